"""Whether each backend keeps sessions: learned before a request that needs the answer lands.

A legacy client whose `initialize` reached a stateless server gets no session id, and its later
requests (each carrying `MCP-Protocol-Version`, none a session id) are refused by a stateful server
(400 "Missing session ID"). The router sends them only to backends known to serve them without a
session, so the proxy must know each backend's kind before the first such request lands:

- from the backends' answers to traffic (router.py): a 2xx to a session-less `initialize` with
  `Mcp-Session-Id` is a stateful server, one without is a stateless one;
- from a probe of its own, sent when a session-less request is to be placed, several backends could
  take it, and some are of a kind not known yet (at the first such request, and after a backend
  came back up or moved): a session-less legacy `ping` with `MCP-Protocol-Version` to the MCP
  endpoint, which creates no session. The request waits for it while no stateless backend is
  known. A stateless server answers it 2xx; a stateful one 400 with a JSON-RPC error about the
  session (Python FastMCP: "Missing session ID", with an unusable `Mcp-Session-Id`; TypeScript
  FastMCP: "No valid session ID provided"). Any other answer, or none, leaves the kind unknown,
  and it is asked again after `RETRY` seconds.

A `session_mode` in the file wins over both (Backend.declared_mode): nothing is learned then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

import aiohttp

from mcpbalancer.config import HealthConfig
from mcpbalancer.fleet.backends import STATEFUL, STATELESS, UNKNOWN, Backend

log = logging.getLogger(__name__)

RETRY: Final = 1.0  # seconds before a backend whose kind is still unknown is asked again
LEGACY_VERSION: Final = "2025-06-18"  # the first revision with the header; every current SDK has it
PING_BODY: Final = json.dumps({"jsonrpc": "2.0", "id": "mcpbalancer-mode", "method": "ping"}).encode()
PING_HEADERS: Final = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": LEGACY_VERSION,
}
USER_AGENT: Final = "mcpbalancer-session-mode"
_BODY_READ: Final = 4096

ModeProbe = Callable[[Backend], Awaitable[str | None]]  # STATEFUL, STATELESS, or None: no telling


def mode_of_answer(status: int, body: bytes, session_id: str | None) -> str | None:
    """What a backend's answer to the session-less `ping` says of it; pure."""
    if 200 <= status < 300:
        return STATELESS
    if status == 400 and (session_id is not None or b"session" in body.lower()):
        return STATEFUL
    return None


class PingProbe:
    """The `ping` of the module docstring, on one aiohttp ClientSession, with the backend's health
    headers (a token for a guarded server) and within its health timeout."""

    def __init__(self, health: Callable[[], HealthConfig]) -> None:
        self._health = health
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._session

    async def __call__(self, backend: Backend) -> str | None:
        settings = backend.health or self._health()
        scheme = "https" if backend.tls else "http"
        target = backend.target(backend.mcp_path).decode("ascii")
        url = f"{scheme}://{backend.host_header.decode('ascii')}{target}"
        headers = {"User-Agent": USER_AGENT, **settings.headers, **PING_HEADERS}
        try:
            async with asyncio.timeout(settings.timeout):
                async with self._http().post(
                    url,
                    data=PING_BODY,
                    headers=headers,
                    ssl=backend.ssl_context or True,
                    server_hostname=backend.server_name,
                    allow_redirects=False,
                ) as resp:
                    body = b"" if resp.status != 400 else await resp.content.read(_BODY_READ)
                    return mode_of_answer(resp.status, body, resp.headers.get("Mcp-Session-Id"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("backend %s: session mode probe failed: %r", backend.name, exc)
            return None

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None


class SessionModes:
    """Learns the kind of the backends whose `session_mode` is unknown, one probe at a time each."""

    def __init__(
        self, probe: ModeProbe, *, clock: Callable[[], float] = time.monotonic, retry: float = RETRY
    ) -> None:
        self._probe = probe
        self._clock = clock
        self._retry = retry
        self._pending: dict[Backend, asyncio.Task[None]] = {}
        self._tried: dict[str, float] = {}  # clock time of the last probe that told nothing

    def learn(self, backends: Iterable[Backend]) -> list[asyncio.Task[None]]:
        """Probe those of `backends` whose kind is unknown, unless a probe is running or one told
        nothing less than `retry` seconds ago. The probes running for them (each ends within its
        backend's health timeout and raises nothing); to wait for, never to cancel: they are
        shared by every request that waits."""
        running = []
        now = self._clock()
        for backend in backends:
            if backend.session_mode != UNKNOWN:
                continue
            task = self._pending.get(backend)
            if task is None and now - self._tried.get(backend.name, -self._retry) >= self._retry:
                task = self._pending[backend] = asyncio.get_running_loop().create_task(self._ask(backend))
            if task is not None:
                running.append(task)
        return running

    def learning(self, backend: Backend) -> bool:
        return backend in self._pending

    def forget(self, backend: Backend) -> None:
        """Asked anew at its next use (a backend back up, or at another address)."""
        self._tried.pop(backend.name, None)

    async def _ask(self, backend: Backend) -> None:
        try:
            address = backend.host_header
            mode = await self._probe(backend)
            if backend.host_header != address or backend.session_mode != UNKNOWN:
                return  # moved meanwhile, or the traffic told first
            if mode is None:
                self._tried[backend.name] = self._clock()
                return
            self._tried.pop(backend.name, None)
            backend.learned_mode(mode)
            log.info("backend %s is %s (session mode probe)", backend.name, mode)
        finally:
            self._pending.pop(backend, None)

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
