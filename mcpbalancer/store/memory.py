"""The embedded session store: one process, one dict, sliding expiry.

It is authoritative, so `peek` never answers UNKNOWN. Expired entries go lazily when looked up and
through an amortised sweep on every bind, so memory stays bounded without a timer task.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# Entries examined per bind. Examining twice as many entries as binds add means the sweep gets
# round the whole map faster than it grows, so every expired entry is found within one pass.
_SWEEP_PER_BIND = 2


class _Entry:
    __slots__ = ("backend", "expires_at", "ttl")

    def __init__(self, backend: str, ttl: float, expires_at: float) -> None:
        self.backend = backend
        self.ttl = ttl
        self.expires_at = expires_at


class MemoryStore:
    """Session id -> backend name in process memory.

    `on_expire(sid, backend)` is called for every entry removed because it expired (not for
    `delete`), so the app can keep per-backend session counts. It must not raise.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_expire: Callable[[str, str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_expire = on_expire
        # Ordered so the sweep can work through the entries front to back, moving live ones to
        # the end: a clock hand that visits every entry once per len/_SWEEP_PER_BIND binds.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, sid: str) -> str | None:
        """Backend of `sid`, or None; a hit slides the expiry to now + the entry's ttl."""
        entry = self._entries.get(sid)
        if entry is None:
            return None
        now = self._clock()
        if entry.expires_at <= now:
            self._expire(sid, entry)
            return None
        entry.expires_at = now + entry.ttl
        return entry.backend

    async def get(self, sid: str) -> str | None:
        # A lookup is session activity here just as it is for peek.
        return self.peek(sid)

    async def bind(self, sid: str, backend: str, ttl: float) -> str:
        now = self._clock()
        entry = self._entries.get(sid)
        if entry is not None:
            if entry.expires_at > now:
                return entry.backend
            self._expire(sid, entry)
        self._entries[sid] = _Entry(backend, ttl, now + ttl)
        self.sweep(_SWEEP_PER_BIND)
        return backend

    async def refresh(self, sid: str) -> str | None:
        return self.peek(sid)

    async def put(self, sid: str, backend: str, ttl: float) -> None:
        self._entries[sid] = _Entry(backend, ttl, self._clock() + ttl)

    async def touch(self, sid: str, ttl: float) -> bool:
        entry = self._entries.get(sid)
        if entry is None:
            return False
        now = self._clock()
        if entry.expires_at <= now:
            self._expire(sid, entry)
            return False
        entry.ttl = ttl
        entry.expires_at = now + ttl
        return True

    async def delete(self, sid: str) -> None:
        self._entries.pop(sid, None)

    async def ping(self) -> None:
        return None  # in this process: always reachable

    async def close(self) -> None:
        self._entries.clear()

    def sweep(self, limit: int | None = None) -> int:
        """Remove expired entries among the next `limit` (all if None); return how many went."""
        entries = self._entries
        count = len(entries) if limit is None else min(limit, len(entries))
        now = self._clock()
        removed = 0
        for _ in range(count):
            sid, entry = next(iter(entries.items()))
            if entry.expires_at <= now:
                self._expire(sid, entry)
                removed += 1
            else:
                entries.move_to_end(sid)
        return removed

    def _expire(self, sid: str, entry: _Entry) -> None:
        del self._entries[sid]
        if self._on_expire is not None:
            self._on_expire(sid, entry.backend)
