"""`backends[].max_in_flight` and `queue_timeout`: at most N requests at a backend at once, the rest
in line, 503 with Retry-After past the wait, GET streams counted apart, and a full backend still
healthy.

The calls are `progress_and_wait`: the backend reports progress as soon as a call starts and answers
once `release(key)` is called, so a test sees exactly which calls reached the backend. The releases
go to the backend directly (a 2026-07-28 call), not through the proxy whose slots they would need.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.mcp_helpers import (
    MODERN_META,
    MODERN_WHOAMI_HEADERS,
    call_body,
    call_tool,
    mcp_url,
    open_session,
    read_sse_event,
    session_headers,
    session_ledger,
    wait_until,
)

_keys = itertools.count()


def limited(backend: BackendProcess, **limits: Any) -> dict[str, Any]:
    return {"backends": [{"name": backend.name, "url": backend.url, **limits}]}


async def release(http: aiohttp.ClientSession, backend: BackendProcess, key: str) -> None:
    body = call_body("release", 1, key=key)
    body["params"]["_meta"] = MODERN_META
    headers = {**MODERN_WHOAMI_HEADERS, "Mcp-Name": "release"}
    async with http.post(backend.mcp_url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


class Call:
    """One progress_and_wait call through the proxy, as a task: `started` once its progress came."""

    def __init__(self, http: aiohttp.ClientSession, url: str, sid: str) -> None:
        self.key = f"k{next(_keys)}"
        self.started = asyncio.Event()
        self.status = 0
        self.headers: Any = None
        body = call_body("progress_and_wait", 100 + next(_keys), key=self.key, wait_seconds=60)
        body["params"]["_meta"] = {"progressToken": self.key}
        self.task = asyncio.ensure_future(self._run(http, url, sid, body))

    async def _run(self, http: aiohttp.ClientSession, url: str, sid: str, body: dict[str, Any]) -> str:
        async with http.post(url, json=body, headers=session_headers(sid)) as resp:
            self.status, self.headers = resp.status, resp.headers
            if resp.status != 200:
                return await resp.text()
            progress = await read_sse_event(resp)
            assert '"notifications/progress"' in progress["data"]
            self.started.set()
            return (await read_sse_event(resp))["data"]


def gauge(proxy: Proxy, name: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, {"backend": "a"}) or 0.0


async def test_ten_slow_calls_reach_the_backend_two_at_a_time(
    backends: list[BackendProcess], dict_proxy: Any, web: aiohttp.ClientSession
) -> None:
    backend = backends[0]
    proxy: Proxy = await dict_proxy(
        {**limited(backend, max_in_flight=2, queue_timeout=60), "health": {"interval": 0}}
    )
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    seen = (await session_ledger(backend)).seen[sid]
    calls = [Call(web, url, sid) for _ in range(10)]
    finished = 0
    while finished < 10:
        running = min(2, 10 - finished)
        started = running + finished
        await wait_until(lambda n=started: _count(calls, n), f"{running} calls running")
        # Exactly `running` have reached the backend; the rest wait in the proxy, none is refused.
        assert (await session_ledger(backend)).seen[sid] == seen + finished + running
        assert gauge(proxy, "mcpbalancer_backend_calls_in_flight") == running
        assert gauge(proxy, "mcpbalancer_backend_queued") == 10 - finished - running
        first = next(c for c in calls if c.started.is_set() and not c.task.done())
        await release(web, backend, first.key)
        assert '"released"' in await asyncio.wait_for(first.task, 10)
        finished += 1
    assert all(c.status == 200 for c in calls)
    await wait_until(lambda: _true(gauge(proxy, "mcpbalancer_backend_calls_in_flight") == 0), "slots free")


async def _count(calls: list[Call], started: int) -> bool:
    return sum(c.started.is_set() for c in calls) == started


async def test_past_queue_timeout_a_call_gets_503_and_the_backend_stays_healthy(
    backends: list[BackendProcess], dict_proxy: Any, web: aiohttp.ClientSession
) -> None:
    backend = backends[0]
    config = {**limited(backend, max_in_flight=1, queue_timeout=0.3), "health": {"interval": 0.2, "fall": 1}}
    proxy: Proxy = await dict_proxy(config)
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    holder = Call(web, url, sid)
    await asyncio.wait_for(holder.started.wait(), 10)
    answers = [await call_tool(web, url, sid, "whoami") for _ in range(3)]
    assert [a.status for a in answers] == [503, 503, 503]
    assert answers[0].headers["Retry-After"] == "1"
    assert answers[0].json()["error"]["message"] == "Backend busy: a is at max_in_flight"
    labels = {"backend": "a"}
    registry = proxy.metrics.registry
    assert registry.get_sample_value("mcpbalancer_backend_queue_timeouts_total", labels) == 3
    assert registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": "backend_busy"}) == 3
    assert proxy.backends.get("a").up  # type: ignore[union-attr]  # full is not failing
    assert (
        registry.get_sample_value("mcpbalancer_upstream_errors_total", {**labels, "kind": "timeout"}) is None
    )
    await release(web, backend, holder.key)
    await asyncio.wait_for(holder.task, 10)
    assert (await call_tool(web, url, sid, "whoami")).status == 200


async def test_an_open_get_stream_takes_no_slot(
    backends: list[BackendProcess], dict_proxy: Any, web: aiohttp.ClientSession
) -> None:
    backend = backends[0]
    proxy: Proxy = await dict_proxy(
        {**limited(backend, max_in_flight=1, queue_timeout=5), "health": {"interval": 0}}
    )
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    stream_headers = {**session_headers(sid), "Accept": "text/event-stream"}
    async with web.get(url, headers=stream_headers) as stream:
        assert stream.status == 200
        assert gauge(proxy, "mcpbalancer_backend_streams_open") == 1
        assert gauge(proxy, "mcpbalancer_backend_calls_in_flight") == 0
        for _ in range(3):  # the one slot is free for calls while the stream idles
            assert (await call_tool(web, url, sid, "whoami")).status == 200
        calls = [Call(web, url, sid) for _ in range(2)]
        await wait_until(lambda: _count(calls, 1), "one call running")
        assert gauge(proxy, "mcpbalancer_backend_queued") == 1
        for done in range(2):
            await wait_until(lambda d=done: _count(calls, d + 1), "the next call running")
            first = next(c for c in calls if c.started.is_set() and not c.task.done())
            await release(web, backend, first.key)
            await asyncio.wait_for(first.task, 10)
    await wait_until(
        lambda: _true(gauge(proxy, "mcpbalancer_backend_streams_open") == 0), "the stream counted out"
    )


async def _true(value: bool) -> bool:
    return value
