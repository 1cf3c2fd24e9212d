"""Ambiguous or hostile HTTP framing is refused (issue 7, item 1), and nothing behind it is smuggled.

Every case is sent followed by a second, well-formed request (`/smuggled`) on the same connection.
The proxy must answer 400 (405 for CONNECT) with a JSON-RPC body and close the connection, count
the refusal in `mcpbalancer_rejected_requests_total{reason}` and log it; the stub backend's request
log proves that `/smuggled` never reached a backend. A request with `Upgrade` is no refusal: it is
forwarded without its upgrade fields, and what follows it is parsed as HTTP.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, request, rpc_error, until_eof
from tests.fixtures.stub import Stub, StubFactory

SMUGGLED = request("GET", "/smuggled")
H = b"Host: localhost\r\n"
POST = b"POST /mcp HTTP/1.1\r\n" + H
GET = b"GET /mcp HTTP/1.1\r\n" + H


# (id, bytes, status, reason, reaches the backend in part): a chunked request whose chunk framing
# breaks has had its head forwarded already; it is aborted upstream instead.
CASES = [
    ("cl-and-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "framing", False),  # noqa: E501
    ("te-and-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400, "framing", False),  # noqa: E501
    ("two-different-cl", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", 400, "framing", False),  # noqa: E501
    ("two-equal-cl", POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nabcde", 400, "framing", False),
    ("cl-list", POST + b"Content-Length: 5, 5\r\n\r\nabcde", 400, "framing", False),
    ("cl-negative", POST + b"Content-Length: -1\r\n\r\n", 400, "framing", False),
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nabcde", 400, "framing", False),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nabcde", 400, "framing", False),
    ("cl-overflow", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400, "framing", False),
    ("te-not-chunked", POST + b"Transfer-Encoding: gzip\r\n\r\n", 400, "framing", False),
    ("te-chunked-not-last", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400, "framing", False),
    ("te-twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "framing", False),  # noqa: E501
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, "framing", False),
    ("te-in-http10", b"POST /mcp HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "version", False),  # noqa: E501
    ("chunk-size-garbage", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "framing", True),
    ("chunk-size-overflow", POST + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n", 400, "framing", True),  # noqa: E501
    ("chunk-size-negative", POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "framing", True),
    ("chunk-bare-lf", POST + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n", 400, "framing", True),
    ("obs-fold-space", GET + b"X-A: a\r\n b\r\n\r\n", 400, "framing", False),
    ("obs-fold-tab", GET + b"X-A: a\r\n\tb\r\n\r\n", 400, "framing", False),
    ("nul-in-value", GET + b"X-A: a\x00b\r\n\r\n", 400, "framing", False),
    ("nul-in-name", GET + b"X-\x00A: ab\r\n\r\n", 400, "framing", False),
    ("ctl-in-value", GET + b"X-A: a\x01b\r\n\r\n", 400, "framing", False),
    ("del-in-value", GET + b"X-A: a\x7fb\r\n\r\n", 400, "framing", False),
    ("bare-cr-in-value", GET + b"X-A: a\rb\r\n\r\n", 400, "framing", False),
    ("space-in-name", GET + b"X A: ab\r\n\r\n", 400, "framing", False),
    ("bare-lf-lines", b"GET /mcp HTTP/1.1\nHost: localhost\n\n", 400, "framing", False),
    ("nul-in-target", b"GET /mcp\x00x HTTP/1.1\r\n" + H + b"\r\n", 400, "framing", False),
    ("ctl-in-target", b"GET /mcp\x01x HTTP/1.1\r\n" + H + b"\r\n", 400, "framing", False),
    ("http-2-0", b"GET /mcp HTTP/2.0\r\n" + H + b"\r\n", 400, "version", False),
    ("no-host", b"GET /mcp HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "host", False),
    ("two-hosts", GET + b"Host: other.test\r\n\r\n", 400, "host", False),
    ("absolute-form-other-host", b"GET http://other.test/mcp HTTP/1.1\r\n" + H + b"\r\n", 400, "host", False),
    ("absolute-form-other-port", b"GET http://localhost:81/mcp HTTP/1.1\r\n" + H + b"\r\n", 400, "host", False),  # noqa: E501
    ("absolute-form-not-http", b"GET ftp://localhost/mcp HTTP/1.1\r\n" + H + b"\r\n", 400, "host", False),
    ("asterisk-not-options", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400, "host", False),
    ("connect", b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n", 405, "method", False),
    ("connect-origin-form", b"CONNECT /mcp HTTP/1.1\r\n" + H + b"\r\n", 405, "method", False),
    ("two-session-ids", POST + b"Mcp-Session-Id: aaa\r\nMcp-Session-Id: bbb\r\nContent-Length: 2\r\n\r\n{}", 400, "session_id", False),  # noqa: E501
]  # fmt: skip


def rejected(proxy: Proxy, reason: str) -> float:
    value = proxy.metrics.registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": reason})
    return value or 0.0


async def assert_next_request_served(proxy: Proxy, stub: Stub, open_client: ClientFactory) -> None:
    """A fresh connection still works, and once its request reached the backend, nothing sent
    before it on the refused connection can still be on its way."""
    client = await open_client(proxy)
    client.send(request("GET", "/next"))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"/next")
    assert stub.requests[-1].target == b"/next"


@pytest.mark.parametrize(
    ("data", "status", "reason", "partial"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_ambiguous_framing_is_refused_and_nothing_behind_it_is_forwarded(
    data: bytes,
    status: int,
    reason: str,
    partial: bool,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    with caplog.at_level(logging.INFO, logger="mcpbalancer"):
        client.send(data + SMUGGLED)
        resp = await until_eof(client)  # the answer, then the connection is closed
    assert resp.status == status
    assert resp.header("connection") == b"close"
    assert isinstance(rpc_error(resp)["message"], str)
    assert rejected(proxy, reason) == 1
    assert [r for r in caplog.records if r.name.startswith("mcpbalancer.dataplane")], "no log line"
    await assert_next_request_served(proxy, stub, open_client)
    targets = [r.target for r in stub.requests]
    assert b"/smuggled" not in targets
    if partial:
        # The head may have gone ahead of its broken body (if the backend connection was ready
        # first); then that upstream request was aborted, not left waiting for the rest.
        assert targets in ([b"/next"], [b"/mcp", b"/next"])
        if len(targets) == 2:
            async with asyncio.timeout(5):
                await stub.requests[0].conn.closed.wait()
    else:
        assert targets == [b"/next"]


async def test_smuggling_behind_a_valid_pipelined_request_reaches_no_backend(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    # CL.TE desync attempt: a front end trusting Content-Length would forward "0\r\n\r\nGET /smuggled"
    # as the body and a back end trusting chunked would see /smuggled as a second request.
    attack = POST + b"Content-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    client.send(request("GET", "/first") + attack + SMUGGLED)
    first = await client.response()
    assert (first.status, bytes(first.body)) == (200, b"/first")
    refused = await until_eof(client)
    assert refused.status == 400
    rpc_error(refused)
    await assert_next_request_served(proxy, stub, open_client)
    assert [r.target for r in stub.requests] == [b"/first", b"/next"]


@pytest.mark.parametrize(
    "target", [b"http://localhost/mcp?x=1", b"http://LOCALhost:80/mcp?x=1"], ids=["same", "default-port"]
)
async def test_absolute_form_for_the_request_host_is_accepted(
    target: bytes, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"/mcp?x=1")
    assert rejected(proxy, "host") == 0


async def test_equal_repeated_session_ids_are_not_a_conflict(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Mcp-Session-Id", "abc"), ("Mcp-Session-Id", "abc")]))
    resp = await client.response()
    assert resp.status == 404  # unknown session, but not refused as ambiguous
    assert rejected(proxy, "session_id") == 0
    assert stub.requests == []


async def test_body_cut_short_by_a_half_close_ends_the_upstream_request(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Content-Length", "100")]) + b"0123456789")
    await stub.wait_requests(1)
    await stub.requests[0].wait_body(10)
    client.writer.write_eof()  # the rest of the body can never come
    resp = await until_eof(client)
    assert resp.status == 400
    assert rpc_error(resp)["message"] == "Bad Request: the request body was cut short"
    async with asyncio.timeout(5):  # the backend is not left waiting for 90 more bytes
        await stub.connections[0].closed.wait()


async def test_connect_is_405_naming_the_methods_allowed(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n\x16\x03\x01tls bytes")
    resp = await until_eof(client)
    assert (resp.status, resp.reason) == (405, b"Method Not Allowed")
    assert resp.header("allow") == b"GET, HEAD, POST, DELETE, OPTIONS"
    assert stub.requests == []


WEBSOCKET = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)
H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
UPGRADES = [
    ("websocket", GET + WEBSOCKET + b"\r\n", b""),
    ("h2c-get", GET + H2C + b"\r\n", b""),
    ("h2c-post-length", POST + H2C + b"Content-Length: 11\r\n\r\nhello world", b"hello world"),
    ("h2c-post-chunked", POST + H2C + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("keep-alive-token", GET + b"Connection: keep-alive, upgrade\r\nUpgrade: websocket\r\n\r\n", b""),
    ("two-connection-fields", GET + b"Connection: upgrade\r\nConnection: x-a\r\nUpgrade: h2c\r\n\r\n", b""),
    ("upper-case", GET + b"CONNECTION: UPGRADE\r\nUPGRADE: h2c\r\n\r\n", b""),
    ("no-space", GET + b"Connection:upgrade\r\nupgrade:websocket\r\n\r\n", b""),
]  # fmt: skip
UPGRADE_FIELDS = {b"upgrade", b"http2-settings", b"connection"}


@pytest.mark.parametrize(("data", "body"), [c[1:] for c in UPGRADES], ids=[c[0] for c in UPGRADES])
async def test_upgrade_is_answered_without_switching_and_what_follows_is_http(
    data: bytes, body: bytes, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(data + request("GET", "/next"))
    first = await client.response()
    assert (first.status, bytes(first.body)) == (200, b"/mcp")  # the backend's answer, not 101 nor 501
    assert not {name.lower() for name, _ in first.headers} & {b"upgrade"}
    second = await client.response()
    assert (second.status, bytes(second.body)) == (200, b"/next")  # the same connection, kept alive
    upgrade, following = stub.requests
    assert {name.lower() for name, _ in upgrade.headers} & UPGRADE_FIELDS == set()
    assert bytes(upgrade.body) == body
    assert following.target == b"/next"
    assert rejected(proxy, "method") == 0
    if b"Sec-WebSocket-Key" in data:  # end-to-end fields pass as they are
        assert upgrade.header("sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="


async def test_a_client_that_speaks_the_new_protocol_anyway_is_a_framing_error(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # a masked WebSocket "Hello"
    client.send(GET + WEBSOCKET + b"\r\n" + frame + SMUGGLED)
    first = await client.response()
    assert (first.status, bytes(first.body)) == (200, b"/mcp")
    refused = await until_eof(client)
    assert refused.status == 400
    assert rejected(proxy, "framing") == 1
    assert [r.target for r in stub.requests] == [b"/mcp"]


async def test_upgrade_with_connection_close_is_answered_and_closed(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    client.send(GET + b"Connection: close, Upgrade\r\nUpgrade: websocket\r\n\r\n" + SMUGGLED)
    resp = await until_eof(client)
    assert (resp.status, resp.header("connection")) == (200, b"close")
    assert [r.target for r in stub.requests] == [b"/mcp"]


async def test_many_pipelined_upgrade_requests_in_one_send_are_each_answered(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    # Each is parsed again after the parser stops at it: in a loop, so more of them than Python's
    # recursion limit come through one read.
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    count = 1100
    client.send(
        (GET + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n") * count + request("GET", "/last")
    )
    for _ in range(count):
        assert (await client.response()).status == 200
    assert bytes((await client.response()).body) == b"/last"
    assert len(stub.requests) == count + 1
