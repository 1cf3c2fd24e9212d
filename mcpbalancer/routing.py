"""The routing decision: request facts + what the store knows -> a backend, or an error answer.

Pure policy over injected parts (backends, strategy, store); no sockets. The data plane calls
`route` when a request head is complete, `learn` when the backend's response head arrives, and
`owner_gone` when a session's backend cannot be reached.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from mcpbalancer import protocol
from mcpbalancer.backends import Backend, BackendSet
from mcpbalancer.balancer import Strategy
from mcpbalancer.binding import SessionBinder, backend_of, decode_owner, encode_owner
from mcpbalancer.errors import BadRequest, NoBackendAvailable, SessionNotFound, StoreError
from mcpbalancer.metrics import Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.store import UNKNOWN, SessionStore

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestFacts:
    """What routing needs to know about one request, read from its head only."""

    method: bytes
    era: Era
    session_id: str | None
    tag: str | None = None  # keyed hash of the bound credential (bind_sessions), else None


def classify(method: bytes, session_id: bytes | None, protocol_version: bytes | None) -> RequestFacts:
    """Facts of a request from its raw header values; BadRequest for a malformed session id."""
    era = protocol.era_of(protocol_version)
    if session_id is None or era is Era.MODERN:
        return RequestFacts(method, era, None)
    if not protocol.valid_session_id(session_id):
        raise BadRequest("Bad Request: invalid Mcp-Session-Id header")
    return RequestFacts(method, era, session_id.decode("ascii"))


class Router:
    def __init__(
        self,
        backends: BackendSet,
        strategy: Strategy,
        store: SessionStore,
        session_ttl: float,
        metrics: Metrics | None = None,
        binder: SessionBinder | None = None,
        refuse_new: Callable[[], bool] | None = None,
    ) -> None:
        self.backends = backends
        self.binder = binder
        # True while new sessions must be refused (on_store_error: fail, and the store is down).
        self._refuse_new = refuse_new
        self._metrics = metrics or Metrics(CollectorRegistry())
        self._strategy = strategy
        self._store = store
        self._ttl = session_ttl
        self._background: set[asyncio.Task[None]] = set()
        self._forgetting: set[str] = set()  # sessions whose store delete has not finished yet

    def route(self, facts: RequestFacts) -> Backend | Awaitable[Backend]:
        """The backend for `facts`: at once when known locally, else an awaitable store lookup.

        Raises SessionNotFound for an unknown session and NoBackendAvailable when nothing can take
        a new one.
        """
        sid = facts.session_id
        if sid is None:
            if self._refuse_new is not None and facts.era is Era.LEGACY and self._refuse_new():
                raise NoBackendAvailable("Session store unavailable")  # 503 + Retry-After
            return self.pick(())
        owner = self._store.peek(sid)
        if owner is UNKNOWN:
            return self._lookup(sid, facts.tag)
        # A local answer, the memory store's included, is a cache hit.
        (self._metrics.lookup_miss if owner is None else self._metrics.lookup_cache_hit).value += 1
        return self._owner_backend(sid, owner, facts.tag)

    def pick(self, exclude: Collection[str]) -> Backend:
        """A backend for a new session or a stateless request, skipping names in `exclude`."""
        candidates = [b for b in self.backends.available() if b.name not in exclude]
        backend = self._strategy.pick(candidates)
        if backend is None:
            raise NoBackendAvailable("No backend available")
        return backend

    async def _lookup(self, sid: str, tag: str | None) -> Backend:
        try:
            owner = await self._store.get(sid)
        except StoreError as exc:
            log.warning("session store lookup failed: %s", exc)
            raise NoBackendAvailable("Session store unavailable") from exc
        (self._metrics.lookup_miss if owner is None else self._metrics.lookup_store_hit).value += 1
        return self._owner_backend(sid, owner, tag)

    def _owner_backend(self, sid: str, owner: str | None, tag: str | None) -> Backend:
        if owner is None:
            raise SessionNotFound()
        name, bound = decode_owner(owner)
        if self.binder is not None and not _same_tag(bound, tag):
            # Another credential than the session's: it does not exist for this caller. The
            # session itself stays: its owner may still use it.
            log.info("session used with another credential than its own; answered as unknown")
            self._metrics.rejected("credential")
            raise SessionNotFound()
        backend = self.backends.get(name)
        if backend is None:
            # The mapping names a backend no longer configured: its sessions are gone.
            self._forget(sid, None, "backend_lost")
            raise SessionNotFound()
        return backend

    def learn(
        self, facts: RequestFacts, backend: Backend, status: int, session_id: bytes | None
    ) -> Awaitable[None] | None:
        """React to a response head; an awaitable when the client must wait for a store write.

        A mapping is learned only from a 2xx answer carrying Mcp-Session-Id to a request that carried
        none (stateful servers put fresh, unusable ids on their 400s). A 404 to a session request,
        or a 2xx to its DELETE, ends the session.
        """
        if facts.era is Era.MODERN:
            return None
        sid = facts.session_id
        if sid is None:
            if session_id is not None and 200 <= status < 300:
                return self._bind(session_id, backend, facts.tag if self.binder is not None else None)
            return None
        if status == 404 or (facts.method == b"DELETE" and 200 <= status < 300):
            self._forget(sid, backend, "backend_404" if status == 404 else "delete")
        return None

    def owner_gone(self, facts: RequestFacts, backend: Backend) -> SessionNotFound:
        """The session's backend is unreachable: forget the session; the client must re-initialize."""
        if facts.session_id is not None:
            log.info("backend %s unreachable; ending session", backend.name)
            self._forget(facts.session_id, backend, "backend_lost")
        return SessionNotFound()

    async def _bind(self, raw_sid: bytes, backend: Backend, tag: str | None) -> None:
        if not protocol.valid_session_id(raw_sid):
            log.warning("backend %s issued a malformed Mcp-Session-Id; not bound", backend.name)
            return
        sid = raw_sid.decode("ascii")
        try:
            value = encode_owner(backend.name, tag)
            owner = await self._store.bind(sid, value, self._ttl)
        except StoreError as exc:
            log.warning("could not store session of backend %s: %s", backend.name, exc)
            return
        if owner == value:
            backend.sessions += 1
            self._metrics.session_created(backend.name)
        else:
            log.warning(
                "backend %s issued a session id bound to %s; not rebound", backend.name, backend_of(owner)
            )

    def _forget(self, sid: str, backend: Backend | None, reason: str) -> None:
        # Count the session down once, even when several requests learn of its end together:
        # the store still has it until the delete below has run.
        if sid in self._forgetting:
            return
        self._metrics.session_ended(reason)
        if backend is not None and backend.sessions > 0 and self._store.peek(sid) is not None:
            backend.sessions -= 1
        self._forgetting.add(sid)
        task = asyncio.get_running_loop().create_task(self._delete(sid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _delete(self, sid: str) -> None:
        try:
            await self._store.delete(sid)
        except StoreError as exc:
            log.warning("could not delete a session from the store: %s", exc)
        finally:
            self._forgetting.discard(sid)

    def session_expired(self, sid: str, owner: str) -> None:
        """Store callback: an entry expired; keep the backend's session count honest."""
        self._metrics.session_ended("expired")
        backend = self.backends.get(backend_of(owner))
        if backend is not None and backend.sessions > 0:
            backend.sessions -= 1

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _same_tag(bound: str | None, tag: str | None) -> bool:
    if bound is None or tag is None:
        return bound is tag
    return hmac.compare_digest(bound, tag)
