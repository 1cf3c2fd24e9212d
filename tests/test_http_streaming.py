"""Streaming through the data plane: no buffering, SSE bytes intact, heartbeats only at event
boundaries, cancellation when the client leaves, and backpressure instead of memory growth.

The backend is a stub that writes what the test pushes, when the test pushes it (`Feed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.dataplane.client import ClientConnection
from mcpbalancer.dataplane.exchange import Exchange
from mcpbalancer.dataplane.upstream import UpstreamConnection
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, RawClient, Response, request
from tests.fixtures.stub import Handler, StubFactory, StubRequest, answer_ok, chunk, response

PING = b": ping\n\n"
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
EVENTS = [
    b"id: 1\r\nretry: 3000\r\ndata:\r\n\r\n",  # a 2025-11-25 priming event: empty data, CRLF
    b'event: message\r\nid: 2\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\n\r\n',
    b"data: first line\ndata: second line\n\n",
    b": a comment\n\nid: 4\ndata: {}\n\n",
]


class Feed:
    """A response whose body the test writes piece by piece: `push(data)`, then `end()`."""

    def __init__(self, framing: str = "chunked", headers: list[tuple[str, str]] = SSE, size: int = 0) -> None:
        self.framing = framing
        self.headers = headers
        self.size = size  # the Content-Length, for framing "length"
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    def push(self, data: bytes) -> None:
        self.pieces.put_nowait(data)

    def end(self) -> None:
        self.pieces.put_nowait(None)

    async def __call__(self, req: StubRequest) -> None:
        await req.complete.wait()
        if self.framing == "length":
            head = response(200, [*self.headers, ("Content-Length", str(self.size))], length=False)
        elif self.framing == "chunked":
            head = response(200, [*self.headers, ("Transfer-Encoding", "chunked")], length=False)
        else:
            head = response(200, self.headers, length=False)
        req.conn.write(head)
        while (piece := await self.pieces.get()) is not None:
            req.conn.write(chunk(piece) if self.framing == "chunked" else piece)
        if self.framing == "chunked":
            req.conn.write(b"0\r\n\r\n")
        elif self.framing == "close":
            req.conn.close()


async def take(client: RawClient, resp: Response, size: int, deadline: float = 5.0) -> bytes:
    """The next `size` body bytes, however the proxy framed them."""
    start = len(resp.body)
    async with asyncio.timeout(deadline):
        while len(resp.body) - start < size:
            if resp.framing == "chunked":
                assert await client.read_chunk(resp), "the response ended early"
            else:
                data = await client.reader.read(size - (len(resp.body) - start))
                assert data, "the connection closed early"
                resp.raw += data
                resp.body += data
    return bytes(resp.body[start:])


async def open_stream(
    proxy: Proxy, open_client: ClientFactory, version: str = "1.1"
) -> tuple[RawClient, Response]:
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Accept", "text/event-stream")], version=version))
    return client, await client.read_head()


# -- 9. no buffering, bytes intact --------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_each_event_reaches_the_client_before_the_backend_sends_the_next(
    framing: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed(framing, size=sum(map(len, EVENTS)))
    stub = await make_stub(feed)
    proxy = await make_proxy([stub])
    client, resp = await open_stream(proxy, open_client)
    assert resp.header("x-accel-buffering") == b"no"
    for event in EVENTS:
        feed.push(event)  # the next one is pushed only once this one has arrived
        assert await take(client, resp, len(event)) == event
    feed.end()
    assert bytes(resp.body) == b"".join(EVENTS)


async def test_events_split_anywhere_arrive_byte_identical(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0.2)
    client, resp = await open_stream(proxy, open_client)
    stream = b"".join(EVENTS)
    for cut in range(0, len(stream), 7):  # splits CRLFs and field names
        feed.push(stream[cut : cut + 7])
    assert await take(client, resp, len(stream)) == stream


async def test_large_events_are_relayed_byte_identical_as_whole_chunks(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    # Chunks from 16 KiB up leave as a vectored send of size line, data and CRLF (no copy), small
    # ones as one framed copy; mixed in one upstream read, all must keep their framing and order.
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub])
    client, resp = await open_stream(proxy, open_client)
    events = [
        b"data: " + bytes([65 + i % 26]) * size + b"\n\n" for i, size in enumerate((20_000, 5, 300_000))
    ]
    feed.push(events[0])
    assert await take(client, resp, len(events[0])) == events[0]
    feed.push(events[1])  # back to back: a small chunk, then a large one
    feed.push(events[2])
    assert await take(client, resp, len(events[1]) + len(events[2])) == events[1] + events[2]
    feed.end()


class Recording:
    """A transport that keeps what is written, in the calls it was written with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.calls.append(("write", [data]))

    def writelines(self, pieces: list[bytes]) -> None:
        self.calls.append(("writelines", list(pieces)))

    def close(self) -> None:
        pass


