"""The shared session store: one Redis key per session, shared by every proxy replica.

Key `<prefix>s:<sid>`, value the backend name, expiry in milliseconds (PX). Each call is bounded by
`op_timeout`, and every redis-py error or timeout becomes a StoreError in `_call`, the one place
where this module meets the library's exceptions.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mcpbalancer.errors import StoreError
from mcpbalancer.store.base import UNKNOWN, Unknown

T = TypeVar("T")

# A PING on a connection idle this long catches a half-dead socket before a real command does.
_HEALTH_CHECK_INTERVAL = 30


class RedisStore:
    """SessionStore on Redis. `peek` cannot answer without I/O, so it is always UNKNOWN: put a
    CachedStore in front of it for the hot path."""

    def __init__(
        self, client: redis.asyncio.Redis, prefix: str = "mcpb:", op_timeout: float = 0.25, space: str = "s"
    ) -> None:
        self._client = client
        self._key_prefix = f"{prefix}{space}:"  # space: s sessions; t, r affinity (store/shared.py)
        self._op_timeout = op_timeout
        # This instance's marker: its absence means Redis lost what we wrote (restart, flush).
        self._marker = f"{prefix}m:{secrets.token_hex(8)}"

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "mcpb:", op_timeout: float = 0.25, space: str = "s"
    ) -> RedisStore:
        """A store on `url` (redis://, rediss:// or unix://); connects on first use, not here."""
        client = redis.asyncio.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=op_timeout,
            health_check_interval=_HEALTH_CHECK_INTERVAL,
            # One immediate retry reconnects a connection that died with a restarted server;
            # anything slower would only eat into op_timeout on the request path.
            retry=Retry(NoBackoff(), retries=1),
        )
        return cls(client, prefix=prefix, op_timeout=op_timeout, space=space)

    @property
    def client(self) -> redis.asyncio.Redis:
        return self._client

    def key(self, sid: str) -> str:
        return self._key_prefix + sid

    def peek(self, sid: str) -> Unknown:
        return UNKNOWN

    async def get(self, sid: str) -> str | None:
        value = await self._call(self._client.get(self.key(sid)))
        return _text(value)

    async def bind(self, sid: str, backend: str, ttl: float) -> str:
        # SET NX GET (Redis >= 7.0) binds and reports an existing owner in one round trip: the
        # reply is the previous value, None when our SET took effect.
        command = self._client.set(self.key(sid), backend, px=_millis(ttl), nx=True, get=True)
        previous = _text(await self._call(command))
        return backend if previous is None else previous

    async def touch(self, sid: str, ttl: float) -> bool:
        return bool(await self._call(self._client.pexpire(self.key(sid), _millis(ttl))))

    async def delete(self, sid: str) -> None:
        await self._call(self._client.delete(self.key(sid)))

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def mark(self, ttl: float) -> bool:
        """Set this instance's marker key for `ttl` seconds; True if it was absent (first call, or
        Redis lost its data since the last one). One round trip: SET PX GET."""
        previous = await self._call(self._client.set(self._marker, "1", px=_millis(ttl), get=True))
        return previous is None

    async def close(self) -> None:
        await self._call(self._client.aclose())

    async def _call(self, command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._op_timeout):
                return await command
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"redis: {type(exc).__name__}: {exc}") from exc


def _millis(ttl: float) -> int:
    # PX 0 is an error in Redis; a non-positive ttl is a caller bug better served by an instant expiry.
    return max(1, round(ttl * 1000))


def _text(value: object) -> str | None:
    # decode_responses=True gives str; a client built without it gives bytes.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    raise StoreError(f"redis: unexpected reply {value!r}")
