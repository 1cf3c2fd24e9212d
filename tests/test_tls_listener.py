"""TLS on the listener: the mcp SDK and curl over HTTPS with a CA made here, the protocol floor and
ALPN with `openssl s_client`, failed handshakes (plain HTTP to the TLS port, garbage, a client
that never finishes) counted and logged without a traceback, the connection limit, and a
certificate reload under a live SSE stream.

Mutual TLS and `bind_sessions: client_cert` are in test_tls_mtls.py, `--check` of the files in
test_tls_check.py, and the data plane's guarantees over TLS (heartbeats, flow control, framing)
in test_tls_guarantees.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import CollectorRegistry

from mcpbalancer.config import ServerTlsConfig
from mcpbalancer.control import healthcheck
from mcpbalancer.dataplane import handshake
from mcpbalancer.dataplane.client import ClientConnection
from mcpbalancer.dataplane.listener_tls import server_tls
from mcpbalancer.errors import ConfigError
from mcpbalancer.observability.metrics import Metrics
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import DictProxy
from tests.fixtures.rawhttp import request
from tests.fixtures.tls import FileProxy, Pki
from tests.mcp_helpers import (
    DEADLINE,
    call_tool,
    mcp_url,
    open_session,
    session_headers,
    text_of,
    wait_until,
)
from tests.pki import Issued
from tests.tls_helpers import client_context, failures, fingerprint, served_certificate, tls_config

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")


async def sdk_whoami(url: str, context: ssl.SSLContext, mode: str = "legacy") -> list[str]:
    """Two tools/call answers of one mcp SDK session over HTTPS verified with `context`."""
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(verify=context, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        return [text_of(await client.call_tool("whoami")), text_of(await client.call_tool("count"))]


# --- serving over TLS ----------------------------------------------------------------------------


async def test_the_mcp_sdk_speaks_to_a_tls_listener_verified_by_the_test_ca(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    proxy = await dict_proxy(tls_config(backends[:1], pki))
    assert proxy.url.startswith("https://127.0.0.1:")
    context = client_context(pki)
    assert await sdk_whoami(mcp_url(proxy), context) == [backends[0].name, "1"]
    [name, _] = await sdk_whoami(mcp_url(proxy), context, mode="2026-07-28")
    assert name == backends[0].name
    assert failures(proxy) == {"protocol": 0, "certificate": 0, "timeout": 0, "closed": 0, "other": 0}


async def test_plain_and_tls_listeners_serve_side_by_side(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    data = tls_config(backends[:1], pki)
    data["listen"] = ["127.0.0.1:0", *data["listen"]]
    proxy = await dict_proxy(data)
    plain, tls = proxy.urls
    assert plain.startswith("http://")
    assert tls.startswith("https://")
    assert await sdk_whoami(tls + "/mcp", client_context(pki)) == [backends[0].name, "1"]
    async with (
        httpx2.AsyncClient() as http,
        Client(streamable_http_client(plain + "/mcp", http_client=http), mode="legacy") as client,
    ):
        assert text_of(await client.call_tool("whoami")) == backends[0].name
        # The plain listener's connection is a ClientConnection itself: TLS costs it nothing.
        assert proxy._plane is not None
        plain_connections = {type(conn) for conn in proxy._plane.connections if not conn.tls}
        assert plain_connections == {ClientConnection}


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_reaches_the_proxy_over_tls_with_the_test_ca(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    proxy = await dict_proxy(tls_config(backends[:1], pki))
    assert CURL is not None
    done = await asyncio.create_subprocess_exec(
        CURL, "-sS", "--cacert", str(pki.ca.cert), "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
        "-H", "Accept: application/json, text/event-stream", proxy.url + "/mcp",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(done.communicate(), DEADLINE)
    assert done.returncode == 0, err
    status, version = out.decode().split()
    assert version == "1.1"  # ALPN: http/1.1, nothing else
    assert status == "400"  # a GET without a session: the backend's own answer, relayed over TLS
    refused = await asyncio.create_subprocess_exec(
        CURL, "-sS", "-o", "/dev/null", proxy.url + "/mcp", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )  # without the CA: curl refuses the certificate
    _, err = await asyncio.wait_for(refused.communicate(), DEADLINE)
    assert refused.returncode == 60, err
    await wait_until(lambda: _async(failures(proxy)["certificate"] == 1), "curl's alert counted")


async def _async(value: bool) -> bool:
    return value


# --- protocol floor and ALPN (openssl s_client) --------------------------------------------------


def s_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        input="",
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    ("min_version", "flag", "accepted"),
    [
        ("1.2", "-tls1_1", False),
        ("1.2", "-tls1_2", True),
        ("1.2", "-tls1_3", True),
        ("1.3", "-tls1_2", False),
        ("1.3", "-tls1_3", True),
    ],
)
async def test_the_protocol_floor_is_min_version(
    min_version: str,
    flag: str,
    accepted: bool,
    backends: list[BackendProcess],
    pki: Pki,
    dict_proxy: DictProxy,
) -> None:
    proxy = await dict_proxy(tls_config(backends[:1], pki, min_version=min_version))
    done = await asyncio.to_thread(s_client, proxy.port, flag, "-CAfile", str(pki.ca.cert))
    version = {"-tls1_1": "TLSv1.1", "-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[flag]
    if accepted:
        assert f"Protocol  : {version}" in done.stdout or f", {version}," in done.stdout, done.stdout
        assert "Verify return code: 0 (ok)" in done.stdout
    else:
        assert "Cipher is (NONE)" in done.stdout or done.returncode != 0, done.stdout
        await wait_until(lambda: _async(failures(proxy)["protocol"] == 1), "the refused version counted")


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_alpn_answers_http_1_1(backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy) -> None:
    proxy = await dict_proxy(tls_config(backends[:1], pki))
    done = await asyncio.to_thread(s_client, proxy.port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in done.stdout, done.stdout
    _, writer = await asyncio.open_connection(
        "127.0.0.1", proxy.port, ssl=client_context(pki, alpn=["h2", "http/1.1"]), server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()


# --- failed handshakes ---------------------------------------------------------------------------


async def test_failed_handshakes_are_counted_and_logged_without_a_traceback_and_the_proxy_serves_on(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy, caplog: pytest.LogCaptureFixture
) -> None:
    data = tls_config(backends[:1], pki)
    data["limits"] = {"head_timeout": 0.5}
    proxy = await dict_proxy(data)
    with caplog.at_level(logging.INFO, logger="mcpbalancer"):
        # Plain HTTP to the TLS port: a protocol failure; the client gets no HTTP answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request("GET", "/mcp"))
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        writer.close()
        await wait_until(lambda: _async(failures(proxy)["protocol"] == 1), "plain HTTP counted")
        # Garbage that is no TLS record.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"\x16\x03\x01\x00\x05garbagegarbage" * 4)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        writer.close()
        await wait_until(lambda: _async(failures(proxy)["protocol"] == 2), "garbage counted")
        # A client that connects and never says hello: cut after limits.head_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        writer.close()
        await wait_until(lambda: _async(failures(proxy)["timeout"] == 1), "the silent client counted")
    lines = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert lines, "no log line"
    assert "failed (protocol)" in lines[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records), "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert proxy._plane is not None
    assert not proxy._plane.handshakes
    assert not proxy._plane.connections
    assert (await sdk_whoami(mcp_url(proxy), client_context(pki)))[0] == backends[0].name


async def test_handshakes_count_towards_the_connection_limit(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    data = tls_config(backends[:1], pki)
    data["limits"] = {"connections": 1}
    proxy = await dict_proxy(data)
    _, first = await asyncio.open_connection(  # holds the one connection
        "127.0.0.1", proxy.port, ssl=client_context(pki), server_hostname="localhost"
    )
    await wait_until(lambda: _async(len(proxy._plane.connections) == 1), "the first connection")  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # closed before any TLS
    writer.close()
    refused = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_rejected_requests_total", {"reason": "connections"}
    )
    assert refused == 1
    first.close()
    await wait_until(lambda: _async(not proxy._plane.connections), "the first connection closed")  # type: ignore[union-attr]
    assert (await sdk_whoami(mcp_url(proxy), client_context(pki)))[0] == backends[0].name


# --- certificate reload ----------------------------------------------------------------------------


async def test_a_reload_serves_the_new_certificate_to_new_handshakes_while_a_stream_continues(
    backends: list[BackendProcess], pki: Pki, reloadable_proxy: FileProxy, tmp_path: Path
) -> None:
    served = tmp_path / "server.pem", tmp_path / "server.key"
    first, second = pki.ca.issue("reload-a"), pki.ca.issue("reload-b")
    install(first, served)
    data = tls_config(backends[:1], pki, cert=served[0], key=served[1])
    data["heartbeat"] = 0.2
    proxy = await reloadable_proxy(data)
    context = client_context(pki)
    assert await asyncio.to_thread(served_certificate, proxy.port, context) == fingerprint(first.cert)
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        sid = await open_session(http, mcp_url(proxy))
        headers = {**session_headers(sid), "Accept": "text/event-stream"}
        async with http.get(mcp_url(proxy), headers=headers) as stream:
            assert stream.status == 200
            assert await next_line(stream) == b": ping\n"
            install(second, served)
            proxy.reload()
            new = await asyncio.to_thread(served_certificate, proxy.port, context)
            assert new == fingerprint(second.cert)
            # The stream opened before the reload goes on, on its connection's first certificate.
            assert await next_line(stream) in (b"\n", b": ping\n")
            assert await next_line(stream) in (b"\n", b": ping\n")
            ssl_object = stream.connection.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            assert hashlib.sha256(ssl_object.getpeercert(binary_form=True)).hexdigest() == fingerprint(
                first.cert
            )
            # The session works on a new connection, with the new certificate.
            answer = await call_tool(http, mcp_url(proxy), sid, "whoami")
            assert answer.text == backends[0].name
    # A reload whose new files are bad is refused; the running pair stays.
    served[1].write_text("not a key")
    with pytest.raises(ConfigError, match=r"listen\[0\]\.tls\.cert, listen\[0\]\.tls\.key"):
        proxy.reload()
    assert await asyncio.to_thread(served_certificate, proxy.port, context) == fingerprint(second.cert)
    expiry = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_tls_certificate_expiry_timestamp_seconds", {"listener": "127.0.0.1:0"}
    )
    assert expiry is not None
    assert expiry > time.time()


def install(issued: Issued, served: tuple[Path, Path]) -> None:
    for src, dst in zip((issued.cert, issued.key), served, strict=True):
        shutil.copy(src, dst)


async def next_line(stream: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(DEADLINE):
        return await stream.content.readline()


async def test_the_healthcheck_probes_a_tls_only_proxy_over_tls(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tls_config(backends[:1], pki)
    data["listen"][0]["address"] = f"127.0.0.1:{port}"
    proxy = await dict_proxy(data)
    assert await asyncio.to_thread(healthcheck.check, proxy.config) is None
    assert failures(proxy) == dict.fromkeys(failures(proxy), 0.0)  # it spoke TLS, not plain HTTP


def test_failed_handshakes_are_logged_once_a_second_with_the_count_of_the_others(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, pki: Pki
) -> None:
    now = [100.0]
    monkeypatch.setattr(handshake.time, "monotonic", lambda: now[0])
    metrics = Metrics(CollectorRegistry())
    metrics.tls_listening()
    plane: Any = type("Plane", (), {"metrics": metrics})()
    config = ServerTlsConfig(cert=str(pki.server.cert), key=str(pki.server.key))
    endpoint = handshake.TlsEndpoint("0.0.0.0:8443", server_tls(config))
    with caplog.at_level(logging.INFO, logger="mcpbalancer"):
        for _ in range(5):
            endpoint.failed(plane, "protocol", "http request", "10.0.0.1")
        now[0] += handshake.FAILURE_LOG_INTERVAL
        endpoint.failed(plane, "timeout", "too slow", "10.0.0.2")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "TLS handshake from 10.0.0.1 on 0.0.0.0:8443 failed (protocol): http request",
        "TLS handshake from 10.0.0.2 on 0.0.0.0:8443 failed (timeout): too slow (4 more since the last line)",
    ]
    counted = metrics.registry.get_sample_value
    assert counted("mcpbalancer_tls_handshake_failures_total", {"reason": "protocol"}) == 5
    assert counted("mcpbalancer_tls_handshake_failures_total", {"reason": "timeout"}) == 1
