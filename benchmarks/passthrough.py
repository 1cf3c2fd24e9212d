"""The floor of a session-affine proxy in Python: what uvloop and httptools cost by themselves.

    python benchmarks/passthrough.py PORT BACKEND_PORT [BACKEND_PORT ...]

Not a proxy to use: it parses each request only to find Mcp-Session-Id, sends the bytes it received
unchanged to the session's backend (learned from the Mcp-Session-Id of an answer; new sessions round
robin), and relays the answer's bytes unchanged. No header hygiene, no framing checks, no timeouts,
no metrics, no error handling, no flow control. Measured like HAProxy (pinned to CPU 0, wrk from
`wrk_sessions.lua` against it), it shows how much of mcpbalancer's cost per request is the runtime
and how much is what mcpbalancer does; RESULTS.md has the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import Any

import httptools
import uvloop

SESSION = b"mcp-session-id"
sessions: dict[bytes, Backend] = {}


class Backend:
    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[Upstream] = []


class Upstream(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: Any = None
        self.new_session = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.client is not None
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.new_session and name.lower() == SESSION:
            sessions[value] = self.backend

    def on_message_complete(self) -> None:
        self.client = None
        self.backend.idle.append(self)


class Client(asyncio.Protocol):
    def __init__(self, pick: itertools.cycle[Backend]) -> None:
        self.pick = pick
        self.parser = httptools.HttpRequestParser(self)
        self.received: list[bytes] = []
        self.sid: bytes | None = None
        self.transport: Any = None
        self.connecting: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.sid = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == SESSION:
            self.sid = value

    def on_message_complete(self) -> None:
        backend = sessions[self.sid] if self.sid is not None else next(self.pick)
        data, self.received = b"".join(self.received), []
        if backend.idle:
            self.send(backend.idle.pop(), data)
        else:
            task = asyncio.ensure_future(self.connect(backend, data))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def connect(self, backend: Backend, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(backend), "127.0.0.1", backend.port)
        self.send(upstream, data)

    def send(self, upstream: Upstream, data: bytes) -> None:
        upstream.client, upstream.new_session = self, self.sid is None
        upstream.transport.write(data)


async def main(port: int, backend_ports: list[int]) -> None:
    pick = itertools.cycle([Backend(p) for p in backend_ports])
    server = await asyncio.get_running_loop().create_server(lambda: Client(pick), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
