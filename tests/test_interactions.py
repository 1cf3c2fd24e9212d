"""Features that were built apart, used together: replay failover with credential-bound sessions,
managed backends across a reload and under health checks, eras with replay, and rules, strict mode,
the Origin check and body limits on one proxy.

Real FastMCP backends (from the test fixtures and from examples/server.py as managed children), the
real mcp client or raw aiohttp, and real Redis where the store matters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config
from mcpbalancer.routing.binding import decode_owner
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import DictProxy, ProxyFactory, proxy_config
from tests.fixtures.stub import Handler, StubFactory, StubRequest, response
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    MODERN_META,
    MODERN_VERSION,
    SESSION_NOT_FOUND,
    call_body,
    from_backend,
    from_proxy,
    mcp_url,
    recorded_client,
    session_headers,
    sse_messages,
    text_of,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = f"python {ROOT / 'examples' / 'server.py'} --name {{name}} --port {{port}}"
RESTART_DEADLINE = 30.0  # a managed restart: 0.5 s delay, then a FastMCP start (slow under load)
ALICE = "Bearer alice-token"
MALLORY = "Bearer mallory-token"
APP = "https://app.example"


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE * 3)) as session:
        yield session


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


# --- raw legacy sessions with an optional credential -------------------------------------------------


def with_auth(headers: dict[str, str], auth: str | None) -> dict[str, str]:
    return headers if auth is None else {**headers, "Authorization": auth}


async def open_as(web: aiohttp.ClientSession, url: str, auth: str | None = None) -> str:
    """A legacy handshake (initialize + notifications/initialized) sent with `auth`; the session id."""
    async with web.post(url, json=INIT_BODY, headers=with_auth(INIT_HEADERS, auth)) as resp:
        assert resp.status == 200, await resp.text()
        sid = resp.headers["Mcp-Session-Id"]
        await resp.read()
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with web.post(url, json=initialized, headers=with_auth(session_headers(sid), auth)) as resp:
        assert resp.status == 202, await resp.text()
    return sid


_ids = iter(range(5000, 10**9))


async def call(
    web: aiohttp.ClientSession, url: str, sid: str, tool: str, auth: str | None = None
) -> tuple[int, Any, str]:
    """tools/call on session `sid` with `auth`: (status, headers, the tool's text or the raw body)."""
    body = call_body(tool, next(_ids))
    async with web.post(url, json=body, headers=with_auth(session_headers(sid), auth)) as resp:
        raw = await resp.text()
        if resp.status != 200:
            return resp.status, resp.headers, raw
        [message] = sse_messages(raw)
        return resp.status, resp.headers, str(message["result"]["content"][0]["text"])


async def refused_as_unknown(web: aiohttp.ClientSession, url: str, sid: str, auth: str | None) -> None:
    """The proxy itself answers 404 Session not found (no backend saw the request)."""
    status, headers, body = await call(web, url, sid, "count", auth)
    assert status == 404, body
    assert from_proxy(headers)
    assert json.loads(body) == SESSION_NOT_FOUND


# --- 1. replay failover + credential-bound sessions --------------------------------------------------


async def test_a_replayed_session_stays_bound_to_its_credential(
    backend_factory: BackendFactory, make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    started = await asyncio.to_thread(backend_factory, ["k1", "k2"])
    proxy = await make_proxy(
        started,
        failover="replay",
        bind_sessions="authorization",
        session_binding_key="interactions-test-key-0123456789",
        store=store,
    )
    url = mcp_url(proxy)
    sid = await open_as(web, url, ALICE)
    status, _, first = await call(web, url, sid, "whoami", ALICE)
    assert status == 200
    [doomed] = [b for b in started if b.name == first]
    [other] = [b for b in started if b.name != first]
    assert (await call(web, url, sid, "count", ALICE))[2] == "1"

    # Another credential, or none: 404 from the proxy, and the session's counter did not move.
    await refused_as_unknown(web, url, sid, MALLORY)
    await refused_as_unknown(web, url, sid, None)
    assert (await call(web, url, sid, "count", ALICE))[2] == "2"
    owner, tag, *_ = decode_owner(str(await proxy.store.get(sid)))
    assert (owner, tag is not None) == (doomed.name, True)

    await doomed.akill()

    # Before the move: another credential must not trigger (or ride on) a replay.
    await refused_as_unknown(web, url, sid, MALLORY)
    assert proxy.router.failover is not None
    assert proxy.router.failover.replays == 0

    # The owner's next request is replayed onto the other backend: a fresh server session.
    status, headers, text = await call(web, url, sid, "count", ALICE)
    assert (status, text) == (200, "1")
    assert from_backend(headers)
    assert headers["Mcp-Session-Id"] == sid
    assert (await call(web, url, sid, "whoami", ALICE))[2] == other.name
    assert proxy.router.failover.replays == 1

    # After the move: the new binding kept the credential's tag.
    assert decode_owner(str(await proxy.store.get(sid)))[:2] == (other.name, tag)
    await refused_as_unknown(web, url, sid, MALLORY)
    await refused_as_unknown(web, url, sid, None)
    assert (await call(web, url, sid, "count", ALICE))[2] == "2"
    assert sample(proxy, "mcpbalancer_rejected_requests_total", reason="credential") == 5
    assert sample(proxy, "mcpbalancer_session_failovers_total", result="moved") == 1


def authenticating(sid: str) -> Handler:
    """A backend that checks the bearer token (401 without Alice's) and mints `sid` on initialize:
    the kind of backend `bind_sessions: authorization` fronts. The fixture servers check no token."""

    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.header("authorization") != ALICE.encode():
            req.conn.write(response(401, [("Content-Type", "application/json")], b'{"error":"no"}'))
            return
        headers = [("Content-Type", "application/json")]
        if req.header("mcp-session-id") is None:
            headers.append(("Mcp-Session-Id", sid))
        req.conn.write(response(200, headers, b'{"jsonrpc":"2.0","id":1,"result":{}}'))

    return handle


async def test_the_replayed_initialize_carries_the_bound_credential(
    make_proxy: ProxyFactory, make_stub: StubFactory, web: aiohttp.ClientSession
) -> None:
    stubs = [await make_stub(authenticating(f"sid-{i}"), name=f"g{i}") for i in (1, 2)]
    proxy = await make_proxy(stubs, failover="replay", bind_sessions="authorization")
    url = mcp_url(proxy)
    async with web.post(url, json=INIT_BODY, headers=with_auth(INIT_HEADERS, ALICE)) as resp:
        assert resp.status == 200
        sid = resp.headers["Mcp-Session-Id"]
    [doomed] = [s for s in stubs if sid == f"sid-{s.name[1]}"]
    [other] = [s for s in stubs if s is not doomed]
    await doomed.close()

    async with web.post(url, json=call_body("count"), headers=with_auth(session_headers(sid), ALICE)) as resp:
        assert resp.status == 200, await resp.text()
    # initialize, notifications/initialized, the request: each with the session's credential, the
    # last two under the id the new backend minted.
    minted = f"sid-{other.name[1]}".encode()
    assert [r.header("authorization") for r in other.requests] == [ALICE.encode()] * 3
    assert [r.header("mcp-session-id") for r in other.requests] == [None, minted, minted]
    assert proxy.router.failover is not None
    assert proxy.router.failover.replays == 1


# --- managed backends -------------------------------------------------------------------------------


class ConfigFile:
    """A YAML config file for a Proxy built with load_config (so that reload re-reads it)."""

    def __init__(self, path: Path, base: dict[str, Any]) -> None:
        self.path = path
        self.base = base

    def write(self, backends: list[dict[str, Any]]) -> None:
        self.path.write_text(yaml.safe_dump({**self.base, "backends": backends}))


@pytest.fixture
async def file_proxy(tmp_path: Path) -> AsyncIterator[Any]:
    """`await file_proxy(backends, **top)` -> (started Proxy, its ConfigFile)."""
    started: list[Proxy] = []

    async def make(backends: list[dict[str, Any]], **top: Any) -> tuple[Proxy, ConfigFile]:
        config = ConfigFile(tmp_path / f"proxy{len(started)}.yaml", {"listen": "127.0.0.1:0", **top})
        config.write(backends)
        proxy = Proxy(load_config(config.path))
        await proxy.start()
        started.append(proxy)
        return proxy, config

    yield make
    for proxy in reversed(started):
        await proxy.stop()


def admin_url(proxy: Proxy) -> str:
    assert proxy.control is not None
    return f"http://127.0.0.1:{proxy.control.port}"


def instance_of(whoami: str) -> str:
    """`m-2 (pid 123, port 4567)` -> `m-2`; a fixture backend's whoami is its bare name."""
    return whoami.split(" ", 1)[0]


async def session_on(web: aiohttp.ClientSession, url: str, wanted: str) -> str:
    """Open raw sessions until one lands on `wanted` (the others stay open)."""
    for _ in range(12):
        sid = await open_as(web, url)
        if instance_of((await call(web, url, sid, "whoami"))[2]) == wanted:
            return sid
    pytest.fail(f"no session landed on {wanted}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_reload_keeps_managed_instances_and_their_sessions(
    backend_factory: BackendFactory,
    file_proxy: Any,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    u1, u2 = await asyncio.to_thread(backend_factory, ["u1", "u2"])
    managed = {"name": "m", "command": EXAMPLE, "replicas": 2}
    proxy, config = await file_proxy(
        [managed, {"name": "u1", "url": u1.url}], admin="127.0.0.1:0", health={"interval": 0}
    )
    url = mcp_url(proxy)
    pids = proxy.managed.pids()
    assert len(set(pids)) == 2
    sid = await session_on(web, url, "m-1")
    assert (await call(web, url, sid, "count"))[2] == "1"
    for name in ("m-2", "u1"):  # every backend holds a session: the next pick is not a tie
        await session_on(web, url, name)

    # Re-weight u1, add u2: the managed entry is unchanged.
    config.write([managed, {"name": "u1", "url": u1.url, "weight": 3}, {"name": "u2", "url": u2.url}])
    async with web.post(admin_url(proxy) + "/admin/reload") as resp:
        assert resp.status == 200
        assert await resp.json() == {"reloaded": True, "added": ["u2"], "removed": [], "updated": ["u1"]}
    assert sorted(b.name for b in proxy.backends) == ["m-1", "m-2", "u1", "u2"]
    assert proxy.managed.pids() == pids
    assert all(alive(pid) for pid in pids)
    assert [b.weight for b in proxy.backends if b.name == "u1"] == [3]
    assert (await call(web, url, sid, "count"))[2] == "2"  # the same process, the same session
    # The added backend takes new sessions (least_sessions: it alone has none).
    fresh = await open_as(web, url)
    assert (await call(web, url, fresh, "whoami"))[2] == "u2"

    # A reload that changes the managed entry: warned about, the running instances kept.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcpbalancer.app"):
        config.write([{**managed, "replicas": 3}, {"name": "u2", "url": u2.url}])
        changes = proxy.reload()
    assert changes.as_json() == {"added": [], "removed": ["u1"], "updated": []}
    assert any("managed (`command`) backends change only on restart" in r.message for r in caplog.records)
    assert sorted(b.name for b in proxy.backends) == ["m-1", "m-2", "u2"]
    assert proxy.managed.pids() == pids
    assert (await call(web, url, sid, "count"))[2] == "3"
    assert all(b.up for b in proxy.backends)


async def test_health_checks_follow_a_managed_instance_through_its_restart(
    file_proxy: Any, web: aiohttp.ClientSession
) -> None:
    proxy, _ = await file_proxy(
        [{"name": "m", "command": EXAMPLE, "replicas": 2}],
        admin="127.0.0.1:0",
        health={"interval": 0.1, "timeout": 1.0, "fall": 2, "rise": 1},
    )
    url, admin = mcp_url(proxy), admin_url(proxy) + "/admin/backends"

    async def states() -> dict[str, tuple[str, float | None]]:
        async with web.get(admin) as resp:
            assert resp.status == 200
            return {b["name"]: (b["state"], b["last_check"]) for b in (await resp.json())["backends"]}

    async def all_up_and_checked() -> bool:
        return all(state == "up" and checked is not None for state, checked in (await states()).values())

    def is_(state: str) -> Any:
        async def check() -> bool:
            return (await states())["m-1"][0] == state

        return check

    await wait_until(all_up_and_checked, "both managed instances probed and up")
    sid = await session_on(web, url, "m-1")
    assert (await call(web, url, sid, "count"))[2] == "1"
    [instance] = [i for i in proxy.managed.instances if i.backend.name == "m-1"]
    old_pid = instance.pid
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)
    await wait_until(is_("down"), "the killed instance reported down")
    await wait_until(is_("up"), "the restarted instance reported up", RESTART_DEADLINE)
    assert instance.pid not in (None, old_pid)
    assert (await states())["m-2"][0] == "up"
    # Health checks did not bring the old process's sessions back: they belong to no process now.
    await refused_as_unknown(web, url, sid, None)
    # The restarted instance serves new sessions.
    fresh = await session_on(web, url, "m-1")
    assert (await call(web, url, fresh, "count"))[2] == "1"


# --- 4. eras + replay --------------------------------------------------------------------------------


async def test_replay_never_moves_a_legacy_session_to_a_modern_only_backend(
    backend_factory: BackendFactory, dict_proxy: DictProxy
) -> None:
    started: list[BackendProcess] = await asyncio.to_thread(backend_factory, ["l1", "l2", "mo"])
    config = proxy_config(started, failover="replay")
    config["backends"][2]["eras"] = ["modern"]
    proxy = await dict_proxy(config)
    async with recorded_client(mcp_url(proxy)) as (client, _):
        first = text_of(await client.call_tool("whoami"))
        assert first in ("l1", "l2")
        assert text_of(await client.call_tool("count")) == "1"
        [doomed] = [b for b in started if b.name == first]
        await doomed.akill()
        # mo has no session at all, so least_sessions would pick it were it not modern-only.
        assert text_of(await client.call_tool("count")) == "1"
        assert text_of(await client.call_tool("whoami")) == ({"l1", "l2"} - {first}).pop()
    assert proxy.router.failover is not None
    assert proxy.router.failover.replays == 1
    assert [b.sessions for b in proxy.backends if b.name == "mo"] == [0]


# --- 5. rules, strict mode, the Origin check and body limits on one proxy ---------------------------


def modern(name: str, tool: str | None = None, **extra: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A 2026-07-28 tools/call of `tool` whose Mcp-Name header says `name`."""
    body = call_body(tool or name, next(_ids))
    body["params"]["_meta"] = MODERN_META
    headers = {**INIT_HEADERS, "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call"}
    return body, {**headers, "Mcp-Name": name, **extra}


async def test_rules_strict_mode_origin_and_body_limit_together(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        backends[:1],
        validate_headers=True,
        routes=[{"match": {"method": "tools/call", "name": "release"}, "deny": 403}],
        allowed_origins=[APP],
        limits={"body_bytes": 4096},
    )
    url = mcp_url(proxy)

    def rule_hits() -> float:
        return sample(proxy, "mcpbalancer_route_rule_hits_total", rule="deny")

    def rejected(reason: str) -> float:
        return sample(proxy, "mcpbalancer_rejected_requests_total", reason=reason)

    # Allowed origin, allowed tool: forwarded, with CORS headers on the answer.
    body, headers = modern("whoami", Origin=APP)
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert from_backend(resp.headers)
        assert resp.headers["Access-Control-Allow-Origin"] == APP
        assert (await resp.json())["result"]["content"][0]["text"] == "a"

    # Denied by the rule: 403 with a JSON-RPC error, counted as a rule hit.
    body, headers = modern("release", Origin=APP)
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 403
        assert from_proxy(resp.headers)
        assert (await resp.json())["error"] == {"code": -32600, "message": "Denied by a routing rule"}
    assert (rule_hits(), rejected("origin")) == (1, 0)

    # A foreign Origin is refused before routing: the deny rule never sees it.
    body, headers = modern("release", Origin="https://evil.example")
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["message"] == "Forbidden: Origin not allowed"
    assert (rule_hits(), rejected("origin")) == (1, 1)

    # Strict mode: a header lying about the tool (to dodge the rule) is refused, not routed.
    body, headers = modern("whoami", tool="release", Origin=APP)
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 400
        assert from_proxy(resp.headers)
        assert (await resp.json())["error"]["code"] == -32020
    assert rule_hits() == 1  # refused before any rule was matched

    # Over limits.body_bytes: 413 before any of it is forwarded.
    body, headers = modern("whoami", Origin=APP)
    body["params"]["arguments"] = {"pad": "x" * 5000}
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 413
        assert from_proxy(resp.headers)
    assert rejected("body_limit") == 1
    assert rejected("origin") == 1


async def test_a_reload_cannot_give_a_url_backend_a_running_managed_instance_name(
    backend_factory: BackendFactory, file_proxy: Any, web: aiohttp.ClientSession
) -> None:
    [u1] = await asyncio.to_thread(backend_factory, ["u1"])
    managed = {"name": "m", "command": EXAMPLE, "replicas": 1}
    proxy, config = await file_proxy([managed], admin="127.0.0.1:0", health={"interval": 0})
    url = mcp_url(proxy)
    [m1] = list(proxy.backends)
    address = (m1.host, m1.port)
    sid = await session_on(web, url, "m-1")
    assert (await call(web, url, sid, "count"))[2] == "1"

    # The file renames the managed entry (kept as running until a restart) and names a url backend
    # like the running instance: valid on its own, a clash with what runs.
    config.write([{**managed, "name": "n"}, {"name": "m-1", "url": u1.url}])
    async with web.post(admin_url(proxy) + "/admin/reload") as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["reloaded"] is False
    assert "m-1" in answer["error"]
    # Nothing changed: the instance keeps its address, its process and its session.
    assert [(b.name, b.host, b.port) for b in proxy.backends] == [("m-1", *address)]
    assert (await call(web, url, sid, "count"))[2] == "2"
    assert instance_of((await call(web, url, sid, "whoami"))[2]) == "m-1"
