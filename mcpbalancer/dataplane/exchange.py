"""One request/response exchange: routes it, relays it to a backend, relays the answer back.

The exchange sits between a ClientConnection (which parsed the request head and feeds the body)
and an UpstreamConnection (which parses the backend's answer). Everything is callbacks; a Task is
made only where something must be awaited: a store lookup for a session not in the local cache, a
new backend connection, or a session binding written to a shared store before the client may see
the id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from mcpbalancer import protocol
from mcpbalancer.config import LimitsConfig, TimeoutsConfig
from mcpbalancer.dataplane.framing import (
    CONTINUE,
    LAST_CHUNK,
    chunk,
    content_length,
    filtered,
    request_head,
    scan,
    tokens,
)
from mcpbalancer.dataplane.head import RequestHead
from mcpbalancer.dataplane.local import LocalAnswer, LocalHandler, render_local
from mcpbalancer.dataplane.tls import tls_problem
from mcpbalancer.dataplane.upstream import Output, UpstreamConnection, UpstreamPool
from mcpbalancer.errors import (
    BadGateway,
    GatewayTimeout,
    NoBackendAvailable,
    PayloadTooLarge,
    ProxyError,
    render_error,
)
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.logs import AccessLog
from mcpbalancer.observability.metrics import NO_BACKEND, Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.protocol.sse import PING, EventBoundary
from mcpbalancer.routing.affinity import ResultSniffer
from mcpbalancer.routing.failover import BODY_LIMIT as INITIALIZE_LIMIT
from mcpbalancer.routing.router import RequestFacts, Router, classify

log = logging.getLogger(__name__)

# Request bytes kept until the first response byte, so a request sent on a keep-alive connection the
# backend had just closed can be sent again on a fresh one. Larger requests are not retried.
REPLAY_LIMIT = 64 * 1024


class ClientSide(Output, Protocol):
    """What an exchange needs of its client connection (client.py's ClientConnection), which makes
    the exchange: a protocol, so that the exchange does not import the connection back."""

    peer_ip: bytes
    reading: bool  # inside data_received: backend writes wait in held_upstream until it ends
    held_upstream: list[Exchange]
    write_paused: bool  # the client's transport buffer is full

    def write(self, data: bytes) -> None: ...
    def write_chunk(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def exchange_finished(self, exchange: Exchange) -> None: ...


class ExchangePlane(Protocol):
    """What an exchange reads of what every connection shares (plane.py's DataPlane)."""

    router: Router
    pools: dict[str, UpstreamPool]
    metrics: Metrics
    access_log: AccessLog | None
    local: Mapping[bytes, LocalHandler]  # paths the proxy answers itself
    heartbeat: float
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    loop: asyncio.AbstractEventLoop
    on_backend_failure: Callable[[str, str], None]  # (backend name, refused|reset|timeout|5xx)


class Exchange:
    # Class-level defaults: a new exchange writes only what its request changes (a request makes
    # one Exchange, and forty assignments in __init__ were a measurable part of its cost).
    facts: RequestFacts | None = None
    backend: Backend | None = None
    upstream: UpstreamConnection | None = None
    done = False
    request_complete = False
    _body_bytes = 0
    _replay_bytes = 0
    _retried = False
    _terminated = False  # the last chunk of a chunked request body was sent
    _tried: tuple[str, ...] = ()  # backends that refused a connection for this request
    _started = False  # response head written to the client
    _held: list[bytes] | None = None  # response bytes held while a binding is stored
    _chunked_out = False
    _no_body = False
    _until_close = False
    _reused = False
    _held_complete = False
    _boundary: EventBoundary | None = None
    _last_write = 0.0
    _last_upstream = 0.0
    _timer: asyncio.TimerHandle | None = None
    _task: asyncio.Task[None] | None = None
    _preset: ProxyError | None = None
    _preset_raw: tuple[int, bytes] | None = None  # (status, whole answer): a CORS preflight
    _turn = False  # at the head of the client's queue: may write to the client
    _beat = 0.0  # heartbeat interval of this response; 0 when none may be injected
    # For metrics and the access log.
    status = 0  # the status the client was sent; 0 while none
    sent = 0  # response body bytes relayed
    outcome = "ok"  # or error, aborted, client_disconnect, shutdown, local
    cut_by: str | None = None  # the outcome when the proxy closes the client connection (shutdown)
    created: bytes | None = None  # the session id a 2xx answer to a request without one minted
    _stream_at = 0.0
    _awaiting_body = False  # routing waits for the whole request body (2026-07-28 only)
    _sniffer: ResultSniffer | None = None  # reads a watched response for affinity
    # Replay failover: the body of a legacy request without a session (an initialize, if it
    # binds one), and the backend's own id for this request's session when it was moved.
    _capture: list[bytes] | None = None
    _alias: bytes | None = None
    # With `replay_on: [backend_404]`: a session request's body, to send again once replayed.
    _resend: list[bytes] | None = None
    _resend_bytes = 0

    def __init__(self, plane: ExchangePlane, client: ClientSide, head: RequestHead) -> None:
        self.plane = plane
        self.client = client
        self.head = head
        self.keep_alive = head.keep_alive
        self.received_at = time.perf_counter()
        self._body: list[bytes] = []  # request body received before a backend connection exists
        self._replay: list[bytes] | None = []
        self._out: list[bytes] = []  # backend writes held while the client read is handled
        failover = plane.router.failover
        if failover is not None:
            if head.session_id is None:
                if head.method == b"POST" and protocol.era_of(None, head.protocol_version) is Era.LEGACY:
                    self._capture = []
            elif failover.on_backend_404 and head.method != b"DELETE":
                self._resend = []

    @property
    def streaming(self) -> bool:
        """Relaying an event stream, a response with no end of its own."""
        return self._boundary is not None and not self.done

    # -- lifecycle driven by the client connection ------------------------------------------------

    def fail_before_start(self, err: ProxyError) -> None:
        """Answer `err` instead of forwarding, once this exchange's turn comes."""
        self._preset = err

    def preset_answer(self, status: int, answer: bytes) -> None:
        """Answer with these bytes instead of forwarding, once this exchange's turn comes."""
        self._preset_raw = (status, answer)

    def start(self) -> None:
        """This exchange is at the head of its connection's queue: route it."""
        self._turn = True
        if self._preset is not None:
            self._answer_error(self._preset)
            return
        if self._preset_raw is not None:
            status, answer = self._preset_raw
            if not self.request_complete and self.head.expect_continue:
                self.keep_alive = False  # the client may or may not send the body it announced
            self._record_own_answer(status, "local")
            self.client.write(answer)
            self._finish(reusable=False)
            return
        head = self.head
        local = self.plane.local.get(head.target)
        if local is not None:
            self._serve_local(local)
            return
        try:
            self.facts = facts = classify(
                head.method,
                head.session_id,
                head.protocol_version,
                head.mcp_method,
                head.mcp_name,
                head.headers,
            )
            router = self.plane.router
            if router.binder is not None and facts.era is Era.LEGACY:
                facts.credential = router.binder.value(head.headers)
                facts.tag = router.binder.tag(facts.credential)
        except ProxyError as err:
            self._answer_error(err)
            return
        if head.has_body and self.plane.router.needs_body(facts):
            self._awaiting_body = True
            if head.expect_continue and not self.request_complete:
                self.client.write(CONTINUE)
                head.expect_continue = False
            if self.request_complete:
                self._route_with_body()
            return
        self._route()

    def _route(self) -> None:
        assert self.facts is not None
        try:
            target = self.plane.router.route(self.facts)
        except ProxyError as err:
            self._answer_error(err)
            return
        if isinstance(target, Backend):
            self._use(target)
        else:
            self._await(target)

    def _route_with_body(self) -> None:
        """The whole body is here (bounded by limits.body_bytes): check it, then route."""
        assert self.facts is not None
        self._awaiting_body = False
        try:
            self.plane.router.inspect(self.facts, b"".join(self._body))
        except ProxyError as err:
            self._answer_error(err)
            return
        self._route()

    def request_body(self, data: bytes) -> None:
        if self.done or self._preset is not None or self._preset_raw is not None:
            return  # answered, or to be answered without forwarding: the body is dropped
        self._body_bytes += len(data)
        if self._body_bytes > self.plane.limits.body_bytes:
            self._too_large()
            return
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
            if self._body_bytes > REPLAY_LIMIT and not self._awaiting_body:
                self.client.pause_reading()
            return
        self._send(chunk(data) if self.head.chunked else data)

    def request_done(self) -> None:
        self.request_complete = True
        if self.done:
            return
        if self._awaiting_body:
            self._route_with_body()
            return
        if self.upstream is not None and self.head.chunked:
            self._send(LAST_CHUNK)
            self._terminated = True

    def request_broken(self, err: ProxyError) -> bool:
        """The rest of the request cannot be parsed: answer `err` (in turn) instead, and end the
        upstream request, which would otherwise wait for a body that never comes. False if this
        exchange is over already."""
        if self.done:
            return False
        self.keep_alive = False
        if self._turn:
            self._answer_error(err)
        else:
            self._body = []
            self._preset = err
        return True

    def client_lost(self) -> None:
        """The client went away: closing the upstream request is the cancellation signal."""
        if self.done:
            return
        if self.cut_by is not None:
            self.outcome = self.cut_by
        elif self._boundary is not None and self._held is None and self._boundary.answered():
            # The client had its whole answer and closed the stream before the backend ended it
            # (the mcp SDK closes right after the response event): delivered, not a disconnect.
            self.outcome = "ok"
        else:
            self.plane.metrics.disconnects.value += 1
            self.outcome = "client_disconnect"
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)

    def client_writable(self, writable: bool) -> None:
        if self.upstream is not None:
            if writable:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()

    # -- routing and connecting -------------------------------------------------------------------

    def _await(self, awaitable: Awaitable[Backend]) -> None:
        async def run() -> None:
            try:
                backend = await awaitable
            except ProxyError as err:
                self._answer_error(err)
                return
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
        if self.head.expect_continue and not self.request_complete and not self._started:
            self.client.write(CONTINUE)
            self.head.expect_continue = False
        conn = self.plane.pools[backend.name].take()
        if conn is not None:
            self._attach(conn)
        else:
            self._connect(backend)

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
            self._tls_failed(backend, problem)
            return
        timed_out = isinstance(exc, TimeoutError)
        log.warning("backend %s: connect failed: %s", backend.name, exc or type(exc).__name__)
        self.plane.metrics.upstream_error(backend.name, "timeout" if timed_out else "connect")
        self.plane.on_backend_failure(backend.name, "timeout" if timed_out else "refused")
        self._tried += (backend.name,)
        if self.facts.session_id is not None:
            failover = self.plane.router.failover
            if timed_out:
                # A backend slow to accept is not gone: keep its sessions.
                self._answer_error(GatewayTimeout("Backend connect timeout"))
            elif failover is not None and failover.can_replay(self.facts.session_id):
                self._await(failover.replay(self.plane.router, self.facts, backend))
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

    def _tls_failed(self, backend: Backend, problem: str) -> None:
        """TLS with the backend failed (its certificate refused, or it refused ours): a 502, for a
        session too. The backend is not gone, and nothing is ever sent to it without TLS."""
        log.warning("backend %s: TLS failed: %s", backend.name, problem)
        self.plane.metrics.upstream_error(backend.name, "tls")
        self.plane.on_backend_failure(backend.name, "tls")
        self._answer_error(BadGateway("Backend TLS handshake failed"))

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        self._reused = conn.reused
        self._connect_upstream(conn)
        self._flush_pending(self._request_head())

    def _connect_upstream(self, conn: UpstreamConnection) -> None:
        conn.attach(self)
        conn.expect_head(self.plane.loop, self.plane.timeouts.response_headers)
        if self.client.write_paused:
            conn.pause_reading()  # the client is still backed up from an earlier response

    def _request_head(self) -> bytes:
        backend, facts = self.backend, self.facts
        assert backend is not None and facts is not None
        # The id the backend knows the session by, when it is not the client's: a sealed id's, or
        # the new backend's of a session replay failover moved (routing sets it).
        self._alias = alias = facts.upstream_sid
        target = backend.target(self.head.target) if backend.endpoint else self.head.target
        return request_head(self.head, target, backend.host_header, self.client.peer_ip, alias, facts.moved)

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

    # -- the response, called by the upstream connection -----------------------------------------

    def response_begun(self) -> None:
        # The backend has the request and has started answering: sending it again could run a
        # tool twice, so it is never retried from here on.
        self._replay = None

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._replay = None
        assert self.facts is not None and self.backend is not None
        if status == 404 and self._resend is not None and self._replays_404():
            return
        self.status = status
        elapsed = time.perf_counter() - self.received_at
        head = self.head
        self.plane.metrics.answered(
            self.backend.name, self.facts.era, head.method, status, head.mcp_method, elapsed
        )
        if status >= 500:
            self.plane.on_backend_failure(self.backend.name, "5xx")
        # A backend's own id for the session goes back as the client's (sealed, or moved).
        swap = head.session_id if self._alias is not None else None
        lines, response_sid, content_type, length, coding, length_at, cors_given = scan(headers, swap)
        # Router.learn's rule: a 2xx with an id, to a legacy request without one, made a session.
        if response_sid is not None and head.session_id is None and 200 <= status < 300:
            if self.facts.era is Era.LEGACY and self.plane.router.sealed is not None:
                try:
                    sealed = self.plane.router.seal(self.facts, self.backend, response_sid)
                except ProxyError as err:  # a backend id too long to seal: 502
                    self._answer_error(err)
                    return
                if sealed is not None:  # the client sees the token, never the backend's id
                    if lines is not None:
                        lines = [sealed if part is response_sid else part for part in lines]
                    response_sid = swap = sealed
            self.created = response_sid if self.facts.era is Era.LEGACY else None  # for the access log
        self._no_body = self.head.method == b"HEAD" or status in (204, 304)
        unsized = not self._no_body and (coding is not None or length is None)
        if unsized:
            coding = self._unsized_body(coding)  # and its Content-Length, if any, is not relayed
        if lines is None:  # Connection named more fields to drop: the general, slower pass
            if swap is not None:
                headers = [(n, swap if n.lower() == protocol.SESSION_ID else v) for n, v in headers]
            drop = protocol.HOP_BY_HOP | tokens(headers)
            lines = filtered(headers, drop | {protocol.CONTENT_LENGTH} if unsized else drop)
        elif unsized and length_at:
            del lines[length_at : length_at + 4]
        lines[0] = b"HTTP/1.1 %d %b\r\n" % (status, reason)
        if self._chunked_out:
            lines += (b"Transfer-Encoding: ", coding or b"chunked", b"\r\n")
        if head.cors is not None and not cors_given:
            lines.append(head.cors)
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif not self.head.http11:
            lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told it persists
        lines.append(b"\r\n")
        out = b"".join(lines)
        is_stream = content_type.lstrip().lower().startswith(protocol.EVENT_STREAM)
        if is_stream and not self._no_body:
            self._start_stream()
        if self.facts.watch and 200 <= status < 300 and not self._no_body:
            self._sniffer = ResultSniffer(is_stream, content_length(length) if coding is None else None)
        wait = self.plane.router.learn(self.facts, self.backend, status, response_sid)
        if self._capture is not None and response_sid is not None and 200 <= status < 300:
            failover = self.plane.router.failover
            if failover is not None and self.request_complete and protocol.valid_session_id(response_sid):
                tag = self.facts.tag if self.plane.router.binder is not None else None
                failover.remember(response_sid.decode("ascii"), head.target, b"".join(self._capture), tag)
            self._capture = None
        if wait is None:
            self._started = True
            self.client.write(out)
        else:
            self._held = [out]
            if self.upstream is not None:
                self.upstream.pause_reading()
            self._hold_until(wait)
        if self.head.method == b"HEAD" and self.upstream is not None:
            self.upstream.skip_body()
            self.response_done()

    def _replays_404(self) -> bool:
        """The owner answered 404 for a session the proxy holds (`replay_on: [backend_404]`): it
        forgot it, having restarted at the same address. Replay the session on a live backend (that
        one or another) and send this request again, rather than pass the 404 on. Only a request the
        proxy has whole (its body kept, at most REPLAY_LIMIT): the 404 says the backend ran nothing."""
        facts, resend = self.facts, self._resend
        failover = self.plane.router.failover
        self._resend = None
        if not self.request_complete or resend is None or facts is None or facts.session_id is None:
            return False
        if failover is None or not failover.can_replay(facts.session_id):
            return False
        log.info(
            "backend %s answered 404 for a live session: replaying it",
            self.backend.name if self.backend else "?",
        )
        if self.upstream is not None:
            self.upstream.abort()  # its 404 body is not read: the connection cannot be reused
            self.upstream = None
        self.status = 0
        self._body, self._terminated = resend, False
        self._await(failover.replay(self.plane.router, facts, self.backend, avoid=False))
        return True

    def _learn(self, messages: list[object]) -> None:
        if messages and self.backend is not None:
            for message in messages:
                self.plane.router.learn_result(self.backend, message)

    def _unsized_body(self, coding: bytes | None) -> bytes:
        """Frame a chunked or close-delimited upstream body: chunked to an HTTP/1.1 client, until
        close to an HTTP/1.0 one. Returns the Transfer-Encoding for the client."""
        plain = coding == b"chunked" or (coding is not None and coding.strip().lower() == b"chunked")
        chunked = plain or (coding is not None and coding.rstrip().lower().endswith(b"chunked"))
        self._until_close = not chunked
        self._chunked_out = self.head.http11
        if not self.head.http11:
            self.keep_alive = False
        if coding is None or plain:
            # Heartbeats need room in the framing (a Content-Length leaves none) and a body without
            # a coding of its own (a ping inside gzip would corrupt it).
            self._beat = self.plane.heartbeat
            return b"chunked"
        # Codings before chunked ("gzip, chunked") are still on the body: they keep their label.
        return coding if chunked else coding + b", chunked"

    def _hold_until(self, wait: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await wait
            except ProxyError as err:  # the binding could not be stored, and must be (fail)
                self._held = None
                self._answer_error(err)
                return
            finally:
                held, self._held = self._held, None
                if not self.done and held is not None:
                    self._started = True
                    self.client.write(b"".join(held))
                    if self.upstream is not None and not self.client.write_paused:
                        self.upstream.resume_reading()
                    if self._held_complete:
                        self._complete()

        self._task = self.plane.loop.create_task(run())

    def response_body(self, data: bytes) -> None:
        if self.done or self._no_body:
            return
        self.sent += len(data)
        if self._sniffer is not None:
            self._learn(self._sniffer.feed(data))  # before the client can see it and ask again
        if self._boundary is not None:
            self._boundary.feed(data)
            self._last_write = self._last_upstream = self.plane.loop.time()
        if self._held is not None:
            self._held.append(chunk(data) if self._chunked_out else data)
        elif self._chunked_out:
            self.client.write_chunk(data)
        else:
            self.client.write(data)

    def response_done(self) -> None:
        if self.done:
            return
        if self._sniffer is not None:
            self._learn(self._sniffer.finish())
            self._sniffer = None
        if self._held is not None:
            self._held_complete = True
            return
        self._complete()

    def _complete(self) -> None:
        if self._chunked_out:
            self.client.write(LAST_CHUNK)
        self._finish(reusable=self.request_complete)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        self.upstream = None
        problem = tls_problem(exc, handshake=False)
        if self._until_close and problem is None and (self._started or self._held is not None):
            self.response_done()  # a close-delimited body ends with the connection (not a TLS error)
            return
        if self._started or self._held is not None:
            # Mid-body: the client sees the truncation as a closed connection.
            self._upstream_failed("reset" if problem is None else "tls")
            self._abort_client()
            return
        assert self.backend is not None and self.facts is not None
        if self._replay is not None and not self._retried and self._reused:
            self._retry_fresh()
            return
        if problem is not None:  # a TLS alert after the handshake: a client certificate refused
            self._tls_failed(self.backend, problem)
            return
        log.warning("backend %s closed the connection before answering: %s", self.backend.name, exc)
        self._upstream_failed("reset")
        self.plane.on_backend_failure(self.backend.name, "reset")
        if self.facts.session_id is not None:
            self._answer_error(self.plane.router.owner_gone(self.facts, self.backend))
        else:
            self._answer_error(BadGateway("Backend closed the connection"))

    def upstream_writable(self, writable: bool) -> None:
        if writable:
            self.client.resume_reading()
        else:
            self.client.pause_reading()

    # -- retry, timers, heartbeats -------------------------------------------------------------

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

    def response_timeout(self) -> None:
        if self.done or self._started:
            return
        name = self.backend.name if self.backend else "?"
        log.warning("backend %s: no response head within %ss", name, self.plane.timeouts.response_headers)
        self._upstream_failed("timeout")
        if self.backend is not None:
            self.plane.on_backend_failure(self.backend.name, "timeout")
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._answer_error(GatewayTimeout("Backend response timeout"))

    def _start_stream(self) -> None:
        assert self.backend is not None
        self.plane.metrics.stream_started(self.backend.name)
        self._stream_at = time.perf_counter()
        self._boundary = EventBoundary()
        self._last_write = self._last_upstream = self.plane.loop.time()
        if self.upstream is not None and (self._beat > 0 or self.plane.timeouts.stream_idle > 0):
            # Armed after this upstream read: a streamed answer that ends in the read it began in
            # (the usual POST) never needs the timer.
            self.upstream.after_read = self._arm_tick

    def _arm_tick(self) -> None:
        if not self.done and self._timer is None:
            self._timer = self.plane.loop.call_later(self._tick_interval(), self._tick)

    def _tick_interval(self) -> float:
        beat, idle = self._beat, self.plane.timeouts.stream_idle
        return min(beat, idle) if beat > 0 and idle > 0 else max(beat, idle)

    def _tick(self) -> None:
        """Heartbeat and idle check, one timer per stream, re-armed rather than reset per chunk."""
        self._timer = None
        if self.done or self._boundary is None:
            return
        now = self.plane.loop.time()
        idle = self.plane.timeouts.stream_idle
        if idle > 0 and now - self._last_upstream >= idle:
            name = self.backend.name if self.backend else "?"
            log.info("backend %s: stream idle for %ss; closing", name, idle)
            self._upstream_failed("timeout")
            self._abort_client()
            return
        due = [self._last_upstream + idle] if idle > 0 else []
        beat = self._beat
        if beat > 0 and now - self._last_write >= beat:
            if self._held is None and self._boundary.at_boundary:
                self.client.write(chunk(PING) if self._chunked_out else PING)
                self.plane.metrics.heartbeats.value += 1
                self._last_write = now
            # Mid-event, nothing can be sent until more data comes, and data moves _last_write:
            # look again an interval from now rather than polling.
            due.append(now + beat)
        elif beat > 0:
            due.append(self._last_write + beat)
        if due:
            self._timer = self.plane.loop.call_later(max(min(due) - now, 0.05), self._tick)

    def _upstream_failed(self, kind: str) -> None:
        if self.backend is not None:
            self.plane.metrics.upstream_error(self.backend.name, kind)

    # -- endings -------------------------------------------------------------------------------

    def _too_large(self) -> None:
        self.plane.metrics.rejected("body_limit")
        if not self._turn:
            # Pipelined behind an exchange still being answered: answer in turn, keep no body.
            self._body = []
            self.keep_alive = False
            self._preset = PayloadTooLarge()
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self._started:
            self._abort_client()
        else:
            self._answer_error(PayloadTooLarge())

    def _answer_error(self, err: ProxyError) -> None:
        if self.done:
            return
        if err.reject_reason is not None:  # a refusal found while routing (errors.py)
            self.plane.metrics.rejected(err.reject_reason)
        if self._started or self._held is not None:
            self._abort_client()
            return
        # The rest of the body is read and dropped, unless the client still waits for 100 Continue
        # (it may never send it) or the body is over the limit: then close after answering.
        if not self.request_complete and (self.head.expect_continue or isinstance(err, PayloadTooLarge)):
            self.keep_alive = False
        target = self.head.target[:200].decode("latin-1")
        log.info("%s %s -> %d %s", self.head.method.decode("latin-1"), target, err.status, err)
        self._record_own_answer(err.status, "error")
        head_only = self.head.method == b"HEAD"
        answer = render_error(err, keep_alive=self.keep_alive, head_only=head_only)
        if self.head.cors is not None:  # a browser may read the error only with CORS headers
            end = answer.index(b"\r\n") + 2
            answer = answer[:end] + self.head.cors + answer[end:]
        self.sent = len(answer) - answer.index(b"\r\n\r\n") - 4
        self.client.write(answer)
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)

    def _record_own_answer(self, status: int, outcome: str) -> None:
        self.status, self.outcome = status, outcome
        head, facts = self.head, self.facts
        era = facts.era if facts is not None else protocol.era_of(head.session_id, head.protocol_version)
        backend = self.backend.name if self.backend is not None else NO_BACKEND
        self.plane.metrics.answered(backend, era, head.method, status, head.mcp_method, None)

    def _serve_local(self, handler: LocalHandler) -> None:
        """A path the proxy answers itself (/healthz, /readyz, /metrics): never forwarded."""
        answer = handler(self.head.method)
        if isinstance(answer, LocalAnswer):
            self._write_local(answer)
            return

        async def run() -> None:
            result = await answer
            if not self.done:
                self._write_local(result)

        self._task = self.plane.loop.create_task(run())

    def _write_local(self, answer: LocalAnswer) -> None:
        if not self.request_complete and self.head.expect_continue:
            self.keep_alive = False  # the client may or may not send the body it announced
        self._record_own_answer(answer.status, "local")
        self.sent = len(answer.body)
        head_only = self.head.method == b"HEAD"
        self.client.write(render_local(answer, keep_alive=self.keep_alive, head_only=head_only))
        self._finish(reusable=False)

    def _abort_client(self) -> None:
        self.outcome = "aborted"
        self.keep_alive = False
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)
        self.client.abort()

    def _finish(self, reusable: bool) -> None:
        if self.done:
            return
        self.done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._boundary is not None and self.backend is not None:
            self.plane.metrics.stream_ended(self.backend.name, time.perf_counter() - self._stream_at)
        if self.plane.access_log is not None:
            self.plane.access_log.write(self)
        if self.backend is not None:
            self.backend.in_flight -= 1
        if self.upstream is not None:
            self.upstream.release(reusable)
            self.upstream = None
        self.client.exchange_finished(self)
