"""The systems under test and what they stand on: stubs, Redis, HAProxy and mcpbalancer.

Each `start_*` goes through the Supervisor, waits until the process is ready by polling (never a
fixed sleep), and returns what the measurements need: a port, and a pid for /proc readings.
"""

from __future__ import annotations

import shutil
import string
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from procs import LOAD_CPU, PROXY_CPU, Child, Supervisor, free_port, free_ports, proxy_cpus

HERE = Path(__file__).resolve().parent
STUB = HERE / "stub_backend.py"
HAPROXY_TEMPLATE = HERE / "haproxy.cfg.tmpl"
# The entry point installed next to the interpreter running the benchmark (the project's venv).
MCPBALANCER = Path(sys.executable).with_name("mcpbalancer")
# Ignored by the Redis round-trip count: the benchmark's own INFO and CONFIG RESETSTAT.
_OWN_COMMANDS = ("cmdstat_info", "cmdstat_config")


@dataclass(frozen=True)
class Stub:
    name: str
    port: int


@dataclass
class Target:
    """One column of the table: where requests go and which process is the proxy."""

    name: str
    port: int | None  # None: direct to the stubs
    proxy: Child | None = None
    redis: redis.Redis | None = None

    @property
    def is_proxy(self) -> bool:
        return self.proxy is not None


def start_stubs(sup: Supervisor, count: int, interval_ms: float) -> list[Stub]:
    stubs = []
    for i in range(1, count + 1):
        name = f"s{i}"
        argv = [sys.executable, str(STUB), "--name", name, "--interval-ms", str(interval_ms)]
        child = sup.start(f"stub-{name}", argv, LOAD_CPU, stdout=subprocess.PIPE)
        stubs.append(Stub(name, child.read_ready_port()))
    return stubs


def start_redis(sup: Supervisor) -> tuple[int, redis.Redis]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = sup.start("redis", argv, LOAD_CPU)
    child.wait_port(port)
    client = redis.Redis(host="127.0.0.1", port=port)
    client.ping()
    return port, client


def redis_commands(client: redis.Redis) -> int:
    """Commands Redis has executed since the last reset, not counting the benchmark's own."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if not k.startswith(_OWN_COMMANDS))


def start_haproxy(sup: Supervisor, workdir: Path, stubs: Sequence[Stub]) -> Target:
    port = free_port()
    servers = "\n".join(f"    server {s.name} 127.0.0.1:{s.port}" for s in stubs)
    config = string.Template(HAPROXY_TEMPLATE.read_text()).substitute(port=port, servers=servers)
    path = workdir / "haproxy.cfg"
    path.write_text(config)
    child = sup.start("haproxy", ["haproxy", "-db", "-f", str(path)], PROXY_CPU)
    child.wait_port(port)
    return Target("haproxy", port, proxy=child)


def mcpbalancer_config(
    port: int, stubs: Sequence[Stub], store: str, quiet: bool = True, admin: int | None = None
) -> str:
    lines = [
        f'listen: "127.0.0.1:{port}"',
        f'store: "{store}"',
        # Above the 100k live sessions of the route-cost test, so no known session misses the cache.
        "local_cache_size: 200000",
    ]
    if admin is not None:  # with workers: worker k answers on admin + k once it serves
        lines.append(f'admin: "127.0.0.1:{admin}"')
    if quiet:
        # No access log, like the HAProxy reference (which has no `log` line).
        lines += ["log:", "  level: warning", "  access: false"]
    lines.append("backends:")
    for s in stubs:
        lines += [f"  - name: {s.name}", f'    url: "http://127.0.0.1:{s.port}"']
    return "\n".join(lines) + "\n"


def start_mcpbalancer(
    sup: Supervisor, workdir: Path, name: str, stubs: Sequence[Stub], store: str, workers: int = 1
) -> Target:
    """mcpbalancer on a free port; with `workers` > 1 (a Redis `store`) a supervisor and that many
    worker processes, pinned to CPU 0 and 2..N, and ready once every worker's admin port answers."""
    port = free_port()
    admin = free_ports(workers) if workers > 1 else None
    path = workdir / f"{name}.yaml"
    path.write_text(mcpbalancer_config(port, stubs, store, admin=admin))
    if not _config_accepted(path):  # a version without the `log` section
        path.write_text(mcpbalancer_config(port, stubs, store, quiet=False, admin=admin))
    argv = [str(MCPBALANCER), "--config", str(path), "--log-level", "warning"]
    if workers > 1:
        argv += ["--workers", str(workers)]
    child = sup.start(
        name, argv, PROXY_CPU if workers == 1 else proxy_cpus(workers), stdout=subprocess.DEVNULL
    )
    child.wait_port(port)
    for k in range(workers if admin is not None else 0):
        child.wait_port(admin + k)
    return Target(name, port, proxy=child)


def _config_accepted(path: Path) -> bool:
    argv = [str(MCPBALANCER), "--config", str(path), "--check"]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0
