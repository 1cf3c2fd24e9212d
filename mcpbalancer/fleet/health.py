"""Active health checks and passive ejection.

The checker knows backends by name only and reports through one callback, `set_status(name, up)`
(the Traefik shape): it never touches routing, sessions or connections. Marking a backend down only
keeps NEW sessions away from it; sessions it owns stay routed to it (a slow or paused backend keeps
its sessions).

Per backend a `HealthState` counts results: `fall` failures in a row mark it down, `rise` successes
in a row bring it back. A refused or reset connection (from a probe or from the data plane) is not a
symptom of slowness: it marks the backend down at once. Timeouts and 5xx answers are failures that
count toward `fall`.

The default probe (`probe: discover`) is a stateless 2026-07-28 `server/discover` POST to the
backend's MCP endpoint: a stock FastMCP server answers 200 without creating a session (a `GET` of the
MCP path without a session id would answer 400 but create and discard a server session on every
probe). The answer must be an MCP endpoint's (probe_answer.py: a legacy-only server's JSON-RPC 400 is
one); a 404, a redirect or an answer that is not MCP means the URL names no MCP endpoint, which is
not slowness either: down at once, like a refused connection. `probe: http` is the load balancers'
readiness check: `method` (GET or HEAD) to `path`, and a status of `expect_status` is a success,
any other one a failure toward `fall`.

Each backend is probed with its own settings (`Backend.health`, its `health:` keys merged over the
global block) and on its own schedule. Every failure has a sentence (`reasons`); `down_reasons` holds
the one that took a backend down while it is down, which the admin API shows and the log line of
the change says; `last_probe` the status or error word of the last probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, NamedTuple

from mcpbalancer.config import HealthConfig
from mcpbalancer.fleet.backends import Backend
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


class ProbeResult(NamedTuple):
    result: str  # OK, FAIL, TIMEOUT, REFUSED or NOT_MCP
    reason: str | None = None  # why it failed, a sentence for the log and the admin API
    status: int | None = None  # the answer's HTTP status; None when no answer came
    error: str | None = None  # when no answer came: timeout, refused, reset, tls, unreachable, invalid


class LastProbe(NamedTuple):
    """The last active probe of a backend, as the admin API shows it."""

    status: int | None
    error: str | None
    ok: bool
    at: float  # Unix time

    def as_json(self) -> dict[str, object]:
        return {"status": self.status, "error": self.error, "ok": self.ok, "at": self.at}


SetStatus = Callable[[str, bool], None]
Probe = Callable[[Backend], Awaitable[ProbeResult | str]]  # a bare result string has no reason
# What the data plane saw, as the sentence that says why a backend went down.
PASSIVE_REASONS: Final = {
    "refused": "connection refused to a request",
    "reset": "connection reset before an answer to a request",
    "timeout": "a request timed out",
    "5xx": "a request was answered 5xx",
    "tls": "the TLS handshake of a request failed",
}


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
    """Keeps a HealthState per backend name and reports changes through `set_status`.

    Each backend is probed with its own settings (`Backend.health`: its `health:` keys over the
    global block), or with the checker's `config` when it has none."""

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
        self.last_probe: dict[str, LastProbe] = {}
        # Why a backend is down, or why its last check failed; no entry when it is healthy.
        self.reasons: dict[str, str] = {}
        # What took a backend down: an entry only while it is down.
        self.down_reasons: dict[str, str] = {}

    def settings(self, backend: Backend) -> HealthConfig:
        return backend.health or self.config

    def reconfigure(self, config: HealthConfig) -> None:
        self.config = config
        for state in self._states.values():
            state.fall, state.rise = config.fall, config.rise

    def track(self, backends: Iterable[Backend]) -> None:
        """The backends now configured: each state counts with its backend's fall and rise, and
        the state of a backend no longer configured is dropped."""
        targets = list(backends)
        for backend in targets:
            settings = self.settings(backend)
            state = self._state(backend.name)
            state.fall, state.rise = settings.fall, settings.rise
        self.forget(b.name for b in targets)

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
            for record in (self.last_check, self.last_probe, self.reasons, self.down_reasons):
                record.pop(name, None)

    def observe(
        self,
        name: str,
        result: str,
        reason: str | None = None,
        *,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        """One active probe result, and why it failed."""
        now = self._clock()
        self.last_check[name] = now
        self.last_probe[name] = LastProbe(status, error, result == OK, now)
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
        """A failure the data plane saw on real traffic: `refused`, `reset`, `timeout`, `5xx`, `tls`."""
        state = self._state(name)
        if kind in HARD_FAILURES and self._on_gone is not None:
            self._on_gone(name)
        changed = state.eject() if kind in HARD_FAILURES else state.record(False)
        why = PASSIVE_REASONS.get(kind, f"a request failed ({kind})")
        self._note(name, state.up, why)
        if changed:
            self._report(name, state.up, why)

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
        if up:
            self.down_reasons.pop(name, None)
        else:
            self.down_reasons[name] = why
        log.log(
            logging.INFO if up else logging.WARNING,
            "backend %s is %s (%s)",
            name,
            "up" if up else "down",
            why,
        )
        self._set_status(name, up)

    async def check_once(self, backends: Iterable[Backend]) -> None:
        """Probe every backend concurrently, each bounded by its timeout."""
        await asyncio.gather(*(self._check(b) for b in backends))

    async def _check(self, backend: Backend) -> None:
        result, reason, status, error = await self._bounded(backend)
        settings = self.settings(backend)
        state = self._state(backend.name)
        state.fall, state.rise = settings.fall, settings.rise  # its own, from the first probe on
        self.observe(backend.name, result, reason, status=status, error=error)

    async def _bounded(self, backend: Backend) -> ProbeResult:
        timeout = self.settings(backend).timeout
        try:
            async with asyncio.timeout(timeout):
                result = await self._probe(backend)
        except TimeoutError:
            return ProbeResult(TIMEOUT, f"probe timed out after {timeout:g}s", error="timeout")
        return result if isinstance(result, ProbeResult) else ProbeResult(result)

    async def run(self, backends: Callable[[], Iterable[Backend]]) -> None:
        """Probe forever, each backend every `interval` of its own settings; cancel to stop. A
        backend whose interval is 0 is not probed (looked at again every second, so a reload can
        turn it on). A probe still running when its next one is due delays that one."""
        loop = asyncio.get_running_loop()
        started: dict[str, float] = {}  # loop time the last probe of each backend began
        running: dict[str, asyncio.Task[None]] = {}
        # Woken when the next probe is due or one ends. A plain future, not asyncio.timeout around
        # an Event: on Python 3.11 a cancel that meets the timeout's expiry can come out as the
        # TimeoutError, which would keep this loop (and the proxy's stop) going.
        wakeup: list[asyncio.Future[None]] = [loop.create_future()]

        def wake() -> None:
            if not wakeup[0].done():
                wakeup[0].set_result(None)

        try:
            while True:
                now = loop.time()
                targets = list(backends())
                self.track(targets)
                wake_at = now + OFF_RECHECK
                for backend in targets:
                    interval = self.settings(backend).interval
                    if interval <= 0 or backend.name in running:
                        continue
                    due = started.get(backend.name, now) + interval
                    if backend.name not in started or due <= now:
                        started[backend.name] = now
                        running[backend.name] = self._spawn(backend, running, wake)
                        due = now + interval
                    wake_at = min(wake_at, due)
                names = {b.name for b in targets}
                for name in [n for n in started if n not in names and n not in running]:
                    del started[name]  # no longer configured
                wakeup[0] = loop.create_future()
                timer = loop.call_later(max(wake_at - loop.time(), 0.0), wake)
                try:
                    await wakeup[0]
                finally:
                    timer.cancel()
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    def _spawn(
        self, backend: Backend, running: dict[str, asyncio.Task[None]], ended: Callable[[], None]
    ) -> asyncio.Task[None]:
        async def probe() -> None:
            try:
                await self._check(backend)
            except Exception:  # a bug in a probe must not end health checking
                log.exception("health check of %s failed", backend.name)
            finally:
                running.pop(backend.name, None)
                ended()

        return asyncio.get_running_loop().create_task(probe())
