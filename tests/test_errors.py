"""render_error: the one place a ProxyError becomes bytes on the client socket."""

from __future__ import annotations

import json
from typing import Any

import httptools
import pytest

from mcpbalancer import errors
from mcpbalancer.errors import (
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    HeadersTooLarge,
    MCPBalancerError,
    MethodNotAllowed,
    NoBackendAvailable,
    PayloadTooLarge,
    ProxyError,
    SessionIdTooLong,
    SessionNotFound,
    render_error,
)
from mcpbalancer.observability.metrics import REJECT_REASONS


class Parsed:
    """Callbacks for httptools.HttpResponseParser, collecting one response."""

    def __init__(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.status = 0
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        # llhttp resets its flags once the message completes: read them here.
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        assert self.parser.get_http_version() == "1.1"

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"duplicate {name!r}"
        return values[0] if values else None


def parse(raw: bytes) -> Parsed:
    parsed = Parsed()
    parsed.parser.feed_data(raw)
    return parsed


def body_json(parsed: Parsed) -> Any:
    return json.loads(parsed.body)


ALL = [
    (BadRequest, 400, b"Bad Request", -32600),
    (Forbidden, 403, b"Forbidden", -32600),
    (SessionNotFound, 404, b"Not Found", -32600),
    (MethodNotAllowed, 405, b"Method Not Allowed", -32600),
    (PayloadTooLarge, 413, b"Content Too Large", -32600),
    (HeadersTooLarge, 431, b"Request Header Fields Too Large", -32600),
    (BadGateway, 502, b"Bad Gateway", -32603),
    (NoBackendAvailable, 503, b"Service Unavailable", -32603),
    (GatewayTimeout, 504, b"Gateway Timeout", -32603),
    # The access refusals (docs/security.md lists their codes).
    (errors.Unauthorized, 401, b"Unauthorized", -32030),
    (errors.InsufficientScope, 403, b"Forbidden", -32031),
    (errors.ToolDenied, 403, b"Forbidden", -32032),
    (errors.RateLimited, 429, b"Too Many Requests", -32033),
    (errors.CallBodyError, 400, b"Bad Request", -32700),
    (errors.CallWithoutName, 400, b"Bad Request", -32602),
]


@pytest.mark.parametrize(("cls", "status", "reason", "code"), ALL)
@pytest.mark.parametrize("keep_alive", [True, False])
def test_every_error_renders_a_complete_response(
    cls: type[ProxyError], status: int, reason: bytes, code: int, keep_alive: bool
) -> None:
    parsed = parse(render_error(cls(), keep_alive=keep_alive))
    assert parsed.complete
    assert (parsed.status, parsed.reason) == (status, reason)
    assert parsed.header(b"content-type") == b"application/json"
    assert parsed.header(b"content-length") == str(len(parsed.body)).encode()
    assert parsed.header(b"cache-control") == b"no-store"
    assert parsed.header(b"connection") == (b"keep-alive" if keep_alive else b"close")
    assert parsed.keep_alive is keep_alive
    assert body_json(parsed) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": code, "message": cls().message},
    }


def test_session_not_found_body_is_exact() -> None:
    raw = render_error(SessionNotFound(), keep_alive=True)
    assert raw.endswith(
        b"\r\n\r\n" + b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Session not found"}}'
    )
    assert parse(raw).body == errors.error_body(SessionNotFound())


def test_custom_message_is_in_the_body() -> None:
    parsed = parse(render_error(BadRequest("Bad Request: invalid Mcp-Session-Id header"), keep_alive=True))
    assert body_json(parsed)["error"]["message"] == "Bad Request: invalid Mcp-Session-Id header"


def test_non_ascii_message_keeps_content_length_in_bytes() -> None:
    raw = render_error(BadGateway("backend “b1” said ✗"), keep_alive=True)
    parsed = parse(raw)
    assert parsed.complete
    assert int(parsed.header(b"content-length") or b"-1") == len(parsed.body)
    assert body_json(parsed)["error"]["message"] == "backend “b1” said ✗"


@pytest.mark.parametrize(("retry_after", "expected"), [(None, b"1"), (30, b"30")])
def test_no_backend_available_has_retry_after(retry_after: int | None, expected: bytes) -> None:
    err = NoBackendAvailable() if retry_after is None else NoBackendAvailable(retry_after=retry_after)
    assert parse(render_error(err, keep_alive=True)).header(b"retry-after") == expected


