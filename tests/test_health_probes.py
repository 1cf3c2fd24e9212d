"""Readiness probes the operator names: `probe: http` with a method, a path, the statuses that mean
ready and headers, globally or per backend, and what the admin API and the log say of a backend
taken down. Real FastMCP backends with a `/ready` route whose answer the test sets
(fastmcp_server.ReadyRoute), and which record the probes they receive."""

from __future__ import annotations

import asyncio
import html
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from tests.fixtures.backends import LEDGER_PATH, BackendFactory, BackendProcess
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import DEADLINE, call_tool, mcp_url, open_session, wait_until

INTERVAL, FALL = 0.1, 2
READY = {"probe": "http", "path": "/ready", "interval": INTERVAL, "timeout": 0.5, "fall": FALL, "rise": 2}
SCRIPT = Path(sys.executable).parent / "mcpbalancer"
LISTENING = re.compile(r"listening on (http://\S+)")


@pytest.fixture
def ready(backend_factory: BackendFactory) -> list[BackendProcess]:
    return backend_factory(["r1", "r2"], extra_args=["--ready-route"])


def config(backends: list[BackendProcess], health: dict[str, Any], **own: dict[str, Any]) -> dict[str, Any]:
    entries = [
        {"name": b.name, "url": b.mcp_url, **({"health": own[b.name]} if b.name in own else {})}
        for b in backends
    ]
    return {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "health": health, "backends": entries}


async def set_ready(web: aiohttp.ClientSession, backend: BackendProcess, query: str) -> None:
    async with web.post(f"{backend.url}/_test/ready?{query}") as resp:
        assert resp.status == 200


async def probes(web: aiohttp.ClientSession, backend: BackendProcess) -> list[dict[str, Any]]:
    async with web.get(f"{backend.url}/_test/probes") as resp:
        found: list[dict[str, Any]] = (await resp.json())["probes"]
    return [p for p in found if p["headers"]["user-agent"] == "mcpbalancer-health"]


async def admin(web: aiohttp.ClientSession, proxy: Proxy) -> dict[str, dict[str, Any]]:
    assert proxy.control is not None
    async with web.get(f"http://127.0.0.1:{proxy.control.port}/admin/backends") as resp:
        return {b["name"]: b for b in (await resp.json())["backends"]}


async def state_of(
    web: aiohttp.ClientSession, proxy: Proxy, name: str, state: str, deadline: float = DEADLINE
) -> float:
    """Wait until `name` is in `state`; the seconds it took."""
    started = time.monotonic()

    async def reached() -> bool:
        return (await admin(web, proxy))[name]["state"] == state

    await wait_until(reached, f"{name} {state}", deadline)
    return time.monotonic() - started


async def whoami(web: aiohttp.ClientSession, proxy: Proxy, sid: str) -> str:
    return (await call_tool(web, mcp_url(proxy), sid, "whoami")).text


async def test_a_503_takes_the_backend_down_its_sessions_stay_and_200_brings_it_back(
    ready: list[BackendProcess],
    dict_proxy: DictProxy,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r1, _ = ready
    proxy = await dict_proxy(config(ready, READY))
    await state_of(web, proxy, "r1", "up")
    sessions: dict[str, str] = {}
    while len(sessions) < 2:
        sid = await open_session(web, mcp_url(proxy))
        sessions.setdefault(await whoami(web, proxy, sid), sid)
    with caplog.at_level(logging.WARNING, "mcpbalancer.fleet.health"):
        await set_ready(web, r1, "status=503")
        took = await state_of(web, proxy, "r1", "down")
    # fall probes, one each interval: generous on a loaded machine.
    assert took < FALL * INTERVAL + 5.0
    why = "GET /ready answered 503, expected [200]"
    r1_state = (await admin(web, proxy))["r1"]
    assert r1_state["down_reason"] == why
    assert (r1_state["last_probe"]["status"], r1_state["last_probe"]["error"]) == (503, None)
    assert r1_state["last_probe"]["ok"] is False
    assert f"backend r1 is down ({why})" in caplog.text
    assert proxy.control is not None
    async with web.get(f"http://127.0.0.1:{proxy.control.port}/") as resp:  # the status page
        row = re.search(r'<tr data-backend="r1" data-state="down">(.*?)</tr>', await resp.text(), re.DOTALL)
    assert row is not None
    assert html.escape(why) in row[1]
    # New sessions avoid it; its own session is still served by it.
    for _ in range(4):
        assert await whoami(web, proxy, await open_session(web, mcp_url(proxy))) == "r2"
    assert await whoami(web, proxy, sessions["r1"]) == "r1"
    await set_ready(web, r1, "status=200")
    await state_of(web, proxy, "r1", "up")
    r1_state = (await admin(web, proxy))["r1"]
    assert (r1_state["down_reason"], r1_state["reason"]) == (None, None)
    assert r1_state["last_probe"]["ok"] is True
    checks = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_health_checks_total", {"backend": "r1", "result": "fail"}
    )
    assert checks is not None
    assert checks >= FALL


