"""The event-stream relay: what an exchange adds while it relays an SSE response.

Made only for a response that is an event stream (the exchange keeps None otherwise), so a JSON
answer carries none of this. It finds the event boundaries as the body passes (a heartbeat is
written only between events), and runs one timer per stream for the heartbeat and the idle
limit, re-armed rather than reset per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from mcpbalancer.config import TimeoutsConfig
from mcpbalancer.dataplane.framing import chunk
from mcpbalancer.dataplane.upstream import UpstreamConnection
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol.sse import PING, START_TAIL, EventBoundary

log = logging.getLogger(__name__)


class _Plane(Protocol):
    loop: asyncio.AbstractEventLoop
    timeouts: TimeoutsConfig
    metrics: Metrics


class _Client(Protocol):
    def write(self, data: bytes) -> None: ...
    def rest_timer(self) -> None: ...


class StreamOwner(Protocol):
    """What the stream relay reads of its exchange (state.py's ExchangeState), which makes it."""

    done: bool
    backend: Backend | None
    upstream: UpstreamConnection | None
    _beat: float  # the heartbeat interval of this response; 0 when none may be injected
    _held: list[bytes] | None  # the answer is held while a binding is stored: no heartbeat
    _chunked_out: bool

    @property
    def plane(self) -> _Plane: ...
    @property
    def client(self) -> _Client: ...

    def _upstream_failed(self, kind: str) -> None: ...
    def _abort_client(self) -> None: ...


class StreamRelay(EventBoundary):
    """The stream's event boundaries (it is the EventBoundary, one object per stream) and its
    timer."""

    __slots__ = ("_exchange", "last_upstream", "last_write", "started_at", "timer")

    def __init__(self, exchange: StreamOwner) -> None:
        # EventBoundary's own start, written here rather than by a call to its __init__.
        self._tail, self.last = START_TAIL, b""
        self._exchange = exchange
        self.started_at = time.perf_counter()
        # When the client was last written to and the backend last sent: kept only while the
        # timer runs (arm starts them), so a stream that ends in its first read never asks.
        self.last_write = self.last_upstream = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start the heartbeat and idle timer (after the upstream read the stream began in). The
        exchange cancels it when it ends."""
        exchange = self._exchange
        if not exchange.done and self.timer is None:
            if exchange.upstream is not None:
                # The head came: its deadline's timer would linger until it fired, in every idle
                # stream (some 500 bytes each). A stream outlives it; a cancel here is worth it.
                exchange.upstream.stop_timer()
            exchange.client.rest_timer()  # the same for the client's head timer, when nothing is due
            loop = exchange.plane.loop
            self.last_write = self.last_upstream = loop.time()
            self.timer = loop.call_later(self._interval(), self._tick)

    def _interval(self) -> float:
        exchange = self._exchange
        beat, idle = exchange._beat, exchange.plane.timeouts.stream_idle
        return min(beat, idle) if beat > 0 and idle > 0 else max(beat, idle)

    def _tick(self) -> None:
        """Heartbeat and idle check."""
        self.timer = None
        exchange = self._exchange
        if exchange.done:
            return
        plane = exchange.plane
        now = plane.loop.time()
        idle = plane.timeouts.stream_idle
        if idle > 0 and now - self.last_upstream >= idle:
            name = exchange.backend.name if exchange.backend else "?"
            log.info("backend %s: stream idle for %ss; closing", name, idle)
            exchange._upstream_failed("timeout")
            exchange._abort_client()
            return
        due = [self.last_upstream + idle] if idle > 0 else []
        beat = exchange._beat
        if beat > 0 and now - self.last_write >= beat:
            if exchange._held is None and self.at_boundary:
                exchange.client.write(chunk(PING) if exchange._chunked_out else PING)
                plane.metrics.heartbeats.value += 1
                self.last_write = now
            # Mid-event, nothing can be sent until more data comes, and data moves last_write:
            # look again an interval from now rather than polling.
            due.append(now + beat)
        elif beat > 0:
            due.append(self.last_write + beat)
        if due:
            self.timer = plane.loop.call_later(max(min(due) - now, 0.05), self._tick)
