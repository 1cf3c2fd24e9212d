"""The data plane's guarantees hold over a TLS listener as over a plain one: SSE heartbeats at event
boundaries, flow control with a slow reader (the backend is paused, nothing piles up in the proxy),
and framing refusals (CL+TE smuggling -> 400, nothing behind it forwarded).

The same stub backends and raw HTTP client as tests/test_http_streaming.py and
test_hardening_framing.py, the client's socket wrapped in TLS with the test CA.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.dataplane.handshake import TlsConnection
from tests.fixtures.proxy import DictProxy
from tests.fixtures.rawhttp import RawClient, request, rpc_error, until_eof
from tests.fixtures.stub import StubFactory
from tests.fixtures.tls import Pki
from tests.test_hardening_framing import CASES, SMUGGLED, rejected
from tests.test_http_streaming import BLOCK, EVENTS, PING, TOTAL, Feed, Pauses, bulk, take
from tests.tls_helpers import client_context, tls_config

TlsClients = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def tls_client(make_stub: object, pki: Pki) -> AsyncIterator[TlsClients]:
    """`await tls_client(proxy, rcvbuf=None)` -> a RawClient speaking TLS to the proxy's listener."""
    clients: list[RawClient] = []

    async def connect(proxy: Proxy, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_context(pki), server_hostname="localhost"
        )
        client = RawClient(reader, writer)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.writer.transport.abort()


def only_connection(proxy: Proxy) -> TlsConnection:
    assert proxy._plane is not None
    (conn,) = proxy._plane.connections
    assert isinstance(conn, TlsConnection)
    return conn


async def test_a_silent_event_stream_gets_a_ping_over_tls(
    make_stub: StubFactory, dict_proxy: DictProxy, pki: Pki, tls_client: TlsClients
) -> None:
    feed = Feed("chunked")
    stub = await make_stub(feed)
    proxy = await dict_proxy({**tls_config([stub], pki), "heartbeat": 0.2})
    client = await tls_client(proxy)
    client.send(request("GET", "/mcp", [("Accept", "text/event-stream")]))
    resp = await client.read_head()
    assert resp.framing == "chunked"
    started = time.monotonic()
    assert await take(client, resp, len(PING), deadline=1.0) == PING
    assert time.monotonic() - started >= 0.15
    # Half an event, then silence: no ping inside it; the rest completes it byte for byte.
    event = EVENTS[1]
    feed.push(event[:10])
    assert await take(client, resp, 10) == event[:10]
    assert await client.nothing_within(0.5) == b""
    feed.push(event[10:])
    assert await take(client, resp, len(event) - 10) == event[10:]
    assert await take(client, resp, len(PING), deadline=1.0) == PING


async def test_a_slow_tls_reader_pauses_the_backend_instead_of_buffering(
    monkeypatch: pytest.MonkeyPatch,
    make_stub: StubFactory,
    dict_proxy: DictProxy,
    pki: Pki,
    tls_client: TlsClients,
) -> None:
    pauses = Pauses(monkeypatch)
    sent, blocked = [0], asyncio.Event()
    stub = await make_stub(bulk(sent, blocked))
    proxy = await dict_proxy(tls_config([stub], pki))
    client = await tls_client(proxy, rcvbuf=64 * 1024)
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
    body = await client.read_exactly(TOTAL, deadline=30)
    assert body == BLOCK * (TOTAL // len(BLOCK))


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [case[1:4] for case in CASES if case[0] in ("cl-and-te", "te-and-cl", "obs-fold-space", "bare-lf-lines")],
    ids=["cl-and-te", "te-and-cl", "obs-fold-space", "bare-lf-lines"],
)
async def test_ambiguous_framing_over_tls_is_refused_and_nothing_behind_it_is_forwarded(
    data: bytes,
    status: int,
    reason: str,
    make_stub: StubFactory,
    dict_proxy: DictProxy,
    pki: Pki,
    tls_client: TlsClients,
) -> None:
    stub = await make_stub()
    proxy = await dict_proxy(tls_config([stub], pki))
    client = await tls_client(proxy)
    client.send(data + SMUGGLED)
    resp = await until_eof(client)
    assert resp.status == status
    assert resp.header("connection") == b"close"
    assert isinstance(rpc_error(resp)["message"], str)
    assert rejected(proxy, reason) == 1
    fresh = await tls_client(proxy)
    fresh.send(request("GET", "/next"))
    answer = await fresh.response()
    assert (answer.status, bytes(answer.body)) == (200, b"/next")
    assert [r.target for r in stub.requests] == [b"/next"]
