"""The client-facing HTTP/1.1 protocol: parse requests with httptools, hand each to an Exchange.

One ClientConnection per accepted socket. Requests are answered in order: pipelined requests wait
in a short queue (reading pauses when it is full) and the head of the queue is the one being
relayed. Header names are lower-cased once, here, and the few headers routing needs are picked out
as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

import httptools

from mcpbalancer import protocol
from mcpbalancer.config import DEFAULT_SERVICE
from mcpbalancer.dataplane.deadline import Deadline
from mcpbalancer.dataplane.exchange import Exchange, ExchangePlane
from mcpbalancer.dataplane.framing import chunk, chunk_size
from mcpbalancer.dataplane.head import Capture, RequestHead
from mcpbalancer.dataplane.services import ServiceMap
from mcpbalancer.dataplane.state import ExchangeState
from mcpbalancer.errors import (
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    NoService,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    render_error,
)
from mcpbalancer.filters.origin import same_host
from mcpbalancer.observability.logs import new_request_id, request_fields
from mcpbalancer.protocol import Era

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 16
# Below this many bytes, response pieces are joined (copied) into one buffer for a send; above it
# they leave as one vectored send (writelines), which copies nothing.
COPY_LIMIT = 16 * 1024
_VERSIONS = frozenset({"1.0", "1.1"})


class ServicePlaneLike(ExchangePlane, Protocol):
    """One service's view of the plane (plane.py's ServicePlane)."""

    name: str


class ConnectionPlane(ExchangePlane, Protocol):
    """What a client connection needs of the data plane (plane.py's DataPlane, which makes the
    connections), besides what it hands on to its exchanges."""

    capture: dict[bytes, Capture]  # the request header fields to pick out as they arrive
    services: ServiceMap[ServicePlaneLike] | None  # `services`: which one a request is for
    connections: set[ClientConnection]
    accepting: bool

    def opened(self, conn: ClientConnection) -> None: ...
    def closed(self, conn: ClientConnection) -> None: ...
    def refuse_connection(self) -> bytes: ...


class ClientConnection(asyncio.Protocol):
    # Set by a TLS listener's acceptor (handshake.py) before connection_made; a plain connection
    # keeps these class defaults and pays nothing for them.
    tls = False
    client_subject: bytes | None = None  # the verified client certificate's subject (RFC 4514)

    def __init__(self, plane: ConnectionPlane) -> None:
        self.plane = plane
        self._capture = plane.capture
        limits = plane.limits
        self._header_bytes, self._header_count = limits.header_bytes, limits.header_count
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = b"unknown"
        # A list, not a deque: it holds PIPELINE_DEPTH exchanges at most, and an empty deque is
        # some 700 bytes more per connection (an idle stream's too).
        self._queue: list[Exchange] = []
        self._parsing: Exchange | None = None
        self._paused = False
        self._corked: list[bytes] | None = None  # writes held while one upstream read is relayed
        self.reading = False  # inside data_received: exchanges hold their backend writes
        self.held_upstream: list[ExchangeState] = []  # exchanges holding backend writes until the read ends
        self._closing = False  # no new requests; close once the queue is empty
        self._lost = False
        self.write_paused = False  # the transport's buffer is full: a new response starts paused
        self._refusal: bytes | None = None  # the answer to a broken byte stream, after the queue
        # One deadline per connection: the head timeout (waiting for a request head to complete) or
        # the keep-alive timeout (idle between requests); none while a request is served.
        self._deadline = Deadline(plane.loop, self._timed_out)
        self._timer_idle = False  # the deadline is the keep-alive one
        self._in_head = False  # a request head has begun and is not complete
        self._head = RequestHead()
        self._head_bytes = 0
        self._upgrade: tuple[RequestHead, str] | None = None  # a head to parse again without Upgrade

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer_ip = str(peer[0]).encode("ascii", "replace")
        plane = self.plane
        if len(plane.connections) >= plane.limits.connections:
            # Accept and close at once: the kernel backlog is not left to fill, nothing is queued.
            self._closing = self._lost = True
            self.transport.write(plane.refuse_connection())
            self.transport.close()
            return
        plane.opened(self)
        if not plane.accepting:
            self._closing = True
            transport.close()
            return
        self._arm(plane.limits.head_timeout, idle=False)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        # What one read produces for a backend (a request head and its body) leaves in one send.
        self.reading = True
        try:
            self._feed(data)
            if self._in_head and self._timer_idle and not self._queue:
                # A head began and did not complete in this read: it is due within head_timeout.
                # (One that completes in the read it began in, the usual case, needs no timer.)
                self._arm(self.plane.limits.head_timeout, idle=False)
        finally:
            self.reading = False
            if self.held_upstream:
                held, self.held_upstream = self.held_upstream, []
                for exchange in held:
                    exchange.flush_upstream()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(memoryview(data)[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc)
        else:
            if self._parsing is None and self._head_bytes > 2 * self.plane.limits.header_bytes:  # _fed()
                self._refuse(HeadersTooLarge(), "header_limit")

    def _fed(self) -> None:
        if self._parsing is None and self._head_bytes > 2 * self.plane.limits.header_bytes:
            self._refuse(HeadersTooLarge(), "header_limit")

    def _upgraded(self, rest: memoryview) -> None:
        """The parser stopped after an upgrade request's head (what follows would be another
        protocol). CONNECT was answered 405: the connection closes. Any other is parsed again
        without its Upgrade fields, on a fresh parser, then its body and what follows, as HTTP."""
        while True:
            upgrade, self._upgrade = self._upgrade, None
            if upgrade is None:
                self._stop_reading()
                return
            self.parser = httptools.HttpRequestParser(self)
            try:
                self.parser.feed_data(without_upgrade(*upgrade))  # a head that cannot upgrade
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
                return
            try:
                self.parser.feed_data(rest)
            except httptools.HttpParserUpgrade as exc:
                rest = rest[exc.args[0] :]  # another upgrade request: a loop, not a recursion
                continue
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
            else:
                self._fed()
            return

    def _parse_failed(self, exc: Exception) -> None:
        cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
        if isinstance(cause, ProxyError):
            self._refuse(cause, "header_limit" if isinstance(cause, HeadersTooLarge) else "framing")
        else:
            self._refuse(BadRequest(f"Bad Request: {exc}"), "framing")

    def eof_received(self) -> bool:
        # Half-close: the client has sent all it will; answer what is queued, then close. An event
        # stream has no end to wait for, though: a client that closes its side during one has gone,
        # and its backend must hear of it at once (a backend keeps one GET stream per session and
        # answers 409 to the client's reconnect while the old one is held open).
        self._closing = True
        if self._queue and self._queue[0].streaming:
            return False  # the transport closes: connection_lost -> client_lost aborts upstream
        if self._parsing is not None and not self._parsing.done:
            # A body cut short can never complete: end its upstream request now rather than leave
            # the backend waiting for the rest until a timeout.
            self._refuse(BadRequest("Bad Request: the request body was cut short"), "framing")
        return bool(self._queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        self._lost = True
        self._closing = True
        self.plane.closed(self)
        queue, self._queue = self._queue, []
        for exchange in queue:
            exchange.client_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self._queue:
            self._queue[0].client_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._queue:
            self._queue[0].client_writable(True)

    # -- httptools callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head = RequestHead()
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._head.target += url
        self._head_bytes += len(url)
        if self._head_bytes > self._header_bytes:
            raise HeadersTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Once per header field of every request: kept to the few operations it needs.
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._header_bytes:
            raise HeadersTooLarge()
        # (The field count is checked once the head is complete: the byte limit bounds it here.)
        lname = name.lower()
        capture = self._capture.get(lname)
        if capture is not None:
            capture(self._head, value)
        self._head.headers.append((lname, name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._deadline.clear()
        if self._closing:
            return
        parser = self.parser
        head = self._head
        if len(head.headers) > self._header_count:
            raise HeadersTooLarge("Too many request header fields")
        head.method = parser.get_method()
        version = parser.get_http_version()
        if parser.should_upgrade() and head.method != b"CONNECT":
            # No protocol is switched to (RFC 9110 §7.8 lets a server ignore Upgrade): the request is
            # answered as if its Upgrade fields were absent, parsed again without them (_feed).
            self._upgrade = (head, version)
            return
        head.keep_alive = parser.should_keep_alive()
        if version != "1.1":
            head.http11 = False
        elif head.expect:
            head.expect_continue = True
        if head.transfer_encoding is not None:
            head.chunked = head.has_body = True
        elif head.content_length is not None and head.content_length.strip() != b"0":
            head.has_body = True
        plane = self.plane
        problem = self._head_problem(head, version)
        services = plane.services
        phases = plane.phases
        missing = False
        if services is None or problem is not None or head.target in plane.local:
            exchange = Exchange(plane, self, head)
        else:
            exchange = self._for_service(services, head)
            missing = exchange.service_missing
            phases = exchange.plane.phases
        if problem is not None:
            err, reason = problem
            plane.metrics.rejected(reason)
            head.keep_alive = exchange.keep_alive = False
            exchange.fail_before_start(err)
        elif missing:
            # The Host and Origin checks still come first: a refused Host is a 421, not a 404.
            early = phases.early_request
            verdict = early(head, self.peer_ip) if early is not None else None
            if isinstance(verdict, ProxyError):
                head.keep_alive = exchange.keep_alive = False
            exchange.fail_before_start(verdict if isinstance(verdict, ProxyError) else NoService())
        elif (early := phases.early_request) is not None and (
            verdict := early(head, self.peer_ip)
        ) is not None:
            if isinstance(verdict, ProxyError):  # counted by its reject_reason when answered
                head.keep_alive = exchange.keep_alive = False
                exchange.fail_before_start(verdict)
            else:
                exchange.preset_answer(*verdict)
        self._parsing = exchange
        self._head_bytes = 0
        self._queue.append(exchange)
        if len(self._queue) == 1:
            exchange.start()
        elif len(self._queue) >= PIPELINE_DEPTH:
            self.pause_reading()

    def _for_service(self, services: ServiceMap[ServicePlaneLike], head: RequestHead) -> Exchange:
        """The exchange of the service `head` is for, its target as the service sees it (a
        stripped prefix); one marked `service_missing` (answered 404) when none matches."""
        picked = services.pick(head.host, head.target)
        if picked is None:
            exchange = Exchange(self.plane, self, head)
            exchange.service_missing = True
            if log.isEnabledFor(logging.INFO):
                host = (head.host or b"")[:100].decode("latin-1")
                target = head.target[:200].decode("latin-1")
                log.info("no service for Host %r, target %r: 404", host, target, extra=exchange.log_fields())
            return exchange
        view, head.target = picked
        exchange = Exchange(view, self, head)
        exchange.service = view.name
        return exchange

    def _head_problem(self, head: RequestHead, version: str) -> tuple[ProxyError, str] | None:
        """Why this head's framing is refused, with its REJECT_REASONS label; None when it may go
        on to the early_request filters (Host allow list, Origin: filters/phases.py)."""
        if head.method == b"CONNECT":
            return MethodNotAllowed("Method Not Allowed: CONNECT is not supported"), "method"
        if version not in _VERSIONS:
            return BadRequest("Bad Request: only HTTP/1.0 and HTTP/1.1 are supported"), "version"
        if head.chunked and not head.http11:
            # RFC 9112 §6.1: Transfer-Encoding from an HTTP/1.0 client is a framing fault.
            return BadRequest("Bad Request: Transfer-Encoding in an HTTP/1.0 request"), "version"
        if head.hosts > 1 or (head.hosts == 0 and head.http11):
            return BadRequest("Bad Request: an HTTP/1.1 request needs exactly one Host header"), "host"
        if head.sid_conflict:
            return BadRequest("Bad Request: conflicting Mcp-Session-Id headers"), "session_id"
        if head.name_conflict and protocol.era_of(head.session_id, head.protocol_version) is Era.MODERN:
            return BadRequest("Bad Request: conflicting Mcp-Name headers"), "mcp_name"
        if not head.chunked and _declared(head.content_length) > self.plane.limits.body_bytes:
            # Refused on its head: nothing is forwarded, and an Expect client gets no 100 Continue.
            return PayloadTooLarge(), "body_limit"
        target = head.target
        if not target.startswith(b"/"):
            return self._other_form(head)
        return None

    def _other_form(self, head: RequestHead) -> tuple[ProxyError, str] | None:
        """Absolute-form targets are accepted only for the Host they came with (no open proxying:
        a target naming another authority than Host is ambiguous about where the request goes);
        asterisk-form only for OPTIONS."""
        target = head.target
        if target == b"*":
            return (
                None
                if head.method == b"OPTIONS"
                else (BadRequest("Bad Request: invalid request target"), "host")
            )
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return BadRequest("Bad Request: invalid request target"), "host"
        authority = (url.host or b"") + (b":%d" % url.port if url.port is not None else b"")
        origin = (url.schema or b"").lower() + b"://" + authority.lower()
        if url.schema is None or url.schema.lower() not in (b"http", b"https") or head.host is None:
            return BadRequest("Bad Request: invalid request target"), "host"
        if not same_host(origin, head.host):
            return BadRequest("Bad Request: absolute-form target for another host than Host"), "host"
        head.target = (url.path or b"/") + (b"?" + url.query if url.query else b"")
        return None

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.request_body(body)

    def on_message_complete(self) -> None:
        exchange, self._parsing = self._parsing, None
        if exchange is not None:
            exchange.request_done()

    # -- used by exchanges ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None and not self._lost:
            self.transport.write(data)

    def cork(self) -> bool:
        """Hold writes until `uncork`, so they leave in one send; False if already corked."""
        if self._corked is not None:
            return False
        self._corked = []
        return True

    def write_chunk(self, data: bytes) -> None:
        """`data` as one chunk of a chunked body. A large chunk is not copied into a framed buffer:
        its size line, the data and the CRLF leave as the pieces of one vectored send."""
        if len(data) < COPY_LIMIT:
            self.write(chunk(data))
        elif self._corked is not None:
            self._corked += (chunk_size(data), data, b"\r\n")
        elif self.transport is not None and not self._lost:
            self.transport.writelines((chunk_size(data), data, b"\r\n"))

    def uncork(self) -> None:
        held, self._corked = self._corked, None
        if not held or self.transport is None or self._lost:
            return
        if len(held) == 1:
            self.transport.write(held[0])
        elif len(held) == 2 and len(held[0]) + len(held[1]) < COPY_LIMIT:
            self.transport.write(held[0] + held[1])  # a head and its body, the usual answer
        elif sum(map(len, held)) < COPY_LIMIT:
            self.transport.write(b"".join(held))  # small pieces: one copy costs less than an iovec
        else:
            self.transport.writelines(held)  # one vectored send, no copy

    def abort(self) -> None:
        self._corked = None
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self._lost:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self._lost:
            self._paused = False
            self.transport.resume_reading()

    @property
    def exchanges(self) -> tuple[Exchange, ...]:
        return tuple(self._queue)

    def exchange_finished(self, exchange: ExchangeState) -> None:
        if self._lost:
            return
        queue = self._queue
        if queue and queue[0] is exchange:
            del queue[0]
        if not exchange.keep_alive:
            self._close()
            return
        if queue:
            queue[0].start()
        elif self._refusal is not None:
            self.write(self._refusal)
            self._close()
        elif self._closing:
            self._close()
        else:
            limits = self.plane.limits
            # Idle: the next request's head is due (it may have begun), or the connection may rest.
            # (_arm's work, written out: this runs once per request)
            in_head = self._in_head
            self._timer_idle = not in_head
            self._deadline.set(limits.head_timeout if in_head else limits.keepalive_timeout)
        if self._paused and len(queue) < PIPELINE_DEPTH:
            self.resume_reading()

    def rest_timer(self) -> None:
        """A stream began: no head or keep-alive deadline is due while it runs, and the timer
        left from the connection's first head would hold some 700 bytes until it fired."""
        self._deadline.rest()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._queue:
            self._close()

    # -- internals --------------------------------------------------------------------------------

    def _arm(self, seconds: float, *, idle: bool) -> None:
        self._timer_idle = idle
        self._deadline.set(seconds)

    def _timed_out(self) -> None:
        if self._lost or self._queue:
            return
        if self._timer_idle:
            self._close()  # an idle keep-alive connection: nothing to say
            return
        self.plane.metrics.rejected("head_timeout")
        request_id = self._head.request_id or new_request_id()
        log.info(
            "closing connection from %s: no request head within %ss",
            self.peer_ip.decode(),
            self.plane.limits.head_timeout,
            extra=request_fields(DEFAULT_SERVICE, request_id),
        )
        if self._in_head:
            self.write(render_error(RequestTimeout(), keep_alive=False, request_id=request_id))
        self._close()

    def _refuse(self, err: ProxyError, reason: str) -> None:
        """The byte stream is broken: answer once the queue ahead drains, then close."""
        self.plane.metrics.rejected(reason)
        self._stop_reading()
        broken, self._parsing = self._parsing, None
        if broken is not None and not broken.done:
            # The exchange whose request broke answers in its turn, with its own request id.
            log.info("refused request from %s: %s", self.peer_ip.decode(), err, extra=broken.log_fields())
            broken.request_broken(err)
            return
        request_id = self._head.request_id or new_request_id()
        fields = request_fields(DEFAULT_SERVICE, request_id)
        log.info("refused request from %s: %s", self.peer_ip.decode(), err, extra=fields)
        answer = render_error(err, keep_alive=False, request_id=request_id)
        if not self._queue:
            self.write(answer)
            self._close()
            return
        self._refusal = answer

    def _stop_reading(self) -> None:
        self._closing = True
        self.pause_reading()

    def _close(self) -> None:
        self._closing = True
        self.uncork()
        if self.transport is not None and not self._lost:
            self.transport.close()


def without_upgrade(head: RequestHead, version: str) -> bytes:
    """The bytes of `head` without its Upgrade and HTTP2-Settings fields: the same request, which
    the parser reads as plain HTTP/1.x (llhttp upgrades only a request with an Upgrade field, so
    this head cannot stop it again; Connection and its tokens are dropped when it is forwarded)."""
    lines = [head.method, b" ", head.target, b" HTTP/", version.encode("ascii"), b"\r\n"]
    for lname, name, value in head.headers:
        if lname not in _UPGRADE_FIELDS:
            lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


_UPGRADE_FIELDS = frozenset({b"upgrade", b"http2-settings"})


def _declared(content_length: bytes | None) -> int:
    """The Content-Length as a number (httptools has checked its digits), 0 when absent."""
    try:
        return int(content_length or b"0")
    except ValueError:
        return 0
