"""Mutual TLS on a listener (`client_ca`, `require_client_cert`) and sessions bound to the client
certificate (`bind_sessions: client_cert`), with real FastMCP backends and certificates made here."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from mcpbalancer.config import parse_config
from mcpbalancer.dataplane.listener_tls import peer_subject
from mcpbalancer.errors import ConfigError
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import DictProxy
from tests.fixtures.tls import Pki
from tests.mcp_helpers import DEADLINE, call_tool, mcp_url, open_session, wait_until
from tests.pki import Issued
from tests.tls_helpers import client_context, failures, tls_config

Connect = Callable[[ssl.SSLContext], aiohttp.ClientSession]


@pytest.fixture
async def https() -> AsyncIterator[Connect]:
    """`https(context)` -> an aiohttp session whose connections use `context`; all closed after."""
    sessions: list[aiohttp.ClientSession] = []

    def make(context: ssl.SSLContext) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=context)
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE))
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        await session.close()


def mtls_config(
    backends: list[BackendProcess], pki: Pki, *, required: bool = False, **top: Any
) -> dict[str, Any]:
    """A TLS listener verifying client certificates of the test CA; `top`: more top-level keys."""
    data = tls_config(backends[:1], pki, client_ca=str(pki.ca.cert), require_client_cert=required)
    return {**data, **top}


def issued_client(pki: Pki, name: str, *, stranger: bool = False) -> Issued:
    return (pki.stranger if stranger else pki.ca).issue(name, client=True)


async def test_required_client_certificate_missing_or_from_another_ca_fails_the_handshake(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy, https: Connect
) -> None:
    proxy = await dict_proxy(mtls_config(backends, pki, required=True))
    url = mcp_url(proxy)
    # No certificate: the handshake fails (in TLS 1.3 the client learns it at its first read).
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await open_session(https(client_context(pki)), url)
    await wait_until(lambda: _now(failures(proxy)["certificate"] == 1), "the missing certificate counted")
    # A certificate of a CA the listener does not trust.
    mallory = issued_client(pki, "mallory", stranger=True)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await open_session(https(client_context(pki, cert=mallory)), url)
    await wait_until(lambda: _now(failures(proxy)["certificate"] == 2), "the unknown CA counted")
    # The test CA's client certificate: served.
    http = https(client_context(pki, cert=pki.client))
    sid = await open_session(http, url)
    answer = await call_tool(http, url, sid, "whoami")
    assert (answer.status, answer.text) == (200, backends[0].name)
    assert failures(proxy)["certificate"] == 2


async def _now(value: bool) -> bool:
    return value


async def test_optional_client_certificate_lets_a_client_without_one_in(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy, https: Connect
) -> None:
    proxy = await dict_proxy(mtls_config(backends, pki))
    http = https(client_context(pki))
    sid = await open_session(http, mcp_url(proxy))
    assert (await call_tool(http, mcp_url(proxy), sid, "whoami")).status == 200
    assert proxy._plane is not None
    assert {conn.client_subject for conn in proxy._plane.connections} == {None}


async def test_sessions_bound_to_the_client_certificate_are_unknown_to_another_one(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy, https: Connect
) -> None:
    proxy = await dict_proxy(mtls_config(backends, pki, bind_sessions="client_cert"))
    url = mcp_url(proxy)
    alice, bob = issued_client(pki, "alice"), issued_client(pki, "bob")
    as_alice = https(client_context(pki, cert=alice))
    sid = await open_session(as_alice, url)
    assert (await call_tool(as_alice, url, sid, "whoami")).status == 200
    # Read once per connection: the subject of the certificate, in RFC 4514 form.
    assert proxy._plane is not None
    assert {conn.client_subject for conn in proxy._plane.connections} == {b"CN=alice"}
    as_bob = https(client_context(pki, cert=bob))
    answer = await call_tool(as_bob, url, sid, "whoami")
    assert answer.status == 404
    assert answer.json()["error"]["message"] == "Session not found"
    # Without a certificate, as without the bound header: unknown too.
    anonymous = https(client_context(pki))
    assert (await call_tool(anonymous, url, sid, "whoami")).status == 404
    rejected = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_rejected_requests_total", {"reason": "credential"}
    )
    assert rejected == 2
    # Alice on a new connection with the same certificate: still hers.
    again = https(client_context(pki, cert=alice))
    assert (await call_tool(again, url, sid, "whoami")).status == 200


def test_peer_subject_is_the_rfc_4514_subject(pki: Pki) -> None:
    der = ssl.PEM_cert_to_DER_cert(pki.client.cert.read_text())
    assert peer_subject(der) == b"CN=proxy"
    assert peer_subject(None) is None


AUTH = {"mode": "enforce", "api_keys": [{"name": "k", "sha256": "a" * 64}]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"bind_sessions": "client_cert"}, "client_cert needs a TLS listener with `tls.client_ca`"),
        ({"bind_sessions": "client_cert", "auth": AUTH}, "client_cert cannot be combined with `auth`"),
    ],
)
def test_client_cert_binding_needs_a_verifying_listener_and_no_auth(
    extra: dict[str, Any], message: str, pki: Pki
) -> None:
    data: dict[str, Any] = {"backends": [{"name": "a", "url": "http://127.0.0.1:1"}], **extra}
    if "auth" in extra:
        data["listen"] = [{"address": "127.0.0.1:0", "tls": {"cert": "c.pem", "client_ca": "ca.pem"}}]
    with pytest.raises(ConfigError, match="bind_sessions: " + message.replace("`", ".")):
        parse_config(data)


async def test_a_client_ca_file_without_a_certificate_is_a_config_error(
    backends: list[BackendProcess], pki: Pki, dict_proxy: DictProxy, tmp_path: Any
) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    data = tls_config(backends[:1], pki, client_ca=str(empty))
    with pytest.raises(ConfigError, match=r"listen\[0\]\.tls\.client_ca: no usable PEM certificate"):
        await asyncio.wait_for(dict_proxy(data), DEADLINE)