async def test_large_chunks_are_sent_without_copying_them(
    make_proxy: ProxyFactory, make_stub: StubFactory
) -> None:
    proxy = await make_proxy([await make_stub()])
    assert proxy._plane is not None
    conn, sent = ClientConnection(proxy._plane), Recording()
    conn.connection_made(sent)  # type: ignore[arg-type]
    try:
        big = b"x" * 20_000
        conn.write_chunk(big)
        conn.write_chunk(b"small")
        [(kind, pieces), small] = sent.calls
        assert (kind, pieces) == ("writelines", [b"4e20\r\n", big, b"\r\n"])
        assert pieces[1] is big  # the data itself, not a framed copy
        assert small == ("write", [b"5\r\nsmall\r\n"])
        sent.calls.clear()
        assert conn.cork()
        conn.write(b"head")
        conn.write_chunk(big)
        conn.uncork()  # over the copy limit in all: one vectored send of the pieces
        [(kind, pieces)] = sent.calls
        assert kind == "writelines"
        assert pieces[2] is big
        assert b"".join(pieces) == b"head4e20\r\n" + big + b"\r\n"
    finally:
        conn.connection_lost(None)


# -- 10. heartbeats --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_silent_event_stream_gets_a_ping(
    version: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0.2)
    client, resp = await open_stream(proxy, open_client, version)
    assert resp.framing == ("chunked" if version == "1.1" else "close")
    started = time.monotonic()
    assert await take(client, resp, len(PING), deadline=1.0) == PING
    assert time.monotonic() - started >= 0.15
    feed.push(EVENTS[1])
    assert await take(client, resp, len(EVENTS[1])) == EVENTS[1]


async def test_an_idle_stream_keeps_neither_the_response_head_nor_its_deadline_timer(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    """What an idle stream holds is paid per stream (benchmarks/stream_memory.py): the head's
    fields are relayed, then dropped, and the response-head deadline's timer, which would linger
    until timeouts.response_headers, is cancelled once the stream outlives its first read, as is
    the client connection's (nothing is due on it while it streams). Its heartbeat timer stays."""
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=5)
    client, resp = await open_stream(proxy, open_client)
    feed.push(EVENTS[0])
    assert await take(client, resp, len(EVENTS[0])) == EVENTS[0]
    exchange = only_connection(proxy)._queue[0]
    upstream, stream = exchange.upstream, exchange._stream
    assert upstream is not None
    assert stream is not None
    assert exchange.streaming
    assert (upstream._headers, upstream._reason) == ([], b"")
    assert upstream._head_due is not None
    assert upstream._head_due._timer is None
    # Nor the client connection's head timer, armed when it opened: nothing is due while it streams.
    assert only_connection(proxy)._deadline._timer is None
    assert stream.timer is not None
    feed.push(EVENTS[1])
    assert await take(client, resp, len(EVENTS[1])) == EVENTS[1]


async def test_no_ping_inside_a_half_received_event(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0.2)
    client, resp = await open_stream(proxy, open_client)
    feed.push(b"data: x\n")
    assert await take(client, resp, 8) == b"data: x\n"
    assert await client.nothing_within(0.7) == b"", "a ping inside an event"
    feed.push(b"\n")  # the event is complete: pings may follow again
    assert await take(client, resp, 1 + len(PING), deadline=1.0) == b"\n" + PING
    assert bytes(resp.body) == b"data: x\n\n" + PING


async def test_heartbeat_zero_sends_no_ping(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0)
    client, resp = await open_stream(proxy, open_client)
    assert await client.nothing_within(0.7) == b""
    feed.push(EVENTS[2])
    assert await take(client, resp, len(EVENTS[2])) == EVENTS[2]


