"""A request head as the client connection captures it, header by header.

A RequestHead is made empty when a request begins; `on_header` files each field under its
lower-cased name and hands the few that routing and framing need to a capture function, which
stores them on the head. Every attribute has a class-level default, so a new head costs one empty
object rather than a dozen assignments, and only what a request actually carries is written.
"""

from __future__ import annotations

from collections.abc import Callable

from mcpbalancer import protocol


class RequestHead:
    # Set when the head is complete (ClientConnection.on_headers_complete).
    method: bytes = b""
    keep_alive: bool = True
    http11: bool = True
    chunked: bool = False
    has_body: bool = False
    expect_continue: bool = False
    # Captured from the request line and the header fields as they arrive.
    target: bytes = b""
    headers: list[tuple[bytes, bytes, bytes]]  # (lower-case name, name as received, value)
    session_id: bytes | None = None
    protocol_version: bytes | None = None
    host: bytes | None = None
    content_length: bytes | None = None
    forwarded_for: bytes | None = None  # X-Forwarded-For, all fields joined
    connection_tokens: frozenset[bytes] = frozenset()
    mcp_method: bytes | None = None
    transfer_encoding: bytes | None = None  # all fields joined
    mcp_name: bytes | None = None  # captured only when routing reads it
    request_id: bytes | None = None  # X-Request-Id, when it is one the proxy keeps
    # Only for the checks of the complete head.
    hosts: int = 0
    sid_conflict: bool = False
    name_conflict: bool = False
    expect: bool = False  # Expect: 100-continue, whatever the version
    origin: bytes | None = None
    cors_request_headers: bytes | None = None  # Access-Control-Request-Headers of a preflight
    # CORS header lines for the answer to an allowed cross-origin request; set after the checks.
    cors: bytes | None = None

    def __init__(self) -> None:
        self.headers = []


Capture = Callable[[RequestHead, bytes], None]


def _session_id(head: RequestHead, value: bytes) -> None:
    if head.session_id is not None and head.session_id != value:
        head.sid_conflict = True
    head.session_id = value


def _version(head: RequestHead, value: bytes) -> None:
    head.protocol_version = value


def _mcp_method(head: RequestHead, value: bytes) -> None:
    head.mcp_method = value  # for metrics and the access log only


def _mcp_name(head: RequestHead, value: bytes) -> None:
    # Two different names: the proxy and the backend could each believe another one.
    if head.mcp_name is not None and head.mcp_name != value:
        head.name_conflict = True
    head.mcp_name = value


def _request_id(head: RequestHead, value: bytes) -> None:
    if protocol.valid_request_id(value):
        head.request_id = value


def _host(head: RequestHead, value: bytes) -> None:
    head.host = value
    head.hosts += 1


def _origin(head: RequestHead, value: bytes) -> None:
    head.origin = value


def _request_headers(head: RequestHead, value: bytes) -> None:
    head.cors_request_headers = value


def _length(head: RequestHead, value: bytes) -> None:
    head.content_length = value


def _transfer_encoding(head: RequestHead, value: bytes) -> None:
    # httptools accepts only codings ending in chunked; the others ("gzip, chunked") stay on the
    # body it hands over, so they are forwarded as received.
    te = head.transfer_encoding
    head.transfer_encoding = value if te is None else te + b", " + value


def _expect(head: RequestHead, value: bytes) -> None:
    head.expect = value.strip().lower() == b"100-continue"


def _forwarded_for(head: RequestHead, value: bytes) -> None:
    xff = head.forwarded_for
    head.forwarded_for = value if xff is None else xff + b", " + value


def _connection(head: RequestHead, value: bytes) -> None:
    head.connection_tokens = head.connection_tokens | protocol.connection_tokens(value)


CAPTURE: dict[bytes, Capture] = {
    protocol.SESSION_ID: _session_id,
    protocol.PROTOCOL_VERSION: _version,
    protocol.MCP_METHOD: _mcp_method,
    protocol.HOST: _host,
    protocol.REQUEST_ID: _request_id,
    protocol.CONTENT_LENGTH: _length,
    protocol.TRANSFER_ENCODING: _transfer_encoding,
    protocol.EXPECT: _expect,
    b"x-forwarded-for": _forwarded_for,
    protocol.CONNECTION: _connection,
    b"origin": _origin,
    b"access-control-request-headers": _request_headers,
}


def capture(reads_names: bool) -> dict[bytes, Capture]:
    """The fields to capture: Mcp-Name too when routing reads it (rules, affinity, strict)."""
    return {**CAPTURE, protocol.MCP_NAME: _mcp_name} if reads_names else CAPTURE
