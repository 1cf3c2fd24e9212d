"""What the proxy accepts from clients and what it passes on: limits and malformed requests get
JSON-RPC errors (in their turn on a pipelined connection), hop-by-hop headers stop at the proxy,
everything else is forwarded verbatim both ways.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import (
    INITIALIZE,
    ClientFactory,
    request,
    rpc_error,
    until_eof,
)
from tests.fixtures.stub import StubFactory, StubRequest, chunk, response

# -- 7. limits --------------------------------------------------------------------------------------

LIMITS = {"header_bytes": 2048, "header_count": 10, "body_bytes": 4096}


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (request("GET", "/mcp", [("X-Big", "a" * 3000)]), 431),
        (request("GET", "/mcp", [(f"X-N{i}", "v") for i in range(10)]), 431),
        (request("POST", "/mcp", body=b"z" * 4097), 413),
        (
            request("POST", "/mcp", [("Transfer-Encoding", "chunked")])
            + chunk(b"z" * 3000)
            + chunk(b"z" * 3000)
            + b"0\r\n\r\n",
            413,
        ),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /mcp HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (request("CONNECT", "example.com:443", host="example.com:443"), 405),
        # Request smuggling: both framings at once.
        (
            request("POST", "/mcp", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
            + b"0\r\n\r\n",
            400,
        ),
    ],
    ids=[
        "header-bytes",
        "header-count",
        "body-length",
        "body-chunked",
        "request-line",
        "header",
        "connect",
        "cl-and-te",
    ],
)
async def test_limits_and_malformed_requests_get_json_errors(
    raw: bytes,
    status: int,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits=LIMITS)
    client = await open_client(proxy)
    client.send(raw)
    resp = await until_eof(client)
    assert resp.status == status
    assert resp.header("connection") == b"close"
    assert isinstance(rpc_error(resp)["message"], str)
    if status != 413 or b"chunked" not in raw:
        assert stub.requests == []
    # The proxy is still up for the next connection.
    await assert_serves(proxy, open_client)


async def assert_serves(proxy: Proxy, open_client: ClientFactory) -> None:
    client = await open_client(proxy)
    client.send(request("GET", "/next"))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"/next")


async def test_garbage_after_a_pipelined_request_is_answered_after_it(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    release = asyncio.Event()

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        await release.wait()
        req.conn.write(response(200, [], b"first"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/1") + b"GARBAGE\r\n\r\n")
    await stub.wait_requests(1)
    release.set()
    first = await client.response()
    assert (first.status, bytes(first.body)) == (200, b"first")
    refused = await until_eof(client)
    assert refused.status == 400
    rpc_error(refused)


async def test_broken_chunked_body_ends_the_exchange_and_the_upstream_request(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Transfer-Encoding", "chunked")]) + chunk(b"abc"))
    await stub.wait_requests(1)
    await stub.requests[0].wait_body(3)
    client.send(b"ZZ-not-a-chunk-size\r\n")
    resp = await until_eof(client)
    assert resp.status == 400
    rpc_error(resp)
    async with asyncio.timeout(2):  # the backend holds half a request: it must not wait for more
        await stub.connections[0].closed.wait()


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
async def test_declared_oversized_body_gets_413_before_anything_is_forwarded(
    expect: bool, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits=LIMITS)
    client = await open_client(proxy)
    client.send(request("GET", "/warm"))  # a pooled upstream connection is ready to take it
    assert (await client.response()).status == 200
    size = 4 << 20
    headers = [("Content-Length", str(size))] + ([("Expect", "100-continue")] if expect else [])
    client.send(request("POST", "/mcp", headers))
    if not expect:
        client.send(b"z" * size)
    resp = await client.read_head()  # the answer comes first: no 100, no reading the whole body
    assert resp.status == 413
    assert resp.header("connection") == b"close"
    assert [r.target for r in stub.requests] == [b"/warm"]


async def test_oversized_pipelined_request_is_answered_in_its_turn(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    release = asyncio.Event()

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        await release.wait()
        req.conn.write(response(200, [], b"first"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub], limits=LIMITS)
    client = await open_client(proxy)
    too_big = request("POST", "/2", [("Transfer-Encoding", "chunked")]) + chunk(b"z" * 5000) + b"0\r\n\r\n"
    client.send(request("GET", "/1") + too_big)
    await stub.wait_requests(1)
    release.set()
    first = await client.response()
    assert (first.status, bytes(first.body)) == (200, b"first")
    second = await until_eof(client)
    assert second.status == 413
    assert len(stub.requests) == 1


# -- 8. header hygiene ----------------------------------------------------------------------------


async def test_request_headers_forwarded_verbatim_without_hop_by_hop(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_hosts=["public.example"])
    client = await open_client(proxy)
    headers = [
        ("Connection", "keep-alive, X-Foo"),
        ("Keep-Alive", "timeout=5"),
        ("X-Unknown", "a  b"),
        ("TE", "trailers"),
        ("Mcp-Param-Region", "eu-west"),
        ("Upgrade", "h2c"),
        ("X-Dup", "1"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Foo", "hop-by-hop by name"),
        ("x-dup", "2"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Accept-Encoding", "gzip, br"),
        ("Mcp-Method", "tools/call"),
    ]
    client.send(request("GET", "/mcp?q=1", headers, host="public.example:8443"))
    assert (await client.response()).status == 200
    (seen,) = stub.requests
    assert seen.raw.startswith(b"GET /mcp?q=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % stub.port)
    forwarded = [(n, v) for n, v in seen.headers if not n.lower().startswith(b"x-forwarded-")]
    assert forwarded == [
        (b"Host", f"127.0.0.1:{stub.port}".encode()),
        (b"X-Unknown", b"a  b"),
        (b"Mcp-Param-Region", b"eu-west"),
        (b"X-Dup", b"1"),
        (b"x-dup", b"2"),
        (b"Accept-Encoding", b"gzip, br"),
        (b"Mcp-Method", b"tools/call"),
    ]
    assert seen.header_all("x-forwarded-for") == [b"10.0.0.1, 127.0.0.1"]
    assert seen.header_all("x-forwarded-proto") == [b"http"]
    assert seen.header_all("x-forwarded-host") == [b"public.example:8443"]
    assert seen.target == b"/mcp?q=1"


async def test_absolute_form_target_reaches_the_backend_in_origin_form(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_hosts=["public.example"])
    client = await open_client(proxy)
    client.send(request("GET", "http://public.example/mcp?a=1&b=2", host="public.example"))
    assert (await client.response()).status == 200
    assert stub.requests[0].target == b"/mcp?a=1&b=2"


async def test_response_headers_forwarded_verbatim_without_hop_by_hop(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"result":{}}' + b" " * 4000  # compressible; must pass as is

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        headers = [
            ("Connection", "keep-alive, X-Bar"),
            ("Keep-Alive", "timeout=5"),
            ("Mcp-Session-Id", "sess-123"),
            ("X-Bar", "hop-by-hop by name"),
            ("X-Accel-Buffering", "no"),
            ("Proxy-Connection", "keep-alive"),
            ("Set-Cookie", "a=1"),
            ("Upgrade", "h2c"),
            ("set-cookie", "b=2"),
            ("Content-Type", "application/json"),
        ]
        req.conn.write(response(200, headers, body))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Accept-Encoding", "gzip")], INITIALIZE))
    resp = await client.response()
    assert resp.headers == [
        (b"Mcp-Session-Id", b"sess-123"),
        (b"X-Accel-Buffering", b"no"),
        (b"Set-Cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    assert resp.body == body
    assert stub.requests[0].header("accept-encoding") == b"gzip"


async def test_encoded_response_passes_untouched(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    body = gzip.compress(b"data: hello\n\n" * 100)

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.write(response(200, [("Content-Encoding", "gzip"), ("Vary", "Accept-Encoding")], body))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Accept-Encoding", "gzip")]))
    resp = await client.response()
    assert resp.header_all("content-encoding") == [b"gzip"]
    assert resp.body == body
