"""One exception tree for the proxy, and the one place that maps it to HTTP.

    MCPBalancerError
     ├── ConfigError                  bad YAML: names the file and the key path
     ├── StoreError                   the session store could not answer (Redis down, timeout)
     ├── BackendStartError            a managed backend's process did not start or answer
     ├── ListenError                  a listener (public or admin) could not be bound
 ├── LookupFailed                 a discovery lookup got no answer (DNS down, timeout, SERVFAIL)
     └── ProxyError                   an answer the proxy itself gives a client
          ├── BadRequest              400: malformed framing, a bad request target, ...
          │    ├── InvalidSessionId   400: Mcp-Session-Id is not 1..256 visible ASCII characters
          │    ├── MalformedHeader    400: a routing header's =?base64?...?= value does not decode
          │    ├── InvalidBody        400: strict mode, the body is not one JSON-RPC object
          │    ├── CallBodyError      400: a body read for its tool calls is not JSON (-32700)
          │    │    └── CallWithoutName  400: a tools/call without a tool name (-32602)
          │    └── HeaderMismatch     400: Mcp-Method/Mcp-Name disagree with the body (-32020)
          ├── Unauthorized            401: no valid credential (auth), with WWW-Authenticate
          ├── Forbidden               403
          │    ├── InsufficientScope  403: the credential lacks a required scope (auth)
          │    ├── ToolDenied         403: a `tool_policy` rule denies the tool
          │    └── OriginNotAllowed   403: an Origin the policy refuses (DNS rebinding, CSRF)
          ├── Denied                  a `deny:` routing rule (403 or the rule's 4xx status)
          ├── SessionNotFound         404: unknown or expired session, or its owner is gone
          ├── NoService               404: no `services` entry (nor the default one) matches the request
          ├── MethodNotAllowed        405: CONNECT (with Allow)
          ├── RequestTimeout          408: the request head did not arrive in time
          ├── PayloadTooLarge         413
          ├── MisdirectedRequest      421: a Host not in `allowed_hosts`
          ├── RateLimited             429: a `rate_limits` bucket is empty (+ Retry-After)
          ├── HeadersTooLarge         431
          ├── BadGateway              502: the backend broke the exchange
          │    └── SessionIdTooLong   502: a backend's session id too long to seal (session_ids: sealed)
          ├── NoBackendAvailable      503: nothing can take a new session (+ Retry-After)
          │    ├── BackendBusy        503: the backend's max_in_flight stayed full for queue_timeout
          │    └── AuthUnavailable    503: a token came and no key set was ever fetched to check it
          └── GatewayTimeout          504

Every ProxyError is rendered by `render_error`: a complete HTTP/1.1 response whose body is a
JSON-RPC error object, because MCP clients parse the body of a failed POST as JSON-RPC. The access
refusals have JSON-RPC codes of their own, in the server-error range (docs/security.md lists them):
-32030 unauthorized, -32031 insufficient scope, -32032 tool denied, -32033 rate limited. Status lines
carry the reason phrase as RFC 9110 spells it (`reason_phrase`), and a message that names the status
("Bad Request: ...") names it the same way.

A client's mistake is always a 4xx; a 5xx is only ever an upstream fault (502, 503, 504). Errors
raised while routing or by a filter (filters/phases.py) that refuse a client's request name their
`reject_reason` (a label of metrics.REJECT_REASONS), counted where the exchange answers them;
refusals of the request's framing, found as its head is parsed, are counted where they are found,
and carry none.
"""

from __future__ import annotations

import json
from functools import cache
from http import HTTPStatus
from typing import ClassVar, Final

# The phrases RFC 9110 renamed; Python's HTTPStatus has the new ones only from 3.13 on.
_RFC9110_PHRASES: Final = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}


def reason_phrase(status: int) -> str:
    """The reason phrase of `status` as RFC 9110 §15 spells it ("Bad Request", "Not Found")."""
    return _RFC9110_PHRASES.get(status) or HTTPStatus(status).phrase


class MCPBalancerError(Exception):
    """Base of every error mcpbalancer raises on purpose."""


class ConfigError(MCPBalancerError):
    """The configuration is invalid; the message names the file and the key path."""


class RestartRequired(ConfigError):
    """A reload changes a setting only a restart can apply; nothing of the file was applied."""


class StoreError(MCPBalancerError):
    """The session store failed to answer."""


class BackendStartError(MCPBalancerError):
    """A managed backend's process could not be started, or died or stayed silent before serving."""


class ListenError(MCPBalancerError):
    """A listener could not be bound; the message names which one and its address."""


class LookupFailed(MCPBalancerError):
    """A DNS lookup of a `discover` entry failed; the message says why. The last known backends
    stay (fleet/discovery.py)."""


class ProxyError(MCPBalancerError):
    status: ClassVar[int] = 500
    reason: ClassVar[str] = "Internal Server Error"
    rpc_code: ClassVar[int] = -32603
    default_message: ClassVar[str] = "Internal error"
    reject_reason: ClassVar[str | None] = None
    allow: ClassVar[str | None] = None  # the Allow header of a 405

    def __init__(
        self, message: str | None = None, *, retry_after: int | None = None, challenge: str | None = None
    ) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.challenge = challenge  # the WWW-Authenticate value of a 401 or an insufficient-scope 403


class BadRequest(ProxyError):
    status, reason, rpc_code, default_message = 400, "Bad Request", -32600, "Bad Request"


