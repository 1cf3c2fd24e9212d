"""Composition root: builds the store, backends, balancer, router and data plane from a Config.

Nothing else in the package constructs these parts; tests build a Proxy from a Config and run it
in their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import TextIO

from prometheus_client import CollectorRegistry

from mcpbalancer.backends import Backend, BackendSet
from mcpbalancer.balancer import make_strategy
from mcpbalancer.binding import SessionBinder
from mcpbalancer.config import Config
from mcpbalancer.control.probes import Readiness, local_endpoints
from mcpbalancer.control.server import ControlServer
from mcpbalancer.dataplane.client import DataPlane
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.logs import AccessLog, access_enabled
from mcpbalancer.metrics import Metrics
from mcpbalancer.routing import Router
from mcpbalancer.store import SessionStore
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.factory import create_store

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 30.0


def build_backends(config: Config) -> BackendSet:
    return BackendSet(
        Backend(
            name=b.name,
            host=b.host,
            port=b.port,
            weight=b.weight,
            tls=b.scheme == "https",
            path_prefix=b.path_prefix.encode("ascii"),
        )
        for b in config.backends
    )


class Proxy:
    """One running mcpbalancer: `await start()`, serve, `await stop()`."""

    def __init__(
        self,
        config: Config,
        *,
        shutdown_timeout: float = 5.0,
        registry: CollectorRegistry | None = None,
        access_stream: TextIO | None = None,
    ) -> None:
        self.config = config
        self.shutdown_timeout = shutdown_timeout
        self.backends = build_backends(config)
        self.metrics = Metrics(registry or CollectorRegistry(), lambda: self.router.backends, runtime=True)
        self.store: SessionStore = create_store(
            config.store,
            prefix=config.store_prefix,
            cache_size=config.local_cache_size,
            on_expire=lambda sid, owner: self.router.session_expired(sid, owner),
            session_ttl=config.session_ttl,
            metrics=self.metrics,
        )
        binder = None
        if config.bind_sessions is not None:
            key = config.session_binding_key
            binder = SessionBinder(config.bind_sessions, key.encode() if key is not None else None)
        self.router = Router(
            self.backends,
            make_strategy(config.balance),
            self.store,
            config.session_ttl,
            self.metrics,
            binder=binder,
            refuse_new=self._store_down if config.on_store_error == "fail" else None,
        )
        self._observability(config, access_stream)
        self._server: asyncio.Server | None = None
        self._plane: DataPlane | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def _observability(self, config: Config, access_stream: TextIO | None) -> None:
        self.readiness = Readiness(lambda: self.router.backends, self.store.ping)
        self.access_log = (
            AccessLog(access_stream or sys.stdout, fmt=config.log.format)
            if access_enabled(config.log)
            else None
        )
        metrics = self.metrics if config.metrics.enabled else None
        # /metrics is served on the admin listener when there is one, else on the public one.
        self.control = (
            None
            if config.admin is None
            else ControlServer(*config.admin, self.readiness, metrics, config.metrics.path)
        )
        public_metrics = config.metrics.path if metrics is not None and self.control is None else None
        self._local = local_endpoints(self.readiness, self.metrics, public_metrics)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        sock: socket.socket = self._server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        pools = {b.name: UpstreamPool(b, connect_timeout=self.config.timeouts.connect) for b in self.backends}
        self._plane = DataPlane(
            self.router,
            pools,
            heartbeat=self.config.heartbeat,
            timeouts=self.config.timeouts,
            limits=self.config.limits,
            loop=loop,
            metrics=self.metrics,
            access_log=self.access_log,
            local=self._local,
            allowed_origins=self.config.allowed_origins,
        )
        self._server = await loop.create_server(
            self._plane.protocol_factory,
            self.config.listen_host,
            self.config.listen_port,
            reuse_address=True,
            backlog=1024,
        )
        if self.control is not None:
            await self.control.start()
        if hasattr(self.store, "sweep"):
            self._sweeper = loop.create_task(self._sweep_forever())
        if isinstance(self.store, CachedStore):
            self._watcher = loop.create_task(self.store.watch())
        log.info("listening on %s with %d backends", self.url, len(self.backends))

    def _store_down(self) -> bool:
        return isinstance(self.store, CachedStore) and self.store.degraded

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.store.sweep()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop accepting, let in-flight exchanges finish (bounded), then close everything."""
        if self._server is not None:
            self._server.close()
        plane = self._plane
        if plane is not None:
            plane.close_idle()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_timeout):
                    await plane.wait_closed()
            plane.abort_all()
            for pool in plane.pools.values():
                pool.close()
        for task in (self._sweeper, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.router.close()
        await self.store.close()
        if self.control is not None:
            await self.control.stop()
        if self.access_log is not None:
            self.access_log.close()
        if self._server is not None:
            await self._server.wait_closed()
