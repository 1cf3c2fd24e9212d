"""Origin validation and CORS (issue 7, item 4): DNS-rebinding protection as the MCP spec asks of
servers, done once at the proxy. The raw client sends `Host: localhost`; the Host check itself and
the same-host rule of `allowed_hosts: ["*"]` are in tests/test_rebinding.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, request, rpc_error, until_eof
from tests.fixtures.stub import StubFactory
from tests.mcp_helpers import mcp_url, text_of

APP = "https://app.example"


def rejected(proxy: Proxy) -> float:
    registry = proxy.metrics.registry
    return registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": "origin"}) or 0.0


@contextlib.asynccontextmanager
async def client_with(url: str, headers: dict[str, str]) -> AsyncIterator[Client]:
    """The real mcp client, sending `headers` (here: what a browser would add) on every request."""
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
        yield client


@pytest.mark.parametrize(
    ("allowed", "origin", "passes"),
    [
        (None, None, True),
        # Empty allowed_origins: an origin on a host of allowed_hosts (the loopback names) passes.
        (None, "http://localhost", True),  # same host as Host
        (None, "http://localhost:80", True),
        (None, "HTTP://LOCALHOST", True),
        (None, "http://localhost:3000", True),  # any port of an allowed host
        (None, "http://127.0.0.1:8080", True),
        (None, "https://[::1]:8443", True),
        (None, "http://localhost.evil.test", False),
        (None, "ftp://localhost", False),
        (None, "http://evil.test", False),
        (None, "null", False),
        ([APP], APP, True),
        ([APP], "https://APP.example", True),
        ([APP], "http://app.example", False),  # another scheme is another origin
        ([APP], "https://app.example:444", False),
        ([APP], "http://localhost", False),  # an explicit list is the whole list
        ([APP], None, True),
        (["*"], "http://evil.test", True),
    ],
)
async def test_origin_policy(
    allowed: list[str] | None,
    origin: str | None,
    passes: bool,
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    stub = await make_stub()
    extra = {} if allowed is None else {"allowed_origins": allowed}
    proxy = await make_proxy([stub], **extra)
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Origin", origin)] if origin else []))
    if passes:
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, b"/mcp")
        assert rejected(proxy) == 0
        if origin is not None:
            assert resp.header("access-control-allow-origin") == origin.encode()
            assert (
                resp.header("access-control-expose-headers")
                == b"Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate"
            )
    else:
        resp = await until_eof(client)
        assert resp.status == 403
        assert rpc_error(resp)["message"] == "Forbidden: Origin not allowed"
        assert resp.header("access-control-allow-origin") is None
        assert rejected(proxy) == 1
        assert stub.requests == []


async def test_preflight_for_an_allowed_origin_is_answered_by_the_proxy(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_origins=[APP])
    client = await open_client(proxy)
    preflight = [
        ("Origin", APP),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type, mcp-session-id, mcp-param-region"),
    ]
    client.send(request("OPTIONS", "/mcp", preflight))
    resp = await client.response()
    assert resp.status == 204
    assert resp.header("access-control-allow-origin") == APP.encode()
    assert (
        resp.header("access-control-expose-headers")
        == b"Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate"
    )
    allow = (resp.header("access-control-allow-headers") or b"").lower()
    for name in (b"mcp-session-id", b"mcp-protocol-version", b"authorization", b"mcp-param-region"):
        assert name in allow
    assert b"DELETE" in (resp.header("access-control-allow-methods") or b"")
    assert resp.header("vary") == b"Origin"
    # The connection stays usable, and the preflight never reached a backend.
    client.send(request("GET", "/mcp", [("Origin", APP)]))
    assert (await client.response()).status == 200
    assert [r.method for r in stub.requests] == [b"GET"]


async def test_preflight_from_a_foreign_origin_is_refused(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_origins=[APP])
    client = await open_client(proxy)
    client.send(
        request(
            "OPTIONS", "/mcp", [("Origin", "https://evil.test"), ("Access-Control-Request-Method", "POST")]
        )
    )
    resp = await until_eof(client)
    assert resp.status == 403
    assert stub.requests == []


async def test_proxy_error_answers_carry_cors_headers_for_allowed_origins(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_origins=[APP])
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Origin", APP), ("Mcp-Session-Id", "unknown")], b"{}"))
    resp = await client.response()
    assert resp.status == 404  # a browser client must be able to read it to re-initialize
    assert resp.header("access-control-allow-origin") == APP.encode()
    rpc_error(resp)


async def test_real_mcp_client_from_an_allowed_origin_works_and_a_foreign_one_is_refused(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(backends[:1], allowed_origins=[APP])
    async with client_with(mcp_url(proxy), {"Origin": APP}) as client:
        assert text_of(await client.call_tool("count")) == "1"
        assert text_of(await client.call_tool("count")) == "2"
    assert rejected(proxy) == 0
    with pytest.raises(Exception) as failure:  # noqa: PT011 - the client's error type is its own business
        async with client_with(mcp_url(proxy), {"Origin": "https://evil.test"}) as client:
            await client.call_tool("count")
    assert failure.value is not None
    assert rejected(proxy) >= 1
