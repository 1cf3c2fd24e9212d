"""Liveness, readiness and the metrics page, as answers both listeners can serve.

`/healthz`: the process is alive and its event loop turns (200). `/readyz`: at least one backend is
up and the session store answers (200), else 503 with a JSON reason. The store is pinged at most
once per READY_CACHE seconds, and concurrent probes share the ping in flight, so a scrape storm
does not become a Redis storm.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable

from mcpbalancer.backends import Backend
from mcpbalancer.dataplane.local import LocalAnswer, LocalHandler
from mcpbalancer.errors import StoreError
from mcpbalancer.metrics import EXPOSITION_CONTENT_TYPE, Metrics

READY_CACHE = 1.0
JSON = "application/json"

ALIVE = LocalAnswer(200, "OK", JSON, b'{"status":"ok"}')
_NOT_ALLOWED = LocalAnswer(405, "Method Not Allowed", JSON, b'{"status":"method not allowed"}')


class Readiness:
    """`await check()` -> (ready, reason). `ping` raises StoreError when the store is unreachable."""

    def __init__(
        self,
        backends: Callable[[], Iterable[Backend]],
        ping: Callable[[], Awaitable[None]],
        *,
        cache: float = READY_CACHE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._ping = ping
        self._cache = cache
        self._clock = clock
        self._checked_at = float("-inf")
        self._store_problem: str | None = None
        self._pinging: asyncio.Future[None] | None = None

    async def check(self) -> tuple[bool, str]:
        if not any(backend.up for backend in self._backends()):
            return False, "no backend up"
        problem = await self._store()
        if problem is not None:
            return False, f"session store unreachable: {problem}"
        return True, "ready"

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
    ready, reason = await readiness.check()
    status = "ready" if ready else "unavailable"
    body = json.dumps({"status": status, "reason": reason}, separators=(",", ":")).encode()
    return (
        LocalAnswer(200, "OK", JSON, body) if ready else LocalAnswer(503, "Service Unavailable", JSON, body)
    )


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
