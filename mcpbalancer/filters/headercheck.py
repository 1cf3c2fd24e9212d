"""Strict mode (`validate_headers: true`): a 2026-07-28 request's routing headers must agree with its
JSON body, so that routing and deny rules cannot be bypassed by headers that lie.

Pure: `check` takes the raw header values and the whole body, returns the parsed message, and raises
HeaderMismatch (400, JSON-RPC -32020, as MCP servers answer) or InvalidBody (400) for a body that is
not JSON. Only `Mcp-Method` and `Mcp-Name` are checked; `Mcp-Param-*` mirror tool arguments and their
meaning is the tool's to define.
"""

from __future__ import annotations

from typing import Final

from mcpbalancer.errors import HeaderMismatch, InvalidBody
from mcpbalancer.protocol import Era
from mcpbalancer.routing.affinity import parse_json
from mcpbalancer.routing.router import RequestFacts
from mcpbalancer.routing.rules import decoded

# The body field each name-bearing method mirrors into Mcp-Name.
NAME_FIELDS: Final = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "tasks/get": "taskId",
    "tasks/update": "taskId",
    "tasks/cancel": "taskId",
    "tasks/result": "taskId",
}


def check(mcp_method: bytes | None, mcp_name: bytes | None, body: bytes) -> dict[str, object]:
    """The request message, after checking that the headers say what the body says."""
    message = parse_json(body)
    if not isinstance(message, dict):
        raise InvalidBody("Parse error: the body of a 2026-07-28 request must be one JSON-RPC object")
    method = message.get("method")
    if not isinstance(method, str):
        return message  # a response or malformed message: nothing is routed on it
    if decoded(mcp_method, "Mcp-Method") != method:
        raise HeaderMismatch("Mcp-Method header does not match the request body's method")
    field = NAME_FIELDS.get(method)
    if field is not None:
        params = message.get("params")
        value = params.get(field) if isinstance(params, dict) else None
        if decoded(mcp_name, "Mcp-Name") != value:
            raise HeaderMismatch(f"Mcp-Name header does not match the request body's {field!r} parameter")
    return message


class StrictHeaders:
    """The request_body filter of `validate_headers: true`: a 2026-07-28 POST is routed only once
    its whole body has been read and found to agree with its routing headers."""

    reads_names = True  # Mcp-Name must be captured to be compared

    def wants_body(self, facts: RequestFacts) -> bool:
        return facts.era is Era.MODERN and facts.method == b"POST"

    def request_body(self, facts: RequestFacts, body: bytes, message: object) -> object:
        return check(facts.mcp_method, facts.mcp_name, body)
