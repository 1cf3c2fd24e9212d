"""Affinity entries (task ids, request-state digests) in the shared Redis, for proxy replicas.

With a Redis session store, what one replica learns (`taskId -> backend`, `digest(requestState) ->
backend`) is written through to Redis in the background, and a replica that does not know a key
asks Redis before balancing. Keys: `<prefix>t:<taskId>` and `<prefix>r:<digest>`, values backend
names, with the entry's expiry. A Redis failure is a miss (the request is balanced), never an error.
"""

from __future__ import annotations

import logging

from mcpbalancer.errors import StoreError
from mcpbalancer.store.redis import RedisStore

log = logging.getLogger(__name__)

SPACES = {"tasks": "t", "request_state": "r"}


class SharedAffinity:
    def __init__(self, stores: dict[str, RedisStore]) -> None:
        self._stores = stores

    @classmethod
    def from_url(cls, url: str, prefix: str, op_timeout: float = 0.25) -> SharedAffinity:
        client = RedisStore.from_url(url, prefix=prefix, op_timeout=op_timeout).client
        return cls(
            {
                kind: RedisStore(client, prefix=prefix, op_timeout=op_timeout, space=space)
                for kind, space in SPACES.items()
            }
        )

    async def get(self, kind: str, key: str) -> str | None:
        try:
            return await self._stores[kind].get(key)
        except StoreError as exc:
            log.warning("shared affinity lookup failed: %s", exc)
            return None

    async def put(self, kind: str, key: str, backend: str, ttl: float) -> None:
        try:
            await self._stores[kind].bind(key, backend, ttl)
        except StoreError as exc:
            log.warning("could not share an affinity entry: %s", exc)

    async def close(self) -> None:
        # The stores share one client: closing it once closes them all.
        store = next(iter(self._stores.values()))
        try:
            await store.close()
        except StoreError as exc:
            log.debug("closing the shared affinity client: %s", exc)
