"""The HTTP/1.1 data plane, byte by byte: keep-alive, bodies, Expect, HEAD, pipelining, half-close.

Backends are scripted stubs (tests/fixtures/stub.py): these are framings and faults a real MCP
server does not produce on demand. Streaming, heartbeats and flow control: test_http_streaming.py;
limits and header hygiene: test_http_requests.py; backend faults: test_http_faults.py.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest

from mcpbalancer.dataplane.client import ClientConnection
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import (
    SESSION_NOT_FOUND,
    ClientFactory,
    request,
    until_eof,
)
from tests.fixtures.stub import Handler, StubFactory, StubRequest, chunk, response

# -- 1. keep-alive --------------------------------------------------------------------------------


async def test_sequential_requests_share_one_upstream_connection(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    for i in range(5):
        client.send(request("GET", f"/mcp?n={i}"))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, f"/mcp?n={i}".encode())
        assert resp.header("connection") is None
    assert [r.target for r in stub.requests] == [f"/mcp?n={i}".encode() for i in range(5)]
    assert len(stub.connections) == 1
    assert all(r.version == "1.1" and r.conn is stub.connections[0] for r in stub.requests)


async def test_http10_client_without_keep_alive_gets_the_answer_and_a_close(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    for _ in range(2):
        client = await open_client(proxy)
        client.send(request("GET", "/mcp", version="1.0"))
        resp = await until_eof(client)
        assert (resp.status, bytes(resp.body)) == (200, b"/mcp")
        assert resp.header("connection") == b"close"
    # The backend side is still HTTP/1.1 with keep-alive: the second client reused the connection.
    assert [r.version for r in stub.requests] == ["1.1", "1.1"]
    assert len(stub.connections) == 1


async def test_http11_client_asking_to_close_gets_a_close_and_the_backend_connection_stays(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    for _ in range(2):
        client = await open_client(proxy)
        client.send(request("GET", "/mcp", [("Connection", "close")]))
        resp = await until_eof(client)
        assert (resp.status, resp.header("connection")) == (200, b"close")
    assert [r.header("connection") for r in stub.requests] == [None, None]
    assert len(stub.connections) == 1


async def test_http10_client_with_keep_alive_is_told_the_connection_persists(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    for target in ("/a", "/b"):
        client.send(request("GET", target, [("Connection", "keep-alive")], version="1.0"))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, target.encode())
        # An HTTP/1.0 client closes unless told otherwise (RFC 9112 §9.3).
        assert resp.header("connection") == b"keep-alive"
    assert stub.requests[0].header("connection") is None


@pytest.mark.parametrize(
    "answer",
    [
        response(200, [("Connection", "close")], b"bye"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
    ],
    ids=["connection-close", "http10"],
)
async def test_upstream_connection_that_will_close_is_not_reused(
    answer: bytes, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        # The first answer says the connection ends, but the socket stays open a while, as it
        # does on a busy server: the proxy must not send a second request on it.
        req.conn.write(answer if len(stub.requests) == 1 else response(200, [], b"fresh"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    for expected in (b"bye", b"fresh"):
        client.send(request("GET", "/mcp"))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, expected)
    assert [len(c.requests) for c in stub.connections] == [1, 1]


# -- 2. bodies ------------------------------------------------------------------------------------


async def test_content_length_request_body_arrives_intact(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    body = bytes(range(256)) * 800  # 200 KiB, every byte value
    client.send(request("POST", "/mcp", [("Content-Type", "application/octet-stream")], body))
    assert (await client.response()).status == 200
    (seen,) = stub.requests
    assert seen.body == body
    assert seen.header_all("content-length") == [str(len(body)).encode()]
    assert seen.header("transfer-encoding") is None


async def test_chunked_request_body_is_streamed_before_the_client_finishes(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    head = request("POST", "/mcp", [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")])
    client.send(head + chunk(b'{"jsonrpc":'))
    await stub.wait_requests(1)
    seen = stub.requests[0]
    async with asyncio.timeout(2):
        await seen.wait_body(len(b'{"jsonrpc":'))
    assert not seen.complete.is_set()
    client.send(chunk(b'"2.0",'))
    async with asyncio.timeout(2):
        await seen.wait_body(len(b'{"jsonrpc":"2.0",'))
    client.send(chunk(b'"method":"ping"}') + b"0\r\n\r\n")
    assert (await client.response()).status == 200
    assert seen.body == b'{"jsonrpc":"2.0","method":"ping"}'
    assert seen.header("transfer-encoding") == b"chunked"
    assert seen.header("content-length") is None


UNSIZED = (b"hello ", b"unsized ", b"world")


async def chunked_answer(req: StubRequest) -> None:
    await req.complete.wait()
    req.conn.write(
        response(200, [("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked")], length=False)
    )
    for part in UNSIZED:
        req.conn.write(chunk(part))
        await req.conn.drain()
    req.conn.write(b"0\r\n\r\n")


async def close_delimited_answer(req: StubRequest) -> None:
    await req.complete.wait()
    req.conn.write(response(200, [("Content-Type", "text/plain")], length=False))
    for part in UNSIZED:
        req.conn.write(part)
        await req.conn.drain()
    req.conn.close()


@pytest.mark.parametrize("handler", [chunked_answer, close_delimited_answer], ids=["chunked", "close"])
async def test_unsized_response_reaches_http11_client_chunked(
    handler: Handler, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub(handler)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    for _ in range(2):  # the client connection stays usable
        client.send(request("GET", "/mcp"))
        resp = await client.response()
        assert resp.status == 200
        assert resp.framing == "chunked"
        assert resp.header("content-length") is None
        assert resp.header("connection") is None
        assert bytes(resp.body) == b"".join(UNSIZED)


@pytest.mark.parametrize("handler", [chunked_answer, close_delimited_answer], ids=["chunked", "close"])
async def test_unsized_response_reaches_http10_client_close_delimited(
    handler: Handler, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub(handler)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Connection", "keep-alive")], version="1.0"))
    resp = await client.response()  # read to EOF: the close delimits the body
    assert resp.status == 200
    assert resp.framing == "close"
    assert resp.header("transfer-encoding") is None
    assert resp.header("connection") == b"close"
    assert bytes(resp.body) == b"".join(UNSIZED)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_content_length_response_keeps_its_length(
    version: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    body = b"x" * 70000 + b"end"

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.write(response(200, [("Content-Type", "application/json")], body))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", version=version))
    resp = await client.response()
    assert resp.framing == "length"
    assert resp.header_all("content-length") == [b"70003"]
    assert resp.header("transfer-encoding") is None
    assert resp.body == body


async def test_transfer_codings_before_chunked_keep_their_label_both_ways(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    coded = gzip.compress(b'{"jsonrpc":"2.0","id":1,"result":{}}')

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "gzip, chunked")]
        req.conn.write(response(200, headers, length=False) + chunk(coded) + b"0\r\n\r\n")

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    head = request("POST", "/mcp", [("Transfer-Encoding", "gzip, chunked")])
    client.send(head + chunk(coded[:10]) + chunk(coded[10:]) + b"0\r\n\r\n")
    resp = await client.response()
    assert resp.header_all("transfer-encoding") == [b"gzip, chunked"]
    assert resp.body == coded
    (seen,) = stub.requests
    assert seen.header_all("transfer-encoding") == [b"gzip, chunked"]
    assert seen.body == coded


async def test_empty_post_keeps_its_content_length(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", body=b""))  # some servers answer 411 to a POST without it
    assert (await client.response()).status == 200
    assert stub.requests[0].header_all("content-length") == [b"0"]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\nContent-Length: 99\r\n\r\n',
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + response(200, [("X-A", "1")], b"final"),
    ],
    ids=["204", "304", "103"],
)
async def test_bodiless_and_interim_answers_keep_both_connections_in_step(
    answer: bytes, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        req.conn.write(answer if req.target == b"/first" else response(200, [], b"second"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/first"))
    first = await client.response()
    status = int(answer[9:12])
    assert first.status == (200 if status == 103 else status)
    assert bytes(first.raw).count(b"HTTP/1.1") == 1, "an interim answer was relayed"
    assert first.header("transfer-encoding") is None
    assert bytes(first.body) == (b"final" if status == 103 else b"")
    client.send(request("GET", "/second"))
    second = await client.response()
    assert bytes(second.raw).startswith(b"HTTP/1.1 200 ")
    assert bytes(second.body) == b"second"
    assert len(stub.connections) == 1


# -- 3. Expect: 100-continue ------------------------------------------------------------------------


async def test_expect_continue_gets_100_then_the_answer(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    head = request("POST", "/mcp", [("Expect", "100-continue"), ("Content-Length", str(len(body)))])
    client.send(head)
    interim = await client.read_head()
    assert bytes(interim.raw) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(body)
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"/mcp")
    (seen,) = stub.requests
    assert seen.header("expect") is None
    assert seen.body == body


async def test_expect_continue_for_unknown_session_gets_404_without_100_and_a_close(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    headers = [("Mcp-Session-Id", "no-such-session"), ("Expect", "100-continue"), ("Content-Length", "40")]
    client.send(request("POST", "/mcp", headers))
    resp = await until_eof(client)  # never sends the body: the proxy must not wait for it
    assert resp.status == 404
    assert bytes(resp.raw).startswith(b"HTTP/1.1 404 ")
    assert resp.header("connection") == b"close"
    assert bytes(resp.body) == SESSION_NOT_FOUND
    assert stub.requests == []


# -- 4. HEAD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", [("Content-Length", "1234"), ("Transfer-Encoding", "chunked")])
async def test_head_gets_headers_only_and_both_connections_stay_usable(
    framing: tuple[str, str], make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.method == b"HEAD":
            req.conn.write(response(200, [("Content-Type", "application/json"), framing], length=False))
        else:
            req.conn.write(response(200, [], b"after head"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("HEAD", "/mcp"))
    head = await client.response(head_only=True)
    assert head.status == 200
    if framing[0] == "Content-Length":
        assert head.header_all("content-length") == [b"1234"]
    client.send(request("GET", "/mcp"))
    resp = await client.response()
    assert bytes(resp.raw).startswith(b"HTTP/1.1 200 "), "HEAD answer followed by body bytes"
    assert bytes(resp.body) == b"after head"
    assert [r.method for r in stub.requests] == [b"HEAD", b"GET"]
    assert len(stub.connections) == 1


# -- 5. pipelining and 6. half-close ---------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    first_may_answer = asyncio.Event()

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.target == b"/1":
            await first_may_answer.wait()
        req.conn.write(response(200, [], req.target + b":" + bytes(req.body)))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    chunked = request("POST", "/3", [("Transfer-Encoding", "chunked")]) + chunk(b"c3") + b"0\r\n\r\n"
    client.send(request("GET", "/1") + request("POST", "/2", body=b"b2") + chunked)
    await stub.wait_requests(1)
    first_may_answer.set()
    bodies = [bytes((await client.response()).body) for _ in range(3)]
    assert bodies == [b"/1:", b"/2:b2", b"/3:c3"]
    assert [r.target for r in stub.requests] == [b"/1", b"/2", b"/3"]


async def test_half_closed_client_still_gets_the_whole_response(
    monkeypatch: pytest.MonkeyPatch,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    release, half_closed = asyncio.Event(), asyncio.Event()
    eof_received = ClientConnection.eof_received

    def seen_eof(conn: ClientConnection) -> bool | None:
        half_closed.set()
        return eof_received(conn)

    monkeypatch.setattr(ClientConnection, "eof_received", seen_eof)

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        await release.wait()
        await chunked_answer(req)

    stub = await make_stub(handle)
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/1") + request("GET", "/2"))
    client.writer.write_eof()
    await stub.wait_requests(1)
    async with asyncio.timeout(2):
        await half_closed.wait()  # the proxy has seen the end of input before any response
    release.set()
    for _ in range(2):
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, b"".join(UNSIZED))
    assert await client.read_to_eof() == b""