def test_retry_after_can_be_turned_off() -> None:
    assert (
        parse(render_error(NoBackendAvailable(retry_after=None), keep_alive=True)).header(b"retry-after")
        is None
    )


@pytest.mark.parametrize(
    ("cls", "status", "reason", "code"), [a for a in ALL if a[0] is not NoBackendAvailable]
)
def test_other_errors_have_no_retry_after(
    cls: type[ProxyError], status: int, reason: bytes, code: int
) -> None:
    assert parse(render_error(cls(), keep_alive=True)).header(b"retry-after") is None


@pytest.mark.parametrize("keep_alive", [True, False])
def test_head_only_has_headers_and_no_body(keep_alive: bool) -> None:
    full = render_error(SessionNotFound(), keep_alive=keep_alive)
    head = render_error(SessionNotFound(), keep_alive=keep_alive, head_only=True)
    assert head.endswith(b"\r\n\r\n")
    assert full == head + errors.error_body(SessionNotFound())
    # Content-Length still describes the body a GET would have had (RFC 9110 §9.3.2).
    assert f"Content-Length: {len(errors.error_body(SessionNotFound()))}\r\n".encode() in head


def test_response_is_pipelining_safe() -> None:
    # Two rendered responses back to back parse as exactly two messages.
    raw = render_error(SessionNotFound(), keep_alive=True) + render_error(BadRequest(), keep_alive=False)
    seen: list[tuple[int, bool, bytes]] = []

    class Collect(Parsed):
        def on_message_complete(self) -> None:
            seen.append((self.status, self.keep_alive, self.body))
            self.body = b""

    Collect().parser.feed_data(raw)
    assert [(status, keep_alive) for status, keep_alive, _ in seen] == [(404, True), (400, False)]
    assert [json.loads(body)["error"]["code"] for _, _, body in seen] == [-32600, -32600]


def test_method_not_allowed_names_the_allowed_methods() -> None:
    assert parse(render_error(MethodNotAllowed(), keep_alive=False)).header(b"allow") == (
        b"GET, HEAD, POST, DELETE, OPTIONS"
    )
    assert parse(render_error(BadRequest(), keep_alive=False)).header(b"allow") is None


def _subclasses(cls: type[ProxyError]) -> list[type[ProxyError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def test_client_mistakes_are_4xx_and_only_upstream_faults_are_5xx() -> None:
    # Every error alert reads a 5xx as "the proxy is broken": a client's mistake must never be one.
    classes = [*_subclasses(ProxyError)[1:], errors.denied(429)]
    # A full backend (max_in_flight), an unreachable authorization server and a backend session id
    # too long to seal are faults upstream too.
    upstream = {
        BadGateway,
        SessionIdTooLong,
        NoBackendAvailable,
        GatewayTimeout,
        errors.BackendBusy,
        errors.AuthUnavailable,
    }
    assert {c for c in classes if c.status >= 500} == upstream
    assert all(400 <= c.status < 500 for c in classes if c.status < 500)


def test_every_reject_reason_is_a_known_label() -> None:
    reasons = {c.reject_reason for c in _subclasses(ProxyError)} - {None}
    assert reasons == {
        *("session_id", "header_encoding", "strict", "rule", "host_not_allowed", "origin"),
        *("auth", "scope", "tool_policy", "rate_limit", "backend_busy", "call_body", "no_service"),
    }
    assert reasons <= set(REJECT_REASONS)


def test_a_challenge_is_the_www_authenticate_header() -> None:
    challenge = 'Bearer error="invalid_token", resource_metadata="http://h/.well-known/x"'
    parsed = parse(render_error(errors.Unauthorized(challenge=challenge), keep_alive=True))
    assert parsed.header(b"www-authenticate") == challenge.encode()
    assert parse(render_error(BadRequest(), keep_alive=True)).header(b"www-authenticate") is None


def test_tree() -> None:
    for cls, *_ in ALL:
        assert issubclass(cls, ProxyError)
    assert issubclass(ProxyError, MCPBalancerError)
    assert issubclass(errors.ConfigError, MCPBalancerError)
    assert issubclass(errors.StoreError, MCPBalancerError)
    assert str(SessionNotFound()) == "Session not found"
