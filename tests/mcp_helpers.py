"""Shared helpers for the end-to-end proxy tests: raw MCP over HTTP, wire recording, waiting.

Raw requests use aiohttp (or bare sockets where a header must be sent byte for byte); MCP clients
are the real mcp 2.3.0 `Client`, optionally on an httpx2 client whose hooks record the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import mcp_types
import pytest
import redis.asyncio
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from mcpbalancer.app import Proxy
from tests.fixtures.backends import LEDGER_PATH, BackendProcess

DEADLINE = 10.0
POLL = 0.02
LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"

INIT_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT_BODY: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": LEGACY_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "e2e-test", "version": "0"},
    },
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
}
SESSION_NOT_FOUND = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


# --- stores ------------------------------------------------------------------------------------


async def store_spec(request: pytest.FixtureRequest) -> str:
    """'memory', or the URL of the session's Redis emptied for this test (fixture param helper)."""
    if request.param == "memory":
        return "memory"
    server = request.getfixturevalue("redis_server")
    server.start()  # no-op unless an earlier test left it dead
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    return str(server.url)


async def redis_keys(url: str, match: str = "mcpb:s:*") -> list[str]:
    """The session keys in Redis (other keys, such as a proxy's liveness marker, come and go)."""
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        return [key async for key in client.scan_iter(match)]
    finally:
        await client.aclose()


# --- where an answer came from -----------------------------------------------------------------


def from_backend(headers: Any) -> bool:
    """The answer was written by a backend (uvicorn always sends Server and Date; the proxy's own
    error answers carry neither)."""
    return bool(headers.get("Server") == "uvicorn" and "Date" in headers)


def from_proxy(headers: Any) -> bool:
    return "Server" not in headers and "Date" not in headers and headers.get("Cache-Control") == "no-store"


@dataclass(frozen=True)
class Ledger:
    """A backend's session ledger (tests/servers/fastmcp_server.py, SessionLedger)."""

    issued: frozenset[str]
    ended: frozenset[str]
    seen: dict[str, int]  # requests that carried each live id
    stray_total: int
    stray: list[dict[str, str]]


async def session_ledger(backend: BackendProcess) -> Ledger:
    """What `backend` itself says of the session ids it issued, ended, and was sent astray."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(backend.url + LEDGER_PATH) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    issued, ended = frozenset(data["issued"]), frozenset(data["ended"])
    return Ledger(issued, ended, data["seen"], data["stray_total"], data["stray"])


# --- raw MCP over aiohttp ----------------------------------------------------------------------


def mcp_url(proxy: Proxy) -> str:
    return proxy.url + "/mcp"


def session_headers(session_id: str) -> dict[str, str]:
    return {**INIT_HEADERS, "Mcp-Session-Id": session_id, "MCP-Protocol-Version": LEGACY_VERSION}


def call_body(tool: str, request_id: int = 2, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


def sse_messages(body: str) -> list[dict[str, Any]]:
    """The JSON data of every SSE event in a complete body (events with empty data are skipped)."""
    messages = []
    for event in body.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
        if data:
            messages.append(json.loads(data))
    return messages


async def read_sse_event(response: aiohttp.ClientResponse) -> dict[str, str]:
    """One SSE event (its fields) from an open stream, comments skipped, with a deadline."""
    fields: dict[str, str] = {}
    async with asyncio.timeout(DEADLINE):
        while True:
            raw = await response.content.readline()
            if not raw:
                raise EOFError("SSE stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")


async def open_session(http: aiohttp.ClientSession, url: str) -> str:
    """Raw legacy handshake (initialize + notifications/initialized); returns the session id."""
    async with http.post(url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 200, await resp.text()
        session_id = resp.headers["Mcp-Session-Id"]
        [init] = sse_messages(await resp.text())
        assert init["result"]["protocolVersion"] == LEGACY_VERSION
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=initialized, headers=session_headers(session_id)) as resp:
        assert resp.status == 202, await resp.text()
    return session_id


@dataclass
class Answer:
    status: int
    headers: Any
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        """The text of a tools/call result carried in an SSE answer."""
        [message] = sse_messages(self.body)
        result = message["result"]
        assert not result.get("isError"), result
        return str(result["content"][0]["text"])


_request_ids = itertools.count(1000)


async def call_tool(
    http: aiohttp.ClientSession, url: str, session_id: str, tool: str, **arguments: Any
) -> Answer:
    """tools/call on a session with raw HTTP; the whole answer.

    Every call gets a request id of its own: a backend routes a late answer by id, so an id used
    twice in one session may receive the answer meant for an earlier request.
    """
    body = call_body(tool, next(_request_ids), **arguments)
    async with http.post(url, json=body, headers=session_headers(session_id)) as resp:
        return Answer(resp.status, resp.headers, await resp.text())


MODERN_WHOAMI_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": MODERN_VERSION,
    "Mcp-Method": "tools/call",
    "Mcp-Name": "whoami",
}


async def modern_whoami(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """A raw 2026-07-28 `whoami` call: (200, the instance name), or (status, the body) otherwise."""
    body = call_body("whoami", next(_request_ids))
    body["params"]["_meta"] = MODERN_META
    async with http.post(url, json=body, headers=MODERN_WHOAMI_HEADERS) as resp:
        text = await resp.text()
        if resp.status != 200:
            return resp.status, text
        messages = sse_messages(text) if resp.content_type == "text/event-stream" else [json.loads(text)]
        return resp.status, str(messages[-1]["result"]["content"][0]["text"])


# --- real mcp clients with the wire recorded ---------------------------------------------------


@dataclass
class Wire:
    """What one mcp Client sent and got, recorded by httpx2 event hooks."""

    requests: list[httpx2.Headers] = field(default_factory=list)
    responses: list[tuple[int, httpx2.Headers]] = field(default_factory=list)

    async def on_request(self, request: httpx2.Request) -> None:
        self.requests.append(request.headers)

    async def on_response(self, response: httpx2.Response) -> None:
        self.responses.append((response.status_code, response.headers))

    @property
    def session_id(self) -> str:
        ids = {h["mcp-session-id"] for status, h in self.responses if "mcp-session-id" in h and status < 300}
        [sid] = ids
        return sid


@contextlib.asynccontextmanager
async def recorded_client(
    url: str, *, mode: str = "legacy", **kwargs: Any
) -> AsyncIterator[tuple[Client, Wire]]:
    """An mcp Client on `url` whose HTTP exchanges are recorded."""
    wire = Wire()
    hooks: dict[str, list[Callable[[Any], Awaitable[None]]]] = {
        "request": [wire.on_request],
        "response": [wire.on_response],
    }
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with httpx2.AsyncClient(timeout=timeout, event_hooks=hooks) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, **kwargs) as client:
            yield client, wire


def text_of(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, mcp_types.TextContent)
    return block.text


# --- waiting -------------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE) -> None:
    """Poll `condition` until it holds; fail naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline}s waiting for {what}")
        await asyncio.sleep(POLL)
