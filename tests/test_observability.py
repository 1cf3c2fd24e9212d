"""Metrics, access log and health endpoints, driven by real traffic: real FastMCP backends, raw HTTP
and the real mcp client, real Redis where the store matters.

Every proxy here has a registry of its own, so a sample's value is the delta caused by the test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.errors import SessionNotFound, error_body
from mcpbalancer.routing.binding import backend_of
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import HasUrl, proxy_config
from tests.fixtures.rawhttp import ClientFactory
from tests.fixtures.rawhttp import request as raw_request
from tests.fixtures.redis import RedisServer
from tests.fixtures.stub import Handler, StubFactory, StubRequest
from tests.fixtures.stub import chunk as stub_chunk
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    call_body,
    call_tool,
    from_backend,
    from_proxy,
    mcp_url,
    open_session,
    recorded_client,
    session_headers,
    sse_messages,
    text_of,
    wait_until,
)

# Every family the issue names; the exposition must carry each one (HELP and TYPE at least).
FAMILIES = {
    "mcpbalancer_requests",
    "mcpbalancer_request_duration_seconds",
    "mcpbalancer_mcp_requests",
    "mcpbalancer_sessions_active",
    "mcpbalancer_sessions_created",
    "mcpbalancer_sessions_ended",
    "mcpbalancer_session_lookups",
    "mcpbalancer_sse_streams_active",
    "mcpbalancer_sse_heartbeats",
    "mcpbalancer_sse_stream_duration_seconds",
    "mcpbalancer_backend_up",
    "mcpbalancer_backend_draining",
    "mcpbalancer_health_checks",
    "mcpbalancer_store_operations",
    "mcpbalancer_store_latency_seconds",
    "mcpbalancer_upstream_errors",
    "mcpbalancer_client_disconnects",
    "mcpbalancer_build_info",
}
ACCESS_FIELDS = {
    "ts",
    "type",
    "client",
    "method",
    "path",
    "era",
    "session",
    "backend",
    "status",
    "bytes",
    "duration_us",
    "mcp_method",
    "outcome",
    "service",
    "request_id",
    "worker",
}


@dataclass
class Observed:
    proxy: Proxy
    registry: CollectorRegistry
    log: io.StringIO

    @property
    def url(self) -> str:
        return mcp_url(self.proxy)

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 for a labelled child that does not exist yet."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def requests(self, backend: str, code: str, method: str = "POST", era: str = "legacy") -> float:
        labels = {"backend": backend, "code": code, "method": method, "era": era, "service": "default"}
        return self.value("mcpbalancer_requests_total", **labels)

    def lookups(self) -> dict[str, float]:
        results = ("cache_hit", "store_hit", "miss")
        return {r: self.value("mcpbalancer_session_lookups_total", result=r) for r in results}

    def ended(self) -> dict[str, float]:
        """Sessions ended, by reason, leaving out the reasons that did not occur."""
        reasons = ("delete", "expired", "backend_lost", "backend_404")
        counts = {r: self.value("mcpbalancer_sessions_ended_total", reason=r) for r in reasons}
        return {reason: count for reason, count in counts.items() if count}

    def access_lines(self) -> list[dict[str, Any]]:
        assert self.proxy.access_log is not None
        self.proxy.access_log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


ObserveFactory = Callable[..., Awaitable[Observed]]


@pytest.fixture
async def observe() -> AsyncIterator[ObserveFactory]:
    """`await observe(backends, **config)` -> a started proxy with its own registry and access log."""
    started: list[Proxy] = []

    async def make(backends: Sequence[HasUrl], **overrides: Any) -> Observed:
        registry, log = CollectorRegistry(), io.StringIO()
        config = parse_config(proxy_config(backends, **overrides), source="<test>")
        proxy = Proxy(config, registry=registry, access_stream=log)
        await proxy.start()
        started.append(proxy)
        return Observed(proxy, registry, log)

    yield make
    for proxy in reversed(started):
        await proxy.stop()


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def owner(obs: Observed, session_id: str) -> str:
    value = obs.proxy.store.peek(session_id)
    assert isinstance(value, str), value
    return backend_of(value)  # the value also holds when the session was bound


async def session_on(obs: Observed, web: aiohttp.ClientSession, name: str) -> str:
    """Open raw sessions until one lands on backend `name`."""
    for _ in range(3 * len(obs.proxy.backends)):
        session_id = await open_session(web, obs.url)
        if owner(obs, session_id) == name:
            return session_id
    pytest.fail(f"no session landed on {name}")


# --- sessions, lookups, requests ------------------------------------------------------------------


async def test_a_session_from_initialize_to_delete(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    session_id = await open_session(web, obs.url)  # initialize, then notifications/initialized
    name = owner(obs, session_id)
    assert obs.value("mcpbalancer_sessions_created_total", backend=name) == 1
    assert obs.value("mcpbalancer_sessions_active", backend=name) == 1
    assert obs.lookups() == {"cache_hit": 1, "store_hit": 0, "miss": 0}

    assert (await call_tool(web, obs.url, session_id, "whoami")).text == name
    # The memory store answers every known session from memory: a cache hit.
    assert obs.lookups() == {"cache_hit": 2, "store_hit": 0, "miss": 0}
    assert obs.requests(name, "2xx") == 3
    assert (
        obs.value("mcpbalancer_request_duration_seconds_count", backend=name, era="legacy", service="default")
        == 3
    )
    # Legacy requests carry no Mcp-Method header and bodies are not parsed: "other".
    assert obs.value("mcpbalancer_mcp_requests_total", era="legacy", mcp_method="other") == 3
    # initialize and tools/call were answered as SSE; each stream has ended.
    assert obs.value("mcpbalancer_sse_stream_duration_seconds_count") == 2
    assert obs.value("mcpbalancer_sse_streams_active", backend=name) == 0

    async with web.delete(obs.url, headers=session_headers(session_id)) as resp:
        assert resp.status == 200
    assert obs.ended() == {"delete": 1}
    assert obs.value("mcpbalancer_sessions_active", backend=name) == 0
    assert obs.requests(name, "2xx", method="DELETE") == 1

    gone = await call_tool(web, obs.url, session_id, "whoami")
    assert gone.status == 404
    assert from_proxy(gone.headers)
    assert obs.lookups() == {"cache_hit": 3, "store_hit": 0, "miss": 1}
    assert obs.requests("none", "4xx") == 1
    # The proxy's own answers are not backend latency.
    assert (
        obs.value(
            "mcpbalancer_request_duration_seconds_count", backend="none", era="legacy", service="default"
        )
        == 0
    )
    assert obs.ended() == {"delete": 1}


async def test_a_backend_404_ends_the_session(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    session_id = await open_session(web, obs.url)
    name = owner(obs, session_id)
    [backend] = [b for b in backends if b.name == name]
    async with web.delete(backend.mcp_url, headers=session_headers(session_id)) as resp:
        assert resp.status == 200  # behind the proxy's back

    answer = await call_tool(web, obs.url, session_id, "whoami")
    assert answer.status == 404
    assert from_backend(answer.headers)
    assert obs.ended() == {"backend_404": 1}
    assert obs.requests(name, "4xx") == 1
    assert obs.value("mcpbalancer_sessions_active", backend=name) == 0


async def test_a_slow_then_dead_owner(
    backends: list[BackendProcess],
    backend_factory: BackendFactory,
    observe: ObserveFactory,
    web: aiohttp.ClientSession,
) -> None:
    [doomed] = await asyncio.to_thread(backend_factory, ["k"])
    obs = await observe([doomed, backends[0]], timeouts={"response_headers": 0.5})
    session_id = await session_on(obs, web, "k")
    assert obs.value("mcpbalancer_backend_up", backend="k") == 1

    doomed.pause()
    try:
        slow = await call_tool(web, obs.url, session_id, "whoami")
    finally:
        doomed.resume()
    assert slow.status == 504
    assert obs.value("mcpbalancer_upstream_errors_total", backend="k", kind="timeout") == 1
    assert obs.requests("k", "5xx") == 1
    assert obs.ended() == {}

    await doomed.akill()
    gone = await call_tool(web, obs.url, session_id, "whoami")
    assert gone.status == 404
    assert obs.ended() == {"backend_lost": 1}
    assert obs.value("mcpbalancer_upstream_errors_total", backend="k", kind="connect") == 1
    assert obs.value("mcpbalancer_upstream_errors_total", backend="k", kind="reset") == 0
    assert obs.value("mcpbalancer_sessions_active", backend="k") == 0

    # Nothing marks a backend down yet (active checks and passive ejection are issue 3's); the gauge
    # reads Backend.up and Backend.draining live at every scrape.
    backend = obs.proxy.backends.get("k")
    assert backend is not None
    backend.up = False
    backend.draining = True
    assert obs.value("mcpbalancer_backend_up", backend="k") == 0
    assert obs.value("mcpbalancer_backend_draining", backend="k") == 1
    assert obs.value("mcpbalancer_backend_up", backend="a") == 1


async def test_lookups_through_a_shared_redis(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession, redis_url: str
) -> None:
    first = await observe(backends, store=redis_url)
    second = await observe(backends, store=redis_url)
    session_id = await open_session(web, first.url)
    name = owner(first, session_id)
    assert first.value("mcpbalancer_store_operations_total", op="bind", result="ok") == 1
    assert first.value("mcpbalancer_store_latency_seconds_count", op="bind") == 1
    assert first.lookups() == {"cache_hit": 1, "store_hit": 0, "miss": 0}

    # The second proxy heard of the binding (the store's events): its first use is a cache hit.
    assert (await call_tool(web, second.url, session_id, "whoami")).text == name
    assert second.lookups() == {"cache_hit": 1, "store_hit": 0, "miss": 0}
    assert second.value("mcpbalancer_store_operations_total", op="get", result="ok") == 0
    assert second.value("mcpbalancer_sessions_created_total", backend=name) == 0
    # A proxy started after the binding did not hear of it: its first use asks Redis, the next one
    # is answered by its local cache.
    third = await observe(backends, store=redis_url)
    assert (await call_tool(web, third.url, session_id, "whoami")).text == name
    assert third.lookups() == {"cache_hit": 0, "store_hit": 1, "miss": 0}
    assert (await call_tool(web, third.url, session_id, "count")).text == "1"
    assert third.lookups() == {"cache_hit": 1, "store_hit": 1, "miss": 0}
    assert third.value("mcpbalancer_store_operations_total", op="get", result="ok") == 1

    unknown = await call_tool(web, third.url, "never-issued", "whoami")
    assert unknown.status == 404
    assert third.lookups() == {"cache_hit": 1, "store_hit": 1, "miss": 1}
    assert third.value("mcpbalancer_store_operations_total", op="get", result="ok") == 2


# --- streams ----------------------------------------------------------------------------------------


async def test_heartbeats_and_the_stream_gauge(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends, heartbeat=0.2)
    session_id = await open_session(web, obs.url)
    name = owner(obs, session_id)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    pings = 0
    async with web.get(obs.url, headers=headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        assert obs.value("mcpbalancer_sse_streams_active", backend=name) == 1
        async with asyncio.timeout(DEADLINE):
            while pings < 2:
                line = await stream.content.readline()
                assert line, "the stream ended"
                pings += line == b": ping\n"
        # The proxy and this client share the event loop; the next ping is a heartbeat away.
        assert obs.value("mcpbalancer_sse_heartbeats_total") == pings
        assert obs.value("mcpbalancer_client_disconnects_total") == 0
    # Leaving the block closed the connection mid-stream: the client went away.
    await wait_until(
        _is(lambda: obs.value("mcpbalancer_sse_streams_active", backend=name), 0), "the stream to end"
    )
    assert obs.value("mcpbalancer_client_disconnects_total") == 1
    assert obs.value("mcpbalancer_sse_stream_duration_seconds_count") == 2  # initialize's, then the GET
    assert obs.value("mcpbalancer_sse_stream_duration_seconds_sum") >= 0.4


def _is(read: Callable[[], float], expected: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return read() == expected

    return check


# --- the modern era ---------------------------------------------------------------------------------


async def test_modern_requests_are_counted_by_mcp_method(
    backends: list[BackendProcess], observe: ObserveFactory
) -> None:
    obs = await observe(backends)
    async with recorded_client(obs.url, mode="2026-07-28") as (client, wire):
        assert text_of(await client.call_tool("whoami")) in {"a", "b", "c"}
        assert text_of(await client.call_tool("whoami")) in {"a", "b", "c"}
    sent = collections.Counter(h["mcp-method"] for h in wire.requests)
    assert sent["tools/call"] == 2
    for method, count in sent.items():
        assert obs.value("mcpbalancer_mcp_requests_total", era="modern", mcp_method=method) == count
    answered = sum(obs.requests(b.name, "2xx", era="modern") for b in backends)
    assert answered == len(wire.requests)
    assert obs.value("mcpbalancer_sessions_created_total", backend="a") == 0


# --- exposition and probes ------------------------------------------------------------------------


def parse_exposition(text: str) -> dict[str, Any]:
    """Family name -> family; the parser raises on anything that is not the text format."""
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_on_the_public_listener(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    await open_session(web, obs.url)
    async with web.get(obs.proxy.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert from_proxy(resp.headers)  # answered by the proxy, not forwarded
        families = parse_exposition(await resp.text())
    assert families.keys() >= FAMILIES
    assert "process_cpu_seconds" in families
    [build] = families["mcpbalancer_build_info"].samples
    assert build.value == 1
    assert build.labels["version"]
    created = families["mcpbalancer_sessions_created"].samples
    assert sum(s.value for s in created if s.name.endswith("_total")) == 1
    # Scrapes are requests the proxy answered itself.
    assert obs.requests("none", "2xx", method="GET") == 1


async def test_metrics_on_the_admin_listener(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends, admin="127.0.0.1:0", metrics={"path": "/prom"})
    assert obs.proxy.control is not None
    admin = f"http://127.0.0.1:{obs.proxy.control.port}"
    await open_session(web, obs.url)
    async with web.get(admin + "/prom") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        families = parse_exposition(await resp.text())
    assert families.keys() >= FAMILIES
    active = families["mcpbalancer_sessions_active"].samples
    assert sorted(s.value for s in active) == [0, 0, 1]
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 404)):
        async with web.get(admin + path) as resp:
            assert resp.status == status, path
    # With an admin listener, the public one does not answer the metrics path: it is forwarded.
    async with web.get(obs.proxy.url + "/prom") as resp:
        assert from_backend(resp.headers)


async def test_metrics_can_be_turned_off(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends, metrics={"enabled": False})
    async with web.get(obs.proxy.url + "/metrics") as resp:
        assert from_backend(resp.headers)
    async with web.get(obs.proxy.url + "/healthz") as resp:
        assert resp.status == 200


async def test_health_probes_are_answered_by_the_proxy(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    base = obs.proxy.url
    async with web.get(base + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        assert from_proxy(resp.headers)
    async with web.get(base + "/readyz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready", "reason": "ready", "store": "ok"}
    async with web.head(base + "/readyz") as resp:
        assert resp.status == 200
    async with web.post(base + "/healthz", json={}) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
    # Keep-alive works across local answers and forwarded requests on one connection.
    assert (await open_session(web, obs.url)) is not None

    for backend in obs.proxy.backends:
        backend.up = False
    async with web.get(base + "/readyz") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "unavailable", "reason": "no backend up", "store": "ok"}
    async with web.get(base + "/healthz") as resp:
        assert resp.status == 200


async def test_readyz_follows_the_redis_store(
    backends: list[BackendProcess],
    observe: ObserveFactory,
    web: aiohttp.ClientSession,
    private_redis_server: RedisServer,
) -> None:
    # on_store_error: degrade (the default): through an outage the proxy still routes known sessions
    # (local cache) and places new ones (bound locally), so it stays ready and says the store is down.
    obs = await observe(backends, store=private_redis_server.url)
    readyz = obs.proxy.url + "/readyz"
    pings = obs.value("mcpbalancer_store_operations_total", op="ping", result="ok")  # the start-up one

    async def status() -> tuple[int, dict[str, str]]:
        async with web.get(readyz) as resp:
            return resp.status, await resp.json()

    assert await status() == (200, {"status": "ready", "reason": "ready", "store": "ok"})
    # Probes within a second share one PING.
    assert (await status())[0] == 200
    assert obs.value("mcpbalancer_store_operations_total", op="ping", result="ok") == pings + 1

    private_redis_server.kill()

    async def store_down() -> bool:
        return (await status())[1]["store"] == "unreachable"

    await wait_until(store_down, "/readyz to report the store down")
    code, body = await status()
    assert code == 200
    assert body["status"] == "degraded"
    assert body["reason"].startswith("session store unreachable: redis:")
    assert body["reason"].endswith("; new sessions are bound locally")
    assert obs.value("mcpbalancer_store_operations_total", op="ping", result="error") >= 1
    # What the body says holds: a new session is placed and routed while Redis is down.
    session_id = await open_session(web, obs.url)
    assert (await call_tool(web, obs.url, session_id, "count")).text == "1"

    for backend in obs.proxy.backends:
        backend.up = False
    unavailable = {"status": "unavailable", "reason": "no backend up", "store": "unreachable"}
    assert await status() == (503, unavailable)
    for backend in obs.proxy.backends:
        backend.up = True

    private_redis_server.start()

    async def store_up() -> bool:
        return await status() == (200, {"status": "ready", "reason": "ready", "store": "ok"})

    await wait_until(store_up, "/readyz to see the store again")


async def test_readyz_with_on_store_error_fail_is_unready_while_the_store_is_down(
    backends: list[BackendProcess],
    observe: ObserveFactory,
    web: aiohttp.ClientSession,
    private_redis_server: RedisServer,
) -> None:
    obs = await observe(backends, store=private_redis_server.url, on_store_error="fail", admin="127.0.0.1:0")
    assert obs.proxy.control is not None
    probes = [obs.proxy.url + "/readyz", f"http://127.0.0.1:{obs.proxy.control.port}/readyz"]

    async def statuses() -> list[tuple[int, dict[str, str]]]:
        answers = []
        for url in probes:
            async with web.get(url) as resp:
                answers.append((resp.status, await resp.json()))
        return answers

    assert await statuses() == [(200, {"status": "ready", "reason": "ready", "store": "ok"})] * 2
    private_redis_server.kill()

    async def unready() -> bool:
        return all(code == 503 for code, _ in await statuses())

    await wait_until(unready, "/readyz to answer 503 on both listeners")
    for _, body in await statuses():
        assert (body["status"], body["store"]) == ("unavailable", "unreachable")
        assert body["reason"].startswith("session store unreachable: redis:")
        assert body["reason"].endswith("; new sessions are refused")
    # What the body says holds: an initialize is refused.
    async with web.post(obs.url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 503


async def unreachable_redis_url(server: RedisServer) -> str:
    """A Redis URL nobody answers on: the private server's port, with the server killed."""
    server.kill()
    return server.url


