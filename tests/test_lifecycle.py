"""Backend lifecycle end to end: health checks, ejection, drain, reload and the admin API, with real
FastMCP backends, the real mcp client, and a proxy built from a YAML file (reload re-reads it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import HealthConfig, load_config
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.health import OK, REFUSED
from mcpbalancer.fleet.http_probe import DISCOVER_BODY, DISCOVER_HEADERS, HttpProbe
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.stub import StubFactory, StubRequest, response
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    SESSION_NOT_FOUND,
    call_body,
    call_tool,
    mcp_url,
    open_session,
    read_sse_event,
    recorded_client,
    session_headers,
    sse_messages,
    text_of,
    wait_until,
)

HEALTH = {"interval": 0.2, "timeout": 0.5, "fall": 2, "rise": 2}


class Managed:
    """A started proxy, its config file, and an aiohttp session for its admin listener."""

    def __init__(self, proxy: Proxy, path: Path, http: aiohttp.ClientSession) -> None:
        self.proxy = proxy
        self.path = path
        self.http = http

    @property
    def mcp(self) -> str:
        return mcp_url(self.proxy)

    @property
    def admin(self) -> str:
        assert self.proxy.control is not None
        return f"http://127.0.0.1:{self.proxy.control.port}"

    def write(self, backends: list[dict[str, Any]], **extra: Any) -> None:
        data = {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "health": HEALTH, **extra}
        self.path.write_text(yaml.safe_dump({**data, "backends": backends}))

    async def states(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(self.admin + "/admin/backends") as resp:
            assert resp.status == 200
            return {b["name"]: b for b in (await resp.json())["backends"]}

    async def state(self, name: str) -> str:
        return str((await self.states())[name]["state"])

    async def post(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.http.post(self.admin + path) as resp:
            return resp.status, await resp.json()

    async def owner(self, sid: str) -> str:
        answer = await call_tool(self.http, self.mcp, sid, "whoami")
        assert answer.status == 200, answer.body
        return answer.text

    async def session_on(self, name: str, others: list[str]) -> str:
        """A raw session that landed on `name` (sessions on other backends are kept open)."""
        for _ in range(20):
            sid = await open_session(self.http, self.mcp)
            owner = await self.owner(sid)
            if owner == name:
                return sid
            others.append(sid)
        pytest.fail(f"no session landed on {name}")


ManagedFactory = Callable[..., Awaitable[Managed]]


def entry(backend: BackendProcess, **extra: Any) -> dict[str, Any]:
    return {"name": backend.name, "url": backend.url, **extra}


@pytest.fixture
async def managed(tmp_path: Path) -> AsyncIterator[ManagedFactory]:
    started: list[Managed] = []

    async def make(backends: list[dict[str, Any]], **extra: Any) -> Managed:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE * 3))
        path = tmp_path / f"proxy{len(started)}.yaml"
        placeholder = Managed(None, path, http)  # type: ignore[arg-type]
        placeholder.write(backends, **extra)
        proxy = Proxy(load_config(path))
        await proxy.start()
        placeholder.proxy = proxy
        started.append(placeholder)
        return placeholder

    yield make
    for m in reversed(started):
        await m.proxy.stop()
        await m.http.close()


async def test_admin_backends_json_shape_and_never_on_the_public_listener(
    backends: list[BackendProcess], managed: ManagedFactory
) -> None:
    m = await managed([entry(backends[0], weight=3), entry(backends[1])])
    await wait_until(lambda: _all_checked(m), "a health check of every backend", deadline=DEADLINE)
    async with m.http.get(m.admin + "/admin/backends") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert [b["name"] for b in body["backends"]] == ["a", "b"]
    first = body["backends"][0]
    assert set(first) == {
        "name",
        "state",
        "weight",
        "sessions",
        "in_flight",
        "session_mode",
        "last_check",
        "last_probe",
        "down_reason",
        "reason",
    }
    assert (first["state"], first["weight"], first["sessions"], first["in_flight"]) == ("up", 3, 0, 0)
    assert (first["reason"], first["down_reason"]) == (None, None)
    assert abs(first["last_check"] - time.time()) < 30
    assert first["last_probe"] == {"status": 200, "error": None, "ok": True, "at": first["last_check"]}
    assert first["session_mode"] == "unknown"  # learned from traffic, or when a request needs it
    # The public listener forwards /admin/... like any path: the proxy never answers it there.
    for path in ("/admin/backends", "/admin/reload"):
        async with m.http.post(m.proxy.url + path) as resp:
            assert "backends" not in await resp.text()
    assert await m.post("/admin/backends/zzz/drain") == (404, {"error": "unknown backend 'zzz'"})
    assert await m.post("/admin/backends/b/drain") == (200, {"backend": "b", "state": "drained"})
    assert await m.post("/admin/backends/b/undrain") == (200, {"backend": "b", "state": "up"})
    health = m.proxy.metrics.registry.get_sample_value(
        "mcpbalancer_health_checks_total", {"backend": "a", "result": "ok"}
    )
    assert health is not None
    assert health >= 1


async def _all_checked(m: Managed) -> bool:
    return all(b["last_check"] is not None for b in (await m.states()).values())


async def test_killed_owner_is_reported_down_without_traffic(
    backend_factory: BackendFactory, managed: ManagedFactory
) -> None:
    k1, k2 = backend_factory(["k1", "k2"])
    m = await managed([entry(k1), entry(k2)])
    others: list[str] = []
    sid = await m.session_on("k1", others)
    await wait_until(lambda: _all_checked(m), "first health checks")
    await k1.akill()
    killed = time.monotonic()
    await wait_until(lambda: _is(m, "k1", "down"), "k1 reported down", deadline=DEADLINE)
    assert time.monotonic() - killed < 5.0
    assert await m.state("k2") == "up"
    # Its session answers 404; a re-initialize lands on the live backend.
    answer = await call_tool(m.http, m.mcp, sid, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    async with recorded_client(m.mcp) as (client, _):
        assert text_of(await client.call_tool("whoami")) == "k2"


async def _is(m: Managed, name: str, state: str) -> bool:
    return await m.state(name) == state


async def test_refused_connection_ejects_at_once(
    backend_factory: BackendFactory, managed: ManagedFactory
) -> None:
    # Active checks too slow to notice: only the data plane's passive ejection can mark it down.
    (p1,) = backend_factory(["p1"])
    m = await managed([entry(p1)], health={"interval": 3600, "timeout": 1})
    sid = await open_session(m.http, m.mcp)
    await p1.akill()
    answer = await call_tool(m.http, m.mcp, sid, "whoami")
    assert answer.status == 404
    assert await m.state("p1") == "down"
    async with m.http.post(m.mcp, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json()
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == -32603


async def test_a_stopped_backend_keeps_its_sessions(
    backend_factory: BackendFactory, managed: ManagedFactory
) -> None:
    s1, s2 = backend_factory(["s1", "s2"])
    m = await managed([entry(s1), entry(s2)])
    others: list[str] = []
    sid = await m.session_on("s1", others)
    assert (await call_tool(m.http, m.mcp, sid, "count")).text == "1"
    s1.pause()
    try:
        await wait_until(lambda: _is(m, "s1", "down"), "s1 reported down while stopped")
        # New sessions avoid it...
        for _ in range(3):
            assert await m.owner(await open_session(m.http, m.mcp)) == "s2"
        # ...but its own session is still routed to it: the call waits for the process.
        pending = asyncio.ensure_future(call_tool(m.http, m.mcp, sid, "count"))
        await wait_until(_in_flight(m, "s1"), "the call to reach s1")
        assert not pending.done()
        assert (await m.states())["s1"]["sessions"] == 1
    finally:
        s1.resume()
    answer = await asyncio.wait_for(pending, DEADLINE)
    assert (answer.status, answer.text) == (200, "2")
    assert (await call_tool(m.http, m.mcp, sid, "count")).text == "3"
    await wait_until(lambda: _is(m, "s1", "up"), "s1 back up after SIGCONT")


def _in_flight(m: Managed, name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await m.states())[name]["in_flight"] >= 1)

    return check


async def test_drain_with_ten_active_sessions(
    backends: list[BackendProcess], managed: ManagedFactory
) -> None:
    m = await managed([entry(b) for b in backends])
    async with contextlib.AsyncExitStack() as stack:
        clients = [(await stack.enter_async_context(recorded_client(m.mcp)))[0] for _ in range(10)]
        owners = [text_of(await c.call_tool("whoami")) for c in clients]
        assert owners.count("a") >= 2
        assert await m.post("/admin/backends/a/drain") == (200, {"backend": "a", "state": "draining"})
        # Every session keeps working, its state included...
        for client in clients:
            assert text_of(await client.call_tool("count")) == "1"
        assert [text_of(await c.call_tool("whoami")) for c in clients] == owners
        # ...new sessions avoid the draining backend...
        async with recorded_client(m.mcp) as (fresh, _):
            assert text_of(await fresh.call_tool("whoami")) != "a"
        for _ in range(5):
            assert await m.owner(await open_session(m.http, m.mcp)) != "a"
        state = (await m.states())["a"]
        assert (state["state"], state["sessions"]) == ("draining", owners.count("a"))
    # The clients sent DELETE as they closed: nothing is left on "a".
    await wait_until(lambda: _is(m, "a", "drained"), "a reported drained")
    assert (await m.states())["a"]["sessions"] == 0


async def test_drain_timeout_ends_the_remaining_sessions(
    backends: list[BackendProcess], managed: ManagedFactory
) -> None:
    m = await managed([entry(backends[0], drain=True, drain_timeout=0.5), entry(backends[1])])
    assert await m.state("a") == "drained"
    assert await m.post("/admin/backends/a/undrain") == (200, {"backend": "a", "state": "up"})
    others: list[str] = []
    sid = await m.session_on("a", others)
    m.write([entry(backends[0], drain=True, drain_timeout=0.5), entry(backends[1])])
    assert (await m.post("/admin/reload"))[0] == 200
    assert await m.state("a") == "draining"
    assert (await call_tool(m.http, m.mcp, sid, "whoami")).text == "a"
    await wait_until(lambda: _is(m, "a", "drained"), "a drained after its drain_timeout")
    answer = await call_tool(m.http, m.mcp, sid, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)


async def test_reload_adds_and_removes_backends_while_streams_stay_open(
    backends: list[BackendProcess], managed: ManagedFactory
) -> None:
    a, b, c = backends
    m = await managed([entry(a), entry(b)])
    others: list[str] = []
    sid_b = await m.session_on("b", others)
    sid_a = await m.session_on("a", others)
    stream_headers = {**session_headers(sid_a), "Accept": "text/event-stream"}
    wait_body = call_body("progress_and_wait", 77, key="reload")
    wait_body["params"]["_meta"] = {"progressToken": "p77"}
    async with (
        m.http.get(m.mcp, headers=stream_headers) as stream,
        m.http.post(
            m.mcp,
            json=wait_body,
            headers=session_headers(sid_a),
        ) as waiting,
    ):
        assert stream.status == 200
        assert waiting.status == 200
        progress = await read_sse_event(waiting)
        assert "progress" in progress["data"]
        m.write([entry(a), entry(c, weight=2)])
        status, changes = await m.post("/admin/reload")
        assert (status, changes) == (200, {"reloaded": True, "added": ["c"], "removed": ["b"], "updated": []})
        # The removed backend's session is gone...
        answer = await call_tool(m.http, m.mcp, sid_b, "whoami")
        assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
        # ...the open streams keep delivering...
        assert (await call_tool(m.http, m.mcp, sid_a, "notify_stream")).text == "sent"
        event = await read_sse_event(stream)
        assert "notifications/tools/list_changed" in event["data"]
        assert (await call_tool(m.http, m.mcp, sid_a, "release", key="reload")).text == "released reload"
        [reply] = sse_messages(await waiting.text())
        assert reply["id"] == 77
        assert reply["result"]["content"][0]["text"] == "released"
        # ...and new sessions go to the new set.
        owners = {await m.owner(await open_session(m.http, m.mcp)) for _ in range(6)}
        assert "c" in owners  # least_sessions: the new, empty backend first
        assert owners <= {"a", "c"}
    states = await m.states()
    assert list(states) == ["a", "c"]
    assert states["c"]["weight"] == 2


async def test_invalid_reload_keeps_the_running_config(
    backends: list[BackendProcess], managed: ManagedFactory, caplog: pytest.LogCaptureFixture
) -> None:
    m = await managed([entry(backends[0]), entry(backends[1])])
    m.path.write_text("backends:\n  - name: a\n    url: ftp://nope\n")
    status, body = await m.post("/admin/reload")
    assert status == 400
    assert body["reloaded"] is False
    assert "backends[0].url" in body["error"]
    assert "reload rejected" in caplog.text
    assert list(await m.states()) == ["a", "b"]
    m.path.write_text("backends: [")
    status, body = await m.post("/admin/reload")
    assert status == 400
    assert "invalid YAML" in body["error"]
    async with recorded_client(m.mcp) as (client, _):
        assert text_of(await client.call_tool("whoami")) in {"a", "b"}


async def test_default_probe_is_stateless_on_a_stock_fastmcp(backends: list[BackendProcess]) -> None:
    a = backends[0]
    probe = HttpProbe(HealthConfig)
    target = Backend(a.name, a.host, a.port)
    try:
        assert probe.url(target) == a.mcp_url
        assert await probe(target) == (OK, None, 200, None)
        async with (
            aiohttp.ClientSession() as http,
            http.post(a.mcp_url, data=DISCOVER_BODY, headers=DISCOVER_HEADERS) as resp,
        ):
            # 200 and no session: the probe does not make the backend create one.
            assert resp.status == 200
            assert "Mcp-Session-Id" not in resp.headers
        closed = Backend("closed", "127.0.0.1", _free_port())
        assert (await probe(closed)).result == REFUSED
    finally:
        await probe.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_5xx_count_toward_fall_but_the_session_stays(
    make_proxy: ProxyFactory, make_stub: StubFactory
) -> None:
    # A raw stub: a real server does not answer 503 on demand.
    async def handle(req: StubRequest) -> None:
        await req.complete.wait()
        if req.header("mcp-session-id") is None:
            req.conn.write(response(200, [("Mcp-Session-Id", "sid-1")], b"{}"))
        else:
            req.conn.write(response(503, [("Content-Type", "text/plain")], b"overloaded"))

    stub = await make_stub(handle)
    proxy = await make_proxy([stub], health={"interval": 0, "fall": 2})
    backend = proxy.backends.get(stub.name)
    assert backend is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
        async with http.post(mcp_url(proxy), data=b"{}", headers=INIT_HEADERS) as resp:
            assert resp.headers["Mcp-Session-Id"] == "sid-1"
        for n in range(3):
            async with http.post(mcp_url(proxy), data=b"{}", headers=session_headers("sid-1")) as resp:
                # The backend's own answer, every time: the session is not moved or ended.
                assert (resp.status, await resp.text()) == (503, "overloaded")
            assert backend.up is (n == 0)
        assert backend.sessions == 1
        async with http.post(mcp_url(proxy), data=b"{}", headers=INIT_HEADERS) as resp:
            assert resp.status == 503  # the proxy's: no backend for a new session
            assert resp.headers["Retry-After"] == "1"
    assert len(stub.requests) == 4
