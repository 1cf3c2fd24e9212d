"""Replay failover any replica can run (issue 14, item 3), and `replay_on: [backend_404]`.

Two proxies share a real Redis; real FastMCP backends are killed (SIGKILL) or restarted at the same
port; the real mcp client and raw aiohttp drive them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.routing.binding import decode_owner
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import DictProxy, proxy_config
from tests.mcp_helpers import (
    call_tool,
    from_backend,
    mcp_url,
    open_session,
    session_ledger,
    wait_until,
)

REPLAY_404 = {"mode": "replay", "replay_on": ["gone", "backend_404"]}


def replays(proxy: Proxy) -> int:
    assert proxy.failover is not None
    return proxy.failover.replays


@pytest.mark.parametrize("ids", ["plain", "sealed"])
async def test_a_session_initialized_through_one_proxy_is_replayed_by_another(
    backend_factory: BackendFactory, dict_proxy: DictProxy, redis_url: str, ids: str
) -> None:
    started = await asyncio.to_thread(backend_factory, ["x1", "x2"])
    extra: dict[str, Any] = {"failover": "replay", "store": redis_url}
    if ids == "sealed":
        extra |= {
            "session_ids": "sealed",
            "session_keys": [base64.b64encode(secrets.token_bytes(32)).decode()],
        }
    first = await dict_proxy(proxy_config(started, **extra))
    second = await dict_proxy(proxy_config(started, **extra))
    async with aiohttp.ClientSession() as web:
        sid = await open_session(web, mcp_url(first))
        owner = (await call_tool(web, mcp_url(first), sid, "whoami")).text
        assert (await call_tool(web, mcp_url(first), sid, "count")).text == "1"
        [doomed] = [b for b in started if b.name == owner]
        [other] = [b for b in started if b.name != owner]
        await doomed.akill()

        # The second proxy never saw the initialize: it reads the record from Redis and replays.
        moved = await call_tool(web, mcp_url(second), sid, "count")
        assert (moved.status, moved.text, moved.headers["Mcp-Session-Id"]) == (200, "1", sid)
        assert from_backend(moved.headers)
        assert (replays(first), replays(second)) == (0, 1)
        # The first proxy routes the moved session to its new backend too, without a replay of its
        # own: it heard of the move, or finds it in Redis when it sees the owner gone.
        assert (await call_tool(web, mcp_url(first), sid, "whoami")).text == other.name
        assert (await call_tool(web, mcp_url(first), sid, "count")).text == "2"
        assert (await call_tool(web, mcp_url(second), sid, "count")).text == "3"
        assert (replays(first), replays(second)) == (0, 1)
    ledger = await session_ledger(other)
    assert ledger.stray_total == 0  # never sent to the new backend under the client's id
    if ids == "plain":
        assert decode_owner(str(await second.store.get(sid))).owner == other.name


async def test_a_record_never_holds_the_credential(
    backend_factory: BackendFactory, dict_proxy: DictProxy, redis_url: str
) -> None:
    import redis.asyncio

    started = await asyncio.to_thread(backend_factory, ["y1"])
    proxy = await dict_proxy(
        proxy_config(
            started,
            failover="replay",
            store=redis_url,
            bind_sessions="authorization",
            session_binding_key="replay-shared-binding-key-0123456789",
        )
    )
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer alice-secret"}) as web:
        sid = await open_session(web, mcp_url(proxy))
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        record = await client.get("{mcpb:s:" + sid + "}:i")
        ttl = await client.pttl("{mcpb:s:" + sid + "}:i")
    finally:
        await client.aclose()
    assert record is not None
    assert json.loads(json.loads(record)["b"])["method"] == "initialize"
    assert "alice-secret" not in record  # the tag only; the replaying request brings the credential
    assert 0 < ttl <= 3600 * 1.5 * 1000


async def test_backend_404_replays_a_session_whose_owner_restarted_at_the_same_port(
    dict_proxy: DictProxy, backend_factory: BackendFactory
) -> None:
    [owner] = await asyncio.to_thread(backend_factory, ["z1"])
    port = owner.port
    # No active health checks: the proxy does not see the restart; the backend's 404 tells it.
    proxy = await dict_proxy(proxy_config([owner], failover=REPLAY_404))
    url = mcp_url(proxy)
    # A raw client: nothing of it reaches the proxy while the backend is down (an SDK client's GET
    # stream would reconnect then, and find the owner gone, which is the other trigger).
    async with aiohttp.ClientSession() as web:
        sid = await open_session(web, url)
        assert [(await call_tool(web, url, sid, "count")).text for _ in range(2)] == ["1", "2"]
        await owner.akill()
        again = BackendProcess("z1", extra_args=["--port", str(port)])
        await asyncio.to_thread(again.start)
        try:
            assert again.port == port
            # The new process forgot the session and answers 404; the proxy replays it there and
            # sends the request again: the client goes on under its id, without initializing again.
            answer = await call_tool(web, url, sid, "count")
            assert (answer.status, answer.text, answer.headers["Mcp-Session-Id"]) == (200, "1", sid)
            assert (await call_tool(web, url, sid, "count")).text == "2"
            assert replays(proxy) == 1
            ledger = await session_ledger(again)
            assert ledger.stray_total == 1  # the one 404, and nothing sent astray after the move
            assert len(ledger.issued) == 1  # the replayed initialize
        finally:
            await again.astop()


async def test_without_backend_404_the_404_is_passed_on(
    dict_proxy: DictProxy, backend_factory: BackendFactory
) -> None:
    [owner] = await asyncio.to_thread(backend_factory, ["w1"])
    port = owner.port
    proxy = await dict_proxy(proxy_config([owner], failover="replay"))  # replay_on: [gone]
    async with aiohttp.ClientSession() as web:
        sid = await open_session(web, mcp_url(proxy))
        assert (await call_tool(web, mcp_url(proxy), sid, "count")).text == "1"
        await owner.akill()
        again = BackendProcess("w1", extra_args=["--port", str(port)])
        await asyncio.to_thread(again.start)
        try:
            answer = await call_tool(web, mcp_url(proxy), sid, "count")
            assert answer.status == 404
            assert from_backend(answer.headers)  # the new process's own 404, relayed
            assert replays(proxy) == 0
            await wait_until(lambda: _forgotten(proxy, sid), "the session to be forgotten")
        finally:
            await again.astop()


async def _forgotten(proxy: Proxy, sid: str) -> bool:
    return proxy.store.peek(sid) is None
