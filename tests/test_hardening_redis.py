"""Redis outages (issue 7, item 6): known sessions keep routing from the local cache, new ones are
bound locally and written back when Redis returns (or refused with `on_store_error: fail`), and no
mapping is lost when Redis comes back empty."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import redis.asyncio

from mcpbalancer.app import Proxy
from mcpbalancer.store import UNKNOWN
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.redis import RedisStore
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.redis import RedisServer
from tests.mcp_helpers import (
    INIT_BODY,
    INIT_HEADERS,
    call_tool,
    mcp_url,
    open_session,
    recorded_client,
    text_of,
    wait_until,
)

SESSIONS = 20


def metric(proxy: Proxy, name: str) -> float:
    return proxy.metrics.registry.get_sample_value(name) or 0.0


async def session_keys(url: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return len([key async for key in client.scan_iter("mcpb:s:*")])
    finally:
        await client.aclose()


async def test_redis_killed_and_restarted_empty_loses_no_call_and_no_session(
    backends: list[BackendProcess], make_proxy: ProxyFactory, private_redis_server: RedisServer
) -> None:
    url = private_redis_server.url
    proxy = await make_proxy(backends, store=url)
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()
    last: dict[str, int] = {}

    async def worker(client: object, sid: str) -> None:
        nonlocal calls
        assert hasattr(client, "call_tool")
        while not stop.is_set():
            try:
                value = int(text_of(await client.call_tool("count")))
            except Exception as exc:  # every failure is a finding: collect, report at the end
                failures.append(exc)
                return
            assert value == last[sid] + 1, "a call reached another session"
            last[sid] = value
            calls += 1
            await asyncio.sleep(0.02)

    async with contextlib.AsyncExitStack() as stack:
        sids = []
        workers = []
        for _ in range(SESSIONS):
            client, wire = await stack.enter_async_context(recorded_client(mcp_url(proxy)))
            assert text_of(await client.call_tool("count")) == "1"
            sids.append(wire.session_id)
            last[wire.session_id] = 1
            workers.append(asyncio.create_task(worker(client, wire.session_id)))
        assert await session_keys(url) == SESSIONS

        private_redis_server.kill()

        async def degraded() -> bool:
            return metric(proxy, "mcpbalancer_store_degraded") == 1

        await wait_until(degraded, "the proxy to notice the Redis outage")
        before = calls
        # New sessions during the outage are bound locally (on_store_error: degrade, the default).
        async with aiohttp.ClientSession() as http:
            born_in_outage = [await open_session(http, mcp_url(proxy)) for _ in range(2)]
            for sid in born_in_outage:
                answer = await call_tool(http, mcp_url(proxy), sid, "count")
                assert (answer.status, answer.text) == (200, "1")

        async def progress() -> bool:
            return calls >= before + 3 * SESSIONS or bool(failures)

        await wait_until(progress, "calls to go on while Redis is down", deadline=30)

        private_redis_server.start()  # empty: nothing was saved

        async def rewritten() -> bool:
            return await session_keys(url) == SESSIONS + 2

        await wait_until(rewritten, "the sessions to be re-asserted in the restarted Redis", deadline=15)
        assert metric(proxy, "mcpbalancer_store_degraded") == 0
        assert metric(proxy, "mcpbalancer_store_resynced_sessions_total") >= SESSIONS + 2
        stop.set()
        await asyncio.gather(*workers)
        assert failures == []
        assert calls > 3 * SESSIONS

        # A second proxy knows only what is in Redis: every session, old and new, is routable there
        # (checked while the clients are still open: leaving, they DELETE their sessions).
        second = await make_proxy(backends, store=url)
        async with aiohttp.ClientSession() as http:
            for sid in sids:
                answer = await call_tool(http, mcp_url(second), sid, "count")
                assert (answer.status, answer.text) == (200, str(last[sid] + 1))
            for sid in born_in_outage:
                answer = await call_tool(http, mcp_url(second), sid, "count")
                assert (answer.status, answer.text) == (200, "2")


async def test_flushed_redis_gets_its_sessions_back_without_an_outage(
    backends: list[BackendProcess], make_proxy: ProxyFactory, redis_url: str
) -> None:
    proxy = await make_proxy(backends, store=redis_url)
    async with aiohttp.ClientSession() as http:
        sids = [await open_session(http, mcp_url(proxy)) for _ in range(3)]
        raw = redis.asyncio.Redis.from_url(redis_url)
        try:
            await wait_until(lambda: _marked(raw), "the proxy's marker key")
            await raw.flushall()  # what a restart without persistence looks like between two pings
        finally:
            await raw.aclose()

        async def back() -> bool:
            return await session_keys(redis_url) == 3

        await wait_until(back, "the sessions to be re-asserted", deadline=15)
        second = await make_proxy(backends, store=redis_url)
        for sid in sids:
            answer = await call_tool(http, mcp_url(second), sid, "count")
            assert (answer.status, answer.text) == (200, "1")


async def _marked(raw: redis.asyncio.Redis) -> bool:
    return len([key async for key in raw.scan_iter("mcpb:m:*")]) > 0


async def test_on_store_error_fail_refuses_new_sessions_but_keeps_known_ones(
    backends: list[BackendProcess], make_proxy: ProxyFactory, private_redis_server: RedisServer
) -> None:
    proxy = await make_proxy(backends, store=private_redis_server.url, on_store_error="fail")
    async with aiohttp.ClientSession() as http:
        known = await open_session(http, mcp_url(proxy))
        private_redis_server.kill()

        async def degraded() -> bool:
            return metric(proxy, "mcpbalancer_store_degraded") == 1

        await wait_until(degraded, "the proxy to notice the Redis outage")
        async with http.post(mcp_url(proxy), json=INIT_BODY, headers=INIT_HEADERS) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["message"] == "Session store unavailable"
        answer = await call_tool(http, mcp_url(proxy), known, "count")
        assert (answer.status, answer.text) == (200, "1")

        private_redis_server.start()

        async def recovered() -> bool:
            return metric(proxy, "mcpbalancer_store_degraded") == 0

        await wait_until(recovered, "the proxy to notice Redis is back")
        await open_session(http, mcp_url(proxy))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_background_touch_after_a_flush_rewrites_the_session_instead_of_dropping_it(
    redis_url: str,
) -> None:
    clock = Clock()
    cached = CachedStore(RedisStore.from_url(redis_url), clock=clock)
    raw = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        await cached.bind("s1", "b1", 60)
        await cached.bind("s2", "b2", 60)
        # The marker, set as one tick of the watch task sets it; no watch task runs, so from here
        # only the touch can notice the loss (and no marker write can land after the flush).
        assert await cached._mark() is False  # the first marking: nothing was lost
        assert await _marked(raw)
        await raw.flushall()
        clock.now += 30  # half a ttl: the next peek slides the expiry in the background
        assert cached.peek("s1") == "b1"
        await cached.drain()
        assert cached.peek("s1") == "b1"  # kept: the marker shows Redis lost its data
        assert await raw.get("mcpb:s:s1") == "b1"
        assert await raw.get("mcpb:s:s2") == "b2"  # the whole cache was re-asserted
        # Whereas a key deleted while the marker survived was ended by another replica: dropped.
        await raw.delete("mcpb:s:s2")
        clock.now += 30
        assert cached.peek("s2") == "b2"
        await cached.drain()
        assert cached.peek("s2") is UNKNOWN
    finally:
        await raw.aclose()
        await cached.close()