async def test_no_ping_while_events_flow(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    events = [b"data: %d\n\n" % i for i in range(20)]

    async def paced(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.write(response(200, [*SSE, ("Transfer-Encoding", "chunked")], length=False))
        for event in events:  # 20 events over ~0.8 s: four heartbeat intervals, never 0.2 s quiet
            req.conn.write(chunk(event))
            await asyncio.sleep(0.04)
        req.conn.write(b"0\r\n\r\n")

    stub = await make_stub(paced)
    proxy = await make_proxy([stub], heartbeat=0.2)
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Accept", "text/event-stream")]))
    resp = await client.response()
    assert bytes(resp.body) == b"".join(events)


async def test_event_stream_with_content_length_gets_no_ping(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("length", size=len(EVENTS[0]) + len(EVENTS[1]))
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0.2)
    client, resp = await open_stream(proxy, open_client)
    feed.push(EVENTS[0])
    assert await take(client, resp, len(EVENTS[0])) == EVENTS[0]
    # A ping would be counted against the Content-Length and corrupt the connection.
    assert await client.nothing_within(0.6) == b""
    feed.push(EVENTS[1])
    feed.end()
    assert await take(client, resp, len(EVENTS[1])) == EVENTS[1]
    stub.handler = answer_ok
    client.send(request("GET", "/mcp"))
    assert (await client.response()).status == 200


async def test_backend_silent_past_stream_idle_ends_the_stream_both_ways(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub], heartbeat=0.2, timeouts={"stream_idle": 0.7})
    client, resp = await open_stream(proxy, open_client)
    feed.push(EVENTS[0])
    assert await take(client, resp, len(EVENTS[0])) == EVENTS[0]
    started = time.monotonic()
    rest = b""
    with contextlib.suppress(ConnectionResetError):
        rest = await client.read_to_eof(deadline=3)  # pings do not count as backend activity
    assert time.monotonic() - started >= 0.5
    assert rest.startswith(b"%x\r\n%b\r\n" % (len(PING), PING))
    assert not rest.endswith(b"0\r\n\r\n"), "a cut stream must not look complete"
    async with asyncio.timeout(2):
        await stub.connections[0].closed.wait()


# -- 11. the client goes away ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_leaving_mid_stream_closes_the_upstream_request(
    how: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await make_proxy([stub])
    client, resp = await open_stream(proxy, open_client)
    feed.push(EVENTS[0])
    assert await take(client, resp, len(EVENTS[0])) == EVENTS[0]
    client.close() if how == "close" else client.reset()
    async with asyncio.timeout(2):
        await stub.connections[0].closed.wait()


async def test_client_leaving_before_the_response_closes_the_upstream_request(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    never = asyncio.Event()

    async def silent(req: StubRequest) -> None:
        await never.wait()

    stub = await make_stub(silent)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", body=b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}'))
    await stub.wait_requests(1)
    client.reset()
    async with asyncio.timeout(2):
        await stub.connections[0].closed.wait()


# -- 14. flow control --------------------------------------------------------------------------------

BLOCK = bytes(range(256)) * 256  # 64 KiB
TOTAL = 24 << 20  # far more than the socket buffers between stub, proxy and client hold


def only_connection(proxy: Proxy) -> ClientConnection:
    assert proxy._plane is not None
    (conn,) = proxy._plane.connections
    return conn


class Pauses:
    """Records the proxy pausing its reads from backends (UpstreamConnection.pause_reading)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paused = asyncio.Event()
        original = UpstreamConnection.pause_reading

        def pause_reading(conn: UpstreamConnection) -> None:
            original(conn)
            self.paused.set()

        monkeypatch.setattr(UpstreamConnection, "pause_reading", pause_reading)

    async def wait(self) -> None:
        async with asyncio.timeout(5):
            await self.paused.wait()


def bulk(sent: list[int], blocked: asyncio.Event) -> Handler:
    """A handler answering TOTAL bytes as fast as the connection takes them."""

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(TOTAL))]
        req.conn.write(response(200, headers, length=False))
        while sent[0] < TOTAL:
            req.conn.write(BLOCK)
            sent[0] += len(BLOCK)
            if req.conn.transport.get_write_buffer_size() > 0:
                blocked.set()  # the kernel buffers towards the proxy are full
            await req.conn.drain()

    return handle


async def test_slow_client_pauses_the_backend_instead_of_buffering(
    monkeypatch: pytest.MonkeyPatch,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    pauses = Pauses(monkeypatch)
    sent, blocked = [0], asyncio.Event()
    stub = await make_stub(bulk(sent, blocked))
    proxy = await make_proxy([stub])
    client = await open_client(proxy, rcvbuf=64 * 1024)
    client.send(request("GET", "/big"))
    resp = await client.read_head()
    assert resp.header("content-length") == str(TOTAL).encode()
    await pauses.wait()
    async with asyncio.timeout(5):
        await blocked.wait()
    conn = only_connection(proxy)
    upstream = conn._queue[0].upstream
    assert upstream is not None
    assert upstream.transport is not None
    assert not upstream.transport.is_reading()
    assert conn.transport is not None
    assert conn.transport.get_write_buffer_size() < 1 << 20, "the proxy buffers the response"
    assert sent[0] < TOTAL, "the backend was never held back"
    body = await client.read_exactly(TOTAL, deadline=20)
    assert body == BLOCK * (TOTAL // len(BLOCK))


async def test_response_started_while_the_client_is_backed_up_starts_paused(
    monkeypatch: pytest.MonkeyPatch,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    pauses = Pauses(monkeypatch)
    sent, blocked = [0], asyncio.Event()
    big = bulk(sent, blocked)
    first_may_answer = asyncio.Event()

    async def handle(req: StubRequest) -> None:
        if req.target == b"/small":
            await first_may_answer.wait()
            req.conn.write(response(200, [], b"small"))
        else:
            await big(req)

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy, rcvbuf=64 * 1024)
    client.send(request("GET", "/small") + request("GET", "/big"))
    await stub.wait_requests(1)
    # The client's socket is backed up when the next response starts: its transport paused
    # writing while the last bytes of the earlier response went out. That state is set here
    # directly; the transport's limit is lifted so that it cannot pause (again) by itself.
    conn = only_connection(proxy)
    assert conn.transport is not None
    conn.transport.set_write_buffer_limits(high=1 << 30)
    conn.write_paused = True
    first_may_answer.set()
    await pauses.wait()
    async with asyncio.timeout(5):
        await blocked.wait()
    upstream = conn._queue[0].upstream
    assert upstream is not None
    assert upstream.transport is not None
    assert not upstream.transport.is_reading()
    assert sent[0] < TOTAL
    conn.resume_writing()
    assert (await client.response()).body == b"small"
    resp = await client.read_head()
    assert resp.status == 200
    assert await client.read_exactly(TOTAL, deadline=20) == BLOCK * (TOTAL // len(BLOCK))


async def test_slow_backend_pauses_the_client_upload_instead_of_buffering(
    monkeypatch: pytest.MonkeyPatch,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    backed_up = asyncio.Event()
    original = Exchange.upstream_writable

    def upstream_writable(exchange: Exchange, writable: bool) -> None:
        original(exchange, writable)
        if not writable:
            backed_up.set()

    monkeypatch.setattr(Exchange, "upstream_writable", upstream_writable)
    reading = asyncio.Event()

    async def handle(req: StubRequest) -> None:
        req.conn.transport.pause_reading()
        await reading.wait()
        req.conn.transport.resume_reading()
        await req.complete.wait()
        req.conn.write(response(200, [], b"%d" % len(req.body)))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub], limits={"body_bytes": TOTAL})
    client = await open_client(proxy)
    client.send(request("POST", "/upload", [("Content-Length", str(TOTAL))]))
    await stub.wait_requests(1)
    for _ in range(TOTAL // len(BLOCK)):
        client.send(BLOCK)
    async with asyncio.timeout(5):
        await backed_up.wait()
    conn = only_connection(proxy)
    upstream = conn._queue[0].upstream
    assert upstream is not None
    assert upstream.transport is not None
    assert conn.transport is not None
    assert not conn.transport.is_reading(), "the proxy keeps reading an upload it cannot send"
    assert upstream.transport.get_write_buffer_size() < 1 << 20
    reading.set()
    resp = await client.response(deadline=20)
    assert bytes(resp.body) == str(TOTAL).encode()
    assert stub.requests[0].body == BLOCK * (TOTAL // len(BLOCK))
