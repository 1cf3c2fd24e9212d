"""TLS to https backends: verified by default, with SNI, a private CA, a name override, a client
certificate, an explicit opt-out; one context for traffic, probes and failover; pooled connections.

Real FastMCP backends served over HTTPS by uvicorn with certificates made here (tests/pki.py), the
real mcp client, raw aiohttp where the error body is read. Two small servers stand in for faults
uvicorn cannot produce: a TCP listener that records what the proxy sends to an "https" address, and
a TLS server that answers a missing client certificate with the TLS alert (uvicorn just drops the
connection; nginx, Go and OpenSSL servers send the alert).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client

from mcpbalancer.app import Proxy
from mcpbalancer.dataplane.tls import ALPN
from tests.fixtures.backends import BackendFactory, BackendProcess, ServerTls, start_all, stop_all
from tests.fixtures.proxy import DictProxy
from tests.fixtures.tls import INTERNAL_NAME, Pki
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    MODERN_META,
    MODERN_VERSION,
    call_body,
    call_tool,
    from_proxy,
    mcp_url,
    open_session,
    recorded_client,
    text_of,
    wait_until,
)

TLS_FAILED = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {"code": -32603, "message": "Backend TLS handshake failed"},
}


@pytest.fixture(scope="module")
def tls_backends(pki: Pki) -> Iterator[dict[str, BackendProcess]]:
    """`tls`: HTTPS with the test CA's server certificate; `mtls`: the same, and it requires a client
    certificate from the test CA."""
    procs = [
        BackendProcess("tls", tls=ServerTls(pki.server)),
        BackendProcess("mtls", tls=ServerTls(pki.server, client_ca=pki.ca.cert)),
    ]
    try:
        yield {b.name: b for b in start_all(procs)}
    finally:
        stop_all(procs)


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def https(backend: BackendProcess, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{backend.port}"


def config(*backends: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "health": {"interval": 0}, "backends": list(backends), **top}


def modern_headers(tool: str) -> dict[str, str]:
    return {
        **INIT_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
    }


def modern_body(tool: str) -> dict[str, Any]:
    body = call_body(tool)
    body["params"]["_meta"] = MODERN_META
    return body


async def handshakes(client: Client) -> dict[str, Any]:
    """What the backend behind `client` reports of the TLS handshakes it has seen."""
    report: dict[str, Any] = json.loads(text_of(await client.call_tool("tls_handshakes")))
    return report


def tls_errors(proxy: Proxy, backend: str) -> float:
    labels = {"backend": backend, "kind": "tls"}
    return proxy.metrics.registry.get_sample_value("mcpbalancer_upstream_errors_total", labels) or 0.0


# --- verified ------------------------------------------------------------------------------------


async def test_a_private_ca_verifies_the_backend_and_the_url_host_is_sent_as_sni(
    tls_backends: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    backend = tls_backends["tls"]
    url = https(backend, "localhost")
    proxy = await dict_proxy(config({"name": "tls", "url": url, "tls": {"ca": str(pki.ca.cert)}}))
    async with recorded_client(mcp_url(proxy)) as (client, _):  # a legacy session, over TLS
        assert text_of(await client.call_tool("whoami")) == "tls"
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "2"]
    async with Client(mcp_url(proxy), mode=MODERN_VERSION) as modern:
        assert text_of(await modern.call_tool("whoami")) == "tls"
        report = await handshakes(modern)
    # Every connection the proxy opened named the URL's host (the probes are off here).
    assert report["server_names"][-1] == "localhost"
    context = proxy.backends.get("tls").ssl_context  # type: ignore[union-attr]
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_server_name_is_verified_instead_of_the_url_host_and_sent_as_sni(
    tls_backends: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    # The certificate names INTERNAL_NAME; the URL is an address.
    tls = {"ca": str(pki.ca.cert), "server_name": INTERNAL_NAME}
    proxy = await dict_proxy(config({"name": "tls", "url": https(tls_backends["tls"]), "tls": tls}))
    async with Client(mcp_url(proxy), mode=MODERN_VERSION) as client:
        assert text_of(await client.call_tool("whoami")) == "tls"
        assert (await handshakes(client))["server_names"][-1] == INTERNAL_NAME


async def test_tls_connections_are_pooled_and_kept_alive(
    tls_backends: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    tls = {"ca": str(pki.ca.cert)}
    proxy = await dict_proxy(config({"name": "tls", "url": https(tls_backends["tls"]), "tls": tls}))
    async with Client(mcp_url(proxy), mode=MODERN_VERSION) as client:
        before = (await handshakes(client))["handshakes"]
        for _ in range(20):
            assert text_of(await client.call_tool("whoami")) == "tls"
        after = (await handshakes(client))["handshakes"]
    assert after == before  # 21 requests after the first, no new handshake: one kept-alive connection
    pool = proxy.fleet.pools["tls"]
    assert pool.take() is not None
    assert pool.take() is None


async def test_the_backend_is_offered_http_1_1_only_by_alpn(pki: Pki, dict_proxy: DictProxy) -> None:
    context = server_context(pki)
    context.set_alpn_protocols(["h2", "http/1.1"])  # a server that would rather speak HTTP/2
    with tls_server_thread(context) as port:
        tls = {"ca": str(pki.ca.cert)}
        proxy = await dict_proxy(config({"name": "h2", "url": f"https://127.0.0.1:{port}", "tls": tls}))
        conn = await proxy.fleet.pools["h2"].connect()
        try:
            assert conn.transport is not None
            ssl_object = conn.transport.get_extra_info("ssl_object")
            assert ssl_object.selected_alpn_protocol() == ALPN[0] == "http/1.1"
            assert ssl_object.getpeercert()["subject"] == ((("commonName", "server"),),)
        finally:
            conn.close()


# --- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "reason"),
    [
        pytest.param(None, "unable to get local issuer certificate", id="not-in-the-system-store"),
        pytest.param({"ca": "stranger"}, "unable to get local issuer certificate", id="unknown-ca"),
        pytest.param(
            {"ca": "ca", "server_name": "wrong.example"},
            "Hostname mismatch, certificate is not valid for 'wrong.example'",
            id="wrong-name",
        ),
    ],
)
async def test_a_refused_certificate_is_a_502_with_a_json_rpc_body_a_metric_and_a_log_line(
    tls_backends: dict[str, BackendProcess],
    pki: Pki,
    dict_proxy: DictProxy,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    tls: dict[str, str] | None,
    reason: str,
) -> None:
    entry: dict[str, Any] = {"name": "guarded", "url": https(tls_backends["tls"])}
    if tls is not None:
        cas = {"ca": pki.ca.cert, "stranger": pki.stranger.cert}
        entry["tls"] = {**tls, "ca": str(cas[tls["ca"]])}
    proxy = await dict_proxy(config(entry))
    caplog.set_level(logging.WARNING, logger="mcpbalancer")

    async with web.post(mcp_url(proxy), json=INIT_BODY, headers=INIT_HEADERS) as resp:  # legacy
        assert resp.status == 502
        assert from_proxy(resp.headers)
        assert await resp.json() == TLS_FAILED
    async with web.post(mcp_url(proxy), json=modern_body("whoami"), headers=modern_headers("whoami")) as resp:
        assert (resp.status, await resp.json()) == (502, TLS_FAILED)

    assert tls_errors(proxy, "guarded") == 2
    lines = [r.getMessage() for r in caplog.records if "TLS failed" in r.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"backend guarded: TLS failed: certificate verify failed: {reason}"), line
    # Two refusals are two failures in a row (health.fall): no new sessions for it.
    assert proxy.backends.get("guarded").up is False  # type: ignore[union-attr]


async def test_an_https_backend_never_gets_plain_http(
    dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    """What the proxy sends to an https:// address is a TLS ClientHello, never the request."""
    received = bytearray()
    got = asyncio.Event()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read(65536))
        got.set()
        writer.close()

    listener = await asyncio.start_server(record, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        proxy = await dict_proxy(config({"name": "plain", "url": f"https://127.0.0.1:{port}"}))
        headers = {**modern_headers("whoami"), "Authorization": "Bearer s3cret-token"}
        async with web.post(mcp_url(proxy), json=modern_body("whoami"), headers=headers) as resp:
            assert resp.status == 502
            assert from_proxy(resp.headers)
        async with asyncio.timeout(DEADLINE):
            await got.wait()
    finally:
        listener.close()
        await listener.wait_closed()
    assert received[:1] == b"\x16"  # a TLS handshake record
    assert b"s3cret-token" not in received
    assert b"POST" not in received


# --- client certificates --------------------------------------------------------------------------


async def test_a_client_certificate_is_sent_to_a_backend_that_requires_one(
    tls_backends: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy
) -> None:
    backend = tls_backends["mtls"]
    mutual = {"ca": str(pki.ca.cert), "cert": str(pki.client.cert), "key": str(pki.client.key)}
    proxy = await dict_proxy(config({"name": "mtls", "url": https(backend), "tls": mutual}))
    async with recorded_client(mcp_url(proxy)) as (client, _):
        assert text_of(await client.call_tool("whoami")) == "mtls"
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "2"]


