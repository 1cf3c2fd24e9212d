"""The edge as a whole: services behind a TLS listener, and a service whose sessions are bound to
the client certificate while another's are not. Real parts: FastMCP subprocesses of two servers
(different tool sets), the mcp SDK over HTTPS verified by a CA made here, mutual TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fixtures.backends import BackendProcess, start_all, stop_all
from tests.fixtures.proxy import DictProxy
from tests.fixtures.tls import Pki
from tests.mcp_helpers import DEADLINE, call_tool, open_session, text_of
from tests.tls_helpers import client_context

Connect = Callable[[ssl.SSLContext], aiohttp.ClientSession]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, BackendProcess]]:
    """One instance each of two servers: `gh_search` on gh-1, `docs_search` on docs-1."""
    made = {
        "gh": BackendProcess("edge-gh-1", extra_args=["--tool", "gh_search"]),
        "docs": BackendProcess("edge-docs-1", extra_args=["--tool", "docs_search"]),
    }
    try:
        start_all(list(made.values()))
        yield made
    finally:
        stop_all(list(made.values()))


@pytest.fixture
async def https() -> AsyncIterator[Connect]:
    sessions: list[aiohttp.ClientSession] = []

    def make(context: ssl.SSLContext) -> aiohttp.ClientSession:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=DEADLINE)
        )
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


def edge_config(servers: dict[str, BackendProcess], pki: Pki, **github: Any) -> dict[str, Any]:
    """A TLS listener (client certificates of the test CA verified when sent) and two services."""
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": str(pki.ca.cert)}
    return {
        "listen": [{"address": "127.0.0.1:0", "tls": tls}],
        "health": {"interval": 0},
        "services": [
            {
                "name": "github",
                "match": {"path_prefix": "/github"},
                "backends": [{"name": servers["gh"].name, "url": servers["gh"].mcp_url}],
                **github,
            },
            {
                "name": "docs",
                "match": {"path_prefix": "/docs"},
                "backends": [{"name": servers["docs"].name, "url": servers["docs"].mcp_url}],
            },
        ],
    }


async def sdk_session(url: str, context: ssl.SSLContext, tool: str) -> tuple[set[str], str, str]:
    """(the tools listed, whoami's answer, `tool`'s answer) of one SDK session over HTTPS."""
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(verify=context, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as client,
    ):
        tools = {t.name for t in (await client.list_tools()).tools}
        return tools, text_of(await client.call_tool("whoami")), text_of(await client.call_tool(tool))


async def test_services_behind_a_tls_listener_serve_the_sdk_each_from_its_own_server(
    servers: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy, https: Connect
) -> None:
    proxy = await dict_proxy(edge_config(servers, pki))
    assert proxy.url.startswith("https://")
    context = client_context(pki)
    gh_tools, gh_who, _ = await sdk_session(proxy.url + "/github/mcp", context, "gh_search")
    docs_tools, docs_who, _ = await sdk_session(proxy.url + "/docs/mcp", context, "docs_search")
    assert ("gh_search" in gh_tools, "docs_search" in gh_tools) == (True, False)
    assert ("docs_search" in docs_tools, "gh_search" in docs_tools) == (True, False)
    assert (gh_who, docs_who) == (servers["gh"].name, servers["docs"].name)
    # A github session presented at docs over the same TLS listener: unknown there.
    http = https(context)
    sid = await open_session(http, proxy.url + "/github/mcp")
    assert (await call_tool(http, proxy.url + "/github/mcp", sid, "whoami")).status == 200
    stray = await call_tool(http, proxy.url + "/docs/mcp", sid, "whoami")
    assert stray.status == 404
    assert stray.json()["error"]["message"] == "Session not found"


async def test_one_service_binds_its_sessions_to_the_client_certificate_and_the_other_does_not(
    servers: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy, https: Connect
) -> None:
    proxy = await dict_proxy(edge_config(servers, pki, bind_sessions="client_cert"))
    alice = https(client_context(pki, cert=pki.ca.issue("alice", client=True)))
    bob = https(client_context(pki, cert=pki.ca.issue("bob", client=True)))
    github, docs = proxy.url + "/github/mcp", proxy.url + "/docs/mcp"
    bound = await open_session(alice, github)
    free = await open_session(alice, docs)
    assert (await call_tool(alice, github, bound, "whoami")).status == 200
    # Bob's certificate does not open Alice's github session ...
    assert (await call_tool(bob, github, bound, "whoami")).status == 404
    # ... while the docs service binds nothing: its session id alone is the key, as configured.
    answer = await call_tool(bob, docs, free, "whoami")
    assert (answer.status, answer.text) == (200, servers["docs"].name)
    rejected = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_rejected_requests_total", {"reason": "credential"}
    )
    assert rejected == 1
