"""Active health checks and passive ejection.

The checker knows backends by name only and reports through one callback, `set_status(name, up)`
(the Traefik shape): it never touches routing, sessions or connections. Marking a backend down only
keeps NEW sessions away from it; sessions it owns stay routed to it (a slow or paused backend keeps
its sessions).

Per backend a `HealthState` counts results: `fall` failures in a row mark it down, `rise` successes
in a row bring it back. A refused or reset connection (from a probe or from the data plane) is not a
symptom of slowness: it marks the backend down at once. Timeouts and 5xx answers are failures that
count toward `fall`.

The default probe is a stateless 2026-07-28 `server/discover` POST to the backend's MCP endpoint: a
stock FastMCP server answers 200 without creating a session (a `GET` of the MCP path without a session
id would answer 400 but create and discard a server session on every probe). The answer must be an
MCP endpoint's (probe_answer.py: a legacy-only server's JSON-RPC 400 is one); a 404, a redirect or
an answer that is not MCP means the URL names no MCP endpoint, which is not slowness either: down at
once, like a refused connection. Every failure has a reason (`reasons`, shown by the admin API and
logged when the state changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import aiohttp

from mcpbalancer.config import HealthConfig
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.probe_answer import BODY_LIMIT, SSE, first_sse_data, problem
from mcpbalancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

# Probe results (the `result` label of mcpbalancer_health_checks_total).
OK, FAIL, TIMEOUT, REFUSED = "ok", "fail", "timeout", "refused"
NOT_MCP = "not_mcp"  # a 404, a redirect, or an answer that is not an MCP endpoint's
EJECTING = frozenset({REFUSED, NOT_MCP})  # no slowness explains these: down at once
# Passive failure kinds reported by the data plane.
HARD_FAILURES = frozenset({"refused", "reset"})  # the process is gone: down at once
# The process may be slow, or (tls) answers with a certificate we refuse: counts toward `fall`.
SOFT_FAILURES = frozenset({"timeout", "5xx", "tls"})

OFF_RECHECK = 1.0
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
    "User-Agent": "mcpbalancer-health",
}


class ProbeResult(NamedTuple):
    result: str  # OK, FAIL, TIMEOUT, REFUSED or NOT_MCP
    reason: str | None = None  # why it failed, for the log and the admin API


SetStatus = Callable[[str, bool], None]
Probe = Callable[[Backend], Awaitable[ProbeResult | str]]  # a bare result string has no reason


class HealthState:
    """fall/rise counting for one backend; pure."""

    def __init__(self, fall: int, rise: int, *, up: bool = True) -> None:
        self.fall = fall
        self.rise = rise
        self.up = up
        self._fails = 0
        self._oks = 0

    def record(self, ok: bool) -> bool:
        """Count one result; True when it changed `up`."""
        if ok:
            self._fails = 0
            self._oks += 1
            if not self.up and self._oks >= self.rise:
                return self._set(True)
        else:
            self._oks = 0
            self._fails += 1
            if self.up and self._fails >= self.fall:
                return self._set(False)
        return False

    def eject(self) -> bool:
        """The backend is gone (refused, reset): down at once. True when it changed `up`."""
        self._oks = 0
        self._fails = max(self._fails, self.fall)
        return self._set(False) if self.up else False

    def _set(self, up: bool) -> bool:
        self.up = up
        self._fails = self._oks = 0
        return True


class HealthChecker:
    """Keeps a HealthState per backend name and reports changes through `set_status`."""

    def __init__(
        self,
        config: HealthConfig,
        set_status: SetStatus,
        probe: Probe,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._set_status = set_status
        # Told of every refused or reset connection: the process is gone (fleet/generations.py).
        self._on_gone = on_gone
        self._probe = probe
        self._metrics = metrics
        self._clock = clock
        self._states: dict[str, HealthState] = {}
        self.last_check: dict[str, float] = {}  # wall-clock time of the last probe result
        # Why a backend is down, or why its last check failed; no entry when it is healthy.
        self.reasons: dict[str, str] = {}

    def reconfigure(self, config: HealthConfig) -> None:
        self.config = config
        for state in self._states.values():
            state.fall, state.rise = config.fall, config.rise

    def _state(self, name: str) -> HealthState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = HealthState(self.config.fall, self.config.rise)
        return state

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of backends no longer configured."""
        names = set(keep)
        for name in [n for n in self._states if n not in names]:
            del self._states[name]
            self.last_check.pop(name, None)
            self.reasons.pop(name, None)

    def observe(self, name: str, result: str, reason: str | None = None) -> None:
        """One active probe result, and why it failed."""
        self.last_check[name] = self._clock()
        if self._metrics is not None:
            self._metrics.health_check(name, result)
        state = self._state(name)
        if result == REFUSED and self._on_gone is not None:
            self._on_gone(name)
        changed = state.eject() if result in EJECTING else state.record(result == OK)
        why = f"health check: {result}" if result == OK or reason is None else reason
        self._note(name, state.up, None if result == OK else why)
        if changed:
            self._report(name, state.up, why)

    def passive(self, name: str, kind: str) -> None:
        """A failure the data plane saw on real traffic: `refused`, `reset`, `timeout` or `5xx`."""
        state = self._state(name)
        if kind in HARD_FAILURES and self._on_gone is not None:
            self._on_gone(name)
        changed = state.eject() if kind in HARD_FAILURES else state.record(False)
        self._note(name, state.up, f"passive: {kind}")
        if changed:
            self._report(name, state.up, f"passive: {kind}")

    # Passive health is the fault filter of filters/phases.py: a refused connection and a failure
    # after the connection count alike.
    fail_to_connect = passive
    error_while_proxy = passive

    def _note(self, name: str, up: bool, failure: str | None) -> None:
        """Keep the reason of the last failure until a success finds the backend up."""
        if failure is not None:
            self.reasons[name] = failure
        elif up:
            self.reasons.pop(name, None)

    def _report(self, name: str, up: bool, why: str) -> None:
        log.log(
            logging.INFO if up else logging.WARNING,
            "backend %s is %s (%s)",
            name,
            "up" if up else "down",
            why,
        )
        self._set_status(name, up)

    async def check_once(self, backends: Iterable[Backend]) -> None:
        """Probe every backend concurrently, each bounded by the timeout."""
        targets = list(backends)
        results = await asyncio.gather(*(self._bounded(b) for b in targets))
        for backend, (result, reason) in zip(targets, results, strict=True):
            self.observe(backend.name, result, reason)

    async def _bounded(self, backend: Backend) -> ProbeResult:
        try:
            async with asyncio.timeout(self.config.timeout):
                result = await self._probe(backend)
        except TimeoutError:
            return ProbeResult(TIMEOUT, f"probe: no answer within {self.config.timeout:g} s")
        return result if isinstance(result, ProbeResult) else ProbeResult(result)

    async def run(self, backends: Callable[[], Iterable[Backend]]) -> None:
        """Probe forever, one round per `interval`; cancel to stop. `interval` 0: checks are off
        (looked at again every second, so a reload can turn them on)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.config.interval <= 0:
                await asyncio.sleep(OFF_RECHECK)
                continue
            started = loop.time()
            try:
                await self.check_once(backends())
            except Exception:  # a bug in a probe must not end health checking
                log.exception("health check round failed")
            await asyncio.sleep(max(self.config.interval - (loop.time() - started), 0.0))


class HttpProbe:
    """The default probe: a `server/discover` POST on one shared aiohttp ClientSession, to
    `health.path` as a client's request for it would go (by default: the backend's MCP endpoint)."""

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

    def url(self, backend: Backend) -> str:
        scheme = "https" if backend.tls else "http"
        path = backend.target(self._config().path.encode("ascii")).decode("ascii")
        return f"{scheme}://{backend.host_header.decode('ascii')}{path}"

    async def __call__(self, backend: Backend) -> ProbeResult:
        url = self.url(backend)
        try:
            async with self._http().post(
                url,
                data=DISCOVER_BODY,
                headers=DISCOVER_HEADERS,
                # The backend's own context, the one its traffic uses (aiohttp's default otherwise).
                ssl=backend.ssl_context or True,
                server_hostname=backend.server_name,
                allow_redirects=False,
            ) as resp:
                return await _judge(resp, url)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                return ProbeResult(REFUSED, f"probe: connection refused by {url}")
            return ProbeResult(FAIL, f"probe: cannot connect to {url}: {exc.os_error}")
        except (aiohttp.ServerDisconnectedError, ConnectionResetError):
            return ProbeResult(REFUSED, f"probe: connection closed by {url} without an answer")
        except (aiohttp.ClientError, OSError) as exc:
            return ProbeResult(FAIL, f"probe: {type(exc).__name__} from {url}: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None


async def _judge(resp: aiohttp.ClientResponse, url: str) -> ProbeResult:
    status = resp.status
    if status >= 500:
        return ProbeResult(FAIL, f"probe: HTTP {status} from {url}")
    body = b""
    if status != 404 and not 300 <= status < 400:
        body = await _read(resp)
    wrong = problem(status, resp.content_type, body, url, resp.headers.get("Location"))
    return ProbeResult(OK) if wrong is None else ProbeResult(NOT_MCP, f"probe: {wrong}")


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    """The body up to BODY_LIMIT; of an event stream, up to its first event with data."""
    stream = resp.content_type == SSE
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > BODY_LIMIT or (stream and first_sse_data(bytes(body)) is not None):
            break
    return bytes(body[:BODY_LIMIT])