async def test_a_backend_that_requires_a_client_certificate_serves_nothing_without_one(
    tls_backends: dict[str, BackendProcess], pki: Pki, dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    tls = {"ca": str(pki.ca.cert)}
    proxy = await dict_proxy(config({"name": "mtls", "url": https(tls_backends["mtls"]), "tls": tls}))
    # uvicorn ends the connection after the handshake without the TLS alert: a reset, and a 502.
    async with web.post(mcp_url(proxy), json=modern_body("whoami"), headers=modern_headers("whoami")) as resp:
        assert resp.status == 502
        assert from_proxy(resp.headers)


def server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    return context


def read_to_eof(tls: ssl.SSLSocket) -> None:
    while tls.recv(4096):
        pass


@contextlib.contextmanager
def tls_server_thread(
    context: ssl.SSLContext, serve_one: Callable[[ssl.SSLSocket], None] = read_to_eof
) -> Iterator[int]:
    """A blocking TLS server on a thread for one connection: it does the handshake (sending an alert
    if the handshake fails, as most TLS servers do), then `serve_one(tls socket)` (by default: read
    until the client closes); its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(DEADLINE)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                serve_one(tls)

    thread = threading.Thread(target=serve, name="tls-server", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(DEADLINE)


async def test_a_tls_alert_after_the_handshake_is_a_tls_failure_naming_the_reason(
    pki: Pki, dict_proxy: DictProxy, web: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpbalancer")
    # Requires a client certificate and answers a missing one with the alert certificate_required.
    context = server_context(pki)
    context.load_verify_locations(pki.ca.cert)
    context.verify_mode = ssl.CERT_REQUIRED
    with tls_server_thread(context) as port:
        tls = {"ca": str(pki.ca.cert)}
        proxy = await dict_proxy(config({"name": "strict", "url": f"https://localhost:{port}", "tls": tls}))
        async with web.post(
            mcp_url(proxy), json=modern_body("whoami"), headers=modern_headers("whoami")
        ) as resp:
            assert (resp.status, await resp.json()) == (502, TLS_FAILED)
    assert tls_errors(proxy, "strict") == 1
    [line] = [r.getMessage() for r in caplog.records if "TLS failed" in r.getMessage()]
    assert line.startswith("backend strict: TLS failed: tlsv13 alert certificate required")
    assert "requires a client certificate (tls.cert)" in line


async def test_a_tls_error_ends_a_close_delimited_body_as_cut_not_as_complete(
    pki: Pki, dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    head_seen = threading.Event()

    def answer_then_garble(tls: ssl.SSLSocket) -> None:
        tls.recv(65536)  # the request
        tls.sendall(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"partial":')
        head_seen.wait(DEADLINE)
        # A record that fails to decrypt, written under the TLS layer: the body ends in a TLS error.
        socket.socket.sendall(tls, b"\x17\x03\x03\x00\x05nope!")
        read_to_eof(tls)

    with tls_server_thread(server_context(pki), answer_then_garble) as port:
        tls = {"ca": str(pki.ca.cert)}
        proxy = await dict_proxy(config({"name": "garbled", "url": f"https://127.0.0.1:{port}", "tls": tls}))
        body, headers = modern_body("whoami"), modern_headers("whoami")
        async with web.post(mcp_url(proxy), json=body, headers=headers) as resp:
            assert resp.status == 200
            head_seen.set()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # cut, where a close would have completed it
    assert tls_errors(proxy, "garbled") == 1


# --- the opt-out -----------------------------------------------------------------------------------


async def test_insecure_skip_verify_connects_to_any_certificate_and_warns_at_start(
    tls_backends: dict[str, BackendProcess], dict_proxy: DictProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpbalancer")
    tls = {"insecure_skip_verify": True}
    proxy = await dict_proxy(config({"name": "lax", "url": https(tls_backends["tls"]), "tls": tls}))
    [warning] = [r for r in caplog.records if "insecure_skip_verify" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "backend lax" in warning.getMessage()
    assert "not verified" in warning.getMessage()
    async with Client(mcp_url(proxy), mode=MODERN_VERSION) as client:
        assert text_of(await client.call_tool("whoami")) == "tls"


# --- probes and failover use the same TLS ----------------------------------------------------------


@pytest.mark.parametrize(("trusted", "result"), [("ca", "ok"), ("stranger", "fail")])
async def test_health_probes_speak_the_backends_tls(
    tls_backends: dict[str, BackendProcess],
    pki: Pki,
    dict_proxy: DictProxy,
    trusted: str,
    result: str,
) -> None:
    ca = {"ca": pki.ca.cert, "stranger": pki.stranger.cert}[trusted]
    tls = {"ca": str(ca), "server_name": INTERNAL_NAME}
    data = config({"name": "probed", "url": https(tls_backends["tls"]), "tls": tls})
    data["health"] = {"interval": 0.05, "timeout": 2, "fall": 1, "rise": 1}
    proxy = await dict_proxy(data)
    labels = {"backend": "probed", "result": result}

    async def probed() -> bool:
        count = proxy.metrics.registry.get_sample_value("mcpbalancer_health_checks_total", labels)
        return (count or 0) >= 2

    await wait_until(probed, f"two probes with result {result}")
    assert proxy.backends.get("probed").up is (result == "ok")  # type: ignore[union-attr]
    if result == "ok":
        async with Client(mcp_url(proxy), mode=MODERN_VERSION) as client:
            names = (await handshakes(client))["server_names"]
        assert names[-3:] == [INTERNAL_NAME] * 3  # the probes' handshakes used server_name too


async def test_replay_failover_initializes_over_the_backends_tls(
    tls_backends: dict[str, BackendProcess],
    backend_factory: BackendFactory,
    pki: Pki,
    dict_proxy: DictProxy,
    web: aiohttp.ClientSession,
) -> None:
    [doomed] = await asyncio.to_thread(backend_factory, ["doomed"], tls=ServerTls(pki.server))
    tls = {"ca": str(pki.ca.cert)}
    entries = [{"name": b.name, "url": https(b), "tls": tls} for b in (doomed, tls_backends["tls"])]
    proxy = await dict_proxy(config(*entries, failover="replay"))
    url = mcp_url(proxy)
    sessions = [await open_session(web, url) for _ in range(2)]  # least_sessions: one on each
    owners = {(await call_tool(web, url, sid, "whoami")).text: sid for sid in sessions}
    assert set(owners) == {"doomed", "tls"}
    await doomed.akill()
    # The stored initialize is re-run on the other backend, over TLS verified by the private CA.
    assert (await call_tool(web, url, owners["doomed"], "whoami")).text == "tls"
    failovers = "mcpbalancer_session_failovers_total"
    assert proxy.metrics.registry.get_sample_value(failovers, {"result": "moved"}) == 1


# --- documentation ---------------------------------------------------------------------------------


def test_every_tls_key_is_documented() -> None:
    root = Path(__file__).resolve().parents[1]
    table = (root / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = (root / "config" / "example.yaml").read_text(encoding="utf-8")
    for key in ("ca", "server_name", "cert", "key", "insecure_skip_verify"):
        assert f"| `backends[].tls.{key}` |" in table, key
        assert f"#     {key}:" in example or f"#   {key}:" in example, key
