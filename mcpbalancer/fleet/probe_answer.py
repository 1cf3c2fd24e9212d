"""Whether the answer to a health probe came from an MCP endpoint; pure.

The probe is a 2026-07-28 `server/discover` POST (health.py). What real servers answer it:

- at their MCP endpoint: FastMCP 4.1.2 (mcp 2.3.0), stateful, stateless or with JSON responses,
  `200 application/json` carrying a JSON-RPC result; legacy-only servers (mcp 1.30.0, FastMCP
  2.14.7) `400 application/json` carrying a JSON-RPC error (-32600 "Bad Request: Missing session
  ID" when stateful, "Unsupported protocol version: 2026-07-28" when stateless); a server behind
  authentication `401` (or `403`), whatever its body, since the probe sends no credentials;
- anywhere else: `404` (Starlette's `text/plain` "Not Found" for a path the server does not
  serve, e.g. `/mcp/mcp`), or a redirect (`307` to `/mcp` for `/mcp/`).

So a 2xx must carry a JSON-RPC message (the JSON body, or the first SSE event with data), 401 and
403 are an endpoint that wants credentials, any other 4xx must carry a JSON-RPC error, and 404 and
redirects are never MCP. 5xx answers are the checker's business (failures that count toward `fall`).
"""

from __future__ import annotations

import json
from typing import Final

JSON: Final = "application/json"
SSE: Final = "text/event-stream"
BODY_LIMIT: Final = 1 << 20  # bytes of an answer read at most
_AUTH: Final = frozenset({401, 403})


def problem(status: int, content_type: str, body: bytes, location: str | None = None) -> str | None:
    """None when a 1xx-4xx answer is an MCP endpoint's; else what is wrong with it, as the end of
    the sentence "POST /mcp answered 404, ...".

    `content_type` is the media type alone, lower case (aiohttp's `content_type`); `location` the
    Location header of a redirect."""
    if status in _AUTH:
        return None
    if status == 404:
        return "no MCP endpoint at that path"
    if 300 <= status < 400:
        return f"a redirect to {location}" if location else "a redirect"
    success = 200 <= status < 300
    data = body if content_type == JSON else None
    if content_type == SSE and success:
        data = first_sse_data(body)
    if data is None:
        return f"not MCP ({content_type or 'no Content-Type'})"
    message = _jsonrpc(data)
    wanted = ("result", "error") if success else ("error",)
    if message is None or not any(key in message for key in wanted):
        return f"not MCP (no JSON-RPC {'response' if success else 'error'})"
    return None


def first_sse_data(body: bytes) -> bytes | None:
    """The data of the first complete event in `body` that has any (priming events have none)."""
    data: list[bytes] = []
    for line in body.splitlines(keepends=True):
        if not line.endswith((b"\n", b"\r")):
            return None  # an unfinished last line
        line = line.rstrip(b"\r\n")
        if not line:
            if any(data):
                return b"\n".join(data)
            data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return None


def _jsonrpc(data: bytes) -> dict[str, object] | None:
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if isinstance(message, dict) and message.get("jsonrpc") == "2.0":
        return message
    return None
