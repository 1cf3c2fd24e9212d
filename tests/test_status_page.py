"""The status page on the admin listener (`GET /`), checked in a real browser.

Real FastMCP backends (one drained, one that refuses connections), real traffic, the page read raw
and loaded by Debian's chromium, headless: the rendered DOM holds the backend table with each
backend's state, and a screenshot is kept as a test artifact (MCPB_ARTIFACTS, default .artifacts/,
which git ignores).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import socket
import struct
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mcpbalancer import __version__
from mcpbalancer.app import Proxy
from mcpbalancer.control.status import Handler, StatusPage, Window
from mcpbalancer.observability.metrics import REQUEST_BUCKETS, Traffic
from tests.fixtures.backends import BackendProcess
from tests.fixtures.binaries import binary
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import call_tool, mcp_url, open_session, session_headers, wait_until

ROOT = Path(__file__).resolve().parents[1]
BROWSER_DEADLINE = 90.0
ROW = re.compile(r'<tr data-backend="([^"]+)" data-state="([^"]+)">(.*?)</tr>', re.DOTALL)


def artifacts() -> Path:
    path = Path(os.environ.get("MCPB_ARTIFACTS") or ROOT / ".artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rows(page: str) -> dict[str, tuple[str, list[str]]]:
    """backend -> (state, the text of its cells) of every backend row of a page."""
    found = {}
    for name, state, cells in ROW.findall(page):
        texts = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", cells)]
        found[html.unescape(name)] = (state, texts)
    return found


async def busy_proxy(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> tuple[Proxy, str]:
    """A proxy with an admin listener and something to show: sessions on a, b drained, a backend that
    refuses connections (down after a probe), some 404s; returns it and its admin URL."""

    class Gone:
        name = "gone"
        url = f"http://127.0.0.1:{_closed_port()}"

    proxy = await make_proxy([*backends[:2], Gone()], admin="127.0.0.1:0", health={"interval": 0.2})
    assert proxy.control is not None
    admin = f"http://127.0.0.1:{proxy.control.port}"

    async def gone_is_down() -> bool:
        gone = proxy.backends.get("gone")
        return gone is not None and not gone.up

    await wait_until(gone_is_down, "the refusing backend to be probed down")
    url = mcp_url(proxy)
    for _ in range(10):  # a session on b, which keeps it draining rather than drained
        sid = await open_session(web, url)
        if (await call_tool(web, url, sid, "whoami")).text == "b":
            break
    async with web.post(admin + "/admin/backends/b/drain") as resp:
        assert resp.status == 200
    for _ in range(3):
        sid = await open_session(web, url)
        assert (await call_tool(web, url, sid, "whoami")).text == "a"
    async with web.post(url, json={}, headers=session_headers("unknown-session")) as resp:
        assert resp.status == 404
    return proxy, admin


async def test_the_status_page_shows_services_backends_and_the_process(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy, admin = await busy_proxy(backends, make_proxy, web)
    async with web.get(admin + "/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert resp.headers["Cache-Control"] == "no-store"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        page = await resp.text()
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "<script" not in page
    assert "http://" not in page.split("<body>")[0]  # nothing loaded from anywhere
    assert 'data-service="default"' in page
    found = rows(page)
    assert {name: state for name, (state, _) in found.items()} == {"a": "up", "b": "draining", "gone": "down"}
    _, a_cells = found["a"]
    a = proxy.backends.get("a")
    assert a is not None
    assert a.sessions >= 3
    assert a_cells[4] == str(a.sessions)
    assert a_cells[6].startswith("ok, ")
    _, gone_cells = found["gone"]
    assert "refused" in gone_cells[6], gone_cells
    for label in ("Sessions", "In flight", "Open streams", "Requests/s", "5xx", "p95 time to head"):
        assert label in page
    assert __version__ in page
    assert "&lt;test&gt;" in page  # the config source, escaped
    assert "Session store" in page
    assert "memory (ok)" in page
    assert "none since start" in page
    async with web.post(admin + "/admin/reload") as resp:  # "<test>" is no file: refused
        assert resp.status == 400
    async with web.get(admin + "/") as resp:
        assert "refused: " in html.unescape(await resp.text())
    # Read-only.
    async with web.post(admin + "/") as resp:
        assert resp.status == 405
    async with web.head(admin + "/") as resp:
        assert resp.status == 200
    # Never on the public listener: there `/` is forwarded like any other path.
    async with web.get(proxy.url + "/") as resp:
        assert "mcpbalancer status" not in await resp.text()


async def test_the_status_page_renders_in_headless_chromium(
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    chromium = binary("chromium", "chromium")
    _, admin = await busy_proxy(backends, make_proxy, web)
    shot = artifacts() / "status-page.png"
    shot.unlink(missing_ok=True)
    common = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ]
    dom = await run(*common, "--dump-dom", admin + "/")
    found = rows(dom)
    assert {name: state for name, (state, _) in found.items()} == {"a": "up", "b": "draining", "gone": "down"}
    assert "mcpbalancer status" in dom
    await run(*common, f"--screenshot={shot}", admin + "/")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000, "the screenshot is nearly blank"


async def run(*command: str) -> str:
    """Run a command in a subprocess (the proxy serves from this event loop meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BROWSER_DEADLINE)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def test_the_last_minute_window_compares_now_with_a_minute_ago() -> None:
    now = [1000.0]
    window = Window(clock=lambda: now[0])
    buckets = len(REQUEST_BUCKETS) + 1

    def traffic(requests: float, errors: float, fast: int, slow: int, total: float) -> Traffic:
        counts = [0] * buckets
        counts[REQUEST_BUCKETS.index(0.005)] = fast
        counts[REQUEST_BUCKETS.index(1)] = slow
        return Traffic(requests, errors, tuple(counts), total, 0.0)

    assert window.last_minute(traffic(0, 0, 0, 0, 0)).error_ratio is None
    window.add(traffic(100, 1, 100, 0, 0.3))  # what happened before the window counts for nothing
    for second in range(5, 61, 5):
        now[0] = 1000.0 + second
        window.add(traffic(100 + second * 10, 1 + second, 100 + second * 9, second, 0.3 + second))
    now[0] = 1065.0
    minute = window.last_minute(traffic(750, 66, 685, 65, 65.3))
    assert minute.seconds == pytest.approx(60.0)
    assert minute.requests_per_second == pytest.approx(600 / 60)
    assert minute.error_ratio == pytest.approx(60 / 600)
    assert minute.mean == pytest.approx(60 / 600)
    assert minute.p95 == 1.0  # 10% of the answers took up to a second


async def test_a_guard_wraps_the_page(backends: list[BackendProcess], make_proxy: ProxyFactory) -> None:
    """The admin listener's access check (a token) wraps the page handler: refused, it never renders."""
    proxy = await make_proxy(backends[:1])
    page = StatusPage(
        lambda: {"default": list(proxy.backends)},
        proxy.metrics,
        proxy.readiness,
        proxy._process_info,
        last_check={},
        reasons={},
        health_interval=lambda: 0.0,
    )

    def guard(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != "Bearer s3cret":
                return web.json_response({"error": "unauthorized"}, status=401)
            return await handler(request)

        return checked

    app = web.Application()
    page.install(app, guard)
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 401
        allowed = await client.get("/", headers={"Authorization": "Bearer s3cret"})
        assert allowed.status == 200
        assert 'data-backend="a"' in await allowed.text()
