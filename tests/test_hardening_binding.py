"""Credential-bound sessions (issue 7, item 5): `bind_sessions: authorization`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx2
import pytest
import redis.asyncio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.errors import ConfigError
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import INITIALIZE, ClientFactory, request
from tests.fixtures.stub import StubFactory, minting
from tests.mcp_helpers import SESSION_NOT_FOUND, call_body, mcp_url, session_headers, text_of

KEY = "0123456789abcdef-test-key"
ALICE = "Bearer alice-token"


def refused(proxy: Proxy) -> float:
    registry = proxy.metrics.registry
    return registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": "credential"}) or 0.0


@contextlib.asynccontextmanager
async def client_with(url: str, headers: dict[str, str]) -> AsyncIterator[tuple[Client, list[str]]]:
    """The real mcp client sending `headers`; yields it and the session ids it was given."""
    sids: list[str] = []

    async def seen(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            sids.append(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0), event_hooks={"response": [seen]})
    async with http, Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
        yield client, sids


async def test_another_credential_gets_404_and_reaches_no_backend(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub(minting("sid-1"))
    proxy = await make_proxy([stub], bind_sessions="authorization")
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Authorization", ALICE)], INITIALIZE))
    assert (await client.response()).header("mcp-session-id") == b"sid-1"
    for other in ([("Authorization", "Bearer mallory")], [], [("Authorization", ALICE + "x")]):
        client.send(request("POST", "/mcp", [("Mcp-Session-Id", "sid-1"), *other], b"{}"))
        resp = await client.response()
        assert resp.status == 404
        assert bytes(resp.body).startswith(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600')
    assert refused(proxy) == 3
    assert len(stub.requests) == 1  # only the initialize
    # The session itself is intact for its owner (header names are case-insensitive).
    client.send(request("POST", "/mcp", [("Mcp-Session-Id", "sid-1"), ("AUTHORIZATION", ALICE)], b"{}"))
    assert (await client.response()).status == 200
    assert len(stub.requests) == 2


async def test_real_mcp_client_keeps_its_session_and_a_thief_gets_404(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(backends[:1], bind_sessions="authorization")
    url = mcp_url(proxy)
    async with client_with(url, {"Authorization": ALICE}) as (client, sids):
        assert text_of(await client.call_tool("count")) == "1"
        sid = sids[0]
        async with aiohttp.ClientSession() as http:
            for thief in ({"Authorization": "Bearer mallory"}, {}):
                headers = {**session_headers(sid), **thief}
                async with http.post(url, json=call_body("count"), headers=headers) as resp:
                    assert resp.status == 404
                    assert await resp.json() == SESSION_NOT_FOUND
        # The thief's calls never reached the backend: the owner's counter went on from 1.
        assert text_of(await client.call_tool("count")) == "2"
    assert refused(proxy) == 2


async def test_binding_is_shared_by_replicas_on_redis_and_stores_no_credential(
    backends: list[BackendProcess], make_proxy: ProxyFactory, redis_url: str
) -> None:
    settings = {"store": redis_url, "bind_sessions": "authorization", "session_binding_key": KEY}
    first = await make_proxy(backends[:1], **settings)
    second = await make_proxy(backends[:1], **settings)
    async with client_with(mcp_url(first), {"Authorization": ALICE}) as (client, sids):
        assert text_of(await client.call_tool("count")) == "1"
        sid = sids[0]
        async with aiohttp.ClientSession() as http:
            owner = {**session_headers(sid), "Authorization": ALICE}
            async with http.post(mcp_url(second), json=call_body("count"), headers=owner) as resp:
                assert resp.status == 200  # the other replica computes the same hash
            thief = {**session_headers(sid), "Authorization": "Bearer mallory"}
            async with http.post(mcp_url(second), json=call_body("count"), headers=thief) as resp:
                assert resp.status == 404
        store = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            value = await store.get(f"mcpb:s:{sid}")
        finally:
            await store.aclose()
        assert value is not None
        backend, tag, bound, *moved = value.split("|")  # routing/binding.py: owner|tag|bound[|alias]
        assert backend == backends[0].name
        assert len(tag) == 32
        assert bound.isdigit()
        assert moved == []
        assert "alice" not in value


def test_redis_store_with_binding_requires_a_shared_key() -> None:
    data = {
        "backends": [{"name": "a", "url": "http://127.0.0.1:1"}],
        "store": "redis://127.0.0.1:6379/0",
        "bind_sessions": "authorization",
    }
    with pytest.raises(ConfigError, match="session_binding_key: is required when bind_sessions is set"):
        parse_config(data, "cfg.yaml")
    assert parse_config({**data, "session_binding_key": KEY}).session_binding_key == KEY
    with pytest.raises(ConfigError, match="session_binding_key: must be at least 16 characters"):
        parse_config({**data, "session_binding_key": "short"})
    with pytest.raises(ConfigError, match="bind_sessions: must be an HTTP header name"):
        parse_config({**data, "bind_sessions": "bad header", "session_binding_key": KEY})
    memory = parse_config({**data, "store": "memory", "bind_sessions": "Authorization"})
    assert (memory.bind_sessions, memory.session_binding_key) == ("authorization", None)
