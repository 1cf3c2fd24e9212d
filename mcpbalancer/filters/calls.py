"""The JSON-RPC calls of a request, for the filters that decide by tool or method.

A 2026-07-28 request names its call in headers (`Mcp-Method`, `Mcp-Name`): nothing is read of its
body. A legacy request names it only in its JSON body, so the filters that need it (a `tool_policy`,
a rate limit on a tool or a method) read that body whole, bounded by `limits.policy_body_bytes`, and
parse it here, once. A batch (a JSON array) is read whole: every call in it is returned, so a
filter sees all of them or refuses the request, never half of it.

The parse is strict where a lenient one could be fooled: a duplicated key (`"name"` twice) is
refused, because the backend's parser might keep the other one than ours, and so is anything that
is not JSON. Pure: bytes in, calls or CallBodyError out.
"""

from __future__ import annotations

import json
from typing import Final

from mcpbalancer.errors import BadRequest, CallBodyError, CallWithoutName
from mcpbalancer.protocol import Era
from mcpbalancer.routing.router import RequestFacts
from mcpbalancer.routing.rules import decoded

TOOLS_CALL: Final = "tools/call"
TOOLS_CALL_BYTES: Final = TOOLS_CALL.encode()
Call = tuple[str, str | None]  # (JSON-RPC method, tool name for tools/call, else None)


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        twice = next(key for key in keys if keys.count(key) > 1)
        raise CallBodyError(f"Bad Request: the key {twice!r} appears twice in one JSON object")
    return obj


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_unique)  # made once: json.loads makes one per call


def may_call_a_tool(body: bytes) -> bool:
    """False when the body cannot hold a tools/call: the name is not in it, spelt out or escaped."""
    return TOOLS_CALL_BYTES in body or b"\\" in body


def calls_of_body(body: bytes) -> tuple[Call, ...]:
    """The calls of a legacy request body: one, or one per message of a batch."""
    if not body:
        return ()  # no body: nothing is called
    try:
        message = _DECODER.decode(body.decode("utf-8"))
    except CallBodyError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CallBodyError("Bad Request: the body is not JSON") from exc
    messages = message if isinstance(message, list) else [message]
    return tuple(call for item in messages if (call := _call(item)) is not None)


def _call(message: object) -> Call | None:
    if not isinstance(message, dict):
        return None  # not a request: the backend answers it
    method = message.get("method")
    if not isinstance(method, str):
        return None  # a response or a malformed message
    if method != TOOLS_CALL:
        return method, None
    params = message.get("params")
    name = params.get("name") if isinstance(params, dict) else None
    if not isinstance(name, str):
        raise CallWithoutName("Bad Request: a tools/call without a tool name")
    return method, name


def calls_of_headers(facts: RequestFacts) -> tuple[Call, ...]:
    """The call a 2026-07-28 request names in its headers; () when it names none."""
    method = decoded(facts.mcp_method, "Mcp-Method")
    if method is None:
        return ()
    if method != TOOLS_CALL:
        return ((method, None),)
    name = decoded(facts.mcp_name, "Mcp-Name")
    if name is None:
        raise BadRequest("Bad Request: a tools/call without an Mcp-Name header")
    return ((method, name),)


def reads_body(facts: RequestFacts) -> bool:
    """The request names its calls only in its body: a legacy POST."""
    return facts.era is Era.LEGACY and facts.method == b"POST"


def known_calls(facts: RequestFacts) -> tuple[Call, ...]:
    """The calls of a request once known: from the body if it was read, else from the headers (a
    2026-07-28 POST), else none (a GET, a DELETE)."""
    if facts.calls is None:
        modern = facts.era is Era.MODERN and facts.method == b"POST"
        facts.calls = calls_of_headers(facts) if modern else ()
    return facts.calls
