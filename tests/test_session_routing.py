"""A request carrying Mcp-Session-Id is routed by its session whatever its MCP-Protocol-Version says
(a 2026-07-28 client never sends one): a live id reaches its owner, an unknown one is the proxy's
own 404. Real FastMCP backends; their session ledgers (tests/servers/fastmcp_server.py) say which
instance each id reached.
"""

from __future__ import annotations

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import SESSION_NOT_FOUND, ClientFactory, request
from tests.mcp_helpers import DEADLINE, INIT_HEADERS, mcp_url, open_session, session_ledger

# Anything a client may put in the version header next to a session id: the stateless revision, an
# unknown revision, bytes that are no revision at all (obs-text, as llhttp lets through).
VERSIONS = ["2026-07-28", "1999-01-01", "\x80\xfe junk ~!"]
TRIES = 6  # per version: balanced, at least one of six would reach another of the three instances


async def strays(backends: list[BackendProcess]) -> int:
    return sum([(await session_ledger(b)).stray_total for b in backends])


async def owner_of(backends: list[BackendProcess], sid: str) -> str:
    [owner] = [b.name for b in backends if sid in (await session_ledger(b)).issued]
    return owner


def tools_list(sid: str, version: str) -> bytes:
    headers = [*INIT_HEADERS.items(), ("Mcp-Session-Id", sid), ("MCP-Protocol-Version", version)]
    return request("POST", "/mcp", headers, b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}')


def misses(proxy: Proxy) -> float:
    value = proxy.metrics.registry.get_sample_value("mcpbalancer_session_lookups_total", {"result": "miss"})
    return value or 0.0


@pytest.mark.parametrize("version", VERSIONS, ids=["2026-07-28", "unknown", "garbage"])
async def test_a_live_session_reaches_its_owner_whatever_the_version_says(
    version: str, backends: list[BackendProcess], make_proxy: ProxyFactory, open_client: ClientFactory
) -> None:
    proxy = await make_proxy(backends)
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        sid = await open_session(http, mcp_url(proxy))
    owner = await owner_of(backends, sid)
    before = await strays(backends)
    client = await open_client(proxy)
    for _ in range(TRIES):
        client.send(tools_list(sid, version))
        resp = await client.response()
        assert resp.header("server") == b"uvicorn", resp  # relayed from a backend
    assert await strays(backends) == before  # every one of them reached the owner
    assert {b.name: b.sessions for b in proxy.backends}[owner] == 1  # and the session is still bound


@pytest.mark.parametrize("version", [*VERSIONS, None], ids=["2026-07-28", "unknown", "garbage", "none"])
async def test_an_unknown_session_is_the_proxys_404_whatever_the_version_says(
    version: str | None, backends: list[BackendProcess], make_proxy: ProxyFactory, open_client: ClientFactory
) -> None:
    proxy = await make_proxy(backends)
    before = await strays(backends)
    client = await open_client(proxy)
    for i in range(TRIES):
        sid = f"{i:032x}"  # the form FastMCP's own ids have
        headers = [*INIT_HEADERS.items(), ("Mcp-Session-Id", sid)]
        if version is not None:
            headers.append(("MCP-Protocol-Version", version))
        client.send(request("POST", "/mcp", headers, b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}'))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (404, SESSION_NOT_FOUND)
        assert resp.header("server") is None  # the proxy's own answer
    assert await strays(backends) == before  # no backend saw any of them
    assert misses(proxy) == TRIES