async def test_a_probe_that_hangs_past_its_timeout_is_down_with_a_timeout_reason(
    ready: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    r1, _ = ready
    proxy = await dict_proxy(config(ready, READY))
    await state_of(web, proxy, "r1", "up")
    await set_ready(web, r1, "hang=1")
    await state_of(web, proxy, "r1", "down")
    r1_state = (await admin(web, proxy))["r1"]
    assert r1_state["down_reason"] == "probe timed out after 0.5s"
    assert (r1_state["last_probe"]["status"], r1_state["last_probe"]["error"]) == (None, "timeout")
    await set_ready(web, r1, "hang=0")
    await state_of(web, proxy, "r1", "up")


async def test_expect_status_lists_the_statuses_that_mean_ready(
    ready: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    r1, _ = ready
    await set_ready(web, r1, "status=204")
    proxy = await dict_proxy(config(ready, {**READY, "expect_status": [200, 204]}))

    async def probed_many() -> bool:
        return len([p for p in await probes(web, r1) if p["path"] == "/ready"]) >= 2 * FALL + 1

    await wait_until(probed_many, "several probes of r1")
    r1_state = (await admin(web, proxy))["r1"]
    assert r1_state["state"] == "up"
    assert r1_state["last_probe"]["status"] == 204
    assert r1_state["last_probe"]["ok"] is True
    failures = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_health_checks_total", {"backend": "r1", "result": "fail"}
    )
    assert failures is None, r1_state


async def test_each_backend_receives_its_own_kind_of_probe_with_its_headers(
    ready: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    # Global: the discover probe with a token; r1: its own http probe with its own header.
    r1, r2 = ready
    health = {"interval": INTERVAL, "headers": {"Authorization": "Bearer global-token"}}
    own = {"probe": "http", "path": "/ready", "headers": {"X-Probe-Token": "r1-token"}}
    proxy = await dict_proxy(config(ready, health, r1=own))

    async def both_probed() -> bool:
        return len(await probes(web, r1)) >= 3 and len(await probes(web, r2)) >= 3

    await wait_until(both_probed, "probes of both backends")
    got_r1, got_r2 = await probes(web, r1), await probes(web, r2)
    assert {(p["method"], p["path"]) for p in got_r1} == {("GET", "/ready")}
    assert {p["headers"].get("x-probe-token") for p in got_r1} == {"r1-token"}
    assert all("authorization" not in p["headers"] for p in got_r1)  # replaced whole
    assert {(p["method"], p["path"], p["headers"].get("mcp-method")) for p in got_r2} == {
        ("POST", "/mcp", "server/discover")
    }
    assert {p["headers"]["authorization"] for p in got_r2} == {"Bearer global-token"}
    states = await admin(web, proxy)
    assert states["r1"]["state"] == states["r2"]["state"] == "up"
    # Neither probe made a session on the backend.
    for backend in ready:
        async with web.get(backend.url + LEDGER_PATH) as resp:
            assert (await resp.json())["issued"] == []


# --- SIGHUP: from GET to HEAD ----------------------------------------------------------------------


@pytest.fixture
async def mcpbalancer(tmp_path: Path) -> AsyncIterator[Any]:
    """`await mcpbalancer(config_dict)` -> (process, config path, its stderr lines): the console
    script serving the file."""
    started: list[tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = []

    async def start(data: dict[str, Any]) -> tuple[asyncio.subprocess.Process, Path, list[str]]:
        path = tmp_path / "mcpbalancer.yaml"
        path.write_text(yaml.safe_dump(data))
        process = await asyncio.create_subprocess_exec(
            str(SCRIPT), "--config", str(path), stderr=asyncio.subprocess.PIPE
        )
        lines: list[str] = []
        listening = asyncio.get_running_loop().create_future()

        async def drain() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:
                lines.append(raw.decode(errors="replace").rstrip())
                if LISTENING.search(lines[-1]) and not listening.done():
                    listening.set_result(None)

        started.append((process, asyncio.create_task(drain())))
        async with asyncio.timeout(DEADLINE):
            await listening
        return process, path, lines

    yield start
    for process, task in started:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(DEADLINE):
                await process.wait()
        task.cancel()


async def test_sighup_turns_the_probe_from_get_to_head(
    ready: list[BackendProcess], mcpbalancer: Any, web: aiohttp.ClientSession
) -> None:
    r1, _ = ready
    data = config(ready, READY)
    data.pop("admin")
    process, path, lines = await mcpbalancer(data)

    async def probed_with(method: str) -> bool:
        return any(p["method"] == method and p["path"] == "/ready" for p in await probes(web, r1))

    await wait_until(lambda: probed_with("GET"), "a GET probe")
    path.write_text(yaml.safe_dump({**data, "health": {**READY, "method": "HEAD"}}))
    process.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return any("reloaded" in line for line in lines)

    await wait_until(reloaded, "the reload")
    seen = len(await probes(web, r1))

    async def several_after() -> bool:
        return len(await probes(web, r1)) >= seen + 4

    await wait_until(several_after, "probes after the reload")
    after = (await probes(web, r1))[seen + 1 :]  # a GET already under way may land first
    assert {p["method"] for p in after} == {"HEAD"}
    assert not any("Traceback" in line for line in lines)
