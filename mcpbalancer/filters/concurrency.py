"""`backends[].max_in_flight`: how many requests a backend is sent at once, and a bounded wait.

A request routed to a backend with a limit takes one of its slots before it is sent (the
upstream-peer phase) and gives it back when its exchange ends, its answer streamed or not. With
every slot taken it waits in line (first come, first served) for at most the backend's
`queue_timeout`; then it is answered 503 with Retry-After, and nothing reaches the backend. A full
backend is not a failing one: the 503 is counted apart (`backend_queue_timeouts_total`) and never
touches the backend's health.

GET requests (the standalone event stream of a session, its resumption) are counted apart and never
limited: they idle for hours, and a limit shared with calls would let idle streams starve them.
Calls answered by an event stream (progress, then the result) are calls: they hold their slot until
the stream ends.

The wait is a future woken by the release that hands the slot over, and a timer (call_later), not
a task per waiter.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable

from mcpbalancer.errors import BackendBusy
from mcpbalancer.filters.phases import Context
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics


class Ticket:
    """One request's hold on a backend: a slot (or a place in line for one), or an open stream."""

    __slots__ = ("_backend", "_gate", "_stream", "_timer", "ready")

    def __init__(self, gate: ConcurrencyLimits, backend: Backend, stream: bool) -> None:
        self._gate = gate
        self._backend = backend
        self._stream = stream
        self._timer: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[None] | None = None  # set while waiting in line

    def release(self) -> None:
        """The exchange ended (or moved to another backend): give back what it holds, once."""
        gate, self._gate = self._gate, None  # type: ignore[assignment]
        if gate is None:
            return
        if self._stream:
            self._backend.streams -= 1
            return
        if self._timer is not None:
            self._timer.cancel()
        ready = self.ready
        if ready is not None and not ready.done():
            ready.cancel()  # still in line: it leaves the line, and held no slot
            gate.left_line(self._backend)
            return
        gate.free(self._backend)

    def _wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> Awaitable[None]:
        self.ready = loop.create_future()
        self._timer = loop.call_later(timeout, self._expire)
        return self.ready

    def _expire(self) -> None:
        ready = self.ready
        if ready is None or ready.done():
            return
        backend = self._backend
        ready.set_exception(BackendBusy(f"Backend busy: {backend.name} is at max_in_flight", retry_after=1))
        self._gate.timed_out(backend)
        self._gate = None  # type: ignore[assignment]  # it held nothing: nothing to give back


class ConcurrencyLimits:
    """The upstream-peer phase of the backends that have a `max_in_flight`."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._metrics = metrics
        self._loop = loop
        self._lines: dict[Backend, deque[Ticket]] = {}

    def upstream_peer(self, ctx: Context, backend: Backend) -> Ticket | None:
        """A ticket for a request about to be sent to `backend`; its `ready` is set when it must
        wait for a slot first. None for a backend without a limit."""
        if backend.max_in_flight is None:
            return None
        if ctx.head.method == b"GET":
            backend.streams += 1
            return Ticket(self, backend, stream=True)
        ticket = Ticket(self, backend, stream=False)
        if backend.calls < backend.max_in_flight and not self._lines.get(backend):
            backend.calls += 1
            return ticket
        loop = self._loop or asyncio.get_running_loop()
        ticket._wait(loop, backend.queue_timeout)
        self._lines.setdefault(backend, deque()).append(ticket)
        backend.queued += 1
        return ticket

    def free(self, backend: Backend) -> None:
        """A slot was given back: the first in line takes it."""
        backend.calls -= 1
        line = self._lines.get(backend)
        limit = backend.max_in_flight
        while line and (limit is None or backend.calls < limit):
            ticket = line.popleft()
            backend.queued -= 1
            if ticket.ready is not None and not ticket.ready.done():
                backend.calls += 1
                if ticket._timer is not None:
                    ticket._timer.cancel()
                ticket.ready.set_result(None)
        if line is not None and not line:
            del self._lines[backend]

    def left_line(self, backend: Backend) -> None:
        """A ticket in line was released before its turn (its client went away)."""
        self._drop_done(backend)

    def timed_out(self, backend: Backend) -> None:
        # Counted and logged (the 503's log line) by the exchange too; never a health failure.
        self._metrics.queue_timeouts.labels(backend.name).value += 1
        self._drop_done(backend)

    def _drop_done(self, backend: Backend) -> None:
        line = self._lines.get(backend)
        if line is None:
            return
        kept = deque(t for t in line if t.ready is not None and not t.ready.done())
        backend.queued -= len(line) - len(kept)
        if kept:
            self._lines[backend] = kept
        else:
            del self._lines[backend]
