"""The HTTP requests of the active health checks (health.py decides what their results mean).

`probe: discover` POSTs a 2026-07-28 `server/discover` to the path, as a client's request for it
would be forwarded, and the answer must be an MCP endpoint's (probe_answer.py). `probe: http` sends
`method` (GET or HEAD) and wants a status of `expect_status`. Both send the settings' `headers`, and
neither creates a session on the backend. A request that gets no answer says why in one word
(`error`: timeout, refused, reset, tls, unreachable, invalid) and in a sentence (`reason`).
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Callable

import aiohttp

from mcpbalancer.config import HealthConfig
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.health import FAIL, NOT_MCP, OK, REFUSED, ProbeResult
from mcpbalancer.fleet.probe_answer import BODY_LIMIT, SSE, first_sse_data, problem

MODERN_VERSION = "2026-07-28"
DISCOVER_BODY = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "server/discover",
        "params": {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        },
    },
    separators=(",", ":"),
).encode()
DISCOVER_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": MODERN_VERSION,
    "Mcp-Method": "server/discover",
}
USER_AGENT = "mcpbalancer-health"


class HttpProbe:
    """The probes, on one shared aiohttp ClientSession, to `path` as a client's request for it
    would go (by default: the backend's MCP endpoint). `probe: discover` POSTs `server/discover`
    and wants an MCP endpoint's answer; `probe: http` sends `method` and wants a status of
    `expect_status`. Each backend is probed with its own settings, else with `config()`."""

    def __init__(self, config: Callable[[], HealthConfig]) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Timeouts are applied by the checker; no keep-alive, so a probe also proves `accept`.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._session

    def url(self, backend: Backend, path: str | None = None) -> str:
        scheme = "https" if backend.tls else "http"
        target = self.target(backend, path)
        return f"{scheme}://{backend.host_header.decode('ascii')}{target}"

    def target(self, backend: Backend, path: str | None = None) -> str:
        path = path if path is not None else (backend.health or self._config()).path
        return backend.target(path.encode("ascii")).decode("ascii")

    async def __call__(self, backend: Backend) -> ProbeResult:
        config = backend.health or self._config()
        http = config.probe == "http"
        method = config.method if http else "POST"
        request = f"{method} {self.target(backend, config.path)}"
        headers = {"User-Agent": USER_AGENT, **config.headers}
        if not http:
            headers.update(DISCOVER_HEADERS)
        try:
            async with self._http().request(
                method,
                self.url(backend, config.path),
                data=None if http else DISCOVER_BODY,
                headers=headers,
                # The backend's own context, the one its traffic uses (aiohttp's default otherwise).
                ssl=backend.ssl_context or True,
                server_hostname=backend.server_name,
                allow_redirects=False,
            ) as resp:
                if http:
                    return _expected(resp.status, config.expect_status, request)
                return await _judge(resp, request)
        except Exception as exc:
            failed = unanswered(exc)
            if failed is None:
                raise
            return failed

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None


def unanswered(exc: BaseException) -> ProbeResult | None:
    """A request that got no answer, as a probe result: what went wrong, in a word and a
    sentence; None for an exception that is not about the connection."""
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return ProbeResult(FAIL, f"TLS failed: {exc}", error="tls")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return ProbeResult(REFUSED, "connection refused", error="refused")
        return ProbeResult(FAIL, f"cannot connect: {exc.os_error}", error="unreachable")
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return ProbeResult(REFUSED, "connection closed without an answer", error="reset")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return ProbeResult(FAIL, f"an answer that is not HTTP: {exc}", error="invalid")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ProbeResult(FAIL, f"{type(exc).__name__}: {exc}", error="unreachable")
    return None


def _expected(status: int, expected: tuple[int, ...], request: str) -> ProbeResult:
    if status in expected:
        return ProbeResult(OK, status=status)
    listed = ", ".join(map(str, expected))
    return ProbeResult(FAIL, f"{request} answered {status}, expected [{listed}]", status=status)


async def _judge(resp: aiohttp.ClientResponse, request: str) -> ProbeResult:
    status = resp.status
    if status >= 500:
        return ProbeResult(FAIL, f"{request} answered {status}", status=status)
    body = b""
    if status != 404 and not 300 <= status < 400:
        body = await _read(resp)
    wrong = problem(status, resp.content_type, body, resp.headers.get("Location"))
    if wrong is None:
        return ProbeResult(OK, status=status)
    return ProbeResult(NOT_MCP, f"{request} answered {status}, {wrong}", status=status)


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    """The body up to BODY_LIMIT; of an event stream, up to its first event with data."""
    stream = resp.content_type == SSE
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > BODY_LIMIT or (stream and first_sse_data(bytes(body)) is not None):
            break
    return bytes(body[:BODY_LIMIT])
