"""Every refusal is counted: each way the proxy answers a request by itself instead of forwarding it
increments `mcpbalancer_rejected_requests_total` under its own reason (and no other), is logged,
and reaches no backend. The cases enumerate every label of REJECT_REASONS, so a new reason cannot
come without a test here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.observability.metrics import REJECT_REASONS
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, request, rpc_error
from tests.fixtures.stub import StubFactory, minting

MODERN = [("MCP-Protocol-Version", "2026-07-28"), ("Content-Type", "application/json")]
CALL_DROP = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"drop_db"}}'
LIST = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
CONFIG: dict[str, Any] = {
    "limits": {"header_bytes": 2048, "body_bytes": 1024, "head_timeout": 0.5},
    "routes": [{"match": {"method": "tools/call", "name": "drop_db"}, "deny": 403}],
    "validate_headers": True,
}


def post(headers: list[tuple[str, str]], body: bytes = LIST) -> bytes:
    return request("POST", "/mcp", headers, body)


# (id, what the client sends, the proxy's status, the reason counted)
CASES = [
    ("framing", post([("Transfer-Encoding", "chunked")], b"0\r\n\r\n"), 400, "framing"),
    ("version", request("GET", "/mcp", version="2.0"), 400, "version"),
    ("host", request("GET", "/mcp", host=None), 400, "host"),
    ("host-not-allowed", request("GET", "/mcp", host="evil.example"), 421, "host_not_allowed"),
    ("method", request("CONNECT", "example.com:443", host="example.com:443"), 405, "method"),
    ("session-id-conflict", post([("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")]), 400, "session_id"),
    ("session-id-malformed", post([("Mcp-Session-Id", "bad id")]), 400, "session_id"),
    ("session-id-malformed-modern", post([("Mcp-Session-Id", "bad id"), *MODERN]), 400, "session_id"),
    ("session-id-too-long", post([("Mcp-Session-Id", "x" * 257), *MODERN]), 400, "session_id"),
    ("session-id-obs-text", post([("Mcp-Session-Id", "caf\xe9")]), 400, "session_id"),
    ("mcp-name-conflict", post([*MODERN, ("Mcp-Name", "a"), ("Mcp-Name", "b")]), 400, "mcp_name"),
    ("header-limit", request("GET", "/mcp", [("X-Big", "a" * 3000)]), 431, "header_limit"),
    ("body-limit", post([], b"z" * 1025), 413, "body_limit"),
    ("origin", request("GET", "/mcp", [("Origin", "http://evil.example")]), 403, "origin"),
    ("head-timeout", b"GET /mcp HTTP/1.1\r\nHost: localhost\r\n", 408, "head_timeout"),
    (
        "deny-rule",
        post([*MODERN, ("Mcp-Method", "tools/call"), ("Mcp-Name", "drop_db")], CALL_DROP),
        403,
        "rule",
    ),
    (
        "header-encoding",
        post([*MODERN, ("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?%%%?=")], CALL_DROP),
        400,
        "header_encoding",
    ),
    ("strict-mismatch", post([*MODERN, ("Mcp-Method", "ping")]), 400, "strict"),
    ("strict-not-json", post([*MODERN, ("Mcp-Method", "tools/list")], b"{"), 400, "strict"),
]
OWN_TESTS = {"connections", "credential"}  # need more than one request: tested below
# Need more than one request too, tested with their features: test_ratelimit.py (rate_limit),
# test_concurrency.py (backend_busy); no_service needs `services` (test_services.py).
ACCESS_OWN_TESTS = {"rate_limit", "backend_busy", "no_service"}

KEY, NARROW_KEY = "refusals-key-0001", "refusals-key-0002"
ACCESS_CONFIG: dict[str, Any] = {
    "auth": {
        "api_keys": [
            {"name": "ci", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "scopes": ["mcp"]},
            {"name": "narrow", "sha256": hashlib.sha256(NARROW_KEY.encode()).hexdigest()},
        ],
        "required_scopes": ["mcp"],
    },
    "tool_policy": [{"deny": ["drop_*"]}, {"allow": ["*"]}],
}
LEGACY = [("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}")]
ACCESS_CASES = [
    ("auth-missing", post([("Content-Type", "application/json")]), 401, "auth"),
    ("auth-invalid", post([("Authorization", "Bearer nope")]), 401, "auth"),
    ("scope", post([("Authorization", f"Bearer {NARROW_KEY}")]), 403, "scope"),
    ("tool-policy-legacy", post(LEGACY, CALL_DROP), 403, "tool_policy"),
    (
        "tool-policy-modern",
        post([*MODERN, *LEGACY[1:], ("Mcp-Method", "tools/call"), ("Mcp-Name", "drop_db")], CALL_DROP),
        403,
        "tool_policy",
    ),
    ("call-body", post(LEGACY, b'{"method": "tools/call"'), 400, "call_body"),
    ("policy-body-limit", post(LEGACY, b" " * 2 * 1024 * 1024), 413, "body_limit"),
]


def counts(proxy: Proxy, reasons: Sequence[str] = REJECT_REASONS) -> dict[str, float]:
    registry = proxy.metrics.registry
    name = "mcpbalancer_rejected_requests_total"
    return {r: registry.get_sample_value(name, {"reason": r}) or 0.0 for r in reasons}


def only(reason: str) -> dict[str, float]:
    return {r: float(r == reason) for r in {*REJECT_REASONS, reason}}


def test_the_cases_cover_every_reason() -> None:
    covered = {case[3] for case in CASES + ACCESS_CASES} | OWN_TESTS | ACCESS_OWN_TESTS
    assert covered == set(REJECT_REASONS)


ALL_CASES = [(*c[1:], CONFIG) for c in CASES] + [(*c[1:], ACCESS_CONFIG) for c in ACCESS_CASES]


@pytest.mark.parametrize(
    ("data", "status", "reason", "config"), ALL_CASES, ids=[c[0] for c in CASES + ACCESS_CASES]
)
async def test_each_refusal_is_counted_under_its_reason_and_reaches_no_backend(
    data: bytes,
    status: int,
    reason: str,
    config: dict[str, Any],
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], **config)
    client = await open_client(proxy)
    with caplog.at_level(logging.INFO, logger="mcpbalancer"):
        client.send(data)
        resp = await client.response()
    assert resp.status == status
    assert 400 <= resp.status < 500  # a client's mistake is never a 5xx
    assert isinstance(rpc_error(resp)["message"], str)
    assert counts(proxy, [*REJECT_REASONS, reason]) == only(reason)
    assert [r for r in caplog.records if r.name.startswith("mcpbalancer")], "no log line"
    assert stub.requests == []


async def test_a_connection_over_the_limit_is_counted(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"connections": 1})
    first = await open_client(proxy)
    first.send(request("GET", "/a"))
    assert (await first.response()).status == 200  # the proxy holds this connection now
    second = await open_client(proxy)
    assert (await second.response()).status == 503  # the proxy's capacity, not the client's fault
    assert counts(proxy) == only("connections")


async def test_a_session_used_with_another_credential_is_counted(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub(minting("s1"))
    proxy = await make_proxy([stub], bind_sessions="Authorization")
    client = await open_client(proxy)
    client.send(post([("Authorization", "Bearer alice")], b'{"jsonrpc":"2.0","id":1,"method":"initialize"}'))
    assert (await client.response()).header("mcp-session-id") == b"s1"
    client.send(post([("Authorization", "Bearer mallory"), ("Mcp-Session-Id", "s1")]))
    assert (await client.response()).status == 404
    assert counts(proxy) == only("credential")
    assert len(stub.requests) == 1
