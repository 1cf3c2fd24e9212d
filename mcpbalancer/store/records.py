"""Replay records in the shared Redis, so that any proxy can replay any session.

Key `{<prefix>s:<sid>}:i`, in its session key's Cluster slot (see redis.py), value the record as
replay failover writes it (routing/failover.py), expiry the session's. A failure raises StoreError:
the failover falls back on what this proxy holds itself.
"""

from __future__ import annotations

from mcpbalancer.store.redis import RedisStore


class SharedRecords:
    def __init__(self, store: RedisStore) -> None:
        self._store = store

    @classmethod
    def from_url(cls, url: str, prefix: str, op_timeout: float = 0.25) -> SharedRecords:
        return cls(RedisStore.from_url(url, prefix=prefix, op_timeout=op_timeout))

    async def put(self, sid: str, record: str, ttl: float) -> None:
        store = self._store
        await store.call(store.client.set(store.record_key(sid), record, px=max(1, round(ttl * 1000))))

    async def get(self, sid: str) -> str | None:
        store = self._store
        value = await store.call(store.client.get(store.record_key(sid)))
        return None if value is None else str(value)

    async def touch(self, sid: str, ttl: float) -> None:
        store = self._store
        await store.call(store.client.pexpire(store.record_key(sid), max(1, round(ttl * 1000))))

    async def delete(self, sid: str) -> None:
        store = self._store
        await store.call(store.client.delete(store.record_key(sid)))

    async def close(self) -> None:
        await self._store.close()
