"""What every client connection shares: the router, the backend pools, the settings, and the set of
live connections that shutdown, drain and connection limits act on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry

from mcpbalancer.config import LimitsConfig, TimeoutsConfig
from mcpbalancer.dataplane.client import ClientConnection
from mcpbalancer.dataplane.exchange import Exchange
from mcpbalancer.dataplane.head import capture
from mcpbalancer.dataplane.local import LocalHandler
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.errors import NoBackendAvailable, render_error
from mcpbalancer.filters.access import AccessPhases
from mcpbalancer.filters.hosts import HostPolicy
from mcpbalancer.filters.origin import OriginPolicy
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.logs import AccessLog
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.routing.router import Router

log = logging.getLogger(__name__)

CONNECTION_WARNING_INTERVAL = 10.0  # seconds between log lines about refused connections


class DataPlane:
    """What every connection shares: the router, the pools, the settings, the live connections."""

    def __init__(
        self,
        router: Router,
        pools: dict[str, UpstreamPool],
        *,
        heartbeat: float,
        timeouts: TimeoutsConfig,
        limits: LimitsConfig,
        loop: asyncio.AbstractEventLoop,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        local: Mapping[bytes, LocalHandler] | None = None,
        allowed_origins: Iterable[str] = (),
        hosts: HostPolicy | None = None,
        access: AccessPhases | None = None,
    ) -> None:
        self.router = router
        self.access = access  # who may call what, how often, how many at once; None: nobody asked
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.access_log = access_log
        self.local = local or {}  # paths the proxy answers itself (/healthz, /readyz, /metrics)
        self.pools = pools
        self.heartbeat = heartbeat
        self.timeouts = timeouts
        self.limits = limits
        self.loop = loop
        self.capture = capture(router.reads_names or (access is not None and access.reads_names))
        # The Host allow list; None when every Host is allowed (no check at all).
        self.hosts = None if hosts is None or hosts.any else hosts
        self.origins = OriginPolicy(allowed_origins, hosts)
        self.connections: set[ClientConnection] = set()
        self.refused_connections = 0  # since the last log line about them
        self._refusal_logged_at = float("-inf")
        self.accepting = True
        self._none_open = asyncio.Event()
        self._none_open.set()
        # Passive health: (backend name, refused|reset|timeout|5xx), set by the composition root.
        self.on_backend_failure: Callable[[str, str], None] = _ignore_failure

    def configure(
        self,
        *,
        heartbeat: float,
        timeouts: TimeoutsConfig,
        limits: LimitsConfig,
        allowed_origins: Iterable[str],
        hosts: HostPolicy | None = None,
        access: AccessPhases | None = None,
    ) -> None:
        """A reload: every request from now on reads the new settings (a connection's header
        limits are taken when it opens); routing may now need Mcp-Name captured, or not."""
        self.heartbeat, self.timeouts, self.limits = heartbeat, timeouts, limits
        self.hosts = None if hosts is None or hosts.any else hosts
        self.origins = OriginPolicy(allowed_origins, hosts)
        self.access = access
        self.capture = capture(self.router.reads_names or (access is not None and access.reads_names))

    def opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self._none_open.clear()

    def refuse_connection(self) -> bytes:
        """Count (and now and then log) a connection over `limits.connections`; the answer to it."""
        self.metrics.rejected("connections")
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= CONNECTION_WARNING_INTERVAL:
            log.warning(
                "connection limit (%d) reached: refused %d connections",
                self.limits.connections,
                self.refused_connections,
            )
            self._refusal_logged_at, self.refused_connections = now, 0
        return _TOO_MANY_CONNECTIONS

    def closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._none_open.set()

    async def wait_closed(self) -> None:
        await self._none_open.wait()

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    def close_idle(self) -> None:
        """Shutdown, step one: close idle connections, and the busy ones after their exchange."""
        self.accepting = False
        for conn in list(self.connections):
            conn.close_when_idle()

    def abort_all(self) -> None:
        """Shutdown, last step: cut what is left; its access lines say `shutdown`."""
        for conn in list(self.connections):
            _cut(conn, "shutdown")

    def busy(self) -> bool:
        """Some exchange is still working, other than a standalone GET stream (which has no end)."""
        return any(not _standalone_stream(ex) for conn in self.connections for ex in conn.exchanges)

    def abort_streams(self, backend: Backend) -> None:
        """Cut the event streams relayed from `backend` (its sessions were ended)."""
        for conn in list(self.connections):
            if any(ex.backend is backend and ex.streaming for ex in conn.exchanges):
                _cut(conn, "aborted")


def _ignore_failure(backend: str, kind: str) -> None:
    pass


def _cut(conn: ClientConnection, outcome: str) -> None:
    """Close `conn` from the proxy's side: its exchanges end with `outcome`, not as a disconnect."""
    for exchange in conn.exchanges:
        exchange.cut_by = outcome
    conn.abort()


def _standalone_stream(exchange: Exchange) -> bool:
    return exchange.head.method == b"GET" and exchange.streaming


_TOO_MANY_CONNECTIONS = render_error(NoBackendAvailable("Too many connections"), keep_alive=False)
