"""Sealed session ids (issue 14, item 1): the route travels in the id, so proxies need no shared store.

Real FastMCP backends, the real mcp client (its requests rotated over the proxies by a transport,
as an L4 balancer in front of them would), raw aiohttp where a token must be altered byte by byte,
and a stub backend only for a session id no real server mints (longer than a sealed id can carry).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import generate_latest

from mcpbalancer.app import Proxy
from mcpbalancer.cli import main
from mcpbalancer.config import load_config, parse_config
from mcpbalancer.config.runtime import SessionKey
from mcpbalancer.errors import ConfigError, SessionNotFound
from mcpbalancer.routing.sealed import SealedIds, key_id
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import proxy_config
from tests.fixtures.stub import StubFactory, StubRequest, response
from tests.mcp_helpers import (
    INIT_BODY,
    INIT_HEADERS,
    SESSION_NOT_FOUND,
    call_tool,
    from_proxy,
    mcp_url,
    open_session,
    session_ledger,
    text_of,
)

SESSIONS = 20
CALLS = 6


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def sealed(backends: list[BackendProcess], keys: list[str], **overrides: Any) -> dict[str, Any]:
    return proxy_config(backends, session_ids="sealed", session_keys=keys, shutdown_timeout=1, **overrides)


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


def key_of(token: str) -> bytes:
    """The key id of a token (bytes 1-4 of the layout in routing/sealed.py)."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[1:5]


@pytest.fixture
async def fleet() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    """`await fleet(config)` -> a started Proxy; every one still running is stopped after the test."""
    running: list[Proxy] = []

    async def start(data: dict[str, Any]) -> Proxy:
        proxy = Proxy(parse_config(data, source="<test>"))
        await proxy.start()
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        await proxy.stop()


