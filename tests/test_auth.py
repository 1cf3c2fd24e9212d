"""`auth`: JWT bearer tokens against a JWKS served by a test authorization server (tests/fixtures/
idp.py), API keys, the protected-resource metadata, and sessions bound to their principal. The real
mcp SDK client sends the tokens through the proxy to real FastMCP backends."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.idp import AUDIENCE, ISSUER, IdP, IdPFactory, bearer, rsa_key
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import (
    INIT_BODY,
    INIT_HEADERS,
    SESSION_NOT_FOUND,
    call_body,
    mcp_url,
    session_headers,
    session_ledger,
    sse_messages,
    text_of,
    wait_until,
)

KEY = "0123456789abcdef-test-key"
API_KEY = "k-3f9a1c0e-the-ci-key"


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


def auth_results(proxy: Proxy, result: str) -> float:
    return sample(proxy, "mcpbalancer_auth_requests_total", result=result)


@contextlib.asynccontextmanager
async def sdk_client(url: str, headers: dict[str, str], mode: str = "legacy") -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


async def auth_proxy(
    make_proxy: ProxyFactory, idp: IdP, backends: list[BackendProcess], **auth: Any
) -> Proxy:
    settings: dict[str, Any] = {"jwks_cooldown": 1, "principal_header": "X-Principal", **auth}
    return await make_proxy(backends, auth=idp.auth(**settings))


async def post_initialize(url: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=INIT_BODY, headers={**INIT_HEADERS, **headers}) as resp,
    ):
        text = await resp.text()
        body = json.loads(text) if resp.content_type == "application/json" else text
        return resp.status, resp.headers, body


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def challenge(headers: Any) -> dict[str, str]:
    value = headers["WWW-Authenticate"]
    assert value.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', value))


# --- accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_valid_token_reaches_the_backend_with_the_principal(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory, mode: str
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1])
    token = idp.token("alice", scope="mcp:tools")
    headers = {**bearer(token), "X-Principal": "root"}  # a client's own X-Principal is never believed
    async with sdk_client(mcp_url(proxy), headers, mode) as client:
        assert text_of(await client.call_tool("whoami")) == "a"
        seen = json.loads(text_of(await client.call_tool("request_headers")))
    assert seen["x-principal"] == "alice"
    assert seen["authorization"] == f"Bearer {token}"  # forwarded by default
    assert auth_results(proxy, "verified") == 1  # one signature check; the rest from the cache
    assert auth_results(proxy, "cached") >= 2


async def test_forward_authorization_false_strips_it(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1], forward_authorization=False)
    async with sdk_client(mcp_url(proxy), bearer(idp.token("alice"))) as client:
        seen = json.loads(text_of(await client.call_tool("request_headers")))
    assert "authorization" not in seen
    assert seen["x-principal"] == "alice"


# --- refused -------------------------------------------------------------------------------------

FORGERIES = {
    "expired": lambda idp: idp.token(exp=int(time.time()) - 3600),
    "not yet valid": lambda idp: idp.token(nbf=int(time.time()) + 3600),
    "wrong audience": lambda idp: idp.token(aud="https://other.example.test/mcp"),
    "wrong issuer": lambda idp: idp.token(iss="https://evil.example.test"),
    "bad signature": lambda idp: idp.with_bad_signature(),
    "alg none": lambda idp: idp.unsigned(),
    "HS256 keyed with the public key": lambda idp: idp.hs256_with_public_key(),
    "no sub": lambda idp: idp.token(sub=None),
    "not a token": lambda idp: "not-a-jwt",
}
REASONS = {
    "expired": "expired",
    "not yet valid": "not valid yet",
    "wrong audience": "another audience",
    "wrong issuer": "another issuer",
    "bad signature": "bad signature",
    "alg none": "'none' is not accepted",
    "HS256 keyed with the public key": "'HS256' is not accepted",
    "no sub": "no sub claim",
    "not a token": "invalid token",
}


@pytest.mark.parametrize("case", FORGERIES)
async def test_an_invalid_token_gets_401_and_reaches_no_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory, case: str
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1])
    before = (await session_ledger(backends[0])).issued
    status, headers, body = await post_initialize(mcp_url(proxy), bearer(FORGERIES[case](idp)))
    assert status == 401, body
    params = challenge(headers)
    assert params["error"] == "invalid_token"
    assert REASONS[case] in params["error_description"]
    assert params["resource_metadata"] == f"{proxy.url}/.well-known/oauth-protected-resource/mcp"
    assert body["error"]["code"] == -32030
    assert body["id"] is None
    assert auth_results(proxy, "invalid") == 1
    assert sample(proxy, "mcpbalancer_rejected_requests_total", reason="auth") == 1
    assert (await session_ledger(backends[0])).issued == before  # no initialize reached it


class _Fake:
    """A backend nobody listens on: a request that got past auth would fail with 502, not 401."""

    name = "nobody"
    url = "http://127.0.0.1:9"


async def test_no_credential_gets_the_challenge_without_an_error_code(
    make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, [_Fake()], required_scopes=["mcp:tools"])
    status, headers, body = await post_initialize(mcp_url(proxy), {})
    assert status == 401
    params = challenge(headers)
    assert "error" not in params  # RFC 6750 §3.1: no error code when no credential was sent
    assert params["scope"] == "mcp:tools"
    assert params["resource_metadata"].endswith("/.well-known/oauth-protected-resource/mcp")
    assert body["error"]["code"] == -32030
    for scheme in ("Basic dXNlcjpwYXNz", "Bearer"):
        status, headers, _ = await post_initialize(mcp_url(proxy), {"Authorization": scheme})
        assert status == 401
    assert auth_results(proxy, "missing") == 1


async def test_a_token_without_the_required_scope_gets_403_insufficient_scope(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1], required_scopes=["mcp:tools", "mcp:read"])
    status, headers, body = await post_initialize(mcp_url(proxy), bearer(idp.token(scope="mcp:read")))
    assert status == 403
    params = challenge(headers)
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "mcp:read mcp:tools"
    assert body["error"]["code"] == -32031
    # `scp` as a list is read too.
    async with sdk_client(mcp_url(proxy), bearer(idp.token(scp=["mcp:tools", "mcp:read"]))) as client:
        assert text_of(await client.call_tool("whoami")) == "a"


# --- the key set: rotation, unknown kids, an IdP that is down ------------------------------------


async def test_an_unknown_kid_is_looked_up_once_then_refused(
    make_proxy: ProxyFactory, make_idp: IdPFactory, backends: list[BackendProcess]
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1], jwks_cooldown=60)
    await wait_until(lambda: _true(idp.fetches == 1), "the key set fetched at start")
    idp.add_key("stray", rsa_key(1), publish=False)  # a key the IdP never published
    status, headers, _ = await post_initialize(mcp_url(proxy), bearer(idp.token(kid="stray")))
    assert status == 401
    assert "key id is unknown" in challenge(headers)["error_description"]
    assert idp.fetches == 2  # refreshed once, in case the IdP had rotated
    for _ in range(3):  # within the cooldown: refused without asking the IdP again
        status, _, _ = await post_initialize(mcp_url(proxy), bearer(idp.token(kid="stray")))
        assert status == 401
    assert idp.fetches == 2


async def _true(value: bool) -> bool:
    return value


async def test_tokens_of_a_rotated_key_are_accepted(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1])
    old = idp.token("alice")
    async with sdk_client(mcp_url(proxy), bearer(old)) as client:
        assert text_of(await client.call_tool("whoami")) == "a"
    new_kid = idp.rotate()
    async with sdk_client(mcp_url(proxy), bearer(idp.token("alice", kid=new_kid))) as client:
        assert text_of(await client.call_tool("whoami")) == "a"
    # The new set no longer has the old key: its token, verified before, is not believed any more.
    status, _, _ = await post_initialize(mcp_url(proxy), bearer(old))
    assert status == 401
    assert sample(proxy, "mcpbalancer_jwks_refreshes_total", result="ok") >= 2


async def test_the_last_good_key_set_is_kept_while_the_idp_is_down(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1])
    await wait_until(lambda: _true(idp.fetches == 1), "the key set fetched at start")
    idp.failing = True
    idp.add_key("stray", rsa_key(1), publish=False)
    status, _, _ = await post_initialize(mcp_url(proxy), bearer(idp.token(kid="stray")))
    assert status == 401  # the refresh it asked for failed
    assert sample(proxy, "mcpbalancer_jwks_refreshes_total", result="error") == 1
    async with sdk_client(mcp_url(proxy), bearer(idp.token("bob"))) as client:  # a fresh token
        assert text_of(await client.call_tool("whoami")) == "a"


async def test_without_any_key_set_a_token_gets_503(make_proxy: ProxyFactory, make_idp: IdPFactory) -> None:
    idp = await make_idp()
    idp.failing = True
    proxy = await auth_proxy(make_proxy, idp, [_Fake()])
    await wait_until(lambda: _true(idp.fetches >= 1), "the first fetch")
    status, headers, body = await post_initialize(mcp_url(proxy), bearer(idp.token()))
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert "keys could not be fetched" in body["error"]["message"]
    assert auth_results(proxy, "unavailable") == 1


# --- sessions belong to their principal ----------------------------------------------------------


async def test_another_principal_presenting_a_session_id_gets_404(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory, store: str
) -> None:
    idp = await make_idp()
    extra = {} if store == "memory" else {"session_binding_key": KEY}
    proxy = await make_proxy(backends[:1], store=store, auth=idp.auth(jwks_cooldown=1), **extra)
    sids: list[str] = []

    async def seen(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            sids.append(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(headers=bearer(idp.token("alice")), event_hooks={"response": [seen]})
    async with (
        http,
        Client(streamable_http_client(mcp_url(proxy), http_client=http), mode="legacy") as client,
    ):
        assert text_of(await client.call_tool("count")) == "1"
        sid = sids[0]
        async with aiohttp.ClientSession() as raw:
            for thief in (idp.token("bob"), idp.token("mallory", scope="admin")):
                headers = {**session_headers(sid), **bearer(thief)}
                async with raw.post(mcp_url(proxy), json=call_body("count"), headers=headers) as resp:
                    assert resp.status == 404
                    assert await resp.json() == SESSION_NOT_FOUND
            # Alice with a refreshed token (another token, the same principal) keeps her session.
            headers = {**session_headers(sid), **bearer(idp.token("alice"))}
            async with raw.post(mcp_url(proxy), json=call_body("count", 77), headers=headers) as resp:
                assert resp.status == 200
                [message] = sse_messages(await resp.text())
                assert message["result"]["content"][0]["text"] == "2"
        assert text_of(await client.call_tool("count")) == "3"  # bob's calls never reached it
    assert sample(proxy, "mcpbalancer_rejected_requests_total", reason="credential") == 2


# --- API keys ------------------------------------------------------------------------------------


async def test_api_keys_in_authorization_or_their_own_header(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    auth = {
        "api_keys": [
            {"name": "ci", "sha256": digest, "scopes": ["mcp:tools"]},
            {"name": "x", "sha256": "0" * 64},
        ],
        "api_key_header": "X-API-Key",
        "principal_header": "X-Principal",
        "required_scopes": ["mcp:tools"],
    }
    proxy = await make_proxy(backends[:1], auth=auth)
    for headers in (bearer(API_KEY), {"X-API-Key": API_KEY}):
        async with sdk_client(mcp_url(proxy), headers) as client:
            seen = json.loads(text_of(await client.call_tool("request_headers")))
        assert seen["x-principal"] == "ci"
    status, headers, body = await post_initialize(mcp_url(proxy), bearer(API_KEY + "x"))
    assert status == 401
    assert "unknown API key" in body["error"]["message"]
    status, _, _ = await post_initialize(mcp_url(proxy), {"X-API-Key": "wrong", **bearer(API_KEY)})
    assert status == 401  # the key header, when present, is the credential
    assert auth_results(proxy, "key") >= 4


# --- the protected-resource metadata -------------------------------------------------------------


async def test_the_protected_resource_metadata_is_served_from_the_config(
    make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(
        make_proxy, idp, [_Fake()], scopes_supported=["mcp:tools"], required_scopes=["mcp:tools"]
    )
    async with aiohttp.ClientSession() as http:
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
            async with http.get(proxy.url + path) as resp:
                assert resp.status == 200  # no credential needed
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
                document = await resp.json()
            assert document == {
                "resource": f"{proxy.url}/mcp",
                "authorization_servers": [ISSUER],
                "scopes_supported": ["mcp:tools"],
                "bearer_methods_supported": ["header"],
            }
        # Only a trusted proxy in front may say the client came over TLS.
        tls = {"X-Forwarded-Proto": "https"}
        async with http.get(proxy.url + "/.well-known/oauth-protected-resource", headers=tls) as resp:
            assert (await resp.json())["resource"].startswith("http://")
        async with http.post(proxy.url + "/.well-known/oauth-protected-resource") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"


async def test_a_trusted_proxy_in_front_makes_the_resource_https(
    make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    auth = idp.auth(authorization_servers=["https://login.example.test"])
    proxy = await make_proxy([_Fake()], auth=auth, trusted_proxies=["127.0.0.0/8"])
    url = proxy.url + "/.well-known/oauth-protected-resource/mcp"
    async with aiohttp.ClientSession() as http, http.get(url, headers={"X-Forwarded-Proto": "https"}) as resp:
        document = await resp.json()
    assert document["resource"] == f"https://{proxy.url.removeprefix('http://')}/mcp"
    assert document["authorization_servers"] == ["https://login.example.test"]
    _, headers, _ = await post_initialize(mcp_url(proxy), {"X-Forwarded-Proto": "https"})
    assert challenge(headers)["resource_metadata"].startswith("https://")


async def test_the_metadata_and_public_paths_can_go_to_the_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(
        make_proxy, idp, backends[:1], resource_metadata="backend", public_paths=["/who*"]
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/.well-known/oauth-protected-resource/mcp") as resp:
            assert resp.status == 404  # FastMCP without auth has none: its answer, passed through
            assert resp.headers.get("Server") == "uvicorn"
        async with http.get(proxy.url + "/whoami") as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "a"
        async with http.get(proxy.url + "/elsewhere") as resp:
            assert resp.status == 401
    assert auth_results(proxy, "public") == 2


async def test_a_token_for_an_audience_list_and_es256(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    idp = await make_idp()
    idp.add_key("ec-1", ec.generate_private_key(ec.SECP256R1()))
    proxy = await make_proxy(backends[:1], auth=idp.auth(audience=["https://a.example.test", AUDIENCE]))
    async with sdk_client(mcp_url(proxy), bearer(idp.token("carol", kid="ec-1"))) as client:
        assert text_of(await client.call_tool("whoami")) == "a"
    proxy_rs_only = await make_proxy(backends[:1], auth=idp.auth(algorithms=["RS256"]))
    status, _, _ = await post_initialize(mcp_url(proxy_rs_only), bearer(idp.token("carol", kid="ec-1")))
    assert status == 401


async def test_the_sdk_client_sees_the_401_as_an_error(
    make_proxy: ProxyFactory, make_idp: IdPFactory
) -> None:
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, [_Fake()])
    with pytest.raises(ExceptionGroup) as caught:  # the client's task group: its initialize failed
        async with sdk_client(mcp_url(proxy), bearer(idp.unsigned())):
            pass
    [error] = leaves(caught.value)
    assert isinstance(error, MCPError)
    assert (error.code, error.message) == (-32030, "Unauthorized: the algorithm 'none' is not accepted")


async def test_with_bind_sessions_too_a_session_is_bound_to_the_principal_and_the_header(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    proxy = await make_proxy(
        backends[:1], auth={"api_keys": [{"name": "ci", "sha256": digest}]}, bind_sessions="X-Device"
    )
    url = mcp_url(proxy)
    device = {**bearer(API_KEY), "X-Device": "laptop"}
    async with web.post(url, json=INIT_BODY, headers={**INIT_HEADERS, **device}) as resp:
        assert resp.status == 200
        sid = resp.headers["Mcp-Session-Id"]
    for headers, status in (
        (device, 200),
        ({**bearer(API_KEY), "X-Device": "phone"}, 404),  # the same principal, another device
        (bearer(API_KEY), 404),
    ):
        body = {"jsonrpc": "2.0", "id": 3, "method": "ping"}
        async with web.post(url, json=body, headers={**session_headers(sid), **headers}) as resp:
            assert resp.status == status


async def test_two_credentials_in_one_request_are_refused(
    backends: list[BackendProcess], make_proxy: ProxyFactory, make_idp: IdPFactory, open_client: Any
) -> None:
    """The proxy would check one, and the backend might read the other."""
    idp = await make_idp()
    proxy = await auth_proxy(make_proxy, idp, backends[:1])
    client = await open_client(proxy)
    twice = f"Authorization: Bearer {idp.token('alice')}\r\nAuthorization: Bearer {idp.token('bob')}\r\n"
    client.send(
        b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + twice.encode()
        + b"Content-Length: 2\r\n\r\n{}"
    )
    resp = await client.response()
    assert resp.status == 400
    assert b"more than one authorization header" in bytes(resp.body)
