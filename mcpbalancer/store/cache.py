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

When the shared store fails (issue 7), known sessions keep routing from the cache and new ones are
bound here alone (`degraded`). `watch()` sets a per-process marker key every second: when the store
answers again, or when the marker is found missing (Redis restarted empty, or was flushed), every
live entry is re-asserted with SET NX, so no mapping is lost and none is bound twice. A background
touch that finds a key gone drops the entry only when the marker shows the store did not lose its
data (another replica ended the session); otherwise the entry is re-asserted. An outage is logged
once, when it is noticed; `check()` pings the store at start-up, so one there is noticed at once.

With `events`, the proxies sharing the store tell each other what their caches must know, on one
pub/sub channel (`listen()` hears it), one line per event, fields separated by spaces (session ids
and values have none):

    b <origin> <sid> <value>   bound: cached here too, so the session's first request on another
                               proxy or worker needs no lookup
    m <origin> <sid> <value>   moved by replay failover: what was cached is replaced
    d <origin> <sid>           ended (DELETE, a backend's 404, its owner gone): no longer routed
                               from any cache (within milliseconds)
    g <origin> <name> <ms>     backend <name> was seen to go away (fleet/generations.py)

A message is lost when the subscription breaks (it is made again); a cache that missed a `d` routes
that session to its backend, which answers 404 for it, and the entry goes then.

On a Cluster (`scoped`), a failed operation concerns its key's slot only: it does not make the
whole store degraded. A binding that fails is kept here (degrade) or raises (fail: the router
answers that initialize 503), and the re-assertion goes on past the keys it cannot write.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from mcpbalancer.errors import StoreError
from mcpbalancer.store.base import UNKNOWN, SharedStore, Unknown

if TYPE_CHECKING:
    from mcpbalancer.observability.metrics import Metrics

logger = logging.getLogger(__name__)

# The shared key's lifetime, in ttls: one ttl after the last use plus the half ttl between slides.
LIFETIME = 1.5
MARKER_TTL = 600.0  # the marker outlives many watch intervals; a dead process's marker goes away
WATCH_INTERVAL = 1.0
RESYNC_BATCH = 100  # SET NX commands in flight at once while re-asserting
LISTEN_RETRY = (0.1, 5.0)  # first and longest wait before subscribing again to the proxies' channel


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
        inner: SharedStore,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        default_ttl: float | None = None,
        metrics: Metrics | None = None,
        events: bool = False,
        scoped: bool = False,
        raise_on_bind_error: bool = False,
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
        self._metrics = metrics
        self.degraded = False  # the last shared-store operation failed: new bindings are local only
        self._dirty = False  # something was not written to the shared store; re-assert when it answers
        self._marked = False  # our marker is known to be in the shared store
        self._generation = 0  # bumped by every re-assertion of the whole cache
        self._resync: asyncio.Task[None] | None = None
        self._events = events
        self._scoped = scoped
        self._raise_on_bind_error = raise_on_bind_error
        self._origin = secrets.token_hex(4)  # our own messages come back to us: skip them
        self._sending: set[asyncio.Task[None]] = set()
        self._unwritten: set[str] = set()  # Cluster: bound here while their slot was down

    def resize(self, capacity: int, default_ttl: float | None) -> None:
        """A reload: a smaller cache sheds its least recently used entries (the shared store still
        has them: they are looked up there again)."""
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity, self._ttl_hint = capacity, default_ttl
        while len(self._entries) > capacity:
            self._entries.popitem(last=False)

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
        try:
            if self._events:
                announce = self._message("b", sid, backend)
                owner = await self._inner.bind(sid, backend, ttl * LIFETIME, announce)
            else:
                owner = await self._inner.bind(sid, backend, ttl * LIFETIME)
        except StoreError as exc:
            self._failed(exc, sid=sid)
            if self._raise_on_bind_error:
                raise
            # The backend has made the session: keep it here, and write it when the store returns.
            logger.warning("session store unavailable; session bound locally until it returns: %s", exc)
            owner = backend
        else:
            self._answered()
        self._ttl_hint = ttl
        self._remember(sid, owner, ttl)
        return owner

    async def refresh(self, sid: str) -> str | None:
        """What the shared store says of `sid` now: another proxy may have moved or ended it."""
        self._entries.pop(sid, None)
        backend = await self._inner.get(sid)
        if backend is not None and self._ttl_hint is not None:
            self._remember(sid, backend, self._ttl_hint)
        return backend

    async def put(self, sid: str, backend: str, ttl: float) -> None:
        await self._inner.put(sid, backend, ttl * LIFETIME)
        self._ttl_hint = ttl
        self._remember(sid, backend, ttl)
        self._announce("m", sid, backend)

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
        self._announce("d", sid)

    # -- what the proxies tell each other ------------------------------------------------------------

    async def record_gone(self, name: str, when: float) -> None:
        await self._inner.record_gone(name, when)

    async def generations(self) -> dict[str, float]:
        return await self._inner.generations()

    def announce_gone(self, name: str, when: float) -> None:
        """Tell the other proxies that backend `name` went away at `when`."""
        self._announce("g", name, str(round(when * 1000)))

    async def listen(self, on_ended: Callable[[str], None], on_gone: Callable[[str, float], None]) -> None:
        """Run forever (a task of the app): hear the other proxies, subscribing again after a break."""
        delay = LISTEN_RETRY[0]
        while True:
            try:
                async for message in self._inner.events():
                    delay = LISTEN_RETRY[0]
                    self._heard(message, on_ended, on_gone)
            except StoreError as exc:
                logger.debug("session store events: %s; subscribing again", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY[1])

    def _heard(
        self, message: str, on_ended: Callable[[str], None], on_gone: Callable[[str, float], None]
    ) -> None:
        kind, origin, rest = [*message.split(" ", 2), "", ""][:3]
        if origin == self._origin or not rest:
            return
        subject, _, value = rest.partition(" ")
        if kind == "d":
            self._entries.pop(subject, None)
            on_ended(subject)
        elif kind in ("b", "m") and value and self._ttl_hint is not None:
            # A binding adds what this cache does not have; a move replaces what it has.
            if kind == "m" or subject not in self._entries:
                self._remember(subject, value, self._ttl_hint)
        elif kind == "g" and value.isdigit():
            on_gone(subject, int(value) / 1000)

    def _message(self, kind: str, subject: str, value: str = "") -> str:
        return f"{kind} {self._origin} {subject} {value}".rstrip()

    def _announce(self, kind: str, subject: str, value: str = "") -> None:
        if not self._events:
            return
        message = self._message(kind, subject, value)

        async def send() -> None:
            try:
                await self._inner.publish(message)
            except StoreError as exc:
                logger.debug("could not tell the other proxies (%s): %s", kind, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def ping(self) -> None:
        await self._inner.ping()

    async def check(self) -> str | None:
        """Ping the shared store now (at start-up): None if it answers, else the problem, and the
        cache is degraded from this moment rather than from the first session or watch tick. Not
        logged here: the caller says what an outage means for new sessions."""
        try:
            await self._inner.ping()
        except StoreError as exc:
            self._failed(exc, quiet=True, whole=True)
            return str(exc)
        self._answered()
        return None

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Run forever (a task of the app): notice outages, recoveries and lost data; re-assert."""
        while True:
            await asyncio.sleep(interval)
            lost = await self._mark()
            if lost or (self._dirty and not self.degraded and not self._scoped):
                await self.resync()
            elif self._unwritten:
                await self.resync(only=self._unwritten)

    async def resync(self, only: set[str] | None = None) -> None:
        """Re-assert every live entry (or those of `only`) with SET NX (the store's owner wins
        where one exists)."""
        if self._resync is None:
            self._resync = asyncio.get_running_loop().create_task(self._resync_all(only))
        try:
            await asyncio.shield(self._resync)
        finally:
            if self._resync is not None and self._resync.done():
                self._resync = None

    async def _resync_all(self, only: set[str] | None = None) -> None:
        self._dirty = False
        self._generation += 1
        now = self._clock()
        chosen = self._entries.items() if only is None else ((s, self._entries.get(s)) for s in list(only))
        live = [(sid, e) for sid, e in chosen if e is not None and now - e.touched_at <= e.ttl]
        self._unwritten.clear()
        written = 0
        for start in range(0, len(live), RESYNC_BATCH):
            batch = live[start : start + RESYNC_BATCH]
            owners = await asyncio.gather(
                *(self._inner.bind(sid, e.backend, e.ttl * LIFETIME) for sid, e in batch),
                return_exceptions=True,
            )
            for (sid, entry), owner in zip(batch, owners, strict=True):
                if isinstance(owner, BaseException):
                    self._failed(owner, sid=sid)  # down again: the next recovery starts over
                    if self._scoped:
                        continue  # that slot only: the others are written
                    return
                if owner != entry.backend and self._entries.get(sid) is entry:
                    logger.warning("session re-asserted to the store found another owner; using it")
                    entry.backend = owner
                written += 1
        if self._metrics is not None:
            self._metrics.store_resynced.value += written
        if written:
            logger.info("re-asserted %d sessions in the session store", written)

    async def _mark(self) -> bool:
        """Set our marker; True if the store had lost it (or never had it). False on failure."""
        try:
            lost = await self._inner.mark(MARKER_TTL)
        except StoreError as exc:
            self._failed(exc)
            return False
        self._answered()
        first, self._marked = not self._marked, True
        return lost and not first

    def _failed(
        self, exc: BaseException, *, quiet: bool = False, whole: bool = False, sid: str | None = None
    ) -> None:
        self._dirty = True
        if self._scoped and not whole:
            if sid is not None:
                self._unwritten.add(sid)  # written when its slot answers again
            return  # one slot of a Cluster: the others answer
        if not self.degraded:
            self.degraded = True
            if self._metrics is not None:
                self._metrics.store_degraded.value = 1
            if not quiet:  # once per outage, when it is noticed (a watch tick is a second apart)
                logger.warning(
                    "session store unreachable: %s; known sessions route from the local cache", exc
                )

    def _answered(self) -> None:
        if self.degraded:
            self.degraded = False
            if self._metrics is not None:
                self._metrics.store_degraded.value = 0
            logger.info("session store reachable again")

    async def drain(self) -> None:
        """Wait for the background touches in flight (tests; a graceful shutdown)."""
        while self._touching:
            await asyncio.gather(*self._touching.values(), return_exceptions=True)
            await asyncio.sleep(0)  # let the done callbacks run

    async def close(self) -> None:
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        tasks = list(self._touching.values()) + ([self._resync] if self._resync is not None else [])
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
        generation = self._generation
        try:
            alive = await self._inner.touch(sid, entry.ttl * LIFETIME)
        except Exception as exc:  # a background task has no caller to report to
            logger.debug("background session touch failed: %s", exc)
            self._failed(exc)
            return
        self._answered()
        if alive or self._entries.get(sid) is not entry:
            return
        # The key is gone. If the store lost its data (our marker is gone too) or was re-filled
        # since this touch began, the session lives on: write it back. Otherwise another replica
        # ended it (or it expired there): stop routing it from the cache.
        if await self._mark() or generation != self._generation:
            await self.resync()
        elif not self.degraded and self._entries.get(sid) is entry:
            del self._entries[sid]
