"""Active health checks and passive ejection.

The checker knows backends by name only and reports through one callback, `set_status(name, up)`
(the Traefik shape): it never touches routing, sessions or connections. Marking a backend down only
keeps NEW sessions away from it; sessions it owns stay routed to it (a slow or paused backend keeps
its sessions).

Per backend a `HealthState` counts results: `fall` failures in a row mark it down, `rise` successes
in a row bring it back. A refused or reset connection (from a probe or from the data plane) is not a
symptom of slowness: it marks the backend down at once. Timeouts and 5xx answers are failures that
count toward `fall`.

The default probe is a stateless 2026-07-28 `server/discover` POST to the MCP path: a stock FastMCP
server answers 200 without creating a session (a `GET` of the MCP path without a session id would
answer 400 but create and discard a server session on every probe). Any answer below 500 proves the
process is serving HTTP; a legacy-only server answers the modern request with a 4xx, which counts as
up too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

import aiohttp

from mcpbalancer.backends import Backend
from mcpbalancer.config import HealthConfig
from mcpbalancer.metrics import Metrics

log = logging.getLogger(__name__)

# Probe results (the `result` label of mcpbalancer_health_checks_total).
OK, FAIL, TIMEOUT, REFUSED = "ok", "fail", "timeout", "refused"
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

SetStatus = Callable[[str, bool], None]
Probe = Callable[[Backend], Awaitable[str]]


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
    ) -> None:
        self.config = config
        self._set_status = set_status
        self._probe = probe
        self._metrics = metrics
        self._clock = clock
        self._states: dict[str, HealthState] = {}
        self.last_check: dict[str, float] = {}  # wall-clock time of the last probe result

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

    def observe(self, name: str, result: str) -> None:
        """One active probe result."""
        self.last_check[name] = self._clock()
        if self._metrics is not None:
            self._metrics.health_check(name, result)
        state = self._state(name)
        changed = state.eject() if result == REFUSED else state.record(result == OK)
        if changed:
            self._report(name, state.up, f"health check: {result}")

    def passive(self, name: str, kind: str) -> None:
        """A failure the data plane saw on real traffic: `refused`, `reset`, `timeout` or `5xx`."""
        state = self._state(name)
        changed = state.eject() if kind in HARD_FAILURES else state.record(False)
        if changed:
            self._report(name, state.up, f"passive: {kind}")

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
        for backend, result in zip(targets, results, strict=True):
            self.observe(backend.name, result)

    async def _bounded(self, backend: Backend) -> str:
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self._probe(backend)
        except TimeoutError:
            return TIMEOUT

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
    """The default probe: a `server/discover` POST on one shared aiohttp ClientSession."""

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
        path = backend.path_prefix.decode("ascii") + self._config().path
        return f"{scheme}://{backend.host_header.decode('ascii')}{path}"

    async def __call__(self, backend: Backend) -> str:
        try:
            async with self._http().post(
                self.url(backend),
                data=DISCOVER_BODY,
                headers=DISCOVER_HEADERS,
                # The backend's own context, the one its traffic uses (aiohttp's default otherwise).
                ssl=backend.ssl_context or True,
                server_hostname=backend.server_name,
            ) as resp:
                await resp.read()
                return OK if resp.status < 500 else FAIL
        except aiohttp.ClientConnectorError as exc:
            return REFUSED if isinstance(exc.os_error, ConnectionRefusedError) else FAIL
        except (aiohttp.ServerDisconnectedError, ConnectionResetError):
            return REFUSED
        except (aiohttp.ClientError, OSError):
            return FAIL

    async def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None