@pytest.mark.parametrize("mode", ["degrade", "fail"])
async def test_an_unreachable_redis_at_start_up_is_a_warning_at_once(
    mode: str,
    backends: list[BackendProcess],
    observe: ObserveFactory,
    web: aiohttp.ClientSession,
    private_redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = await unreachable_redis_url(private_redis_server)
    with caplog.at_level(logging.WARNING, logger="mcpbalancer"):
        obs = await observe(backends, store=url, on_store_error=mode)
    # Logged by start() itself, before any request and before the first one-second store check.
    [warning] = [r for r in caplog.records if "session store unreachable" in r.getMessage()]
    assert (warning.name, warning.levelname) == ("mcpbalancer.app", "WARNING")
    message = warning.getMessage()
    assert message.startswith("session store unreachable at start-up: redis:")
    assert obs.value("mcpbalancer_store_degraded") == 1
    assert obs.access_lines() == []
    async with web.post(obs.url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        status = resp.status
    if mode == "fail":
        assert "new sessions are refused (503)" in message
        assert status == 503  # refused from the start, not from the first failed write
    else:
        assert "new sessions are bound locally" in message
        assert status == 200


# --- the access log -----------------------------------------------------------------------------------


async def test_access_log_lines(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    async with web.post(obs.url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        session_id = resp.headers["Mcp-Session-Id"]
        assert sse_messages(await resp.text())
    answer = await call_tool(web, obs.url, session_id, "whoami")
    name = answer.text
    odd = URL(obs.url + '?q="\\x', encoded=True)  # sent as is: the log must escape it
    async with web.post(odd, json={}, headers={"Mcp-Session-Id": "no-such-session"}) as resp:
        assert resp.status == 404
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": 'tools/"odd"'}
    async with web.post(obs.url, data=b"{}", headers=headers) as resp:
        modern_status = resp.status
        await resp.read()  # the whole answer: the exchange has ended

    lines = obs.access_lines()
    assert len(lines) == 4, lines
    assert all(set(line) == ACCESS_FIELDS for line in lines)
    init, call, unknown, modern = lines
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", init["ts"])
    assert init | {"ts": "", "duration_us": 0, "bytes": 0} == {
        "ts": "",
        "type": "access",
        "client": "127.0.0.1",
        "method": "POST",
        "path": "/mcp",
        "era": "legacy",
        "session": call["session"],  # the session its answer created
        "backend": name,
        "status": 200,
        "bytes": 0,
        "duration_us": 0,
        "mcp_method": None,
        "outcome": "ok",
        "service": "default",
        "request_id": None,
        "worker": None,
    }
    assert init["bytes"] > 0
    assert init["duration_us"] > 0
    assert re.fullmatch(r"[0-9a-f]{8}", call["session"])
    assert (call["backend"], call["status"], call["outcome"]) == (name, 200, "ok")
    assert call["bytes"] == len(answer.body.encode())
    assert unknown["path"] == '/mcp?q="\\x'
    assert (unknown["backend"], unknown["status"], unknown["outcome"]) == (None, 404, "error")
    assert unknown["bytes"] == len(error_body(SessionNotFound()))
    assert unknown["session"] != call["session"]
    assert re.fullmatch(r"[0-9a-f]{16}", unknown["request_id"])  # the X-Request-Id of the 404
    assert (modern["era"], modern["mcp_method"], modern["status"]) == ("modern", 'tools/"odd"', modern_status)
    assert obs.value("mcpbalancer_mcp_requests_total", era="modern", mcp_method="other") == 1
    # Session ids never reach the log, whole or in part.
    text = obs.log.getvalue()
    assert session_id not in text
    assert session_id[:8] not in text
    assert "no-such-session" not in text


async def test_access_log_text_format(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends, log={"format": "text"})
    session_id = await open_session(web, obs.url)
    assert obs.proxy.access_log is not None
    obs.proxy.access_log.flush()
    lines = obs.log.getvalue().splitlines()
    assert len(lines) == 2
    pattern = (
        r"\S+Z 127\.0\.0\.1 \"POST /mcp\" (200|202) \d+ \d+us era=legacy service=default "
        r"session=(-|[0-9a-f]{8}) backend=[abc] mcp=- outcome=ok request_id=- worker=-"
    )
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert session_id not in obs.log.getvalue()


async def test_access_log_can_be_turned_off(backends: list[BackendProcess], observe: ObserveFactory) -> None:
    assert (await observe(backends, log={"access": False})).proxy.access_log is None
    assert (await observe(backends, log={"level": "warning"})).proxy.access_log is None


# --- the access log tells the truth (issue 11) ------------------------------------------------------


SDK_CLIENTS = 12
SDK_CALLS = 15


async def test_tool_calls_of_the_sdk_are_logged_ok(
    backends: list[BackendProcess], observe: ObserveFactory
) -> None:
    # The mcp SDK closes its connection as soon as the response event of a POST's stream has
    # arrived, often before the backend has ended that stream: the answer was delivered whole.
    obs = await observe(backends)

    async def client() -> None:
        async with recorded_client(obs.url) as (sdk, _):
            for _ in range(SDK_CALLS):
                assert text_of(await sdk.call_tool("whoami")) in {"a", "b", "c"}

    await asyncio.gather(*(client() for _ in range(SDK_CLIENTS)))
    await wait_until(lambda: _no_connections(obs), "the proxy to see every connection closed")
    answered = [line for line in obs.access_lines() if line["method"] == "POST" and line["status"] == 200]
    assert len(answered) >= SDK_CLIENTS * (SDK_CALLS + 1)  # the calls and the initializes
    assert [line for line in answered if line["outcome"] != "ok"] == []


async def _no_connections(obs: Observed) -> bool:
    plane = obs.proxy._plane
    return plane is not None and not plane.connections


def sse_stub(*events: bytes) -> Handler:
    """A backend that answers a POST with these SSE events and then holds the stream open (a
    backend slow to end its stream, which a real server does not do on demand)."""

    async def handle(request: StubRequest) -> None:
        await request.complete.wait()
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        request.conn.write(head.encode() + b"".join(stub_chunk(e) for e in events))
        await request.conn.closed.wait()

    return handle


PROGRESS_EVENT = (
    b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":1,"progress":0.5}}\n\n'
)
RESULT_EVENT = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n\n'


@pytest.mark.parametrize(
    ("events", "outcome"),
    [
        pytest.param([PROGRESS_EVENT, RESULT_EVENT], "ok", id="after-the-answer"),
        pytest.param([PROGRESS_EVENT], "client_disconnect", id="before-the-answer"),
    ],
)
async def test_a_client_that_closes_at_the_last_byte_of_its_answer_got_it(
    events: list[bytes],
    outcome: str,
    observe: ObserveFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
) -> None:
    stub = await make_stub(sse_stub(*events))
    obs = await observe([stub])
    client = await open_client(obs.proxy)
    client.send(raw_request("POST", "/mcp", [("Content-Type", "application/json")], b"{}"))
    resp = await client.read_head()
    expected = b"".join(events)
    while len(resp.body) < len(expected):
        assert await client.read_chunk(resp)
    assert bytes(resp.body) == expected  # its last byte is in: the client closes at once
    client.close()
    [conn] = stub.connections
    async with asyncio.timeout(DEADLINE):
        await conn.closed.wait()  # the backend's stream is closed at once either way
    [line] = obs.access_lines()
    assert (line["status"], line["bytes"], line["outcome"]) == (200, len(expected), outcome)
    disconnects = 0 if outcome == "ok" else 1
    assert obs.value("mcpbalancer_client_disconnects_total") == disconnects


async def test_streams_cut_at_shutdown_are_logged_shutdown(
    backends: list[BackendProcess], web: aiohttp.ClientSession
) -> None:
    log = io.StringIO()
    config = parse_config(proxy_config(backends[:1], shutdown_timeout=0.2), source="<test>")
    proxy = Proxy(config, registry=CollectorRegistry(), access_stream=log)
    await proxy.start()
    try:
        url = mcp_url(proxy)
        session_id = await open_session(web, url)
        headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
        stream = await web.get(url, headers=headers, timeout=aiohttp.ClientTimeout())
        assert stream.status == 200
        slow = asyncio.create_task(call_tool(web, url, session_id, "slow", seconds=30))
        [backend] = proxy.backends

        async def both_open() -> bool:
            return backend.in_flight == 2

        await wait_until(both_open, "the GET stream and the tool call to be in flight")
    finally:
        await proxy.stop()  # waits 0.2 s for the tool call, then cuts it and the GET stream
    with contextlib.suppress(aiohttp.ClientError):
        await slow
    stream.close()
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    cut = [(line["method"], line["outcome"]) for line in lines[2:]]
    assert sorted(cut) == [("GET", "shutdown"), ("POST", "shutdown")], lines
    disconnects = proxy.metrics.registry.get_sample_value("mcpbalancer_client_disconnects_total")
    assert disconnects == 0


async def test_the_initialize_line_names_the_session_it_created(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends)
    session_id = await open_session(web, obs.url)  # initialize, notifications/initialized
    await call_tool(web, obs.url, session_id, "whoami")
    # A stateful server puts a fresh, unusable id on its 400 to a session-less request that is not
    # an initialize: no session was created, none is named.
    async with web.post(obs.url, json=call_body("whoami"), headers=INIT_HEADERS) as resp:
        assert resp.status == 400
        assert "Mcp-Session-Id" in resp.headers
        await resp.read()
    async with web.post(obs.url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        other = resp.headers["Mcp-Session-Id"]
        assert sse_messages(await resp.text())  # the whole answer: the exchange has ended
    initialize, initialized, call, refused, second = obs.access_lines()
    assert re.fullmatch(r"[0-9a-f]{8}", initialize["session"])
    assert initialize["session"] == initialized["session"] == call["session"]
    assert refused["session"] is None
    assert second["session"] not in (None, initialize["session"])
    assert session_id not in obs.log.getvalue()
    assert other not in obs.log.getvalue()


async def test_streams_of_an_evicted_backend_are_logged_aborted(
    backends: list[BackendProcess], observe: ObserveFactory, web: aiohttp.ClientSession
) -> None:
    obs = await observe(backends[:1])
    session_id = await open_session(web, obs.url)
    headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    async with web.get(obs.url, headers=headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        [backend] = obs.proxy.backends
        obs.proxy.fleet.on_evict(backend)  # what a drain that timed out does to its open streams
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: the chunked body has no end
            await stream.content.read()

    async def logged() -> bool:
        return len(obs.access_lines()) == 3

    await wait_until(logged, "the stream's access line")
    assert obs.access_lines()[-1]["outcome"] == "aborted"
    assert obs.value("mcpbalancer_client_disconnects_total") == 0
