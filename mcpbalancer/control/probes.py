"""Liveness, readiness and the metrics page, as answers both listeners can serve.

`/healthz`: the process is alive and its event loop turns (200). `/readyz`: 200 while the proxy can
place and route sessions, 503 when it cannot serve, with a JSON body naming the reason and the
store's state. It cannot serve when no backend is up, or when the session store is unreachable and
`on_store_error` is `fail` (new sessions are refused). With `degrade` a store outage is reported in
the body (`"status":"degraded"`) but the answer stays 200: known sessions route from the local cache
and new ones are bound locally. The store is pinged at most once per READY_CACHE seconds, and
concurrent probes share the ping in flight, so a scrape storm does not become a Redis storm.

With `discover` entries the body lists them (`"discovery": [{entry, state, backends, reason}]`). An
entry whose last lookup failed or was empty is `stale`: its last known backends are kept and serve,
so the answer stays 200, with `"status":"degraded"` and the reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

from mcpbalancer.dataplane.local import LocalAnswer, LocalHandler
from mcpbalancer.errors import StoreError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import EXPOSITION_CONTENT_TYPE, Metrics

READY_CACHE = 1.0
JSON = "application/json"

ALIVE = LocalAnswer(200, "OK", JSON, b'{"status":"ok"}')
_NOT_ALLOWED = LocalAnswer(405, "Method Not Allowed", JSON, b'{"status":"method not allowed"}')


class Verdict(NamedTuple):
    """What /readyz answers: `ready` is the status code's choice (200 or 503)."""

    ready: bool
    status: str  # "ready", "degraded" (ready, the store is down) or "unavailable"
    reason: str
    store: str  # "ok", "unreachable", or "unknown" (not asked yet)
    discovery: tuple[dict[str, Any], ...] = ()  # one line per `discover` entry


class Readiness:
    """`await check()` -> Verdict. `ping` raises StoreError when the store is unreachable;
    `store_required` (on_store_error: fail) makes an unreachable store unready."""

    def __init__(
        self,
        backends: Callable[[], Iterable[Backend]],
        ping: Callable[[], Awaitable[None]],
        *,
        store_required: bool = False,
        discovery: Callable[[], list[dict[str, Any]]] | None = None,
        cache: float = READY_CACHE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._ping = ping
        self.store_required = store_required
        self._discovery = discovery
        self._cache = cache
        self._clock = clock
        self._checked_at = float("-inf")
        self._store_problem: str | None = None
        self._pinging: asyncio.Future[None] | None = None

    async def check(self) -> Verdict:
        verdict = await self._check()
        if self._discovery is None:
            return verdict
        entries = tuple(self._discovery())
        stale = [e for e in entries if e["state"] == "stale"]
        if stale and verdict.status == "ready":
            first = stale[0]
            reason = f"discovery {first['entry']}: {first['reason']}; its last known backends are kept"
            return Verdict(True, "degraded", reason, verdict.store, entries)
        return verdict._replace(discovery=entries)

    async def _check(self) -> Verdict:
        if not any(backend.up for backend in self._backends()):
            # The store is not asked when no backend could serve anyway: its last known state.
            return Verdict(False, "unavailable", "no backend up", self._store_state())
        problem = await self._store()
        if problem is None:
            return Verdict(True, "ready", "ready", "ok")
        reason = f"session store unreachable: {problem}"
        if self.store_required:
            return Verdict(False, "unavailable", f"{reason}; new sessions are refused", "unreachable")
        return Verdict(True, "degraded", f"{reason}; new sessions are bound locally", "unreachable")

    def _store_state(self) -> str:
        if self._checked_at == float("-inf"):
            return "unknown"
        return "ok" if self._store_problem is None else "unreachable"

    async def _store(self) -> str | None:
        if self._clock() - self._checked_at < self._cache:
            return self._store_problem
        if self._pinging is None:
            self._pinging = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._pinging)
        return self._store_problem

    async def _refresh(self) -> None:
        try:
            await self._ping()
            self._store_problem = None
        except StoreError as exc:
            self._store_problem = str(exc)
        finally:
            self._checked_at = self._clock()
            self._pinging = None


async def readiness_answer(readiness: Readiness) -> LocalAnswer:
    verdict = await readiness.check()
    fields: dict[str, Any] = {"status": verdict.status, "reason": verdict.reason, "store": verdict.store}
    if verdict.discovery:
        fields["discovery"] = list(verdict.discovery)
    body = json.dumps(fields, separators=(",", ":")).encode()
    if verdict.ready:
        return LocalAnswer(200, "OK", JSON, body)
    return LocalAnswer(503, "Service Unavailable", JSON, body)


def metrics_answer(metrics: Metrics) -> LocalAnswer:
    return LocalAnswer(200, "OK", EXPOSITION_CONTENT_TYPE, metrics.exposition())


def local_endpoints(
    readiness: Readiness, metrics: Metrics, metrics_path: str | None
) -> dict[bytes, LocalHandler]:
    """The public listener's own paths; `metrics_path` None when metrics are off or on the admin listener."""

    def healthz(method: bytes) -> LocalAnswer:
        return ALIVE if method in (b"GET", b"HEAD") else _NOT_ALLOWED

    def readyz(method: bytes) -> LocalAnswer | Awaitable[LocalAnswer]:
        return readiness_answer(readiness) if method in (b"GET", b"HEAD") else _NOT_ALLOWED

    def metrics_page(method: bytes) -> LocalAnswer:
        return metrics_answer(metrics) if method in (b"GET", b"HEAD") else _NOT_ALLOWED

    endpoints: dict[bytes, LocalHandler] = {b"/healthz": healthz, b"/readyz": readyz}
    if metrics_path is not None:
        endpoints[metrics_path.encode("ascii")] = metrics_page
    return endpoints
