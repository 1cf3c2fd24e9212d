"""A bounded local cache in front of a shared store (DESIGN §3).

A known session costs one dict lookup and no round trip: `peek` answers from the cache and slides
the shared expiry with a background `touch` at most once per half ttl. Known sessions stay
routable while the shared store is down. A cache miss is UNKNOWN, never None, since only the
shared store can say a session does not exist.

Because the expiry slides only every half ttl, a session may be used up to half a ttl after the
last slide without sliding it again. The shared key is therefore written to live that much longer
(`LIFETIME` x ttl): a session stays for at least its ttl after its last use, on every replica, as
it does in the memory store; an idle one goes between one ttl and `LIFETIME` ttls after its last
use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from mcpbalancer.store.base import UNKNOWN, SessionStore, Unknown

logger = logging.getLogger(__name__)

# The shared key's lifetime, in ttls: one ttl after the last use plus the half ttl between slides.
LIFETIME = 1.5


class _Entry:
    __slots__ = ("backend", "touched_at", "ttl")

    def __init__(self, backend: str, ttl: float, touched_at: float) -> None:
        self.backend = backend
        self.ttl = ttl
        self.touched_at = touched_at


class CachedStore:
    """LRU cache of sid -> backend over `inner`.

    An entry not touched for its ttl is stale: the shared key may have expired, so it is dropped
    and the caller asks the shared store again. `default_ttl` is the ttl given to sessions learned
    through `get` (the shared store does not report one); without it the cache uses the last ttl
    seen in bind/touch, and does not cache `get` results until it has seen one.
    """

    def __init__(
        self,
        inner: SessionStore,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        default_ttl: float | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._inner = inner
        self._capacity = capacity
        self._clock = clock
        self._ttl_hint = default_ttl
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # One in-flight background touch per sid; holding the task also keeps it from being
        # garbage collected before it finishes.
        self._touching: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, sid: str) -> str | Unknown:
        entry = self._entries.get(sid)
        if entry is None:
            return UNKNOWN
        now = self._clock()
        age = now - entry.touched_at
        if age > entry.ttl:
            del self._entries[sid]
            return UNKNOWN
        self._entries.move_to_end(sid)
        if age >= entry.ttl / 2:
            self._touch_in_background(sid, entry, now)
        return entry.backend

    async def get(self, sid: str) -> str | None:
        cached = self.peek(sid)
        if not isinstance(cached, Unknown):
            return cached
        backend = await self._inner.get(sid)
        if backend is not None and self._ttl_hint is not None:
            entry = self._remember(sid, backend, self._ttl_hint)
            # We do not know when the shared key was last touched, and this lookup is activity
            # on the session: slide its expiry now rather than half a ttl from now.
            self._touch_in_background(sid, entry, entry.touched_at)
        return backend

    async def bind(self, sid: str, backend: str, ttl: float) -> str:
        owner = await self._inner.bind(sid, backend, ttl * LIFETIME)
        self._ttl_hint = ttl
        self._remember(sid, owner, ttl)
        return owner

    async def touch(self, sid: str, ttl: float) -> bool:
        alive = await self._inner.touch(sid, ttl * LIFETIME)
        self._ttl_hint = ttl
        entry = self._entries.get(sid)
        if entry is not None:
            if alive:
                entry.ttl = ttl
                entry.touched_at = self._clock()
            else:
                del self._entries[sid]
        return alive

    async def delete(self, sid: str) -> None:
        self._entries.pop(sid, None)
        await self._inner.delete(sid)

    async def ping(self) -> None:
        await self._inner.ping()

    async def drain(self) -> None:
        """Wait for the background touches in flight (tests; a graceful shutdown)."""
        while self._touching:
            await asyncio.gather(*self._touching.values(), return_exceptions=True)
            await asyncio.sleep(0)  # let the done callbacks run

    async def close(self) -> None:
        tasks = list(self._touching.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        await self._inner.close()

    def _remember(self, sid: str, backend: str, ttl: float) -> _Entry:
        entry = _Entry(backend, ttl, self._clock())
        entries = self._entries
        entries[sid] = entry
        entries.move_to_end(sid)
        if len(entries) > self._capacity:
            entries.popitem(last=False)
        return entry

    def _touch_in_background(self, sid: str, entry: _Entry, now: float) -> None:
        # Stamp first: later peeks within the next half ttl must not fire again, whatever the
        # outcome. A failed touch leaves the entry serving until it goes stale, which is what
        # keeps known sessions routable through a shared-store outage.
        entry.touched_at = now
        if sid in self._touching:
            return
        task = asyncio.get_running_loop().create_task(self._touch(sid, entry))
        self._touching[sid] = task
        task.add_done_callback(lambda _: self._touching.pop(sid, None))

    async def _touch(self, sid: str, entry: _Entry) -> None:
        try:
            alive = await self._inner.touch(sid, entry.ttl * LIFETIME)
        except Exception as exc:  # a background task has no caller to report to
            logger.debug("background session touch failed: %s", exc)
            return
        # The key is gone (expired or deleted by another replica): stop routing from the cache,
        # unless the entry has been replaced meanwhile.
        if not alive and self._entries.get(sid) is entry:
            del self._entries[sid]
