"""Command line: parse arguments, load the config, run the proxy until SIGTERM or SIGINT.

With `workers` > 1 this process becomes the supervisor of that many worker processes, each of them
this same command with a hidden `--worker-index` (supervisor.py), and serves `admin` for all of them
(control/cluster.py). `mcpbalancer admin ...` calls the admin API of a running proxy (control/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from mcpbalancer import __version__
from mcpbalancer.app import Proxy, key_file, restart_only_problem
from mcpbalancer.config import LOG_LEVELS, Config, check_workers, host_port, load_config
from mcpbalancer.config.checks import MIN_SESSION_KEY_BYTES
from mcpbalancer.config.schema import schema_text
from mcpbalancer.control import client, healthcheck
from mcpbalancer.control.cluster import ClusterControl
from mcpbalancer.dataplane.listener_tls import date_problems, listener_tls
from mcpbalancer.dataplane.tls import backend_contexts
from mcpbalancer.errors import BackendStartError, ConfigError, ListenError
from mcpbalancer.observability.logs import configure_logging
from mcpbalancer.process.supervisor import (
    ADMIN_DRAINS_ENV,
    CONTROL_SOCKET_ENV,
    SESSION_TAG_KEY_ENV,
    Supervisor,
    WorkerCommand,
    announce_ready,
    check_listen,
)

log = logging.getLogger("mcpbalancer")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["admin"]:
        return _admin_parser().parse_args(words[1:], argparse.Namespace(command="admin"))
    parser = argparse.ArgumentParser(
        prog="mcpbalancer", description="Session-aware reverse proxy and load balancer for MCP."
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["schema", "keygen", "admin"],
        help="schema: print the JSON Schema of the configuration file and exit; keygen: print a new "
        "random key for `session_keys` and exit; admin: call the admin API of a running proxy "
        "(`mcpbalancer admin --help`)",
    )
    parser.add_argument(
        "--config", "-c", help="YAML configuration file (required, except for `schema` and `keygen`)"
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--healthcheck",
        action="store_true",
        help="exit 0 if the proxy of this configuration answers /healthz (admin listener, else listen)",
    )
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, help="overrides `log.level` of the configuration (default info)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="overrides `workers` of the configuration: N processes sharing the port (needs a Redis store)",
    )
    # Given by the supervisor to the workers it starts; not meant to be typed.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"mcpbalancer {__version__}")
    args = parser.parse_args(words)
    if args.command is None and args.config is None:
        parser.error("the following arguments are required: --config/-c")
    return args


def _admin_parser() -> argparse.ArgumentParser:
    """`mcpbalancer admin COMMAND [NAME]`, the options before or after the command."""
    options = argparse.ArgumentParser(add_help=False)
    where = options.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", help="reach the admin listener of this file, with its token")
    where.add_argument("--url", help=f"reach this admin URL, with the token in {client.TOKEN_ENV}")
    options.add_argument("--json", action="store_true", help="print the server's JSON answer")
    parser = argparse.ArgumentParser(
        prog="mcpbalancer admin",
        parents=[options],
        description="Call the admin API of a running mcpbalancer.",
        epilog="Exit status: 0 done, 1 the server refused or could not be reached, 2 usage.",
    )
    commands = parser.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    # Options after the command too; SUPPRESS keeps an absent one from undoing one given before it.
    after = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    where = after.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", help=argparse.SUPPRESS)
    where.add_argument("--url", help=argparse.SUPPRESS)
    after.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    commands.add_parser(
        "backends", parents=[after], help="the backends: state, sessions, in flight, why down"
    )
    commands.add_parser("services", parents=[after], help="the services: what each matches, its backends")
    for verb, text in (("drain", "no new sessions for NAME"), ("undrain", "undo a drain of NAME")):
        sub = commands.add_parser(verb, parents=[after], help=text)
        sub.add_argument("name", metavar="NAME", help="a backend name")
    commands.add_parser("reload", parents=[after], help="re-read the configuration file (every worker)")
    return parser


def with_log_level(config: Config, level: str | None) -> Config:
    """`--log-level` overrides `log.level` for everything, the access log (info lines) included."""
    if level is None:
        return config
    return dataclasses.replace(config, log=dataclasses.replace(config.log, level=level))


def with_workers(config: Config, workers: int | None) -> Config:
    """`--workers` overrides `workers`; ConfigError when the count does not fit the file."""
    if workers is None:
        return config
    return check_workers(dataclasses.replace(config, workers=workers), key="--workers")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "schema":
        sys.stdout.write(schema_text())
        return 0
    if args.command == "keygen":
        # 32 bytes from the OS's CSPRNG, the AES-256 key size; printed, never stored or logged.
        print(base64.b64encode(secrets.token_bytes(MIN_SESSION_KEY_BYTES)).decode("ascii"))
        return 0
    if args.command == "admin":
        return _admin(args)
    adjust = _overrides(args)
    try:
        config = adjust(load_config(args.config))
    except ConfigError as exc:
        print(f"mcpbalancer: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.healthcheck:
        return _healthcheck(config)
    configure_logging(config.log, worker=args.worker_index)
    if args.check:
        try:
            backend_contexts(config)  # the CA, certificate and key files are read and used
            tls = listener_tls(config)  # and the listeners' (a key must match its certificate)
            key_file(config)  # and the key set of auth.jwks_file
        except ConfigError as exc:
            print(f"mcpbalancer: invalid configuration: {exc}", file=sys.stderr)
            return 2
        errors, warnings = date_problems(tls, config.source)
        for warning in warnings:
            print(f"mcpbalancer: warning: {warning}", file=sys.stderr)
        if errors:
            print(f"mcpbalancer: invalid configuration: {'; '.join(errors)}", file=sys.stderr)
            return 2
        workers = f"{config.workers} worker{'s' if config.workers > 1 else ''}"
        every = [config, *(s.config for s in config.services)]
        count = sum(len(c.backends) for c in every)
        backends = f"{count} backend{'s' if count != 1 else ''}"
        n = sum(len(c.discovery) for c in every)
        if n:  # their backends are known once the proxy looks them up
            backends += f", {n} discovery entr{'ies' if n != 1 else 'y'}"
        if config.services:
            backends += f", {len(config.services)} service{'s' if len(config.services) != 1 else ''}"
        print(f"{config.source}: OK ({backends}, {workers})")
        return 0
    if config.workers > 1 and args.worker_index is None:
        return _supervise(config, args, adjust)
    return _run(
        serve(
            config,
            adjust=adjust,
            ready_fd=args.ready_fd,
            session_tag_key=_tag_key(args),
            worker=args.worker_index,
            control_socket=_from_supervisor(args, CONTROL_SOCKET_ENV),
            admin_drains=_admin_drains(args),
        )
    )


def _admin(args: argparse.Namespace) -> int:
    if args.config is None and args.url is None:
        print("mcpbalancer admin: give --config FILE or --url URL", file=sys.stderr)
        return 2
    try:
        target = client.from_url(args.url) if args.url else client.from_config(load_config(args.config))
    except ConfigError as exc:
        print(f"mcpbalancer admin: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except client.AdminError as exc:
        print(f"mcpbalancer admin: {exc}", file=sys.stderr)
        return 2
    name = getattr(args, "name", None)
    return client.run(target, args.admin_command, name, raw=args.json, out=sys.stdout, err=sys.stderr)


def _healthcheck(config: Config) -> int:
    problem = healthcheck.check(config)
    if problem is not None:
        print(f"mcpbalancer: health check failed: {problem}", file=sys.stderr)
        return 1
    return 0


def _overrides(args: argparse.Namespace) -> Callable[[Config], Config]:
    """What the command line changes in a loaded file: at start-up and on every reload."""

    def adjust(config: Config) -> Config:
        return with_workers(with_log_level(config, args.log_level), args.workers)

    return adjust


def _supervise(config: Config, args: argparse.Namespace, adjust: Callable[[Config], Config]) -> int:
    # One clear error here rather than N workers failing one after the other.
    for listener in config.all_listeners:
        try:
            check_listen(listener.host, listener.port)
        except OSError as exc:
            print(f"mcpbalancer: cannot listen on {listener.address}: {exc}", file=sys.stderr)
            return 1
    supervisor = Supervisor(config, _worker_command(args), adjust=adjust, restart_only=restart_only_problem)
    return _run(_supervised(supervisor))


async def _supervised(supervisor: Supervisor) -> int:
    """The workers, and the admin listener that answers for all of them."""
    admin = supervisor.config.admin
    control = None if admin is None else ClusterControl(supervisor, *admin)
    if control is not None:
        try:
            await control.start()
        except OSError as exc:
            assert admin is not None
            print(f"mcpbalancer: cannot listen on {host_port(*admin)} (admin): {exc}", file=sys.stderr)
            await control.stop()
            return 1
    try:
        return await supervisor.run()
    finally:
        if control is not None:
            await control.stop()


def _from_supervisor(args: argparse.Namespace, name: str) -> str | None:
    """What the supervisor put in a worker's environment; None outside a worker."""
    return os.environ.get(name) or None if args.worker_index is not None else None


