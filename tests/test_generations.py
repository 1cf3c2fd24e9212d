"""Sessions of a backend that restarted end cleanly, idle ones too (issue 14, item 5).

A real FastMCP backend is killed and started again at the same port; the proxy that probes it sees
it refuse, records when, and shares that through a real Redis with a proxy that probes nothing. A
session bound before then gets the proxy's own 404 (or a replay), never the new process's answer.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.fleet.generations import Generations
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import DictProxy, proxy_config
from tests.mcp_helpers import (
    SESSION_NOT_FOUND,
    call_tool,
    from_proxy,
    mcp_url,
    open_session,
    session_ledger,
    wait_until,
)

PROBING = {"interval": 0.1, "timeout": 0.5, "fall": 1, "rise": 1}


def backend(proxy: Proxy, name: str) -> Backend:
    found = proxy.backends.get(name)
    assert found is not None
    return found


def ended(proxy: Proxy, reason: str) -> float:
    return (
        proxy.metrics.registry.get_sample_value("mcpbalancer_sessions_ended_total", {"reason": reason}) or 0
    )


async def restart_at_same_port(owner: BackendProcess) -> BackendProcess:
    port = owner.port
    await owner.akill()
    again = BackendProcess(owner.name, extra_args=["--port", str(port)])
    await asyncio.to_thread(again.start)
    assert again.port == port
    return again


@pytest.mark.parametrize("ids", ["plain", "sealed"])
async def test_idle_sessions_of_a_restarted_backend_get_404_from_every_proxy(
    backend_factory: BackendFactory, dict_proxy: DictProxy, redis_url: str, ids: str
) -> None:
    [owner] = await asyncio.to_thread(backend_factory, ["g1"])
    shared: dict[str, Any] = {"store": redis_url}
    if ids == "sealed":
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        shared |= {"session_ids": "sealed", "session_keys": [key]}
    watcher = await dict_proxy(proxy_config([owner], health=PROBING, **shared))
    blind = await dict_proxy(proxy_config([owner], **shared))  # no probes: it hears of it
    async with aiohttp.ClientSession() as web:
        sessions = {
            "watcher": await open_session(web, mcp_url(watcher)),
            "blind": await open_session(web, mcp_url(blind)),
        }
        for proxy, sid in ((watcher, sessions["watcher"]), (blind, sessions["blind"])):
            assert (await call_tool(web, mcp_url(proxy), sid, "count")).text == "1"
        again = await restart_at_same_port(owner)
        try:
            await wait_until(lambda: _restart_seen(watcher, "g1"), "the watcher to see g1 go and return")
            await wait_until(lambda: _gone_at(blind, "g1"), "the blind proxy to hear that g1 went")
            # Idle all along, both sessions now belong to a process that is gone: the proxies answer
            # 404 themselves, whichever proxy the session comes through.
            for proxy in (watcher, blind):
                for sid in sessions.values():
                    answer = await call_tool(web, mcp_url(proxy), sid, "count")
                    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
                    assert from_proxy(answer.headers)
            ledger = await session_ledger(again)
            assert ledger.stray_total == 0  # the new process never saw an old session
            # A session bound after the restart is not affected.
            fresh = await open_session(web, mcp_url(blind))
            assert (await call_tool(web, mcp_url(watcher), fresh, "count")).text == "1"
        finally:
            await again.astop()
    assert ended(watcher, "backend_restarted") + ended(blind, "backend_restarted") >= 2


async def test_with_replay_a_stale_session_moves_to_the_restarted_backend(
    backend_factory: BackendFactory, dict_proxy: DictProxy
) -> None:
    [owner] = await asyncio.to_thread(backend_factory, ["g2"])
    proxy = await dict_proxy(proxy_config([owner], health=PROBING, failover="replay"))
    async with aiohttp.ClientSession() as web:
        sid = await open_session(web, mcp_url(proxy))
        assert (await call_tool(web, mcp_url(proxy), sid, "count")).text == "1"
        again = await restart_at_same_port(owner)
        try:
            await wait_until(lambda: _restart_seen(proxy, "g2"), "the proxy to see g2 go and return")
            answer = await call_tool(web, mcp_url(proxy), sid, "count")
            assert (answer.status, answer.text, answer.headers["Mcp-Session-Id"]) == (200, "1", sid)
            assert proxy.failover is not None
            assert proxy.failover.replays == 1
            assert (await session_ledger(again)).stray_total == 0
        finally:
            await again.astop()


def test_a_generation_heard_from_elsewhere_is_never_later_than_the_local_clock() -> None:
    backends = BackendSet([Backend("b", "127.0.0.1", 1)])
    now = [1000.0]
    generations = Generations(backends, clock=lambda: now[0])
    generations.heard("b", 5000.0)  # a proxy whose clock runs ahead
    assert backends.get("b").gone_at == 1000.0  # type: ignore[union-attr]
    generations.heard("b", 900.0)  # older news changes nothing
    assert backends.get("b").gone_at == 1000.0  # type: ignore[union-attr]
    generations.heard("nope", 1.0)  # a backend this proxy does not have


async def _restart_seen(proxy: Proxy, name: str) -> bool:
    found = backend(proxy, name)
    return found.gone_at > 0 and found.up


async def _gone_at(proxy: Proxy, name: str) -> bool:
    return backend(proxy, name).gone_at > 0
