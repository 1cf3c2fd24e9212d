"""Pure MCP and HTTP facts: header names, the era test, session-id validation, hop-by-hop headers.

No I/O here. Header names are lower-case bytes because the data plane sees raw bytes from httptools
and lower-cases each name once.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re

SESSION_ID = b"mcp-session-id"
PROTOCOL_VERSION = b"mcp-protocol-version"
MCP_METHOD = b"mcp-method"
MCP_NAME = b"mcp-name"
LAST_EVENT_ID = b"last-event-id"
CONTENT_TYPE = b"content-type"
CONTENT_LENGTH = b"content-length"
TRANSFER_ENCODING = b"transfer-encoding"
CONNECTION = b"connection"
EXPECT = b"expect"
HOST = b"host"
REQUEST_ID = b"x-request-id"

EVENT_STREAM = b"text/event-stream"

# Revisions that use sessions. A request whose MCP-Protocol-Version is absent or one of these is legacy.
LEGACY_VERSIONS = frozenset({b"2024-11-05", b"2025-03-26", b"2025-06-18", b"2025-11-25"})
MODERN_VERSION = b"2026-07-28"

MAX_SESSION_ID_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
_VISIBLE = bytes(range(0x21, 0x7F))  # the characters of session and request ids

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",  # RFC 7540 §3.2.1: an h2c upgrade's, connection-specific by definition
    }
)


class Era(enum.StrEnum):
    LEGACY = "legacy"
    MODERN = "modern"


def era_of(session_id: bytes | None, protocol_version: bytes | None) -> Era:
    """The era of a request from its headers alone: a session id means legacy (a 2026-07-28 client
    never sends one, so the request is routed by its session whatever its version says); else an
    MCP-Protocol-Version that is not a legacy revision means modern; else legacy."""
    if session_id is not None or protocol_version is None or protocol_version.strip() in LEGACY_VERSIONS:
        return Era.LEGACY
    return Era.MODERN


def valid_session_id(value: bytes) -> bool:
    """Session ids are 1..256 visible ASCII characters (0x21-0x7E)."""
    # Deleting every visible character leaves b"" for a valid id: a fraction of the cost of a
    # regex match ([\x21-\x7e]{1,256}\Z, which it replaces), paid once per request.
    return 0 < len(value) <= MAX_SESSION_ID_BYTES and not value.translate(None, _VISIBLE)


def valid_request_id(value: bytes) -> bool:
    """An X-Request-Id the proxy keeps (logs, and repeats on its own error answers): 1..128 visible
    ASCII characters. Another value is forwarded as it came but not used."""
    return 0 < len(value) <= MAX_REQUEST_ID_BYTES and not value.translate(None, _VISIBLE)


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased header names a Connection header declares hop-by-hop."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


_ENCODED_RE = re.compile(rb"=\?base64\?(.*)\?=\Z", re.IGNORECASE)


class HeaderEncodingError(ValueError):
    """A header value in the =?base64?...?= form that does not decode."""


def decode_header_value(value: bytes) -> str:
    """Decode a routing header value: plain ASCII as is, `=?base64?<b64>?=` as base64 UTF-8."""
    match = _ENCODED_RE.match(value.strip())
    if match is None:
        return value.decode("latin-1").strip()
    try:
        return base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise HeaderEncodingError(f"malformed base64 header value: {value[:64]!r}") from exc
