"""Pick a session store from its configuration string.

Construction is synchronous and does no I/O: the Redis client connects on first use, so the app can
build its store before the event loop runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.store.base import SessionStore, SharedStore
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.instrumented import InstrumentedStore
from mcpbalancer.store.memory import MemoryStore
from mcpbalancer.store.redis import RedisStore

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def create_store(
    spec: str,
    *,
    prefix: str,
    cache_size: int,
    clock: Callable[[], float] = time.monotonic,
    on_expire: Callable[[str, str], None] | None = None,
    op_timeout: float = 0.25,
    session_ttl: float | None = None,
    metrics: Metrics | None = None,
) -> SessionStore:
    """'memory' -> MemoryStore; a redis://, rediss:// or unix:// URL -> CachedStore(RedisStore).

    `on_expire` only applies to the memory store: Redis expires keys silently. `session_ttl` lets
    the cache keep sessions it learns from Redis (see CachedStore). With `metrics`, the Redis round
    trips are counted and timed (InstrumentedStore, under the cache).
    """
    if spec == "memory":
        return MemoryStore(clock=clock, on_expire=on_expire)
    if spec.lower().startswith(_REDIS_SCHEMES):
        shared: SharedStore = RedisStore.from_url(spec, prefix=prefix, op_timeout=op_timeout)
        if metrics is not None:
            shared = InstrumentedStore(shared, metrics)
        return CachedStore(shared, capacity=cache_size, clock=clock, default_ttl=session_ttl, metrics=metrics)
    raise ValueError(f"unknown session store {spec!r}: use 'memory' or a redis://, rediss:// or unix:// URL")
