"""Caches that agree (issue 14, item 6): proxies sharing a Redis tell each other what their local
caches must know, on the store's pub/sub channel.

Two in-process proxies on one real Redis, in front of real FastMCP backends. "Within a second" is
waited for with a one-second deadline, polling, never sleeping.
"""

from __future__ import annotations

import aiohttp

from mcpbalancer.app import Proxy
from mcpbalancer.store import UNKNOWN
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import DictProxy, proxy_config
from tests.mcp_helpers import (
    SESSION_NOT_FOUND,
    call_tool,
    from_backend,
    from_proxy,
    mcp_url,
    open_session,
    session_headers,
    session_ledger,
    wait_until,
)

WITHIN = 1.0


def lookups(proxy: Proxy, result: str) -> float:
    value = proxy.metrics.registry.get_sample_value("mcpbalancer_session_lookups_total", {"result": result})
    return value or 0.0


async def pair(dict_proxy: DictProxy, backends: list[BackendProcess], redis_url: str) -> tuple[Proxy, Proxy]:
    return (
        await dict_proxy(proxy_config(backends, store=redis_url)),
        await dict_proxy(proxy_config(backends, store=redis_url)),
    )


async def test_a_binding_reaches_the_other_proxies_before_their_first_request(
    dict_proxy: DictProxy, backends: list[BackendProcess], redis_url: str
) -> None:
    first, second = await pair(dict_proxy, backends[:2], redis_url)
    async with aiohttp.ClientSession() as web:
        sid = await open_session(web, mcp_url(first))

        async def cached() -> bool:
            return second.store.peek(sid) is not UNKNOWN

        await wait_until(cached, "the binding to reach the second proxy's cache", WITHIN)
        assert (await call_tool(web, mcp_url(second), sid, "count")).text == "1"
    # Its first request on the second proxy was a dict lookup, not a Redis read.
    assert lookups(second, "store_hit") == 0
    assert lookups(second, "cache_hit") >= 1


async def test_a_session_ended_through_one_proxy_stops_routing_from_the_others_within_a_second(
    dict_proxy: DictProxy, backends: list[BackendProcess], redis_url: str
) -> None:
    first, second = await pair(dict_proxy, backends[:2], redis_url)
    async with aiohttp.ClientSession() as web:
        deleted = await open_session(web, mcp_url(first))
        forgotten = await open_session(web, mcp_url(first))
        for sid in (deleted, forgotten):
            assert (await call_tool(web, mcp_url(second), sid, "count")).text == "1"  # cached there
        owner = (await call_tool(web, mcp_url(first), forgotten, "whoami")).text
        [backend] = [b for b in backends if b.name == owner]

        # Ended by a DELETE through the first proxy.
        async with web.delete(mcp_url(first), headers=session_headers(deleted)) as resp:
            assert resp.status == 200
        # Ended by its backend: it forgets the session (a DELETE straight to it), then answers the
        # first proxy 404.
        async with web.delete(backend.mcp_url, headers=session_headers(forgotten)) as resp:
            assert resp.status == 200
        answer = await call_tool(web, mcp_url(first), forgotten, "count")
        assert (answer.status, from_backend(answer.headers)) == (404, True)

        for sid in (deleted, forgotten):

            async def dropped(sid: str = sid) -> bool:
                return second.store.peek(sid) is UNKNOWN

            await wait_until(dropped, "the end to reach the second proxy's cache", WITHIN)
        before = {b.name: (await session_ledger(b)).stray_total for b in backends[:2]}
        for sid in (deleted, forgotten):
            answer = await call_tool(web, mcp_url(second), sid, "count")
            assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
            assert from_proxy(answer.headers)  # not sent to a backend that no longer has it
        after = {b.name: (await session_ledger(b)).stray_total for b in backends[:2]}
        assert after == before
