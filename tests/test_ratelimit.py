"""`rate_limits`: token buckets per principal, shared by proxies on one Redis, counted locally while
Redis is down, per tool on legacy calls, and by client address through `trusted_proxies`."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.redis import RedisServer
from tests.fixtures.stub import StubFactory
from tests.mcp_helpers import (
    MODERN_META,
    MODERN_WHOAMI_HEADERS,
    call_body,
    call_tool,
    mcp_url,
    open_session,
    wait_until,
)

KEYS = {"alice": "key-of-alice-0001", "bob": "key-of-bob-00002"}
AUTH = {"api_keys": [{"name": n, "sha256": hashlib.sha256(k.encode()).hexdigest()} for n, k in KEYS.items()]}
PER_PRINCIPAL = [{"key": "principal", "rate": "5/second", "burst": 5}]
BINDING_KEY = "0123456789abcdef-test-key"


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def whoami(http: aiohttp.ClientSession, url: str, who: str | None, **headers: str) -> tuple[int, Any]:
    """A 2026-07-28 whoami as `who` (an API key's name): the status and the answer's headers; a 429
    is checked to be the proxy's JSON-RPC error."""
    body = call_body("whoami", 1)
    body["params"]["_meta"] = MODERN_META
    auth = {"Authorization": f"Bearer {KEYS[who]}"} if who is not None else {}
    async with http.post(url, json=body, headers={**MODERN_WHOAMI_HEADERS, **auth, **headers}) as resp:
        if resp.status == 429:
            error = (await resp.json())["error"]
            assert error["code"] == -32033
            assert error["message"].startswith("Too Many Requests: rate_limits[")
        await resp.read()
        return resp.status, resp.headers


async def until_refused(
    http: aiohttp.ClientSession, urls: list[str], who: str, most: int = 50
) -> tuple[int, Any]:
    """Requests as `who` (round robin over `urls`) until one gets 429: (how many passed, its headers)."""
    for passed in range(most):
        status, headers = await whoami(http, urls[passed % len(urls)], who)
        if status == 429:
            return passed, headers
        assert status == 200, status
    pytest.fail(f"no 429 in {most} requests")


def refills(started: float, rate: float = 5.0) -> int:
    """Tokens a bucket may have regained since `started` (generous: a loaded machine is slow)."""
    return int((time.monotonic() - started) * rate) + 1


async def test_a_principal_over_its_rate_gets_429_and_others_are_not_affected(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], auth=AUTH, rate_limits=PER_PRINCIPAL)
    url = mcp_url(proxy)
    started = time.monotonic()
    passed, headers = await until_refused(web, [url], "alice")
    assert 5 <= passed <= 5 + refills(started)  # the burst, and what refilled meanwhile
    assert int(headers["Retry-After"]) >= 1
    status, _ = await whoami(web, url, "bob")  # another principal, another bucket
    assert status == 200
    assert sample(proxy, "mcpbalancer_rate_limited_total", rule="0") >= 1
    assert sample(proxy, "mcpbalancer_rejected_requests_total", reason="rate_limit") >= 1
    # A refused request reached no backend: only the passed ones were answered by one.
    answered = sample(
        proxy,
        "mcpbalancer_requests_total",
        backend="a",
        era="modern",
        method="POST",
        code="2xx",
        service="default",
    )
    assert answered == passed + 1
    assert proxy.backends.get("a").up  # type: ignore[union-attr]


async def test_two_proxies_on_one_redis_share_the_limit(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, redis_url: str
) -> None:
    settings = {
        "store": redis_url,
        "session_binding_key": BINDING_KEY,
        "auth": AUTH,
        "rate_limits": PER_PRINCIPAL,
    }
    first = await make_proxy(backends[:1], **settings)
    second = await make_proxy(backends[:1], **settings)
    started = time.monotonic()
    passed, _ = await until_refused(web, [mcp_url(first), mcp_url(second)], "alice")
    assert 5 <= passed <= 5 + refills(started)  # not 5 per proxy: one bucket in Redis
    refused = [sample(p, "mcpbalancer_rate_limited_total", rule="0") for p in (first, second)]
    assert sum(refused) == 1
    assert sample(first, "mcpbalancer_rate_limit_local_total") == 0


