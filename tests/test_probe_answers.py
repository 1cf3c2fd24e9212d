"""A health probe must reach an MCP endpoint: a 404, a redirect or an answer that is not MCP is a
failed probe (down at once), with a reason the admin API shows and the log names. Real FastMCP
backends at wrong paths, a real web server that is not MCP, and the answers real legacy-only servers
give (recorded below: they need mcp 1.x, which cannot share this environment with mcp 2.x)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.web import Application, AppRunner, Request, Response, StreamResponse, TCPSite

from mcpbalancer.config import HealthConfig
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.health import NOT_MCP, OK, HealthChecker, ProbeResult
from mcpbalancer.fleet.http_probe import HttpProbe
from mcpbalancer.fleet.probe_answer import first_sse_data, problem
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import DEADLINE, modern_whoami, wait_until

URL = "http://h:8000/mcp"
JSON, SSE, TEXT = "application/json", "text/event-stream", "text/plain"
# What real servers answered the probe (a 2026-07-28 server/discover POST) at their MCP endpoint.
FASTMCP_4 = b'{"jsonrpc":"2.0","id":0,"result":{"supportedVersions":["2026-07-28"],"capabilities":{}}}'
LEGACY_STATEFUL = (  # mcp 1.30.0 / FastMCP 2.14.7, stateful (it also sets a fresh Mcp-Session-Id)
    b'{"jsonrpc":"2.0","id":"server-error",'
    b'"error":{"code":-32600,"message":"Bad Request: Missing session ID"}}'
)
LEGACY_STATELESS = (  # the same, with stateless_http=True
    b'{"jsonrpc":"2.0","id":"server-error","error":{"code":-32600,"message":"Bad Request: Unsupported '
    b'protocol version: 2026-07-28. Supported versions: 2024-11-05, 2025-03-26, 2025-06-18, 2025-11-25"}}'
)


# --- which answers are an MCP endpoint's, pure ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (200, JSON, FASTMCP_4),
        (400, JSON, LEGACY_STATEFUL),
        (400, JSON, LEGACY_STATELESS),
        (200, SSE, b"id: 1\nretry: 100\ndata:\n\nevent: message\ndata: " + FASTMCP_4 + b"\n\n"),
        (200, SSE, b"data: " + FASTMCP_4 + b"\r\n\r\n"),
        (401, JSON, b'{"error":"invalid_token","error_description":"Authentication required"}'),
        (403, TEXT, b"Forbidden"),
        (406, JSON, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Not Acceptable"}}'),
    ],
)
def test_answers_of_an_mcp_endpoint(status: int, content_type: str, body: bytes) -> None:
    assert problem(status, content_type, body) is None


@pytest.mark.parametrize(
    ("status", "content_type", "body", "location", "reason"),
    [
        (404, TEXT, b"Not Found", None, "no MCP endpoint at that path"),
        # Even with a JSON-RPC body: the probe sends no session, so no 404 is an MCP endpoint's.
        (404, JSON, LEGACY_STATEFUL, None, "no MCP endpoint at that path"),
        (307, "", b"", "http://h:8000/mcp", "a redirect to http://h:8000/mcp"),
        (301, "", b"", None, "a redirect"),
        (200, "text/html", b"<html>shop</html>", None, "not MCP (text/html)"),
        (200, "", b"", None, "not MCP (no Content-Type)"),
        (200, JSON, b'{"status":"ok"}', None, "not MCP (no JSON-RPC response)"),
        (200, JSON, b'{"jsonrpc":"2.0","method":"x"}', None, "not MCP (no JSON-RPC response)"),
        (200, JSON, b"not json", None, "not MCP (no JSON-RPC response)"),
        (200, JSON, b"[" * 200_000, None, "not MCP (no JSON-RPC response)"),
        (200, JSON, b'{"jsonrpc":"2.0","result":"\xff"}', None, "not MCP (no JSON-RPC response)"),
        (202, JSON, b"", None, "not MCP (no JSON-RPC response)"),
        (200, SSE, b"id: 1\ndata:\n\n", None, "not MCP (text/event-stream)"),
        (400, JSON, FASTMCP_4, None, "not MCP (no JSON-RPC error)"),
        (405, TEXT, b"Method Not Allowed", None, "not MCP (text/plain)"),
        (400, SSE, b"data: " + LEGACY_STATEFUL + b"\n\n", None, "not MCP (text/event-stream)"),
    ],
)
def test_answers_that_are_not_mcp(
    status: int, content_type: str, body: bytes, location: str | None, reason: str
) -> None:
    assert problem(status, content_type, body, location) == reason


def test_first_sse_data() -> None:
    assert first_sse_data(b"data: a\ndata: b\n\n") == b"a\nb"
    assert first_sse_data(b"data:a\r\n\r\ndata: b\r\n\r\n") == b"a"
    assert first_sse_data(b": ping\n\nid: 1\ndata:\n\ndata: x\n\n") == b"x"
    assert first_sse_data(b"data: a\n") is None  # the event has not ended
    assert first_sse_data(b"data: a\n\ndat") == b"a"
    assert first_sse_data(b"data: a") is None


# --- the checker: not MCP is down at once, and the reason is kept ----------------------------------


class ScriptedProbe:
    def __init__(self) -> None:
        self.answer: ProbeResult | str = ProbeResult(OK)

    async def __call__(self, backend: Backend) -> ProbeResult | str:
        if self.answer == "hang":
            await asyncio.Event().wait()
        return self.answer


async def test_a_probe_answered_by_no_mcp_endpoint_marks_down_at_once_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    probe, statuses = ScriptedProbe(), {}
    check = HealthChecker(HealthConfig(fall=5, rise=2, timeout=0.01), statuses.__setitem__, probe)
    a = Backend("a", "h", 8000)
    why = "POST /mcp/mcp answered 404, no MCP endpoint at that path"
    probe.answer = ProbeResult(NOT_MCP, why)
    with caplog.at_level(logging.INFO, "mcpbalancer.fleet.health"):
        await check.check_once([a])
        assert statuses == {"a": False}  # one probe, though fall is 5
        assert check.reasons == {"a": why}
        assert f"backend a is down ({why})" in caplog.text
        probe.answer = ProbeResult(OK)
        await check.check_once([a])
        assert check.reasons == {"a": why}  # still down: the reason stays
        await check.check_once([a])
        assert statuses == {"a": True}
        assert check.reasons == {}
        assert "backend a is up (health check: ok)" in caplog.text
    probe.answer = "hang"
    await check.check_once([a])
    assert check.reasons == {"a": "probe timed out after 0.01s"}
    probe.answer = OK  # a bare result string, as a probe without reasons returns
    await check.check_once([a])
    assert check.reasons == {}
    check.passive("a", "reset")
    assert check.reasons == {"a": "connection reset before an answer to a request"}


# --- real servers through the proxy ------------------------------------------------------------

HEALTH = {"interval": 0.1, "timeout": 1, "fall": 2, "rise": 2}


async def admin_backends(http: aiohttp.ClientSession, proxy: Any) -> dict[str, dict[str, Any]]:
    async with http.get(f"http://127.0.0.1:{proxy.control.port}/admin/backends") as resp:
        return {b["name"]: b for b in (await resp.json())["backends"]}


async def readyz(http: aiohttp.ClientSession, proxy: Any) -> tuple[int, dict[str, Any]]:
    async with http.get(proxy.url + "/readyz") as resp:
        return resp.status, await resp.json()


def config(*backends: dict[str, str]) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "admin": "127.0.0.1:0", "health": HEALTH, "backends": list(backends)}


@pytest.fixture
async def web_server() -> AsyncIterator[Callable[[Application], Awaitable[str]]]:
    """`await web_server(app)` -> the base URL of a real aiohttp server for `app` on port 0."""
    runners: list[AppRunner] = []

    async def start(app: Application) -> str:
        # Handlers are cancelled when their client goes, so a stream left open ends with the probe.
        runner = AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/nope", "POST /nope answered 404, no MCP endpoint at that path"),
        ("/mcp/mcp", "POST /mcp/mcp answered 404, no MCP endpoint at that path"),
        ("/mcp/", "POST /mcp/ answered 307, a redirect to {url}/mcp"),
    ],
)
async def test_a_backend_url_with_a_wrong_path_is_down_and_says_why(
    backends: list[BackendProcess],
    dict_proxy: DictProxy,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    path: str,
    reason: str,
) -> None:
    a = backends[0]
    expected = reason.format(url=a.url)
    with caplog.at_level(logging.WARNING, "mcpbalancer.fleet.health"):
        proxy = await dict_proxy(config({"name": "a", "url": a.url + path}))

        async def down() -> bool:
            return (await admin_backends(web, proxy))["a"]["state"] == "down"

        await wait_until(down, "the backend at a wrong path to be down")
    state = (await admin_backends(web, proxy))["a"]
    assert (state["reason"], state["down_reason"]) == (expected, expected)
    assert state["last_probe"]["status"] == int(expected.split()[3].rstrip(","))
    assert f"backend a is down ({expected})" in caplog.text
    # The only backend: the proxy is not ready, and a new session finds no backend.
    assert await readyz(web, proxy) == (
        503,
        {"status": "unavailable", "reason": "no backend up", "store": "unknown"},
    )
    status, _ = await modern_whoami(web, proxy.url + "/mcp")
    assert status == 503


async def test_the_right_endpoint_is_up_and_a_wrong_one_gets_no_traffic(
    backends: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    a, b = backends[0], backends[1]
    proxy = await dict_proxy(config({"name": "a", "url": a.mcp_url}, {"name": "b", "url": b.url + "/nope"}))

    async def probed() -> bool:
        states = await admin_backends(web, proxy)
        return states["a"]["last_check"] is not None and states["b"]["state"] == "down"

    await wait_until(probed, "both backends probed")
    states = await admin_backends(web, proxy)
    assert (states["a"]["state"], states["a"]["reason"]) == ("up", None)
    assert states["b"]["down_reason"] == "POST /nope answered 404, no MCP endpoint at that path"
    assert await readyz(web, proxy) == (200, {"status": "ready", "reason": "ready", "store": "ok"})
    answers = [await modern_whoami(web, proxy.url + "/mcp") for _ in range(6)]
    assert answers == [(200, "a")] * 6


async def test_a_server_that_is_not_mcp_is_down(
    dict_proxy: DictProxy, web: aiohttp.ClientSession, web_server: Callable[[Application], Awaitable[str]]
) -> None:
    # A real web site where an MCP server was meant to be: 200 to anything, in HTML.
    async def page(request: Request) -> Response:
        return Response(text="<html>welcome</html>", content_type="text/html")

    app = Application()
    app.router.add_route("*", "/{tail:.*}", page)
    base = await web_server(app)
    proxy = await dict_proxy(config({"name": "site", "url": base + "/mcp"}))

    async def down() -> bool:
        return (await admin_backends(web, proxy))["site"]["state"] == "down"

    await wait_until(down, "the web site to be down")
    reason = (await admin_backends(web, proxy))["site"]["down_reason"]
    assert reason == "POST /mcp answered 200, not MCP (text/html)"


async def test_the_probe_reads_an_event_stream_up_to_its_first_message(
    web_server: Callable[[Application], Awaitable[str]],
) -> None:
    # An endpoint that answers in SSE (a priming event first) and keeps the stream open.
    async def stream(request: Request) -> StreamResponse:
        resp = StreamResponse(headers={"Content-Type": SSE})
        await resp.prepare(request)
        await resp.write(b"id: 0\ndata:\n\nevent: message\ndata: " + FASTMCP_4 + b"\n\n")
        await asyncio.Event().wait()  # never ends
        return resp

    async def legacy(request: Request) -> Response:
        return Response(body=LEGACY_STATEFUL, status=400, content_type=JSON)

    app = Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/legacy", legacy)
    base = await web_server(app)
    port = int(base.rpartition(":")[2])
    probe = HttpProbe(lambda: HealthConfig(path="/mcp"))
    try:
        async with asyncio.timeout(DEADLINE):
            for endpoint in (b"/stream", b"/legacy"):
                assert (await probe(Backend("x", "127.0.0.1", port, endpoint=endpoint))).result == OK
    finally:
        await probe.close()
