"""Stateless and stateful servers in one pool: a legacy request without a session id that is not an
initialize goes only to a backend that serves it without a session, from a cold proxy's first
request on. Real Python FastMCP servers (stateless_http, stateless with JSON answers, stateful),
the real mcp SDK as client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import DictProxy, ProxyFactory
from tests.mcp_helpers import INIT_BODY, INIT_HEADERS, mcp_url, recorded_client, text_of, wait_until

CLIENTS = 6
CALLS = 10
COLD_STARTS = 3
PING = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
VERSIONED = {**INIT_HEADERS, "MCP-Protocol-Version": "2025-06-18"}


@pytest.fixture
def pool(backend_factory: BackendFactory) -> list[BackendProcess]:
    """`sl` stateless, `sj` stateless answering JSON, `sf` stateful (as FastMCP is by default)."""
    [sl] = backend_factory(["sl"], extra_args=["--stateless-http"])
    [sj] = backend_factory(["sj"], extra_args=["--stateless-http", "--json-response"])
    [sf] = backend_factory(["sf"])
    return [sl, sj, sf]


async def one_client(url: str) -> tuple[str | None, list[str]]:
    """A legacy mcp SDK client making CALLS calls: (its session id or None, who answered each)."""
    async with recorded_client(url) as (client, wire):
        answers = [text_of(await client.call_tool("whoami")) for _ in range(CALLS)]
        ids = {h["mcp-session-id"] for status, h in wire.responses if status < 300 and "mcp-session-id" in h}
    return (ids.pop() if ids else None), answers


def modes(proxy: Proxy) -> dict[str, str]:
    return {b.name: b.session_mode for b in proxy.backends}


async def test_a_mixed_pool_serves_every_call_from_a_cold_start(
    pool: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    for _ in range(COLD_STARTS):
        proxy = await make_proxy(pool)  # a fresh proxy: it knows no backend's kind
        assert set(modes(proxy).values()) == {"unknown"}
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one_client(mcp_url(proxy)) for _ in range(CLIENTS)))
        for session_id, answers in results:
            if session_id is not None:
                # It got a session: every call stays on the stateful server.
                assert set(answers) == {"sf"}, answers
            else:
                # No session: it never reaches the stateful server.
                assert set(answers) <= {"sl", "sj"}, answers
        assert modes(proxy) == {"sl": "stateless", "sj": "stateless", "sf": "stateful"}
        await proxy.stop()


async def test_a_cold_proxy_learns_the_kinds_before_a_session_less_request_lands(
    pool: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    # The first request is a session-less ping: nothing was learned from traffic yet.
    for _ in range(COLD_STARTS):
        proxy = await make_proxy(pool)
        answers = []
        for _ in range(6):
            async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
                answers.append(resp.status)
        assert answers == [200] * 6
        assert modes(proxy) == {"sl": "stateless", "sj": "stateless", "sf": "stateful"}
        await proxy.stop()


def answered(proxy: Proxy) -> dict[str, int]:
    """Legacy POSTs each backend answered (any status)."""
    counts = {}
    for b in proxy.backends:
        labels = {"backend": b.name, "era": "legacy", "method": "POST", "service": "default"}
        counts[b.name] = sum(
            int(
                proxy.metrics.registry.get_sample_value(
                    "mcpbalancer_requests_total", {**labels, "code": code}
                )
                or 0
            )
            for code in ("2xx", "4xx")
        )
    return counts


async def test_a_warm_pool_sends_session_less_requests_to_the_stateless_servers_only(
    pool: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(pool)
    await asyncio.gather(*(one_client(mcp_url(proxy)) for _ in range(CLIENTS)))
    assert modes(proxy) == {"sl": "stateless", "sj": "stateless", "sf": "stateful"}
    before = answered(proxy)
    for _ in range(20):
        async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
            assert resp.status == 200
    after = answered(proxy)
    assert after["sf"] == before["sf"]
    assert after["sl"] > before["sl"]
    assert after["sj"] > before["sj"]
    results = await asyncio.gather(*(one_client(mcp_url(proxy)) for _ in range(CLIENTS)))
    assert all(sid is not None or set(answers) <= {"sl", "sj"} for sid, answers in results)


async def test_an_all_stateful_pool_answers_the_servers_own_400(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends)  # a, b, c: stock FastMCP, stateful
    async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
        assert resp.status == 400
        assert "Missing session ID" in (await resp.json())["error"]["message"]
    assert set(modes(proxy).values()) == {"stateful"}


def declared(pool: list[BackendProcess], **modes_: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "health": {"interval": 0},
        "backends": [
            {"name": b.name, "url": b.url, **({"session_mode": modes_[b.name]} if b.name in modes_ else {})}
            for b in pool
        ],
    }


async def test_a_declared_session_mode_is_kept_whatever_the_traffic_shows(
    pool: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    # `sj` is stateless, but the file says stateful: no session-less request goes to it, and
    # neither its answers nor the proxy's own probe change what the file says.
    proxy = await dict_proxy(declared(pool, sj="stateful", sf="stateful"))
    assert modes(proxy) == {"sl": "unknown", "sj": "stateful", "sf": "stateful"}
    for _ in range(4):
        async with web.post(mcp_url(proxy), json=INIT_BODY, headers=INIT_HEADERS) as resp:
            assert resp.status == 200
    results = await asyncio.gather(*(one_client(mcp_url(proxy)) for _ in range(CLIENTS)))
    for _ in range(10):
        async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
            assert resp.status == 200
    assert modes(proxy) == {"sl": "stateless", "sj": "stateful", "sf": "stateful"}
    for session_id, answers in results:
        if session_id is None:
            assert set(answers) == {"sl"}, answers  # never `sj`, declared stateful
    before = answered(proxy)["sj"]
    for _ in range(10):
        async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
            assert resp.status == 200
    assert answered(proxy)["sj"] == before
    assert modes(proxy)["sj"] == "stateful"


async def test_a_re_addressed_backend_is_learned_again(
    backend_factory: BackendFactory, tmp_path: Path, web: aiohttp.ClientSession
) -> None:
    # The migration backwards: `sw` was stateless, its URL now names a stateful server.
    [sl] = backend_factory(["sl"], extra_args=["--stateless-http"])
    [sw] = backend_factory(["sw"], extra_args=["--stateless-http"])
    [stateful] = backend_factory(["sw"])
    path = tmp_path / "mcpbalancer.yaml"

    def write(url: str) -> None:
        entries = [{"name": "sl", "url": sl.url}, {"name": "sw", "url": url}]
        path.write_text(
            yaml.safe_dump({"listen": "127.0.0.1:0", "health": {"interval": 0}, "backends": entries})
        )

    write(sw.url)
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
            assert resp.status == 200
        assert modes(proxy) == {"sl": "stateless", "sw": "stateless"}
        write(stateful.url)
        assert proxy.reload().updated == ["sw"]
        assert modes(proxy) == {"sl": "stateless", "sw": "unknown"}
        for _ in range(10):
            async with web.post(mcp_url(proxy), json=PING, headers=VERSIONED) as resp:
                assert resp.status == 200  # never the stateful server's 400

        async def learned() -> bool:
            return modes(proxy)["sw"] == "stateful"

        await wait_until(learned, "the new server's kind learned")
        proxy.fleet.set_status("sw", False)
        proxy.fleet.set_status("sw", True)  # back up: perhaps restarted as another kind
        assert modes(proxy)["sw"] == "unknown"
    finally:
        await proxy.stop()
