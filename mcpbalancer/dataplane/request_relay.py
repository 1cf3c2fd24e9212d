"""The request relay: from a routing decision to the request's bytes at the backend.

It takes a connection from the backend's pool or opens one, sends the head (with the
upstream_request filters' edits) and the body that came before the connection, then the rest of
the body as it arrives. A connect failure moves a new session or a stateless request to another
backend; a request sent on a keep-alive connection the backend had just closed is sent again,
once, on a fresh one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from mcpbalancer.dataplane.framing import CONTINUE, LAST_CHUNK, chunk, request_head
from mcpbalancer.dataplane.state import REPLAY_LIMIT, ExchangeState
from mcpbalancer.dataplane.tls import tls_problem
from mcpbalancer.dataplane.upstream import UpstreamConnection
from mcpbalancer.errors import BadGateway, GatewayTimeout, NoBackendAvailable, ProxyError
from mcpbalancer.filters.phases import Context, Ticket
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.tracing import SCAN_LIMIT
from mcpbalancer.routing.failover import BODY_LIMIT as INITIALIZE_LIMIT

log = logging.getLogger(__name__)


class RequestRelay(ExchangeState):
    __slots__ = ()

    # -- the body, fed by the client connection ---------------------------------------------------

    def request_body(self, data: bytes) -> None:
        if self.done or self._preset is not None or self._preset_raw is not None:
            return  # answered, or to be answered without forwarding: the body is dropped
        self._body_bytes += len(data)
        if self._body_bytes > self.plane.limits.body_bytes:
            self._too_large()
            return
        trace = self.trace
        if trace is not None and trace.wants_body:  # its first chunk, for the span's method and tool
            trace.body, trace.wants_body = data[:SCAN_LIMIT], False
        if self._capture is not None:
            if self._body_bytes > INITIALIZE_LIMIT:
                self._capture = None
            else:
                self._capture.append(data)
        if self._resend is not None:
            if self._body_bytes > REPLAY_LIMIT:
                self._resend = None  # too large to keep: a 404 is passed on
            else:
                self._resend.append(data)
        if self.upstream is None:
            self._body.append(data)
            if self._body_bytes > REPLAY_LIMIT:
                if not self._awaiting_body:
                    self.client.pause_reading()
                elif self._body_limit and self._body_bytes > self._body_limit:
                    self._too_large()  # a request_body filter reads no more than this
            return
        self._send(chunk(data) if self.head.chunked else data)

    # -- connecting -------------------------------------------------------------------------------

    def _await(self, awaitable: Awaitable[Backend], decision: str) -> None:
        """Route once `awaitable` (a store lookup, a replay) has the backend. `decision` names it
        for the span."""

        async def run() -> None:
            trace = self.trace
            started = time.perf_counter() if trace is not None else 0.0
            try:
                backend = await awaitable
            except ProxyError as err:
                self._answer_error(err)
                return
            finally:
                if trace is not None:
                    trace.decision, trace.store_seconds = decision, time.perf_counter() - started
            if not self.done:
                self._use(backend)

        self._task = self.plane.loop.create_task(run())

    def _use(self, backend: Backend) -> None:
        if self.done:
            return
        if self.backend is None:
            backend.in_flight += 1
        elif self.backend is not backend:
            self.backend.in_flight -= 1
            backend.in_flight += 1
        self.backend = backend
        peer = self.plane.phases.upstream_peer
        if peer is not None and self._held_for is not backend and self._hold(peer, backend):
            return  # in line for room on it: _use(backend) again once there is
        if self.head.expect_continue and not self.request_complete and not self._started:
            self.client.write(CONTINUE)
            self.head.expect_continue = False
        conn = self.plane.pools[backend.name].take()
        if conn is not None:
            self._attach(conn)
        else:
            self._connect(backend)

    def _hold(self, peer: Callable[[Context, Backend], Ticket | None], backend: Backend) -> bool:
        """The upstream_peer filter's ticket for `backend` (the one for a backend tried before is
        given back); True while it must wait for room, 503 if none comes in time."""
        if self._ticket is not None:
            self._ticket.release()
        self._held_for = backend
        ticket = self._ticket = peer(self, backend)
        if ticket is None or ticket.ready is None:
            return False
        self._then(ticket.ready, lambda: self._use(backend))
        return True

    def _connect(self, backend: Backend, then: Callable[[UpstreamConnection], None] | None = None) -> None:
        """Open a new connection to `backend` in a Task, then `then(conn)` (default: attach)."""

        async def run() -> None:
            try:
                conn = await self.plane.pools[backend.name].connect()
            except (OSError, TimeoutError) as exc:
                if not self.done:
                    self._connect_failed(backend, exc)
                return
            if self.done:
                conn.close()
            else:
                (then or self._attach)(conn)

        self._task = self.plane.loop.create_task(run())

    def _connect_failed(self, backend: Backend, exc: OSError | TimeoutError) -> None:
        assert self.facts is not None
        problem = tls_problem(exc, handshake=True)
        if problem is not None:
            self._tls_failed(backend, problem, connecting=True)
            return
        timed_out = isinstance(exc, TimeoutError)
        log.warning(
            "backend %s: connect failed: %s", backend.name, exc or type(exc).__name__, extra=self.log_fields()
        )
        self.plane.metrics.upstream_error(backend.name, "timeout" if timed_out else "connect")
        fault = self.plane.phases.fail_to_connect
        if fault is not None:
            fault(backend.name, "timeout" if timed_out else "refused")
        self._tried += (backend.name,)
        if self.facts.session_id is not None:
            failover = self.plane.router.failover
            if timed_out:
                # A backend slow to accept is not gone: keep its sessions.
                self._answer_error(GatewayTimeout("Backend connect timeout"))
            elif failover is not None and failover.can_replay(self.facts.session_id):
                self._await(failover.replay(self.plane.router, self.facts, backend), "replay")
            else:
                self._answer_error(self.plane.router.owner_gone(self.facts, backend))
            return
        # Nothing reached the backend: a new session or a stateless request may try another.
        try:
            other = self.plane.router.pick(self.facts, self._tried)
        except NoBackendAvailable:
            self._answer_error(BadGateway("No backend reachable"))
            return
        self._use(other)

    def _tls_failed(self, backend: Backend, problem: str, *, connecting: bool) -> None:
        """TLS with the backend failed (its certificate refused, or it refused ours): a 502, for a
        session too. The backend is not gone, and nothing is ever sent to it without TLS."""
        log.warning("backend %s: TLS failed: %s", backend.name, problem, extra=self.log_fields())
        self.plane.metrics.upstream_error(backend.name, "tls")
        phases = self.plane.phases
        fault = phases.fail_to_connect if connecting else phases.error_while_proxy
        if fault is not None:
            fault(backend.name, "tls")
        self._answer_error(BadGateway("Backend TLS handshake failed"))

    def _attach(self, conn: UpstreamConnection) -> None:
        # Once a request: _connect_upstream and the head's making are written out here.
        self.upstream = conn
        self._reused = conn.reused
        plane, client, head = self.plane, self.client, self.head
        conn.attach(self)
        conn.expect_head(plane.loop, plane.timeouts.response_headers)
        if client.write_paused:
            conn.pause_reading()  # the client is still backed up from an earlier response
        backend, facts = self.backend, self.facts
        assert backend is not None and facts is not None
        edit = plane.phases.upstream_request
        edits = self._edits = edit(facts) if edit is not None else None
        target = backend.target(head.target) if backend.endpoint else head.target
        sent = request_head(head, target, backend.host_header, client.peer_ip, edits)
        if self._body or head.chunked:
            self._flush_pending(sent)
        else:  # the usual case: the body (if any) has not been read yet, and follows as it comes
            self._send(sent)
            client.resume_reading()

    def _connect_upstream(self, conn: UpstreamConnection) -> None:
        conn.attach(self)
        conn.expect_head(self.plane.loop, self.plane.timeouts.response_headers)
        if self.client.write_paused:
            conn.pause_reading()  # the client is still backed up from an earlier response

    # -- sending ----------------------------------------------------------------------------------

    def _flush_pending(self, head: bytes = b"") -> None:
        """Send `head` and the body that arrived while no backend connection existed, in one write."""
        parts = [head] if head else []
        parts += map(chunk, self._body) if self.head.chunked else self._body
        self._body = []
        if self.request_complete and self.head.chunked and not self._terminated:
            parts.append(LAST_CHUNK)
            self._terminated = True
        if parts:
            self._send(b"".join(parts))
        self.client.resume_reading()

    def _send(self, data: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > REPLAY_LIMIT:
                self._replay = None
            else:
                replay.append(data)
        if self.upstream is None:
            return
        if self.client.reading:
            if not self._out:
                self.client.held_upstream.append(self)
            self._out.append(data)
        else:
            self.upstream.write(data)

    def flush_upstream(self) -> None:
        """The client read that produced these backend writes is over: send them as one."""
        out, self._out = self._out, []
        if out and self.upstream is not None and not self.done:
            self.upstream.write(out[0] if len(out) == 1 else b"".join(out))

    def _retry_fresh(self) -> None:
        """The idle keep-alive connection was stale: send the same bytes on a new one, once."""
        self._retried = True
        replay = self._replay or []
        assert self.backend is not None

        def resend(conn: UpstreamConnection) -> None:
            self.upstream = conn
            self._connect_upstream(conn)
            conn.write(b"".join(replay))
            self._flush_pending()

        self._connect(self.backend, resend)

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading()
        else:
            self.client.pause_reading()
