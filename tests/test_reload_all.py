"""A reload applies every setting but the restart-only ones (issue 12, item 3), under live sessions.

One proxy built from a YAML file, real FastMCP backends, a live session of the mcp SDK, a raw one
with its standalone GET stream open; each step rewrites the file, POSTs /admin/reload, checks the
change took effect, and that the sessions still reach their owners and the stream still delivers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import LIVE, RESTART_ONLY, Proxy
from mcpbalancer.config import Config, load_config
from tests.fixtures.backends import BackendProcess
from tests.fixtures.redis import RedisServer
from tests.mcp_helpers import (
    DEADLINE,
    INIT_HEADERS,
    call_tool,
    mcp_url,
    modern_whoami,
    open_session,
    read_sse_event,
    recorded_client,
    session_headers,
    text_of,
    wait_until,
)


def test_every_config_field_is_classified_once() -> None:
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == LIVE | RESTART_ONLY
    assert not LIVE & RESTART_ONLY
    assert {"listen_host", "listen_port", "workers", "store", "store_prefix"} <= RESTART_ONLY


class Running:
    """The proxy under test, its file, and what the file holds now."""

    def __init__(self, path: Path, settings: dict[str, Any], access: io.StringIO) -> None:
        self.path, self.settings, self.access = path, settings, access
        self.proxy: Proxy | None = None
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE * 3))

    @property
    def p(self) -> Proxy:
        assert self.proxy is not None
        return self.proxy

    @property
    def mcp(self) -> str:
        return mcp_url(self.p)

    def write(self, **changes: Any) -> None:
        self.settings = {**self.settings, **changes}
        self.path.write_text(yaml.safe_dump(self.settings))

    async def reload(self, **changes: Any) -> tuple[int, dict[str, Any]]:
        self.write(**changes)
        assert self.p.control is not None
        async with self.http.post(f"http://127.0.0.1:{self.p.control.port}/admin/reload") as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def running(tmp_path: Path, backends: list[BackendProcess]) -> AsyncIterator[Running]:
    root = logging.getLogger()
    level = root.level
    a, b, _ = backends
    settings = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "heartbeat": 0,
        "health": {"interval": 0},
        "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}],
    }
    r = Running(tmp_path / "proxy.yaml", settings, io.StringIO())
    r.write()
    r.proxy = Proxy(load_config(r.path), access_stream=r.access)
    await r.p.start()
    yield r
    await r.p.stop()
    await r.http.close()
    root.setLevel(level)


async def _fresh(url: str, headers: dict[str, str]) -> int:
    """The status of a GET on a new client connection (limits are taken when one opens)."""
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status


async def _owners(r: Running, count: int) -> list[str]:
    owners = []
    for _ in range(count):
        answer = await call_tool(r.http, r.mcp, await open_session(r.http, r.mcp), "whoami")
        owners.append(answer.text)
    return owners


async def _until_ping(stream: aiohttp.ClientResponse) -> None:
    async with asyncio.timeout(DEADLINE):
        while (line := await stream.content.readline()) != b": ping\n":
            assert line, "stream ended"


async def test_each_live_setting_takes_effect_on_reload_with_sessions_and_stream_kept(
    running: Running,
) -> None:
    r = running
    sid = await open_session(r.http, r.mcp)
    owner = (await call_tool(r.http, r.mcp, sid, "whoami")).text
    stream_headers = {**session_headers(sid), "Accept": "text/event-stream"}
    async with (
        recorded_client(r.mcp) as (client, _),
        r.http.get(r.mcp, headers=stream_headers) as stream,
    ):
        assert stream.status == 200
        sdk_owner = text_of(await client.call_tool("whoami"))

        async def still_served() -> None:
            assert (await call_tool(r.http, r.mcp, sid, "whoami")).text == owner
            assert text_of(await client.call_tool("whoami")) == sdk_owner
            assert (await call_tool(r.http, r.mcp, sid, "notify_stream")).text == "sent"
            assert "notifications/tools/list_changed" in (await read_sse_event(stream))["data"]

        async def reload(**changes: Any) -> None:
            status, body = await r.reload(**changes)
            assert (status, body["reloaded"]) == (200, True), body
            await still_served()

        # limits: a head bigger than the new header_bytes is refused on a new connection.
        big = {"X-Filler": "x" * 3000, **INIT_HEADERS}
        assert await _fresh(r.mcp, big) != 431
        await reload(limits={"header_bytes": 2048})
        assert await _fresh(r.mcp, big) == 431

        # allowed_origins: a cross-origin caller the new list names gets through.
        origin = {**session_headers(sid), "Origin": "https://app.example"}
        body = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
        async with r.http.post(r.mcp, json=body, headers=origin) as resp:
            assert resp.status == 403
        await reload(allowed_origins=["https://app.example"])
        async with r.http.post(r.mcp, json=body, headers=origin) as resp:
            assert resp.status == 200

        # allowed_hosts: a Host the new list names is served; before, it was refused (421).
        named = {**session_headers(sid), "Host": "mcp.example"}
        async with r.http.post(r.mcp, json=body, headers=named) as resp:
            assert resp.status == 421
        await reload(allowed_hosts=["localhost", "127.0.0.1", "mcp.example"])
        async with r.http.post(r.mcp, json=body, headers=named) as resp:
            assert resp.status == 200

        # routes and pools: 2026-07-28 whoami calls go to the pool a new rule names.
        rule = {"match": {"method": "tools/call", "name": "who*"}, "pool": "only_b"}
        await reload(pools={"only_b": ["b"]}, routes=[rule])
        assert [await modern_whoami(r.http, r.mcp) for _ in range(4)] == [(200, "b")] * 4

        # balance: least_sessions fills the emptier backend; round_robin alternates anyway.
        assert r.p.control is not None
        drain = f"http://127.0.0.1:{r.p.control.port}/admin/backends/b/"
        async with r.http.post(drain + "drain"):
            pass
        await _owners(r, 4)  # all on a: b now has 4 sessions fewer
        async with r.http.post(drain + "undrain"):
            pass
        assert await _owners(r, 1) == ["b"]
        await reload(balance="round_robin")
        assert sorted(await _owners(r, 2)) == ["a", "b"]

        # heartbeat: a stream opened after the reload gets pings (the open one keeps its own).
        await reload(heartbeat=0.05)
        other = await open_session(r.http, r.mcp)
        async with r.http.get(r.mcp, headers={**session_headers(other), "Accept": "text/event-stream"}) as s:
            await _until_ping(s)

        # log: the format of the access lines, then a level that turns them off.
        await reload(log={"format": "text"})
        await wait_until(lambda: _logged(r, '"POST /mcp" 200'), "a text access line")
        await reload(log={"format": "text", "level": "warning"})
        assert r.p.access_log is None
        assert logging.getLogger().level == logging.WARNING

        # The rest of the live settings, in one file: applied, and the sessions still served.
        await reload(
            session_ttl=120,
            local_cache_size=500,
            timeouts={"connect": 2, "response_headers": 60},
            affinity={"tasks": True},
            validate_headers=True,
            failover="replay",
            on_store_error="fail",
            shutdown_timeout=3,
        )
        assert r.p.router.failover is not None
        assert r.p.router.affinity is not None
        assert r.p.router.affinity.tasks is not None
        assert r.p.readiness.store_required
        assert r.p.config.session_ttl == 120


async def _logged(r: Running, text: str) -> bool:
    return any(text in line and not line.startswith("{") for line in r.access.getvalue().splitlines())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RESTART_CHANGES = [
    pytest.param({"listen": "127.0.0.1:1"}, "listen", id="listen"),
    pytest.param({"workers": 2}, "workers", id="workers"),
    pytest.param({"store": "memory"}, "store", id="store"),
    pytest.param({"store_prefix": "other:"}, "store_prefix", id="store_prefix"),
    pytest.param({"admin": "127.0.0.1:1"}, "admin", id="admin"),
]


@pytest.mark.parametrize(("change", "key"), RESTART_CHANGES)
async def test_a_restart_only_change_refuses_the_whole_reload(
    tmp_path: Path,
    backends: list[BackendProcess],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    key: str,
) -> None:
    # Several workers need a fixed port: the running proxy gets one when the file asks for them.
    port = _free_port() if key == "workers" else 0
    settings = {
        "listen": f"127.0.0.1:{port}",
        "admin": "127.0.0.1:0",
        "store": redis_server.url,
        "heartbeat": 0,
        "health": {"interval": 0},
        "backends": [{"name": "a", "url": backends[0].url}],
    }
    r = Running(tmp_path / "proxy.yaml", settings, io.StringIO())
    r.write()
    r.proxy = Proxy(load_config(r.path))
    await r.p.start()
    try:
        status, body = await r.reload(**change, heartbeat=7, balance="p2c")
        assert status == 409
        assert body["reloaded"] is False
        assert body["restart_required"] is True
        assert f"`{key}`" in body["error"]
        assert "restart is needed" in caplog.text
        assert f"`{key}`" in caplog.text
        # Nothing of the file was applied: not even the keys a reload could apply.
        assert (r.p.config.heartbeat, r.p.config.balance) == (0.0, "least_sessions")
        assert r.p._plane is not None
        assert r.p._plane.heartbeat == 0.0
        sid = await open_session(r.http, r.mcp)
        assert (await call_tool(r.http, r.mcp, sid, "whoami")).text == "a"
    finally:
        await r.p.stop()
        await r.http.close()
