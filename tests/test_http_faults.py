"""Faults between the proxy and its backends: stale pooled connections, backends that refuse, close
early, answer garbage or stay silent. Which requests are retried, which get 502/504, and which
sessions survive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import (
    INITIALIZE,
    SESSION_NOT_FOUND,
    ClientFactory,
    initialize,
    request,
    rpc_error,
)
from tests.fixtures.stub import Refusing, StubFactory, StubRequest, minting, response

JSON = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}

# -- 12. stale keep-alive ---------------------------------------------------------------------------


async def test_backend_closing_an_idle_connection_is_invisible_to_the_client(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.write(response(200, [], req.target))  # keep-alive, then gone
        req.conn.close()

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    for target in (b"/1", b"/2", b"/3"):
        client.send(request("GET", target.decode()))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, target)
    assert [r.target for r in stub.requests] == [b"/1", b"/2", b"/3"]


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_request_on_a_connection_closed_in_flight_is_retried_once_on_a_fresh_one(
    how: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.conn.index == 0 and len(req.conn.requests) == 2:
            # The backend had closed this idle connection as the request was crossing the wire.
            req.conn.close() if how == "close" else req.conn.reset()
            return
        req.conn.write(response(200, [], req.target + b":" + bytes(req.body)))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/1"))
    assert (await client.response()).body == b"/1:"
    client.send(request("POST", "/2", [("Content-Type", "application/json")], b'{"n":2}'))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b'/2:{"n":2}')
    lost, retried = stub.requests[1:]
    assert (lost.conn.index, retried.conn.index) == (0, 1)
    assert retried.raw == lost.raw  # the same bytes again
    assert retried.body == b'{"n":2}'
    assert len(stub.connections) == 2


async def test_fresh_connection_closed_before_answering_is_not_retried(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.close()

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp"))
    resp = await client.response()
    assert resp.status == 502
    rpc_error(resp)
    assert len(stub.requests) == 1


# -- 13. unreachable and silent backends --------------------------------------------------------------


async def test_new_session_skips_a_refusing_backend(
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    make_refusing: Callable[[str], Refusing],
    http: aiohttp.ClientSession,
) -> None:
    stub = await make_stub(minting("sid-1"))
    proxy = await make_proxy([make_refusing("down"), stub])
    for _ in range(4):  # least_sessions: after the first, the refusing one (no sessions) is tried first
        async with http.post(f"{proxy.url}/mcp", data=INITIALIZE, headers=JSON) as resp:
            assert resp.status == 200
            assert resp.headers["Mcp-Session-Id"] == "sid-1"
    assert len(stub.requests) == 4


async def test_all_backends_refusing_gives_502(
    make_proxy: ProxyFactory, make_refusing: Callable[[str], Refusing], http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy([make_refusing("down1"), make_refusing("down2")])
    async with http.post(f"{proxy.url}/mcp", data=INITIALIZE, headers=JSON) as resp:
        assert resp.status == 502
        body = await resp.json()
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == -32603


async def test_session_on_a_refusing_backend_gets_404_and_is_forgotten(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub(minting("sid-gone"), name="a")
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    sid = await initialize(client)
    await stub.close()  # the port refuses from now on
    headers = [("Mcp-Session-Id", sid.decode()), ("MCP-Protocol-Version", "2025-11-25")]
    client.send(request("POST", "/mcp", headers, b'{"jsonrpc":"2.0","id":2,"method":"ping"}'))
    resp = await client.response()
    assert resp.status == 404
    assert bytes(resp.body) == SESSION_NOT_FOUND
    # Back on the same port: the mapping is gone, so the request reaches no backend.
    revived = await make_stub(minting("sid-new"), name="a", port=stub.port)
    client.send(request("POST", "/mcp", headers, b'{"jsonrpc":"2.0","id":3,"method":"ping"}'))
    resp = await client.response()
    assert resp.status == 404
    assert bytes(resp.body) == SESSION_NOT_FOUND
    assert revived.requests == []


async def test_response_headers_timeout_counts_from_each_request_on_a_reused_connection(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    # The backend connection keeps one timer across requests: a deadline left from an earlier,
    # quickly answered request must not cut a later one short.
    answered = 0

    async def handle(req: StubRequest) -> None:
        nonlocal answered
        await req.complete.wait()
        if answered < 3:
            answered += 1
            req.conn.write(response(200, [], b"quick"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub], timeouts={"response_headers": 0.6})
    client = await open_client(proxy)
    for _ in range(3):
        client.send(request("GET", "/quick"))
        assert (await client.response()).status == 200
        await asyncio.sleep(0.25)  # the client's pace: the first deadline passes meanwhile
    assert len(stub.connections) == 1  # all on one pooled backend connection
    client.send(request("GET", "/silent"))
    started = time.monotonic()
    resp = await client.response()
    assert resp.status == 504
    assert time.monotonic() - started >= 0.55


async def test_backend_silent_past_response_headers_timeout_gives_504_and_keeps_the_session(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    silent = True

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.header("mcp-session-id") is None:
            req.conn.write(response(200, [("Mcp-Session-Id", "sid-slow")], b"{}"))
        elif not silent:
            req.conn.write(response(200, [], b"late but here"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub], timeouts={"response_headers": 0.5})
    client = await open_client(proxy)
    sid = await initialize(client)
    headers = [("Mcp-Session-Id", sid.decode()), ("MCP-Protocol-Version", "2025-11-25")]
    client.send(request("POST", "/mcp", headers, b"{}"))
    started = time.monotonic()
    resp = await client.response()
    assert resp.status == 504
    assert time.monotonic() - started >= 0.45
    rpc_error(resp)
    async with asyncio.timeout(2):
        await stub.connections[-1].closed.wait()  # the silent exchange was abandoned upstream
    silent = False
    client.send(request("POST", "/mcp", headers, b"{}"))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"late but here")


@pytest.mark.parametrize(
    "partial", [b"HTTP/1.1 200 O", b"NOT HTTP AT ALL\r\n\r\n"], ids=["truncated-head", "garbage"]
)
async def test_request_answered_in_part_on_a_reused_connection_is_not_retried(
    partial: bytes, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if len(req.conn.requests) == 1:
            req.conn.write(response(200, [], b"ok"))
        else:
            # The backend has started answering, so it has the request: sending it again could
            # run a tool twice.
            req.conn.write(partial)
            await req.conn.drain()
            req.conn.close()

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/1"))
    assert (await client.response()).status == 200
    client.send(request("POST", "/mcp", [("Content-Type", "application/json")], b'{"method":"tools/call"}'))
    resp = await client.response()
    assert resp.status == 502
    rpc_error(resp)
    assert len(stub.requests) == 2
    assert len(stub.connections) == 1
