"""What every client connection shares: the router, the backend pools, the settings, and the set of
live connections that shutdown, drain and connection limits act on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from mcpbalancer.config import LimitsConfig, TimeoutsConfig
from mcpbalancer.dataplane.client import ClientConnection, ServicePlaneLike
from mcpbalancer.dataplane.exchange import Exchange
from mcpbalancer.dataplane.head import capture
from mcpbalancer.dataplane.local import LocalHandler
from mcpbalancer.dataplane.services import ServiceMap
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.errors import NoBackendAvailable, render_error
from mcpbalancer.filters.phases import NO_PHASES, Phases
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.routing.router import Router

log = logging.getLogger(__name__)

CONNECTION_WARNING_INTERVAL = 10.0  # seconds between log lines about refused connections


class DataPlane:
    """What every connection shares: the router, the pools, the settings, the filters (`phases`,
    composed by app.py), the live connections."""

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
        local: Mapping[bytes, LocalHandler] | None = None,
        phases: Phases = NO_PHASES,
    ) -> None:
        self.router = router
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.phases = phases
        self.local = local or {}  # paths the proxy answers itself (/healthz, /readyz, /metrics)
        self.pools = pools
        self.heartbeat = heartbeat
        self.timeouts = timeouts
        self.limits = limits
        self.loop = loop
        self.capture = capture(router.reads_names or phases.reads_names)
        self.connections: set[ClientConnection] = set()
        self.handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes under way (handshake.py)
        self.refused_connections = 0  # since the last log line about them
        self._refusal_logged_at = float("-inf")
        self.accepting = True
        self._none_open = asyncio.Event()
        self._none_open.set()
        # With `services`: which one a request is for (client.py asks it per request head). None
        # without them: every request is the default service's, and nothing is matched.
        self.services: ServiceMap[ServicePlaneLike] | None = None

    def configure(
        self,
        *,
        heartbeat: float,
        timeouts: TimeoutsConfig,
        limits: LimitsConfig,
        phases: Phases,
    ) -> None:
        """A reload: every request from now on reads the new settings and filters (a connection's
        header limits are taken when it opens); routing may now need Mcp-Name captured, or not."""
        self.heartbeat, self.timeouts, self.limits = heartbeat, timeouts, limits
        self.phases = phases
        self.capture = capture(self.router.reads_names or phases.reads_names)
        if self.services is not None:
            self._recapture()

    def serve(self, services: ServiceMap[ServicePlaneLike] | None) -> None:
        """The services requests are matched to from now on (None: the default one only)."""
        self.services = services
        self.capture = capture(self.router.reads_names or self.phases.reads_names)
        if services is not None:
            self._recapture()

    def _recapture(self) -> None:
        assert self.services is not None
        views = [route.target for route in self.services.routes]
        names = any(v.router.reads_names or v.phases.reads_names for v in views)
        self.capture = capture(names or self.router.reads_names or self.phases.reads_names)

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
        for task in list(self.handshakes):
            task.cancel()
        for conn in list(self.connections):
            _cut(conn, "shutdown")

    def busy(self) -> bool:
        """Some exchange is still working, other than a standalone GET stream (which has no end)."""
        return any(not _standalone_stream(ex) for conn in self.connections for ex in conn.exchanges)

    def abort_streams(self, backend: Backend) -> None:
        """Cut the standalone GET streams relayed from `backend` (its sessions were ended or move):
        they never end by themselves. Requests in flight (a tool call's streamed answer too) run to
        their end: the backend still serves them, and cutting one would lose its result."""
        for conn in list(self.connections):
            if any(ex.backend is backend and _standalone_stream(ex) for ex in conn.exchanges):
                _cut(conn, "aborted")


class ServicePlane:
    """What the exchanges of one service read as their plane: the service's router, pools, filters
    and stream settings; the rest is the data plane's. Made anew at every reload (app.py)."""

    def __init__(
        self,
        name: str,
        plane: DataPlane,
        router: Router,
        pools: dict[str, UpstreamPool],
        phases: Phases,
        *,
        heartbeat: float,
        timeouts: TimeoutsConfig,
    ) -> None:
        self.name = name
        self.router, self.pools, self.phases = router, pools, phases
        self.heartbeat, self.timeouts = heartbeat, timeouts
        self.metrics = plane.metrics
        self.local = plane.local
        self.loop = plane.loop
        self.limits = plane.limits


def _cut(conn: ClientConnection, outcome: str) -> None:
    """Close `conn` from the proxy's side: its exchanges end with `outcome`, not as a disconnect."""
    for exchange in conn.exchanges:
        exchange.cut_by = outcome
    conn.abort()


def _standalone_stream(exchange: Exchange) -> bool:
    return exchange.head.method == b"GET" and exchange.streaming


_TOO_MANY_CONNECTIONS = render_error(NoBackendAvailable("Too many connections"), keep_alive=False)
