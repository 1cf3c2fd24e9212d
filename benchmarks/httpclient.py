"""A minimal HTTP/1.1 client for the Python load drivers: asyncio.Protocol + httptools.

Only what the benchmarks need, kept cheap so the driver is not the bottleneck: one keep-alive
connection sends one request at a time and keeps, of each answer, the status, the two headers the
affinity check reads, and when the first body byte and the end arrived. A StreamConnection reads an
endless SSE stream and reports the relay delay of each event (the stub stamps events with
CLOCK_MONOTONIC, which every process on the machine shares).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import httptools

SESSION_HEADER = b"mcp-session-id"
BACKEND_HEADER = b"x-backend"
REQUEST_BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"x":1}}}'
INIT_BODY = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}'
)


def post(host: str, target: bytes, sid: str | None) -> bytes:
    """A legacy-era MCP POST: initialize without a session id, a tool call with one."""
    body = INIT_BODY if sid is None else REQUEST_BODY
    lines = [b"POST ", target, b" HTTP/1.1\r\nHost: ", host.encode(), b"\r\n"]
    lines.append(b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n")
    if sid is not None:
        lines += (b"Mcp-Session-Id: ", sid.encode(), b"\r\nMCP-Protocol-Version: 2025-06-18\r\n")
    lines += (b"Content-Length: %d\r\n\r\n" % len(body), body)
    return b"".join(lines)


def get_stream(host: str, target: bytes, sid: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: %b\r\nAccept: text/event-stream\r\nMcp-Session-Id: %b\r\n\r\n" % (
        target,
        host.encode(),
        sid.encode(),
    )


class Response:
    __slots__ = ("backend", "done_at", "first_body_at", "sent_at", "sid", "status")

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.status = 0
        self.sid: bytes | None = None
        self.backend: bytes | None = None
        self.first_body_at = 0.0
        self.done_at = 0.0


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; `request` must not be called again before its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._waiter: asyncio.Future[Response] | None = None
        self.closed = False

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None, "not connected"
        assert self._waiter is None, "one request at a time"
        self._waiter = asyncio.get_running_loop().create_future()
        self._response = Response(time.perf_counter())
        self.transport.write(data)
        return self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        if response is None:
            return
        lname = name.lower()
        if lname == SESSION_HEADER:
            response.sid = value
        elif lname == BACKEND_HEADER:
            response.backend = value

    def on_headers_complete(self) -> None:
        if self._response is not None:
            self._response.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None and not response.first_body_at:
            response.first_body_at = time.perf_counter()

    def on_message_complete(self) -> None:
        response, waiter = self._response, self._waiter
        self._response = self._waiter = None
        if response is not None and waiter is not None and not waiter.done():
            response.done_at = time.perf_counter()
            waiter.set_result(response)

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self._response = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class StreamConnection(asyncio.Protocol):
    """An SSE GET stream; `on_event(delay_ns)` is called for every stamped event received."""

    def __init__(self, on_event: Callable[[int], None]) -> None:
        self.on_event = on_event
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.backend: bytes | None = None
        self.opened: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.lost = False
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._settle(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._settle(exc or ConnectionResetError("stream closed"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == BACKEND_HEADER:
            self.backend = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not 200 <= self.status < 300:
            self._settle(ConnectionError(f"stream answered {self.status}"))

    def on_body(self, body: bytes) -> None:
        now = time.monotonic_ns()
        data = self._pending + body
        *events, self._pending = data.split(b"\n\n")
        for event in events:
            stamp = event.rfind(b'{"t":')
            if stamp >= 0:
                self.on_event(now - int(event[stamp + 5 : event.index(b"}", stamp)]))
                self._settle(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _settle(self, exc: BaseException | None) -> None:
        if self.opened.done():
            return
        if exc is None:
            self.opened.set_result(self.status)
        else:
            self.opened.set_exception(exc)
