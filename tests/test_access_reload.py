"""The access settings reload (POST /admin/reload, as SIGHUP does): a tool policy, rate limits, a
backend's max_in_flight, auth with API keys and a JWKS file each take effect on the next request, and
go again when the file drops them; a key-set file that cannot be used refuses the whole reload."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config
from tests.fixtures.backends import BackendProcess
from tests.fixtures.idp import AUDIENCE, ISSUER, claims, public_jwk
from tests.mcp_helpers import DEADLINE, INIT_BODY, INIT_HEADERS, call_tool, mcp_url, open_session

API_KEY = "reload-test-key-0001"


class Running:
    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.proxy: Proxy | None = None
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE))

    @property
    def p(self) -> Proxy:
        assert self.proxy is not None
        return self.proxy

    def write(self, **changes: Any) -> None:
        self.settings = {**self.settings, **changes}
        self.settings = {k: v for k, v in self.settings.items() if v is not None}
        self.path.write_text(yaml.safe_dump(self.settings))

    async def reload(self, **changes: Any) -> tuple[int, dict[str, Any]]:
        self.write(**changes)
        assert self.p.control is not None
        async with self.http.post(f"http://127.0.0.1:{self.p.control.port}/admin/reload") as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def running(tmp_path: Path, backends: list[BackendProcess]) -> AsyncIterator[Running]:
    settings = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "health": {"interval": 0},
        "backends": [{"name": "a", "url": backends[0].url}],
    }
    r = Running(tmp_path / "proxy.yaml", settings)
    r.write()
    r.proxy = Proxy(load_config(r.path))
    await r.p.start()
    yield r
    await r.p.stop()
    await r.http.close()


async def initialize(r: Running, headers: dict[str, str]) -> int:
    async with r.http.post(mcp_url(r.p), json=INIT_BODY, headers={**INIT_HEADERS, **headers}) as resp:
        return resp.status


async def test_the_access_settings_take_effect_and_go_on_reload(running: Running, tmp_path: Path) -> None:
    r = running
    url = mcp_url(r.p)
    sid = await open_session(r.http, url)
    assert r.p.access_filters == []  # nothing configured: no access filter at all
    assert (await call_tool(r.http, url, sid, "slow", seconds=0)).status == 200

    async def reload(**changes: Any) -> None:
        status, body = await r.reload(**changes)
        assert (status, body["reloaded"]) == (200, True), body

    await reload(tool_policy=[{"deny": ["slow"]}, {"allow": ["*"]}])
    assert (await call_tool(r.http, url, sid, "slow", seconds=0)).status == 403
    assert (await call_tool(r.http, url, sid, "whoami")).status == 200  # the session goes on

    await reload(rate_limits=[{"key": "session", "rate": "2/minute"}])
    assert [(await call_tool(r.http, url, sid, "whoami")).status for _ in range(3)] == [200, 200, 429]
    await reload(heartbeat=5)  # another key changed: the buckets are kept, still empty
    assert (await call_tool(r.http, url, sid, "whoami")).status == 429
    await reload(rate_limits=None, tool_policy=None)
    assert (await call_tool(r.http, url, sid, "slow", seconds=0)).status == 200

    await reload(backends=[{"name": "a", "url": r.settings["backends"][0]["url"], "max_in_flight": 3}])
    assert r.p._plane is not None
    assert r.p._plane.phases.upstream_peer is not None
    assert r.p.backends.get("a").max_in_flight == 3  # type: ignore[union-attr]
    assert (await call_tool(r.http, url, sid, "whoami")).status == 200

    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    await reload(auth={"api_keys": [{"name": "ci", "sha256": digest}]})
    assert await initialize(r, {}) == 401
    assert await initialize(r, {"Authorization": f"Bearer {API_KEY}"}) == 200
    # A session made before auth was on belongs to no principal: it is ended (404) for everyone.
    async with r.http.post(
        url,
        json={"jsonrpc": "2.0", "id": 5, "method": "ping"},
        headers={
            **INIT_HEADERS,
            "Mcp-Session-Id": sid,
            "MCP-Protocol-Version": "2025-11-25",
            "Authorization": f"Bearer {API_KEY}",
        },
    ) as resp:
        assert resp.status == 404

    key = ec.generate_private_key(ec.SECP256R1())
    keys = tmp_path / "jwks.json"
    keys.write_text(json.dumps({"keys": [public_jwk("file-1", key)]}))
    await reload(auth={"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json"})
    token = jwt.encode(claims("dana"), key, algorithm="ES256", headers={"kid": "file-1"})
    assert await initialize(r, {"Authorization": f"Bearer {token}"}) == 200
    assert await initialize(r, {"Authorization": f"Bearer {API_KEY}"}) == 401  # keys are gone

    keys.write_text("{}")  # not a key set: the reload is refused whole, the running one kept
    status, body = await r.reload(heartbeat=9)
    assert status == 400
    assert "auth.jwks_file: " in body["error"]
    assert r.p.config.heartbeat == 5
    assert await initialize(r, {"Authorization": f"Bearer {token}"}) == 200

    keys.write_text(json.dumps({"keys": [public_jwk("file-1", key)]}))
    await reload(auth=None, backends=[{"name": "a", "url": r.settings["backends"][0]["url"]}])
    assert r.p.access_filters == []
    assert r.p._plane.phases.upstream_peer is None
    assert await initialize(r, {}) == 200
