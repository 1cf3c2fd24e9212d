"""A SessionStore decorator that counts and times the operations of the store it wraps.

It wraps the shared (Redis) store, under the local cache: what it sees are real round trips,
background touches included. `peek` is the hot path and has no I/O, so it is the inner store's
own bound method, not a wrapper.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from mcpbalancer.errors import StoreError
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.store.base import SharedStore, Unknown

_T = TypeVar("_T")


class InstrumentedStore:
    def __init__(self, inner: SharedStore, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self.peek: Callable[[str], str | Unknown | None] = inner.peek

    async def get(self, sid: str) -> str | None:
        return await self._timed("get", self._inner.get(sid))

    async def bind(self, sid: str, backend: str, ttl: float, announce: str | None = None) -> str:
        if announce is None:  # a store that cannot announce takes no such argument
            return await self._timed("bind", self._inner.bind(sid, backend, ttl))
        return await self._timed("bind", self._inner.bind(sid, backend, ttl, announce))

    async def refresh(self, sid: str) -> str | None:
        return await self._timed("get", self._inner.refresh(sid))

    async def put(self, sid: str, backend: str, ttl: float) -> None:
        await self._timed("put", self._inner.put(sid, backend, ttl))

    async def publish(self, message: str) -> None:
        await self._timed("publish", self._inner.publish(message))

    def events(self) -> AsyncIterator[str]:
        return self._inner.events()

    async def record_gone(self, name: str, when: float) -> None:
        await self._timed("generation", self._inner.record_gone(name, when))

    async def generations(self) -> dict[str, float]:
        return await self._timed("generation", self._inner.generations())

    async def touch(self, sid: str, ttl: float) -> bool:
        return await self._timed("touch", self._inner.touch(sid, ttl))

    async def delete(self, sid: str) -> None:
        await self._timed("delete", self._inner.delete(sid))

    async def ping(self) -> None:
        await self._timed("ping", self._inner.ping())

    async def mark(self, ttl: float) -> bool:
        return await self._timed("mark", self._inner.mark(ttl))

    async def close(self) -> None:
        await self._inner.close()

    async def _timed(self, op: str, call: Awaitable[_T]) -> _T:
        start = time.perf_counter()
        try:
            result = await call
        except StoreError:
            self._metrics.store_operation(op, False, time.perf_counter() - start)
            raise
        self._metrics.store_operation(op, True, time.perf_counter() - start)
        return result
