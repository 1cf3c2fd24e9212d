"""Benchmark mcpbalancer against HAProxy and direct-to-backend, on this machine.

    python benchmarks/run.py [--smoke] [--duration S] [--targets direct,haproxy,memory,redis]
                             [--workers N]

Starts three stub backends, Redis, HAProxy (if installed) and mcpbalancer (memory store, then a
Redis store); pins the proxy under test to CPU 0 and everything else to CPU 1 when there are two
cores; measures each target in turn (see scenario.py) and prints markdown tables. With --workers N
the mcpbalancer targets run N worker processes (Redis store only), pinned to CPU 0 and 2..N. Every
process it starts is stopped at the end, also on Ctrl-C or an error. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import report
import uvloop
from loads import Load, WrkLoad, make_load
from procs import LOAD_CPU, Supervisor, command_version, pinning_available, proxy_cpus
from scenario import Plan, Runner, TargetResult, summary
from systems import Stub, Target, start_haproxy, start_mcpbalancer, start_redis, start_stubs

ALL_TARGETS = ("direct", "haproxy", "memory", "redis")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="about 1-2 s per measurement, < 60 s in all")
    parser.add_argument("--duration", type=float, help="seconds per saturation run (default 10; smoke 1)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma-separated subset")
    parser.add_argument("--rounds", type=int, help="rounds of latency + saturation runs (default 3; smoke 1)")
    parser.add_argument("--big-sessions", type=int, help="live sessions for the route-cost test")
    parser.add_argument("--streams", type=int, help="idle GET streams held open (default 1000)")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python load driver even if wrk exists")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="mcpbalancer worker processes (default 1); > 1 needs the Redis store: no `memory` target",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.smoke() if args.smoke else Plan()
    overrides = {
        "duration": args.duration,
        "rounds": args.rounds,
        "big_sessions": args.big_sessions,
        "streams": args.streams,
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def versions() -> dict[str, str]:
    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "uvloop": dist("uvloop"),
        "httptools": dist("httptools"),
        "mcpbalancer": f"{dist('mcpbalancer')}, {git_revision()}",
        "haproxy": command_version(["haproxy", "-v"]),
        "wrk": command_version(["wrk", "-v"]),
        "redis-server": command_version(["redis-server", "--version"]),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
    }


def git_revision() -> str:
    """The commit measured, and whether the working tree had uncommitted changes."""
    if shutil.which("git") is None:
        return "git not installed"
    argv = ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return f"git {out.stdout.strip()}" if out.returncode == 0 else "not a git checkout"


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the `finally` that stops the children runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def measure_all(
    args: argparse.Namespace,
    names: Sequence[str],
    sup: Supervisor,
    workdir: Path,
    plan: Plan,
    load: Load,
    notes: list[str],
) -> list[TargetResult]:
    stubs = start_stubs(sup, 3, plan.stream_interval_ms)
    runner = Runner(plan, load, stubs, sup.pin)
    targets = [
        t for name in names if (t := start_target(name, sup, workdir, stubs, notes, args.workers)) is not None
    ]
    results = []
    for target in targets:
        print(f"== {target.name}: sessions, idle streams, first event", flush=True)
        results.append(await runner.prepare(target))
        _check_alive(targets)
    for n in range(1, plan.rounds + 1):
        print(f"== round {n}/{plan.rounds}: latency at a fixed rate, saturation", flush=True)
        for target, result in zip(targets, results, strict=True):
            await runner.round(target, result)
            _check_alive(targets)
    print("== route cost", flush=True)
    for target, result in zip(targets, results, strict=True):
        if target.is_proxy:
            await runner.route_cost(target, result)
            _check_alive(targets)
    if runner.busy_starts:
        notes.append(f"{runner.busy_starts} timed runs started while other processes were busy.")
    return results


def _check_alive(targets: Sequence[Target]) -> None:
    for target in targets:
        if target.proxy is not None:
            target.proxy.check_alive()


def start_target(
    name: str, sup: Supervisor, workdir: Path, stubs: Sequence[Stub], notes: list[str], workers: int = 1
) -> Target | None:
    if name == "direct":
        return Target("direct", None)
    if name == "haproxy":
        if shutil.which("haproxy") is None:
            notes.append("HAProxy is not installed: no HAProxy column, no ratios against it.")
            return None
        return start_haproxy(sup, workdir, stubs)
    if name == "memory":
        if workers > 1:
            notes.append(f"No mcpb-memory column: {workers} workers need the Redis store.")
            return None
        return start_mcpbalancer(sup, workdir, "mcpb-memory", stubs, "memory")
    if name == "redis":
        if shutil.which("redis-server") is None:
            notes.append("redis-server is not installed: no mcpb-redis column.")
            return None
        port, client = start_redis(sup)
        target = start_mcpbalancer(
            sup, workdir, "mcpb-redis", stubs, f"redis://127.0.0.1:{port}/0", workers=workers
        )
        if workers > 1:
            notes.append(
                f"mcpb-redis runs {workers} worker processes; its CPU and RSS are summed over them "
                "(and the supervisor)."
            )
        target.redis = client
        return target
    raise ValueError(f"unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")


def render(
    results: Sequence[TargetResult], plan: Plan, env: dict[str, str], notes: Sequence[str], argv: str
) -> str:
    lines = [f"command: `{argv}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "### Targets (mcpbalancer vs HAProxy, same run, same stubs, same CPU split)", ""]
    lines += report.checks_table(results)
    lines += ["", "### Absolute numbers", ""]
    lines += report.absolute_table(results, plan)
    vs_direct = report.ratio_vs_direct_table(results)
    if vs_direct:
        lines += ["", "### Throughput against the direct floor", "", *vs_direct]
    if notes:
        lines += ["", *(f"Note: {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def prepare_machine(no_pin: bool, notes: list[str], workers: int = 1) -> bool:
    """Pin this process (the Python drivers) to the load core when possible; raise the fd limit."""
    pin = pinning_available(workers) and not no_pin
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})
        if workers > 1:
            notes.append(f"Proxy pinned to CPUs {proxy_cpus(workers)}; the load side to CPU {LOAD_CPU}.")
    else:
        cores = workers + 1
        notes.append(f"Not pinned (needs taskset and {cores} cores): proxy and load share the CPUs.")
    raise_fd_limit()
    return pin


def run_all(
    args: argparse.Namespace, names: Sequence[str], workdir: Path, pin: bool, notes: list[str]
) -> tuple[list[TargetResult], dict[str, str]]:
    env = versions()
    load = make_load(workdir, pin, prefer_wrk=not args.no_wrk)
    if not isinstance(load, WrkLoad):
        notes.append(f"Saturation load by the Python driver ({load.name}), not wrk: lower absolute req/s.")
    env["load generator"] = load.name
    sup = Supervisor(workdir, pin)
    try:
        with stop_on_sigterm():
            results = uvloop.run(measure_all(args, names, sup, workdir, make_plan(args), load, notes))
    finally:
        sup.stop_all()
    return results, env


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(ALL_TARGETS)):
        print(f"unknown targets {unknown}; known: {', '.join(ALL_TARGETS)}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("--workers must be >= 1", file=sys.stderr)
        return 2
    notes: list[str] = []
    pin = prepare_machine(args.no_pin, notes, args.workers)
    workdir = Path(tempfile.mkdtemp(prefix="mcpbench-"))
    started = time.monotonic()
    try:
        results, env = run_all(args, names, workdir, pin, notes)
    except KeyboardInterrupt:
        print("interrupted; every process it started is stopped", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 130
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nfinished in {time.monotonic() - started:.0f}s\n")
    print(render(results, make_plan(args), env, notes, command.strip()))
    if args.json is not None:
        args.json.write_text(json.dumps([summary(r) for r in results], indent=1))
    if any(r.total_errors for r in results):
        print(f"errors seen: process logs kept in {workdir}", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