async def test_while_redis_is_down_each_proxy_counts_on_its_own(
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    private_redis_server: RedisServer,
) -> None:
    settings = {
        "store": private_redis_server.url,
        "session_binding_key": BINDING_KEY,
        "auth": AUTH,
        "rate_limits": PER_PRINCIPAL,
    }
    proxy = await make_proxy(backends[:1], **settings)
    url = mcp_url(proxy)
    assert (await whoami(web, url, "bob"))[0] == 200  # shared while Redis answers
    private_redis_server.kill()
    started = time.monotonic()
    passed, headers = await until_refused(web, [url], "alice")
    assert 5 <= passed <= 5 + refills(started)  # the limit still holds, in this proxy's buckets
    assert int(headers["Retry-After"]) >= 1
    assert sample(proxy, "mcpbalancer_rate_limit_degraded") == 1
    assert sample(proxy, "mcpbalancer_rate_limit_local_total") >= passed
    private_redis_server.start()

    async def shared_again() -> bool:
        await whoami(web, url, "bob")
        return sample(proxy, "mcpbalancer_rate_limit_degraded") == 0

    await wait_until(shared_again, "the buckets shared again once Redis answers")


async def test_a_per_tool_limit_reads_legacy_calls_and_counts_nothing_else(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    limits = [{"key": "tool", "match": {"tool": "count"}, "rate": "2/minute"}]
    proxy = await make_proxy(backends[:1], rate_limits=limits)
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    statuses = [(await call_tool(web, url, sid, "count")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert (await call_tool(web, url, sid, "whoami")).status == 200  # another tool: not counted
    # A batch counts each call: two more count calls do not fit in an empty bucket.
    batch = [call_body("count", 901), call_body("count", 902)]
    async with web.post(url, json=batch, headers={"Mcp-Session-Id": sid, **_legacy()}) as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 20  # a token every 30 s


def _legacy() -> dict[str, str]:
    return {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": "2025-11-25",
    }


async def test_client_ip_comes_from_x_forwarded_for_only_through_a_trusted_proxy(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    limits = [{"key": "client_ip", "rate": "1/minute"}]
    untrusting = await make_proxy(backends[:1], rate_limits=limits)
    url = mcp_url(untrusting)
    assert (await whoami(web, url, None, **{"X-Forwarded-For": "198.51.100.1"}))[0] == 200
    # Another address claimed by the client itself proves nothing: the same bucket (127.0.0.1).
    assert (await whoami(web, url, None, **{"X-Forwarded-For": "198.51.100.2"}))[0] == 429
    trusting = await make_proxy(backends[:1], rate_limits=limits, trusted_proxies=["127.0.0.1"])
    url = mcp_url(trusting)
    for address in ("198.51.100.1", "198.51.100.2"):
        assert (await whoami(web, url, None, **{"X-Forwarded-For": address}))[0] == 200
    assert (await whoami(web, url, None, **{"X-Forwarded-For": "198.51.100.1"}))[0] == 429
    # Only the rightmost untrusted hop counts: what a client wrote further left is ignored.
    forged = {"X-Forwarded-For": "203.0.113.9, 198.51.100.2"}
    assert (await whoami(web, url, None, **forged))[0] == 429


async def test_a_legacy_post_without_a_body_is_counted_too(
    make_proxy: ProxyFactory, make_stub: StubFactory, web: aiohttp.ClientSession
) -> None:
    """With a rule on tools the body of a legacy POST is read before counting; one without a body
    calls no tool, and is still counted by the other rules."""
    stub = await make_stub()
    limits = [
        {"key": "tool", "match": {"tool": "count"}, "rate": "1/minute"},
        {"key": "client_ip", "rate": "2/minute"},
    ]
    proxy = await make_proxy([stub], rate_limits=limits)
    headers = _legacy()  # no session: a new one is placed on the stub
    statuses = []
    for _ in range(3):
        async with web.post(mcp_url(proxy), data=b"", headers=headers) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    assert len(stub.requests) == 2
