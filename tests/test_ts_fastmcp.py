"""Real TypeScript FastMCP servers (the npm `fastmcp` package, pinned by tests/tsfastmcp/) behind
the proxy, with the probes docs/servers.md gives for them: `probe: http` of `/ready` for a
stateless one, of `/health` for a stateful one, whose `/ready` answers 503 until it holds a session.
Node and the package are installed as for the conformance suite (tests/fixtures/node.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.node import install, unavailable
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import DEADLINE, mcp_url, recorded_client, text_of, wait_until

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tests" / "tsfastmcp"
CACHE = ROOT / ".cache" / "tsfastmcp"
ENTRY = CACHE / "node_modules" / "fastmcp" / "dist" / "FastMCP.js"
READY = re.compile(rb"READY (\d+)")
HEALTH = {"probe": "http", "interval": 0.1, "timeout": 1, "fall": 1, "rise": 1}


@pytest.fixture(scope="session")
def ts_node() -> str:
    node, problem = install(PACKAGE, CACHE, ENTRY, extra=("server.mjs",))
    if node is None:
        unavailable(f"TypeScript FastMCP cannot run here: {problem}")
    return node


@dataclass
class TsServer:
    name: str
    url: str
    process: asyncio.subprocess.Process


TsFactory = Callable[[str, str], Awaitable[TsServer]]


@pytest.fixture
async def ts_server(ts_node: str) -> AsyncIterator[TsFactory]:
    """`await ts_server(name, "stateless" | "stateful")` -> a started TypeScript FastMCP server."""
    started: list[asyncio.subprocess.Process] = []

    async def start(name: str, mode: str) -> TsServer:
        process = await asyncio.create_subprocess_exec(
            ts_node,
            str(CACHE / "server.mjs"),
            name,
            mode,
            cwd=CACHE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        started.append(process)
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while (match := READY.search(await process.stdout.readline())) is None:
                if process.stdout.at_eof():
                    pytest.fail(f"the TypeScript server {name} exited before it was ready")
        return TsServer(name, f"http://127.0.0.1:{int(match[1])}/mcp", process)

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        async with asyncio.timeout(10):
            await process.wait()


def config(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "backends": list(entries)}


async def admin(web: aiohttp.ClientSession, proxy: Proxy) -> dict[str, dict[str, Any]]:
    assert proxy.control is not None
    async with web.get(f"http://127.0.0.1:{proxy.control.port}/admin/backends") as resp:
        return {b["name"]: b for b in (await resp.json())["backends"]}


async def test_the_documented_probes_of_typescript_fastmcp(
    ts_server: TsFactory, dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    stateless, stateful = await ts_server("tl", "stateless"), await ts_server("tf", "stateful")
    proxy = await dict_proxy(
        config(
            {"name": "tl", "url": stateless.url, "eras": ["legacy"], "health": {**HEALTH, "path": "/ready"}},
            {"name": "tf", "url": stateful.url, "eras": ["legacy"], "health": {**HEALTH, "path": "/health"}},
            # The same stateful server probed at /ready: 503 while it holds no session.
            {
                "name": "tf-ready",
                "url": stateful.url,
                "eras": ["legacy"],
                "health": {**HEALTH, "path": "/ready"},
            },
        )
    )

    async def probed() -> bool:
        return all(b["last_probe"] is not None for b in (await admin(web, proxy)).values())

    await wait_until(probed, "a probe of each backend")
    states = await admin(web, proxy)
    assert (states["tl"]["state"], states["tl"]["last_probe"]["status"]) == ("up", 200)
    assert (states["tf"]["state"], states["tf"]["last_probe"]["status"]) == ("up", 200)
    assert states["tf-ready"]["state"] == "down"
    assert states["tf-ready"]["down_reason"] == "GET /ready answered 503, expected [200]"


async def test_a_pool_of_typescript_servers_of_both_kinds_serves_every_call(
    ts_server: TsFactory, dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    servers = [await ts_server("tl1", "stateless"), await ts_server("tl2", "stateless")]
    servers.append(await ts_server("tf", "stateful"))
    entries = [{"name": s.name, "url": s.url, "eras": ["legacy"], "health": {"interval": 0}} for s in servers]

    async def client(url: str) -> list[str]:
        async with recorded_client(url) as (session, _):
            return [text_of(await session.call_tool("whoami")) for _ in range(5)]

    for _ in range(2):  # from a cold start, twice
        proxy = await dict_proxy(config(*entries))
        async with asyncio.timeout(DEADLINE * 3):
            answers = await asyncio.gather(*(client(mcp_url(proxy)) for _ in range(4)))
        for calls in answers:
            assert set(calls) == {"tf"} or set(calls) <= {"tl1", "tl2"}, calls
        kinds = {name: b["session_mode"] for name, b in (await admin(web, proxy)).items()}
        assert kinds["tf"] in ("stateful", "unknown")  # unknown if no initialize reached it
        assert "stateful" not in (kinds["tl1"], kinds["tl2"])
        await proxy.stop()