def _tag_key(args: argparse.Namespace) -> bytes | None:
    """A worker's access-log session key, from its supervisor; None (random) otherwise."""
    key = _from_supervisor(args, SESSION_TAG_KEY_ENV)
    return bytes.fromhex(key) if key else None


def _admin_drains(args: argparse.Namespace) -> Mapping[str, bool]:
    """The drains (true) and undrains (false) posted to the supervisor's admin API since the last
    reload, for a worker starting after them."""
    raw = _from_supervisor(args, ADMIN_DRAINS_ENV)
    drains = json.loads(raw) if raw else {}
    return {str(name): bool(drained) for name, drained in drains.items()}


def _worker_command(args: argparse.Namespace) -> WorkerCommand:
    """A worker is this command again, in a fresh interpreter: it reads the file itself, as on a
    reload, and gets the same overrides."""

    def command(index: int, ready_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "mcpbalancer", "--config", args.config]
        argv += ["--worker-index", str(index), "--ready-fd", str(ready_fd)]
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        if args.log_level is not None:
            argv += ["--log-level", args.log_level]
        return argv

    return command


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(main)
    return int(uvloop.run(main))


async def serve(
    config: Config,
    *,
    adjust: Callable[[Config], Config] | None = None,
    ready_fd: int | None = None,
    session_tag_key: bytes | None = None,
    worker: int | None = None,
    control_socket: str | None = None,
    admin_drains: Mapping[str, bool] | None = None,
) -> int:
    try:
        proxy = Proxy(
            config,
            adjust=adjust,
            session_tag_key=session_tag_key,
            worker=worker,
            control_socket=control_socket,
        )
    except ConfigError as exc:  # a TLS file named by the config cannot be read or used
        print(f"mcpbalancer: invalid configuration: {exc}", file=sys.stderr)
        return 2
    # Before it serves: the drains posted to the supervisor apply from its first request.
    for name, drained in (admin_drains or {}).items():
        proxy.set_drained(name, drained)
    try:
        await proxy.start()
    except (BackendStartError, ListenError) as exc:
        print(f"mcpbalancer: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, proxy)
    if ready_fd is not None:  # a worker: listening, and its signal handlers are in place
        announce_ready(ready_fd)
    await stop.wait()
    log.info("shutting down")
    await proxy.stop()
    return 0


def _reload(proxy: Proxy) -> None:
    log.info("SIGHUP: reloading %s", proxy.config.source)
    # An invalid file is logged by reload() and the running configuration stays.
    with contextlib.suppress(ConfigError):
        proxy.reload()
