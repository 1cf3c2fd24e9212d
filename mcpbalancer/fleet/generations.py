"""When each backend's process was last seen to go away: the generation of its sessions.

A backend that restarted at the same address does not know the sessions of the process before it.
A request of such a session used to reach the new process, which answers 404, or 400 (the TypeScript
SDK's servers, the conformance reference server): a client that gets 400 never initializes again.
The proxy knows when an instance went away: a refused or reset connection, from a probe or from
traffic (the health checker calls `gone`). `Backend.gone_at` records that moment, and routing answers
a session bound before it 404 itself, or replays it (routing/router.py), whatever the new process
would say. A managed backend's exit changes its owner id instead (managed.py), with the same effect.

Refused means nothing listens: the process is gone. A timeout or a 5xx does not move the
generation: the process may be slow, and its sessions are alive.

With a shared store, the moment goes to Redis (the latest wins) and to the other proxies at once
(the store's events), and a proxy starting reads them all, so every proxy agrees. Times are wall
clock, compared across machines: keep the proxies' clocks synchronised (NTP). A time heard from
another proxy is never taken as later than this proxy's own clock, so a clock running ahead
elsewhere does not end the sessions bound here since.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from mcpbalancer.errors import StoreError
from mcpbalancer.fleet.backends import BackendSet

log = logging.getLogger(__name__)

SHARE_INTERVAL = 1.0  # a backend refusing every request is shared once a second, not per request


class SharedGenerations(Protocol):
    """The shared store's side (store/cache.py, store/redis.py)."""

    async def record_gone(self, name: str, when: float) -> None: ...
    async def generations(self) -> dict[str, float]: ...
    def announce_gone(self, name: str, when: float) -> None: ...


class Generations:
    def __init__(
        self,
        backends: BackendSet,
        shared: SharedGenerations | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backends = backends
        self._shared = shared
        self._clock = clock
        self._shared_at: dict[str, float] = {}
        self._background: set[asyncio.Task[None]] = set()

    def gone(self, name: str) -> None:
        """Backend `name`'s process was seen to go away now (the health checker's callback)."""
        backend = self._backends.get(name)
        if backend is None:
            return
        now = self._clock()
        if now - backend.gone_at > SHARE_INTERVAL:
            log.info("backend %s went away: sessions bound to it before now are ended", name)
        backend.gone_at = max(backend.gone_at, now)
        if self._shared is None or now - self._shared_at.get(name, 0.0) < SHARE_INTERVAL:
            return
        self._shared_at[name] = now
        self._shared.announce_gone(name, now)
        self._spawn(self._shared.record_gone(name, now))

    def heard(self, name: str, when: float) -> None:
        """Another proxy saw backend `name` go away at `when`."""
        backend = self._backends.get(name)
        if backend is not None:
            backend.gone_at = max(backend.gone_at, min(when, self._clock()))

    async def load(self) -> None:
        """What the other proxies saw before this one started."""
        if self._shared is None:
            return
        try:
            seen = await self._shared.generations()
        except StoreError as exc:
            log.warning("could not read the backends' generations from the store: %s", exc)
            return
        for name, when in seen.items():
            self.heard(name, when)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except StoreError as exc:
                log.warning("could not share a backend's generation: %s", exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
