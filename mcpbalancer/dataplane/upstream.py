"""Backend connections: one asyncio.Protocol per TCP connection, a keep-alive pool per backend.

An UpstreamConnection parses one response at a time with httptools and hands each event to the
`ResponseSink` (the exchange) it is attached to. Idle connections wait in their backend's pool,
most recently used first, so a burst reuses warm sockets and cold ones age out.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from mcpbalancer.dataplane.deadline import INF, Deadline
from mcpbalancer.fleet.backends import Backend

log = logging.getLogger(__name__)


class Output(Protocol):
    """The client side an exchange writes to; corked while one upstream read is relayed."""

    def cork(self) -> bool: ...
    def uncork(self) -> None: ...


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange it serves."""

    @property
    def client(self) -> Output: ...

    def response_begun(self) -> None: ...  # the connection was lost after the answer had begun
    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_done(self) -> None: ...
    def response_timeout(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_writable(self, writable: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_answering",
        "_head_due",
        "_headers",
        "_interim",
        "_reason",
        "after_read",
        "closed",
        "keep_alive",
        "parser",
        "paused",
        "pool",
        "reused",
        "sink",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.reused = False
        self.closed = False
        self.keep_alive = True  # the last response head allows another request on this connection
        self.paused = False  # reading paused (the client is backed up)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._interim = False
        self._answering = False  # bytes of an answer came for the attached sink
        # When the response head is due; made with the first request, which brings the loop.
        self._head_due: Deadline | None = None
        self.after_read: Callable[[], None] | None = None  # called once, after the current read

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.sink is None:
            # A backend has nothing to say on an idle connection; it is not reusable.
            self.close()
            return
        # The backend has started answering: the request is not sent again (see _lose).
        self._answering = True
        # Everything one read produces for the client (head, body, last chunk) leaves in one write.
        output = self.sink.client
        corked = output.cork()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            log.warning("backend %s sent a malformed response: %s", self.pool.backend.name, exc)
            self._lose(exc)
        finally:
            if corked:
                output.uncork()
            if self.after_read is not None:
                after, self.after_read = self.after_read, None
                after()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        self._lose(exc)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_writable(True)

    # httptools callbacks (no on_message_begin: a call per response saved; the head's fields are
    # reset when it completes, which also lets an idle stream keep none of them)

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers, reason = self._headers, self._reason
        self._headers, self._reason = [], b""
        status = self.parser.get_status_code()
        # Interim 1xx answers (102, 103) are not relayed: we never forward Expect or Upgrade.
        self._interim = 100 <= status < 200
        if self._interim:
            return
        head_due = self._head_due
        if head_due is not None:
            head_due.at = INF  # Deadline.clear, written out: once per response
        # Read at the head: a HEAD answer swaps the parser before the message completes.
        self.keep_alive = self.parser.should_keep_alive()
        if self.sink is not None:
            self.sink.response_head(status, reason, headers)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.response_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.sink is not None:
            self.sink.response_done()

    # used by the exchange

    def attach(self, sink: ResponseSink) -> None:
        self.sink = sink
        self._answering = False

    def expect_head(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """A request went out: its response head is due within `timeout` seconds, else the sink's
        `response_timeout` is called."""
        if self._head_due is None:
            self._head_due = Deadline(loop, self._head_overdue)
        self._head_due.set(timeout)

    def _head_overdue(self) -> None:
        if self.sink is not None:
            self.sink.response_timeout()

    def stop_timer(self) -> None:
        """No response-head deadline, nor its timer, until the next request's."""
        if self._head_due is not None:
            self._head_due.cancel()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def skip_body(self) -> None:
        """The response to HEAD has no body whatever its Content-Length says: start a fresh parser."""
        self.parser = httptools.HttpResponseParser(self)

    def release(self, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        self.sink = None
        head_due = self._head_due
        if head_due is not None:
            head_due.at = INF  # Deadline.clear, written out: once per request
        self.after_read = None
        if reusable and self.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.sink = None
        self.stop_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.discard(self)

    def abort(self) -> None:
        self.sink = None
        self.stop_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.pool.discard(self)

    def _lose(self, exc: Exception | None) -> None:
        sink, self.sink = self.sink, None
        self.stop_timer()
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()
        if sink is not None:
            if self._answering:
                sink.response_begun()  # told only now: the only use of it is here, when lost
            sink.upstream_lost(exc)


class UpstreamPool:
    """Keep-alive connections to one backend."""

    def __init__(self, backend: Backend, *, connect_timeout: float, max_idle: int = 64) -> None:
        self.backend = backend
        self.connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self._closed = False  # replaced or removed (reload, shutdown): keep nothing idle

    def take(self) -> UpstreamConnection | None:
        """A warm idle connection, or None."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection, with its TLS handshake done for an https backend (both within the
        connect timeout); raises OSError (refused, unreachable; ssl.SSLError for a TLS failure) or
        TimeoutError."""
        loop = asyncio.get_running_loop()
        backend = self.backend
        tls: ssl.SSLContext | None = backend.ssl_context if backend.tls else None
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: UpstreamConnection(self),
                backend.host,
                backend.port,
                ssl=tls,
                server_hostname=backend.server_name if tls is not None else None,
            )
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.close()
            return
        if conn.paused:
            conn.resume_reading()
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
