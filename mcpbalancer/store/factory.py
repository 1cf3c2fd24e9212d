"""Pick a session store from its configuration string.

Construction is synchronous and does no I/O: the Redis client connects on first use, so the app can
build its store before the event loop runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mcpbalancer.config.storeurl import MEMORY, parse_store
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.store.base import SessionStore, SharedStore
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.instrumented import InstrumentedStore
from mcpbalancer.store.memory import MemoryStore
from mcpbalancer.store.redis import RedisStore, client_for


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
    fail_new: bool = False,
) -> SessionStore:
    """'memory' -> MemoryStore; a Redis, Sentinel or Cluster URL -> CachedStore(RedisStore), whose
    proxies tell each other what their caches must know (CachedStore's events).

    `on_expire` only applies to the memory store: Redis expires keys silently. `session_ttl` lets
    the cache keep sessions it learns from Redis (see CachedStore). With `metrics`, the Redis round
    trips are counted and timed (InstrumentedStore, under the cache). `fail_new` (on_store_error:
    fail): on a Cluster, a binding whose slot is down raises rather than staying local.
    """
    try:
        parsed = parse_store(spec)
    except ValueError as exc:  # what the config would have refused
        raise ValueError(f"unknown session store: {exc}") from None
    if parsed.kind == MEMORY:
        return MemoryStore(clock=clock, on_expire=on_expire)
    redis_store = RedisStore(client_for(parsed, op_timeout), prefix=prefix, op_timeout=op_timeout)
    shared: SharedStore = redis_store if metrics is None else InstrumentedStore(redis_store, metrics)
    return CachedStore(
        shared,
        capacity=cache_size,
        clock=clock,
        default_ttl=session_ttl,
        metrics=metrics,
        events=True,
        scoped=redis_store.cluster,
        raise_on_bind_error=redis_store.cluster and fail_new,
    )