class InvalidSessionId(BadRequest):
    default_message, reject_reason = "Bad Request: invalid Mcp-Session-Id header", "session_id"


class MalformedHeader(BadRequest):
    reject_reason = "header_encoding"


class InvalidBody(BadRequest):
    reject_reason = "strict"


class CallBodyError(BadRequest):
    """A legacy body read for its calls (tool policy, rate limits) is not JSON-RPC: parse error."""

    rpc_code, reject_reason = -32700, "call_body"


class CallWithoutName(CallBodyError):
    rpc_code = -32602  # invalid params


class HeaderMismatch(BadRequest):
    rpc_code, default_message = -32020, "Header mismatch"  # MCP 2026-07-28 HEADER_MISMATCH
    reject_reason = "strict"


class Forbidden(ProxyError):
    status, reason, rpc_code, default_message = 403, "Forbidden", -32600, "Forbidden"


class Unauthorized(ProxyError):
    status, reason, rpc_code, default_message = 401, "Unauthorized", -32030, "Unauthorized"
    reject_reason = "auth"


class InsufficientScope(Forbidden):
    rpc_code, default_message = -32031, "Forbidden: insufficient scope"
    reject_reason = "scope"


class ToolDenied(Forbidden):
    rpc_code, default_message = -32032, "Forbidden: tool not allowed"
    reject_reason = "tool_policy"


class OriginNotAllowed(Forbidden):
    default_message, reject_reason = "Forbidden: Origin not allowed", "origin"


class Denied(ProxyError):
    """A request refused by a `deny:` routing rule; `denied(status)` makes the class of a status."""

    status, reason, rpc_code, default_message = 403, "Forbidden", -32600, "Denied by a routing rule"
    reject_reason = "rule"


@cache
def denied(status: int) -> type[Denied]:
    """The Denied class answering `status` (a 4xx), made once per status."""
    attrs = {"status": status, "reason": reason_phrase(status)}
    return type(f"Denied{status}", (Denied,), attrs)


class SessionNotFound(ProxyError):
    status, reason, rpc_code, default_message = 404, "Not Found", -32600, "Session not found"


class NoService(ProxyError):
    status, reason, rpc_code, default_message = (
        404,
        "Not Found",
        -32600,
        "Not Found: no service for this request",
    )
    reject_reason = "no_service"


class MethodNotAllowed(ProxyError):
    status, reason, rpc_code, default_message = 405, "Method Not Allowed", -32600, "Method Not Allowed"
    allow = "GET, HEAD, POST, DELETE, OPTIONS"


class RequestTimeout(ProxyError):
    status, reason, rpc_code, default_message = 408, "Request Timeout", -32600, "Request head timeout"


class PayloadTooLarge(ProxyError):
    status, reason, rpc_code, default_message = 413, "Content Too Large", -32600, "Request body too large"


class MisdirectedRequest(ProxyError):
    status, reason, rpc_code = 421, "Misdirected Request", -32600
    default_message = "Misdirected Request: Host not allowed"
    reject_reason = "host_not_allowed"


class RateLimited(ProxyError):
    status, reason, rpc_code, default_message = 429, "Too Many Requests", -32033, "Too Many Requests"
    reject_reason = "rate_limit"


class HeadersTooLarge(ProxyError):
    status, reason = 431, "Request Header Fields Too Large"
    rpc_code, default_message = -32600, "Request Header Fields Too Large"


class BadGateway(ProxyError):
    status, reason, rpc_code, default_message = 502, "Bad Gateway", -32603, "Bad Gateway"


class SessionIdTooLong(BadGateway):
    """An upstream fault: the backend issued a session id the sealed id cannot carry."""

    default_message = "Bad Gateway: the backend's session id is too long to seal"


class NoBackendAvailable(ProxyError):
    status, reason, rpc_code = 503, "Service Unavailable", -32603
    default_message = "No backend available"

    def __init__(self, message: str | None = None, *, retry_after: int | None = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class BackendBusy(NoBackendAvailable):
    default_message = "Backend busy"
    reject_reason = "backend_busy"


class AuthUnavailable(NoBackendAvailable):
    default_message = "Service Unavailable: the authorization server's keys could not be fetched"


class GatewayTimeout(ProxyError):
    status, reason, rpc_code, default_message = 504, "Gateway Timeout", -32603, "Gateway Timeout"


def error_body(err: ProxyError) -> bytes:
    payload = {"jsonrpc": "2.0", "id": None, "error": {"code": err.rpc_code, "message": err.message}}
    return json.dumps(payload, separators=(",", ":")).encode()


def render_error(
    err: ProxyError, *, keep_alive: bool, head_only: bool = False, request_id: bytes | None = None
) -> bytes:
    """The whole HTTP/1.1 response for `err`, ready to write to the client socket; with
    `request_id`, an X-Request-Id header (the id its log line carries)."""
    body = error_body(err)
    lines = [
        f"HTTP/1.1 {err.status} {err.reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    if err.retry_after is not None:
        lines.append(f"Retry-After: {err.retry_after}")
    if err.allow is not None:
        lines.append(f"Allow: {err.allow}")
    if err.challenge is not None:
        lines.append(f"WWW-Authenticate: {err.challenge}")
    if request_id is not None:
        lines.append(f"X-Request-Id: {request_id.decode('latin-1')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
