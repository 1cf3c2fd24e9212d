"""`--workers 2` behind a TLS listener: each worker binds the TLS port (SO_REUSEPORT) and does its
own handshakes, and a session keeps its backend whichever worker a new TLS connection reaches.
The real CLI as a subprocess, real FastMCP backends, a real Redis store, certificates made here."""

from __future__ import annotations

import ssl

import aiohttp

from tests.fixtures.cluster import DEADLINE, StartCluster
from tests.fixtures.tls import Pki
from tests.mcp_helpers import call_tool, open_session, wait_until
from tests.tls_helpers import client_context


def fresh_tls(context: ssl.SSLContext) -> aiohttp.ClientSession:
    """Every request on a new TLS connection: SO_REUSEPORT picks a worker per connection."""
    connector = aiohttp.TCPConnector(force_close=True, ssl=context)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE))


async def test_two_workers_share_a_tls_listener_and_sessions_keep_their_backend(
    start_cluster: StartCluster, pki: Pki
) -> None:
    tls = f"{{cert: '{pki.server.cert}', key: '{pki.server.key}'}}"
    listen = "[{address: '127.0.0.1:{port}', tls: " + tls + "}]"
    cluster = await start_cluster(listen=listen)
    url = f"https://127.0.0.1:{cluster.port}/mcp"
    owners: dict[str, str] = {}
    async with fresh_tls(client_context(pki)) as http:

        async def both_workers_served() -> bool:
            sid = await open_session(http, url)
            owners[sid] = (await call_tool(http, url, sid, "whoami")).text
            return cluster.served_by() == {0, 1}

        await wait_until(both_workers_served, "both workers to serve TLS connections", DEADLINE)
        for sid, owner in owners.items():  # each on a new handshake, with either worker
            answer = await call_tool(http, url, sid, "whoami")
            assert (answer.status, answer.text) == (200, owner)
    assert len(owners) >= 2
    assert "Traceback" not in cluster.text()