class RoundRobin(httpx2.AsyncBaseTransport):
    """Each request to the next proxy, whatever port the client asked for (an L4 balancer in front
    of the fleet); a proxy that refuses the connection (being restarted) is skipped, as a balancer
    would, since the request never reached it."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.served: collections.Counter[int] = collections.Counter()
        self._turn = itertools.count()
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        for _ in range(4 * len(self.ports)):
            port = self.ports[next(self._turn) % len(self.ports)]
            request.url = request.url.copy_with(port=port)
            try:
                answer = await self._inner.handle_async_request(request)
            except httpx2.ConnectError:
                await asyncio.sleep(0.01)
                continue
            self.served[port] += 1
            return answer
        raise httpx2.ConnectError("every proxy refused the connection")

    async def aclose(self) -> None:
        await self._inner.aclose()


# --- one proxy at a time: the token, its keys, what does not open ------------------------------


async def test_the_client_sees_a_token_and_the_backend_its_own_id(
    fleet: Callable[[dict[str, Any]], Awaitable[Proxy]], backends: list[BackendProcess]
) -> None:
    proxy = await fleet(sealed(backends[:1], [new_key()]))
    url = mcp_url(proxy)
    async with aiohttp.ClientSession() as web:
        token = await open_session(web, url)
        answer = await call_tool(web, url, token, "count")
        assert (answer.status, answer.text, answer.headers["Mcp-Session-Id"]) == (200, "1", token)
    opened = proxy.router.sealed.open(token) if proxy.router.sealed is not None else None
    assert opened is not None
    assert opened.owner == backends[0].name
    ledger = await session_ledger(backends[0])
    assert opened.backend_sid.decode() in ledger.issued  # the backend minted it, the client never saw it
    assert token not in ledger.issued
    assert token not in ledger.seen
    assert len(token) <= 256
    assert token.isascii()
    assert proxy.store.peek(token) is None  # nothing in the store
    assert sample(proxy, "mcpbalancer_sealed_ids_total", result="issued") == 1


async def test_tampered_truncated_and_other_services_tokens_get_404_from_the_proxy(
    fleet: Callable[[dict[str, Any]], Awaitable[Proxy]], backends: list[BackendProcess]
) -> None:
    key = new_key()
    proxy = await fleet(sealed(backends[:1], [key]))
    url = mcp_url(proxy)
    async with aiohttp.ClientSession() as web:
        token = await open_session(web, url)
        opened = proxy.router.sealed.open(token)  # type: ignore[union-attr]
        flipped = token[:40] + ("A" if token[40] != "A" else "B") + token[41:]
        other = SealedIds([base64.b64decode(key)], service="another")
        foreign = other.seal(opened.owner, opened.backend_sid, None)  # the same key, another service
        before = await session_ledger(backends[0])
        bad = {
            "tampered": flipped,
            "truncated": token[:-4],
            "other service": foreign,
            "not base64": token[:-1] + "!",
            "stray padding": token + "=",
        }
        for what, value in bad.items():
            answer = await call_tool(web, url, value, "count")
            assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND), what
            assert from_proxy(answer.headers), what
        after = await session_ledger(backends[0])
        assert after.stray_total == before.stray_total  # no backend saw any of them
        assert after.seen == before.seen
        assert (await call_tool(web, url, token, "count")).text == "1"  # the real one still works
    # Tampered and foreign tokens fail authentication; a truncated one is that or, most often, no
    # longer canonical base64 (its last character carries bits that are not zero).
    invalid = sample(proxy, "mcpbalancer_sealed_ids_total", result="invalid")
    malformed = sample(proxy, "mcpbalancer_sealed_ids_total", result="malformed")
    assert (invalid + malformed, invalid >= 2, malformed >= 2) == (5, True, True)


async def test_key_rotation_old_tokens_open_new_ones_use_the_new_key_removed_keys_404(
    tmp_path: Any, backends: list[BackendProcess], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    old, new = new_key(), new_key()
    path = tmp_path / "sealed.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\nhealth: {interval: 0}\nsession_ids: sealed\n"
        f"backends: [{{name: {backends[0].name}, url: '{backends[0].url}'}}]\n"
        f"session_keys: ['{old}']\n"
    )
    proxy = Proxy(load_config(str(path)))
    await proxy.start()
    try:
        url = mcp_url(proxy)
        async with aiohttp.ClientSession() as web:
            first = await open_session(web, url)
            assert key_of(first) == key_id(base64.b64decode(old))
            # Rotate: the new key first seals, the old one still opens.
            path.write_text(path.read_text().replace(f"['{old}']", f"['{new}', 'file:old.key']"))
            (tmp_path / "old.key").write_text(old + "\n")
            proxy.reload()
            second = await open_session(web, url)
            assert key_of(second) == key_id(base64.b64decode(new))
            assert (await call_tool(web, url, first, "count")).text == "1"
            assert (await call_tool(web, url, second, "count")).text == "1"
            # Retire the old key: its tokens do not open any more, the new key's do.
            path.write_text(path.read_text().replace(", 'file:old.key'", ""))
            proxy.reload()
            gone = await call_tool(web, url, first, "count")
            assert (gone.status, from_proxy(gone.headers)) == (404, True)
            assert (await call_tool(web, url, second, "count")).text == "2"
        assert sample(proxy, "mcpbalancer_sealed_ids_total", result="unknown_key") == 1
        exposed = caplog.text + generate_latest(proxy.metrics.registry).decode()
        assert old not in exposed
        assert new not in exposed
    finally:
        await proxy.stop()


def test_a_token_older_than_session_max_age_is_404() -> None:
    clock = [1_000_000.0]
    seal = SealedIds([secrets.token_bytes(32)], max_age=60, clock=lambda: clock[0])
    token = seal.seal("a", b"abc", None)
    clock[0] += 59
    assert seal.open(token).backend_sid == b"abc"
    clock[0] += 2
    with pytest.raises(SessionNotFound):
        seal.open(token)
    assert SealedIds([secrets.token_bytes(32)]).seal("a", b"abc", None) != token


async def test_a_backend_id_too_long_to_seal_is_refused_with_502(
    fleet: Callable[[dict[str, Any]], Awaitable[Proxy]], make_stub: StubFactory
) -> None:
    # No real server mints a 200-byte id: a stub does. A sealed id holds at most 256 characters.
    long_id = "x" * 200

    async def mint(request: StubRequest) -> None:
        await request.complete.wait()
        headers = [("Content-Type", "application/json"), ("Mcp-Session-Id", long_id)]
        request.conn.write(response(200, headers, b'{"jsonrpc":"2.0","id":1,"result":{}}'))

    stub = await make_stub(mint, name="long")
    proxy = await fleet(sealed([stub], [new_key()]))
    async with aiohttp.ClientSession() as web:
        async with web.post(mcp_url(proxy), json=INIT_BODY, headers=INIT_HEADERS) as resp:
            body = await resp.json()
            assert resp.status == 502
            assert "Mcp-Session-Id" not in resp.headers
        assert body["error"]["message"] == "Bad Gateway: the backend's session id is too long to seal"
    assert sample(proxy, "mcpbalancer_sealed_ids_total", result="too_long") == 1
    assert sample(proxy, "mcpbalancer_sessions_created_total", backend="long") == 0


# --- a fleet of proxies that shares only its keys ---------------------------------------------


async def test_three_proxies_share_keys_and_no_store_and_survive_restarts_in_turn(
    fleet: Callable[[dict[str, Any]], Awaitable[Proxy]], backends: list[BackendProcess]
) -> None:
    config = sealed(backends, [new_key()])
    proxies = [await fleet(config) for _ in range(3)]
    ports = [p.port for p in proxies]
    before = {b.name: (await session_ledger(b)).stray_total for b in backends}
    balancer = RoundRobin(ports)
    failures: list[BaseException] = []
    counts: dict[int, list[str]] = {}

    async def session(n: int, client: Client) -> None:
        counts[n] = [text_of(await client.call_tool("count")) for _ in range(CALLS)]

    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx2.AsyncClient(transport=balancer, timeout=30.0))
        clients = []
        for _ in range(SESSIONS):
            transport = streamable_http_client(f"http://127.0.0.1:{ports[0]}/mcp", http_client=http)
            clients.append(await stack.enter_async_context(Client(transport, mode="legacy")))
        owners = [text_of(await c.call_tool("whoami")) for c in clients]
        for round_, port in enumerate(ports):
            # Restart proxy `round_` while every session goes on through the others.
            work = [asyncio.create_task(session(n, c)) for n, c in enumerate(clients)]
            victim = next(p for p in proxies if p.port == port)
            await victim.stop()
            proxies.remove(victim)
            replacement = await fleet({**config, "listen": f"127.0.0.1:{port}"})
            proxies.append(replacement)
            for result in await asyncio.gather(*work, return_exceptions=True):
                if isinstance(result, BaseException):
                    failures.append(result)
            expected = [str(k) for k in range(round_ * CALLS + 1, (round_ + 1) * CALLS + 1)]
            assert [counts[n] for n in range(SESSIONS)] == [expected] * SESSIONS
        assert [text_of(await c.call_tool("whoami")) for c in clients] == owners
    assert failures == []
    assert all(balancer.served[p] > SESSIONS for p in ports)  # every proxy took its share
    after = {b.name: (await session_ledger(b)).stray_total for b in backends}
    assert after == before  # 0 misroutes: no backend got a request for a session it does not own
    assert len(set(owners)) > 1


def test_the_config_refuses_sealed_ids_without_a_key_and_short_keys() -> None:
    base = {"backends": [{"name": "a", "url": "http://127.0.0.1:1"}], "session_ids": "sealed"}
    with pytest.raises(ConfigError, match="session_keys: is required with session_ids: sealed"):
        parse_config(base)
    short = base64.b64encode(b"k" * 31).decode()
    with pytest.raises(ConfigError) as raised:
        parse_config({**base, "session_keys": [new_key(), short]})
    assert "session_keys[1]: is 31 bytes, too short" in str(raised.value)
    assert short not in str(raised.value)  # a key is never quoted
    config = parse_config({**base, "session_keys": [new_key()]})
    assert "SessionKey(<secret>)" in repr(config)
    assert config.session_keys[0].material not in repr(config).encode()
    assert dataclasses.replace(config).session_keys == config.session_keys
    assert isinstance(config.session_keys[0], SessionKey)


def test_keygen_prints_a_fresh_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["keygen"]) == 0
    second = capsys.readouterr().out.strip()
    assert len(base64.b64decode(first)) == 32
    assert first != second
