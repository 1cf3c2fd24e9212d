"""Command line: parse arguments, load the config, run the proxy until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from mcpbalancer import __version__
from mcpbalancer.app import Proxy
from mcpbalancer.config import LOG_LEVELS, Config, load_config
from mcpbalancer.errors import BackendStartError, ConfigError
from mcpbalancer.logs import configure_logging

log = logging.getLogger("mcpbalancer")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mcpbalancer", description="Session-aware reverse proxy and load balancer for MCP."
    )
    parser.add_argument("--config", "-c", required=True, help="YAML configuration file")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, help="overrides `log.level` of the configuration (default info)"
    )
    parser.add_argument("--version", action="version", version=f"mcpbalancer {__version__}")
    return parser.parse_args(argv)


def with_log_level(config: Config, level: str | None) -> Config:
    """`--log-level` overrides `log.level` for everything, the access log (info lines) included."""
    if level is None:
        return config
    return dataclasses.replace(config, log=dataclasses.replace(config.log, level=level))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mcpbalancer: invalid configuration: {exc}", file=sys.stderr)
        return 2
    config = with_log_level(config, args.log_level)
    configure_logging(config.log)
    if args.check:
        print(f"{config.source}: OK ({len(config.backends)} backends)")
        return 0
    try:
        return _run(serve(config))
    except OSError as exc:
        print(
            f"mcpbalancer: cannot listen on {config.listen_host}:{config.listen_port}: {exc}", file=sys.stderr
        )
        return 1


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        return asyncio.run(main)
    return int(uvloop.run(main))


async def serve(config: Config) -> int:
    proxy = Proxy(config)
    try:
        await proxy.start()
    except BackendStartError as exc:
        print(f"mcpbalancer: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, proxy)
    await stop.wait()
    log.info("shutting down")
    await proxy.stop()
    return 0


def _reload(proxy: Proxy) -> None:
    log.info("SIGHUP: reloading %s", proxy.config.source)
    # An invalid file is logged by reload() and the running configuration stays.
    with contextlib.suppress(ConfigError):
        proxy.reload()
