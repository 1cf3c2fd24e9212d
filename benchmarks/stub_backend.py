"""A fast stub MCP backend for the benchmarks: asyncio.Protocol + httptools on uvloop.

It does the least a stateful legacy MCP server does, so a benchmark measures the proxy in front of
it, not the backend:

- POST without `Mcp-Session-Id` -> 200 JSON (an initialize answer) with a fresh `Mcp-Session-Id`.
- POST with a known id -> 200 JSON; with `sse=1` in the query -> 200 `text/event-stream`, chunked,
  one `event: message`; `hold=<ms>` keeps the stream open that long after the event before it ends.
- GET with a known id -> an endless SSE stream, one event every `--interval-ms`, each carrying the
  CLOCK_MONOTONIC time it was written (`data: {"t":<ns>}`) so a client can measure relay latency.
- DELETE with a known id -> 200 and the session is gone. Unknown id -> 404 with a JSON-RPC error.

Every answer carries `X-Backend: <name>` (affinity checks) and echoes the request's session id, as
the mcp SDK does. Run: `python stub_backend.py --name s1 [--port 0]`; it prints `READY <port>`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import sys
import time
from typing import cast

import httptools
import uvloop

SESSION_HEADER = b"mcp-session-id"
JSON_RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}'
INIT_RESULT = (
    b'{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},'
    b'"serverInfo":{"name":"stub","version":"1"}}}'
)
NOT_FOUND = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
SSE_EVENT = b"event: message\ndata: " + JSON_RESULT + b"\n\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Stub:
    """What all connections of one stub process share."""

    def __init__(self, name: str, interval: float) -> None:
        self.name = name.encode()
        self.interval = interval
        self.sessions: set[bytes] = set()
        self._serial = itertools.count(1)
        self._nonce = os.urandom(4).hex().encode()

    def new_session(self) -> bytes:
        sid = b"%b-%b-%d" % (self.name, self._nonce, next(self._serial))
        self.sessions.add(sid)
        return sid

    def head(self, status: bytes, content_type: bytes, sid: bytes | None, length: int | None) -> bytes:
        parts = [b"HTTP/1.1 ", status, b"\r\nContent-Type: ", content_type, b"\r\nX-Backend: ", self.name]
        if sid is not None:
            parts += (b"\r\nMcp-Session-Id: ", sid)
        if length is None:
            parts.append(b"\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            parts += (b"\r\nContent-Length: ", b"%d" % length, b"\r\n\r\n")
        return b"".join(parts)


class StubConnection(asyncio.Protocol):
    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.sid: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.sid = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == len(SESSION_HEADER) and name.lower() == SESSION_HEADER:
            self.sid = value

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        sid = self.sid
        if sid is None:
            self._initialize() if method == b"POST" else self._not_found(None)
        elif sid not in self.stub.sessions:
            self._not_found(sid)
        elif method == b"POST":
            self._post(sid)
        elif method == b"GET":
            self._open_stream(sid)
        elif method == b"DELETE":
            self.stub.sessions.discard(sid)
            self.write(self.stub.head(b"200 OK", b"application/json", sid, 0))
        else:
            self.write(self.stub.head(b"405 Method Not Allowed", b"application/json", sid, 0))

    # answers

    def _initialize(self) -> None:
        sid = self.stub.new_session()
        self.write(self.stub.head(b"200 OK", b"application/json", sid, len(INIT_RESULT)) + INIT_RESULT)

    def _not_found(self, sid: bytes | None) -> None:
        head = self.stub.head(b"404 Not Found", b"application/json", sid, len(NOT_FOUND))
        self.write(head + NOT_FOUND)

    def _post(self, sid: bytes) -> None:
        query = self.url.partition(b"?")[2]
        if b"sse=1" not in query:
            self.write(self.stub.head(b"200 OK", b"application/json", sid, len(JSON_RESULT)) + JSON_RESULT)
            return
        head = self.stub.head(b"200 OK", b"text/event-stream", sid, None)
        hold = _hold_seconds(query)
        if hold <= 0:
            self.write(head + chunk(SSE_EVENT) + LAST_CHUNK)
            return
        self.write(head + chunk(SSE_EVENT))
        self._pause_reading()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(hold, self._end_held_stream)

    def _pause_reading(self) -> None:
        # A held response is still in progress: stop reading so a pipelined request waits.
        if self.transport is not None:
            self.transport.pause_reading()

    def _end_held_stream(self) -> None:
        self.timer = None
        self.write(LAST_CHUNK)
        if self.transport is not None:
            self.transport.resume_reading()

    def _open_stream(self, sid: bytes) -> None:
        self.write(self.stub.head(b"200 OK", b"text/event-stream", sid, None) + self._event())
        if self.stub.interval > 0:
            # A random phase spreads the streams' events evenly instead of in bursts.
            phase = random.uniform(0, self.stub.interval)
            self.timer = asyncio.get_running_loop().call_later(phase, self._tick)

    def _tick(self) -> None:
        if self.transport is None:
            return
        self.write(self._event())
        self.timer = asyncio.get_running_loop().call_later(self.stub.interval, self._tick)

    def _event(self) -> bytes:
        self.events += 1
        body = b'id: %d\nevent: message\ndata: {"t":%d}\n\n' % (self.events, time.monotonic_ns())
        return chunk(body)

    # plumbing

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _hold_seconds(query: bytes) -> float:
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == b"hold" and value.isdigit():
            return int(value) / 1000
    return 0.0


async def serve(name: str, host: str, port: int, interval: float) -> None:
    stub = Stub(name, interval)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubConnection(stub), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    await stop.wait()
    server.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fast stub MCP backend for the benchmarks.")
    parser.add_argument("--name", required=True, help="backend name, sent as X-Backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as READY <port>)")
    parser.add_argument("--interval-ms", type=float, default=1000.0, help="GET stream event period")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uvloop.run(serve(args.name, args.host, args.port, args.interval_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
