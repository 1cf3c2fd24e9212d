"""HTTP/1.1 framing the exchange needs, as pure functions of header lists: the request head sent
to a backend, and one pass over a backend's response head.

Both run once per request, so both read each field once and build the lines they relay in the
same pass, leaving only rare cases (a Connection header naming further fields) to a general pass.
"""

from __future__ import annotations

from mcpbalancer import protocol
from mcpbalancer.dataplane.head import RequestHead
from mcpbalancer.filters.phases import HeadEdits

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """`data` framed as one chunk of a chunked body (a copy; see ClientConnection.write_chunk)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunk_size(data: bytes) -> bytes:
    """The size line of the chunk that carries `data`; CRLF closes the chunk after the data."""
    return b"%x\r\n" % len(data)


def request_head(
    head: RequestHead,
    target: bytes,
    host: bytes,
    peer_ip: bytes,
    edits: HeadEdits | None = None,
) -> bytes:
    """The head to send to a backend at `host` for `target` (the client's, or the backend's own MCP
    endpoint): hop-by-hop fields dropped, X-Forwarded-* added, the body's framing restated; with
    `edits` (the upstream_request filters', filters/phases.py), fields dropped or added, and the
    session id replaced by the one the backend knows the session by."""
    drop = _DROP_REQUEST | head.connection_tokens if head.connection_tokens else _DROP_REQUEST
    lines = [head.method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    if edits is not None:
        if edits.drop:
            drop = drop | edits.drop
        if edits.session_id is not None:
            drop = _DROP_REQUEST_SID if drop is _DROP_REQUEST else drop | _SESSION_ID
            lines += (b"Mcp-Session-Id: ", edits.session_id, b"\r\n")
        if edits.add:
            lines += edits.add
    for lname, name, value in head.headers:
        if lname not in drop:
            lines += (name, b": ", value, b"\r\n")
    forwarded_for = peer_ip if head.forwarded_for is None else head.forwarded_for + b", " + peer_ip
    lines += (b"X-Forwarded-For: ", forwarded_for, b"\r\nX-Forwarded-Proto: http\r\n")
    if head.host is not None:
        lines += (b"X-Forwarded-Host: ", head.host, b"\r\n")
    if head.chunked:
        lines += (b"Transfer-Encoding: ", head.transfer_encoding or b"chunked", b"\r\n\r\n")
    elif head.content_length is not None:  # "0" too: some servers answer 411 without it
        lines += (b"Content-Length: ", head.content_length, b"\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines)


def content_length(value: bytes | None) -> int | None:
    """A Content-Length value as a number; None when absent or not a number."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# Hop-by-hop headers, and the ones this proxy writes itself.
_DROP_REQUEST = protocol.HOP_BY_HOP | {
    protocol.HOST,
    protocol.EXPECT,
    protocol.CONTENT_LENGTH,
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}
_SESSION_ID = frozenset({protocol.SESSION_ID})
_DROP_REQUEST_SID = _DROP_REQUEST | _SESSION_ID  # a session the backend knows by another id: the usual case


# What the response head scan does with a field, by lower-case name; others are relayed as they are.
_RELAY, _SID, _TYPE, _LENGTH, _CODING, _HOP, _CONNECTION, _ACAO = range(8)
_RESPONSE_FIELDS = {name: _HOP for name in protocol.HOP_BY_HOP} | {
    protocol.SESSION_ID: _SID,
    protocol.CONTENT_TYPE: _TYPE,
    protocol.CONTENT_LENGTH: _LENGTH,
    protocol.TRANSFER_ENCODING: _CODING,
    protocol.CONNECTION: _CONNECTION,
    b"access-control-allow-origin": _ACAO,
}
_Scan = tuple[list[bytes] | None, bytes | None, bytes, bytes | None, bytes | None, int, bool]


def scan(headers: list[tuple[bytes, bytes]], session_id: bytes | None = None) -> _Scan:
    """One pass over a response head: (the lines to relay, with a placeholder for the status
    line, or None when a Connection header names fields to drop; Mcp-Session-Id; Content-Type;
    Content-Length; Transfer-Encoding; where the Content-Length line starts, 0 if none; whether
    Access-Control-Allow-Origin is there). Hop-by-hop fields are left out. With `session_id`, an
    Mcp-Session-Id field is relayed (and reported) with that value instead: the client's id for a
    session the backend knows by another."""
    lines: list[bytes] | None = [b""]
    sid = length = coding = None
    content_type = b""
    length_at = 0
    cors = False
    fields = _RESPONSE_FIELDS
    for name, value in headers:
        kind = fields.get(name.lower(), _RELAY)
        if kind == _HOP:
            continue
        if kind == _CODING:
            coding = value if coding is None else coding + b", " + value
            continue
        if kind == _CONNECTION:
            if protocol.connection_tokens(value) - protocol.HOP_BY_HOP:
                lines = None
            continue
        if kind == _SID:
            if session_id is not None:
                value = session_id
            sid = value
        elif kind == _TYPE:
            content_type = value
        elif kind == _LENGTH:
            length = value
            if lines is not None:
                length_at = len(lines)
        elif kind == _ACAO:
            cors = True
        if lines is not None:
            lines += (name, b": ", value, b"\r\n")
    return lines, sid, content_type, length, coding, length_at, cors


def tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Every field name the Connection headers list."""
    named: frozenset[bytes] = frozenset()
    for name, value in headers:
        if name.lower() == protocol.CONNECTION:
            named = named | protocol.connection_tokens(value)
    return named


def filtered(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> list[bytes]:
    """The lines of the fields not in `drop`, after a placeholder for the status line."""
    lines = [b""]
    for name, value in headers:
        if name.lower() not in drop:
            lines += (name, b": ", value, b"\r\n")
    return lines
