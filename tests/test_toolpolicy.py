"""`tool_policy` for both eras: a legacy `tools/call` read from its bounded body (a batch checked
whole), a 2026-07-28 call decided on `Mcp-Name` without reading the body, and the bound itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory
from tests.fixtures.stub import StubFactory
from tests.mcp_helpers import (
    MODERN_VERSION,
    call_body,
    mcp_url,
    open_session,
    session_headers,
    session_ledger,
    text_of,
)

POLICY = [{"deny": ["slow", "release"]}, {"allow": ["*"]}]


def decisions(proxy: Proxy, rule: str, decision: str) -> float:
    labels = {"rule": rule, "decision": decision}
    return proxy.metrics.registry.get_sample_value("mcpbalancer_tool_policy_decisions_total", labels) or 0.0


def rejected(proxy: Proxy, reason: str) -> float:
    labels = {"reason": reason}
    return proxy.metrics.registry.get_sample_value("mcpbalancer_rejected_requests_total", labels) or 0.0


@contextlib.asynccontextmanager
async def sdk_client(url: str, mode: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers=headers or {}, timeout=httpx2.Timeout(30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_denied_tool_is_refused_with_a_json_rpc_error_and_reaches_no_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, mode: str
) -> None:
    proxy = await make_proxy(backends[:1], tool_policy=POLICY)
    async with sdk_client(mcp_url(proxy), mode) as client:
        assert text_of(await client.call_tool("whoami")) == "a"
        with pytest.raises(MCPError) as raised:
            await client.call_tool("slow", {"seconds": 0})
        assert raised.value.error.code == -32032
        assert raised.value.error.message == "Forbidden: tool 'slow' is not allowed"
        assert text_of(await client.call_tool("count")) == "1"  # the session goes on
    assert decisions(proxy, "0", "deny") == 1
    assert decisions(proxy, "1", "allow") >= 2
    assert rejected(proxy, "tool_policy") == 1
    # The refusal was the proxy's own answer (backend "none"), once.
    era = "legacy" if mode == "legacy" else "modern"
    labels = {"backend": "none", "era": era, "method": "POST", "code": "4xx", "service": "default"}
    assert proxy.metrics.registry.get_sample_value("mcpbalancer_requests_total", labels) == 1


async def test_a_batch_with_one_denied_call_is_refused_whole(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], tool_policy=POLICY)
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    seen = (await session_ledger(backends[0])).seen[sid]
    batch = [call_body("whoami", 11), call_body("release", 12, key="k"), call_body("count", 13)]
    async with web.post(url, json=batch, headers=session_headers(sid)) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert body["error"] == {"code": -32032, "message": "Forbidden: tool 'release' is not allowed"}
    assert (await session_ledger(backends[0])).seen[sid] == seen  # no part of it was sent
    # A notification or a response in a batch calls no tool: the allowed calls decide.
    allowed = [call_body("whoami", 14), {"jsonrpc": "2.0", "method": "notifications/cancelled"}]
    async with web.post(url, json=allowed, headers=session_headers(sid)) as resp:
        assert resp.status != 403
    assert (await session_ledger(backends[0])).seen[sid] == seen + 1


async def test_a_2026_call_is_decided_on_mcp_name_without_reading_the_body(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], tool_policy=POLICY)
    client = await open_client(proxy)
    head = (
        "POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"MCP-Protocol-Version: {MODERN_VERSION}\r\nMcp-Method: tools/call\r\nMcp-Name: {{name}}\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    client.send(head.replace("{name}", "slow").encode())  # the head only: the body never comes
    resp = await client.response()
    assert resp.status == 403
    assert json.loads(bytes(resp.body))["error"]["code"] == -32032
    assert stub.requests == []
    # Encoded names are decoded first: =?base64?c2xvdw==?= is "slow".
    client = await open_client(proxy)
    client.send(head.replace("{name}", "=?base64?c2xvdw==?=").encode())
    assert (await client.response()).status == 403
    # Without Mcp-Method nothing tells what the body calls: refused.
    client = await open_client(proxy)
    client.send(head.replace("Mcp-Method: tools/call\r\n", "").replace("{name}", "whoami").encode())
    resp = await client.response()
    assert resp.status == 400
    assert b"must carry Mcp-Method" in bytes(resp.body)
    assert stub.requests == []


async def test_the_body_read_for_the_policy_stays_bounded(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], tool_policy=POLICY)
    sixteen_mib = 16 * 1024 * 1024
    # Announced: refused from the head (16 MiB is within limits.body_bytes, not policy_body_bytes).
    client = await open_client(proxy)
    client.send(b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % sixteen_mib)
    resp = await client.response()
    assert resp.status == 413
    assert resp.header("connection") == b"close"
    # Chunked: refused once policy_body_bytes (1 MiB) have come, long before the 16 MiB.
    client = await open_client(proxy)
    client.send(b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer = asyncio.ensure_future(client.response(deadline=30))
    piece = b"%x\r\n%b\r\n" % (64 * 1024, b"x" * 64 * 1024)
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < sixteen_mib and not answer.done():
            client.send(piece)
            await client.writer.drain()
            sent += 64 * 1024
    resp = await answer
    assert resp.status == 413
    assert b"Request body too large" in bytes(resp.body)
    assert sent < sixteen_mib
    assert stub.requests == []
    assert rejected(proxy, "body_limit") == 2


async def test_a_body_that_could_fool_the_check_is_refused(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], tool_policy=POLICY)
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    seen = (await session_ledger(backends[0])).seen[sid]
    bodies = {
        # Which "name" counts is up to the parser: ours keeps the last, another may keep the first.
        b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"whoami","name":"slow"}}': -32700,
        b'{"jsonrpc":"2.0", "method": "tools/call"': -32700,  # not JSON
        b'{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{}}': -32602,  # no tool name
    }
    for body, code in bodies.items():
        async with web.post(url, data=body, headers=session_headers(sid)) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"]["code"] == code
    assert (await session_ledger(backends[0])).seen[sid] == seen
    assert rejected(proxy, "call_body") == 3
    # An escaped name is a name: "tools\/call" is "tools/call" to every JSON parser.
    escaped = (
        b'{"jsonrpc":"2.0","id":7,"method":"tools\\/call","params":{"name":"sl\\u006fw","arguments":{}}}'
    )
    async with web.post(url, data=escaped, headers=session_headers(sid)) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == -32032


async def test_when_conditions_on_the_principal_and_its_scopes(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    keys = {"alice": "key-of-alice-0001", "bob": "key-of-bob-00002"}
    auth = {
        "api_keys": [
            {
                "name": "alice",
                "sha256": hashlib.sha256(keys["alice"].encode()).hexdigest(),
                "scopes": ["long"],
            },
            {"name": "bob", "sha256": hashlib.sha256(keys["bob"].encode()).hexdigest()},
        ]
    }
    policy = [
        {"deny": ["count"], "when": {"principal": "b*"}},
        {"allow": ["slow"], "when": {"scope": "long"}},
        {"deny": ["slow"]},
        {"allow": ["*"]},
    ]
    proxy = await make_proxy(backends[:1], auth=auth, tool_policy=policy)
    outcome: dict[str, dict[str, Any]] = {}
    for who, key in keys.items():
        outcome[who] = {}
        async with sdk_client(mcp_url(proxy), "legacy", {"Authorization": f"Bearer {key}"}) as client:
            for tool, args in (("count", {}), ("slow", {"seconds": 0}), ("whoami", {})):
                try:
                    outcome[who][tool] = text_of(await client.call_tool(tool, args))
                except MCPError as exc:
                    outcome[who][tool] = exc.error.code
    assert outcome == {
        "alice": {"count": "1", "slow": "a", "whoami": "a"},
        "bob": {"count": -32032, "slow": -32032, "whoami": "a"},
    }


async def test_a_call_no_rule_matches_is_denied(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(backends[:1], tool_policy=[{"allow": ["who*"]}])
    async with sdk_client(mcp_url(proxy), "legacy") as client:
        assert text_of(await client.call_tool("whoami")) == "a"
        with pytest.raises(MCPError):
            await client.call_tool("count")
    assert decisions(proxy, "default", "deny") == 1
