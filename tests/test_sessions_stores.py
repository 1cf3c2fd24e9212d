"""End to end: what the session store adds (issue 2, behaviours 6 and 7).

Proxies sharing one Redis route each other's sessions and survive restarts; expiry slides with use
on both stores, without a store write per request.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import redis.asyncio

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.memory import MemoryStore
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory, proxy_config
from tests.mcp_helpers import (
    LEGACY_VERSION,
    SESSION_NOT_FOUND,
    call_tool,
    from_backend,
    from_proxy,
    mcp_url,
    open_session,
    wait_until,
)


async def count(web: aiohttp.ClientSession, proxy: Proxy, session_id: str) -> str:
    answer = await call_tool(web, mcp_url(proxy), session_id, "count")
    assert answer.status == 200, answer.body
    return answer.text


# --- shared Redis ----------------------------------------------------------------------------------


async def test_two_proxies_on_one_redis_route_each_others_sessions(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, redis_url: str
) -> None:
    first = await make_proxy(backends, store=redis_url)
    second = await make_proxy(backends, store=redis_url)

    born_on_first = await open_session(web, mcp_url(first))
    born_on_second = await open_session(web, mcp_url(second))
    for session_id in (born_on_first, born_on_second):
        # The counter lives in the owner's process: it continues only if both reach the same instance.
        assert [
            await count(web, first, session_id),
            await count(web, second, session_id),
            await count(web, first, session_id),
            await count(web, second, session_id),
        ] == ["1", "2", "3", "4"]
        assert await first.store.get(session_id) == await second.store.get(session_id)

    # The GET stream too: opened through one proxy, a second one through the other meets it (409).
    get_headers = {
        "Accept": "text/event-stream",
        "Mcp-Session-Id": born_on_first,
        "MCP-Protocol-Version": LEGACY_VERSION,
    }
    async with web.get(mcp_url(second), headers=get_headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        async with web.get(mcp_url(first), headers=get_headers) as other:
            assert other.status == 409
            assert from_backend(other.headers)

    # A session one proxy ends is gone from Redis at once. The other proxy still has it in its local
    # cache (nothing tells a replica's cache; entries live until a refresh finds the key gone), so
    # it forwards the next request to the owner, whose 404 it relays and learns from.
    async with web.delete(mcp_url(first), headers={"Mcp-Session-Id": born_on_second}) as resp:
        assert resp.status == 200
    await wait_until(lambda: _unknown_to(first, born_on_second), "the DELETE to reach the shared store")
    answer = await call_tool(web, mcp_url(second), born_on_second, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    await wait_until(lambda: _unknown_to(second, born_on_second), "the owner's 404 to end the mapping")
    answer = await call_tool(web, mcp_url(second), born_on_second, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    assert from_proxy(answer.headers)


async def _unknown_to(proxy: Proxy, session_id: str) -> bool:
    return await proxy.store.get(session_id) is None


async def test_a_restarted_proxy_keeps_routing_existing_sessions(
    backends: list[BackendProcess], web: aiohttp.ClientSession, redis_url: str
) -> None:
    config = parse_config(proxy_config(backends, store=redis_url), source="<test>")
    proxy = Proxy(config)
    await proxy.start()
    try:
        session_ids = [await open_session(web, mcp_url(proxy)) for _ in range(3)]
        owners = [await proxy.store.get(sid) for sid in session_ids]
        assert [await count(web, proxy, sid) for sid in session_ids] == ["1", "1", "1"]
    finally:
        await proxy.stop()

    restarted = Proxy(config)
    await restarted.start()
    try:
        # Nothing of the first process survives but Redis: the sessions continue where they were.
        assert [await count(web, restarted, sid) for sid in session_ids] == ["2", "2", "2"]
        assert [await restarted.store.get(sid) for sid in session_ids] == owners
    finally:
        await restarted.stop()


async def test_known_sessions_cost_no_redis_round_trip(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, redis_url: str
) -> None:
    proxy = await make_proxy(backends, store=redis_url, session_ttl=60)
    session_id = await open_session(web, mcp_url(proxy))
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.config_resetstat()
        assert [await count(web, proxy, session_id) for _ in range(10)] == [str(n) for n in range(1, 11)]
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    # Routing ten requests read nothing from Redis, and refreshed the expiry not once (it slides
    # only when half the ttl has passed since the last refresh).
    used = {name.removeprefix("cmdstat_") for name in stats}
    assert not used & {"get", "pexpire", "expire", "set"}, stats


# --- sliding expiry, both stores -----------------------------------------------------------------


async def test_sessions_in_use_stay_and_idle_ones_expire(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    ttl = 2.0  # seconds: wide enough that a loaded 2-core machine does not stretch a gap past it
    proxy = await make_proxy(backends, store=store, session_ttl=ttl)
    url = mcp_url(proxy)
    busy = await open_session(web, url)
    idle = await open_session(web, url)

    # Use one session for well over two ttls, never leaving it idle for a whole ttl: every request
    # keeps it alive. The gaps alternate around half the ttl, where a store that refreshes the
    # expiry only every half ttl must still not lose a session idle for less than a ttl.
    started = time.monotonic()
    counts = [await count(web, proxy, busy)]
    for gap in itertools.cycle((0.45 * ttl, 0.7 * ttl)):
        await asyncio.sleep(gap)  # the pace of use under test, not a synchronisation
        counts.append(await count(web, proxy, busy))
        if time.monotonic() - started > 2.2 * ttl:
            break
    assert counts == [str(n) for n in range(1, len(counts) + 1)]

    # The other one, untouched since it was opened, has expired in the store...
    await wait_until(lambda: _expired(proxy, store, idle), "the idle session to expire")
    # ...so the proxy answers 404 itself, though the backend still has the session.
    answer = await call_tool(web, url, idle, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    assert from_proxy(answer.headers)
    assert await count(web, proxy, busy) == str(len(counts) + 1)


async def _expired(proxy: Proxy, store: str, session_id: str) -> bool:
    """Whether the store's entry for `session_id` is past its expiry, asked without using the
    session (a lookup through the store's API is activity and would slide it)."""
    if store == "memory":
        assert isinstance(proxy.store, MemoryStore)
        entry = proxy.store._entries.get(session_id)
        return entry is None or entry.expires_at <= time.monotonic()
    assert isinstance(proxy.store, CachedStore)
    client = redis.asyncio.Redis.from_url(store)
    try:
        return not await client.exists(f"{proxy.config.store_prefix}s:{session_id}")
    finally:
        await client.aclose()
