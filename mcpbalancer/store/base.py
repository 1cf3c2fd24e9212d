"""The SessionStore contract shared by the memory and Redis stores.

`peek` is the hot path: synchronous, no I/O. A store that can answer locally (the memory store, or
the local cache in front of Redis) returns the backend name or None; one that cannot returns UNKNOWN
and the caller awaits `get`. Values are backend names, never URLs, so renaming a URL in the config
does not orphan sessions.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import Final, Protocol


class Unknown(enum.Enum):
    """`peek` could not answer without I/O."""

    token = 0


UNKNOWN: Final = Unknown.token


class SessionStore(Protocol):
    def peek(self, sid: str) -> str | Unknown | None:
        """Backend of `sid` if known locally; may slide the expiry (without a network write on
        every call); None if the store is sure there is no such session; UNKNOWN otherwise."""
        ...

    async def get(self, sid: str) -> str | None:
        """Backend of `sid`, asking the shared store if needed."""
        ...

    async def bind(self, sid: str, backend: str, ttl: float) -> str:
        """Bind `sid` to `backend` unless already bound (SET NX PX); return the owner now on record."""
        ...

    async def refresh(self, sid: str) -> str | None:
        """Backend of `sid` as the shared store has it now, past any local copy."""
        ...

    async def put(self, sid: str, backend: str, ttl: float) -> None:
        """Bind `sid` to `backend` over any earlier binding (a session moved to another backend)."""
        ...

    async def touch(self, sid: str, ttl: float) -> bool:
        """Extend the expiry of `sid` to `ttl` seconds from now; False if it no longer exists."""
        ...

    async def delete(self, sid: str) -> None:
        """Forget `sid`."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; StoreError when it cannot be reached (readiness)."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


class SharedStore(SessionStore, Protocol):
    """A store shared by proxy replicas (Redis), which can lose its data while we run."""

    async def bind(self, sid: str, backend: str, ttl: float, announce: str | None = None) -> str:
        """SessionStore.bind; with `announce`, published to the proxies if the binding took effect."""
        ...

    async def mark(self, ttl: float) -> bool:
        """Set this process's marker for `ttl` seconds; True if it was absent (the first call, or
        the store lost its data since the last one)."""
        ...

    async def publish(self, message: str) -> None:
        """Tell every proxy sharing the store (store/cache.py's events)."""
        ...

    def events(self) -> AsyncIterator[str]:
        """What the proxies tell each other, until the subscription breaks (StoreError)."""
        ...

    async def record_gone(self, name: str, when: float) -> None:
        """Backend `name` was seen to go away at `when` (seconds since the epoch)."""
        ...

    async def generations(self) -> dict[str, float]:
        """When each backend was last seen to go away."""
        ...
