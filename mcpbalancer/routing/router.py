"""The routing decision: request facts + what the store knows -> a backend, or an error answer.

Pure policy over injected parts (backends, strategy, store, affinity maps); no sockets. `route` is
the `upstream_peer` phase of filters/phases.py: the data plane calls it once the request filters
have run (route rules have set `facts.pool`, the body filters `facts.state_key`), `learn` when the
backend's response head arrives, `learn_result` for the messages of a watched response, and
`owner_gone` when a session's backend cannot be reached.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry

from mcpbalancer import protocol
from mcpbalancer.errors import InvalidSessionId, NoBackendAvailable, SessionNotFound, StoreError
from mcpbalancer.fleet import backends as kinds
from mcpbalancer.fleet.backends import STATEFUL, STATELESS, Backend, BackendSet
from mcpbalancer.fleet.session_modes import SessionModes
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.routing.affinity import (
    MRTR_METHODS,
    REQUEST_STATE,
    TASK_CREATING,
    TASK_METHODS,
    TASKS,
    Affinity,
)
from mcpbalancer.routing.balancer import Strategy
from mcpbalancer.routing.binding import (
    SEPARATOR,
    Binding,
    Principal,
    SessionBinder,
    backend_of,
    decode_owner,
    decode_rest,
    encode_owner,
)
from mcpbalancer.routing.rules import decoded
from mcpbalancer.store import UNKNOWN, SessionStore

if TYPE_CHECKING:
    from mcpbalancer.routing.sealed import Opened
    from mcpbalancer.store.shared import SharedAffinity

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestFacts:
    """What routing needs to know about one request, read from its head only."""

    method: bytes
    era: Era
    session_id: str | None
    # 2026-07-28 requests only: the routing headers as received, and what routing made of them.
    mcp_method: bytes | None = None
    mcp_name: bytes | None = None
    headers: Sequence[tuple[bytes, bytes, bytes]] = ()
    pool: frozenset[str] | None = None  # the backends a matching rule allows
    state_key: str | None = None  # digest of the requestState an MRTR retry carries
    watch: bool = False  # the response may create a task or a request state: learn from it
    # Only what replay failover needs to re-run `notifications/initialized`; not a routing fact.
    protocol_version: bytes | None = field(default=None, compare=False)
    # A legacy request without a session id that carries MCP-Protocol-Version: not an initialize
    # (a 2025-06-18 client sends the header on every request after it), so it goes only to a
    # backend that serves requests without a session (a stateless one).
    sessionless: bool = False
    tag: str | None = None  # keyed hash of the bound credential (bind_sessions), else None
    # The bound credential itself: replay failover sends it with the replayed initialize.
    credential: bytes | None = field(default=None, compare=False, repr=False)
    # Set by the access filters (filters/): who is calling, and the JSON-RPC calls of the request as
    # (method, tool name or None), from the headers (2026-07-28) or the bounded body (legacy).
    principal: Principal | None = field(default=None, compare=False)
    calls: tuple[tuple[str, str | None], ...] | None = field(default=None, compare=False)
    # Set by routing for the request head: the id the backend knows the session by when it is not
    # the client's (a sealed id, a session replay failover moved), and whether it was moved (then
    # the client's Last-Event-IDs name another process's events).
    upstream_sid: bytes | None = field(default=None, compare=False)
    moved: bool = field(default=False, compare=False)


def classify(
    method: bytes,
    session_id: bytes | None,
    protocol_version: bytes | None,
    mcp_method: bytes | None = None,
    mcp_name: bytes | None = None,
    headers: Sequence[tuple[bytes, bytes, bytes]] = (),
) -> RequestFacts:
    """Facts of a request from its raw header values; InvalidSessionId (400) for a malformed id.

    A request with a session id is a legacy one, routed by its session whatever its
    MCP-Protocol-Version says (protocol.era_of): none of the 2026-07-28 routing applies to it."""
    if session_id is not None:
        if not protocol.valid_session_id(session_id):
            raise InvalidSessionId()
        sid = session_id.decode("ascii")
        return RequestFacts(method, Era.LEGACY, sid, protocol_version=protocol_version)
    if protocol_version is None:
        return RequestFacts(method, Era.LEGACY, None)
    if protocol.era_of(None, protocol_version) is Era.MODERN:
        return RequestFacts(method, Era.MODERN, None, mcp_method, mcp_name, headers)
    return RequestFacts(method, Era.LEGACY, None, sessionless=True)


class Replay(Protocol):
    """Replay failover (failover.py) as the router and the data plane use it: a protocol, not an
    import, because the failover calls back into the router (pick, adopt, rebind, session_lost)."""

    on_backend_404: bool  # `replay_on: [backend_404]`

    def can_replay(self, sid: str) -> bool: ...
    def replay(
        self, router: Router, facts: RequestFacts, gone: Backend | None, *, avoid: bool = True
    ) -> Awaitable[Backend]: ...
    def used(self, sid: str) -> None: ...
    def forget_local(self, sid: str) -> None: ...
    def remember(self, sid: str, target: bytes, body: bytes, tag: str | None) -> None: ...
    def discard(self, sid: str) -> None: ...
    async def close(self) -> None: ...


class Seal(Protocol):
    """Sealed session ids (sealed.py) as the router uses them."""

    max_age: float | None

    opened: dict[str, Opened]  # tokens opened before: a hit is one lookup

    def open(self, token: str) -> Opened: ...
    def seal(self, owner: str, backend_sid: bytes, tag: str | None) -> str: ...
    def end(self, token: str) -> bool: ...


class Router:
    def __init__(
        self,
        backends: BackendSet,
        strategy: Strategy,
        store: SessionStore,
        session_ttl: float,
        metrics: Metrics | None = None,
        *,
        affinity: Affinity | None = None,
        shared_affinity: SharedAffinity | None = None,
        failover: Replay | None = None,
        binder: SessionBinder | None = None,
        refuse_new: Callable[[], bool] | None = None,
        modes: SessionModes | None = None,
        sealed: Seal | None = None,
        max_age: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backends = backends
        self._modes = modes  # learns which backends are stateless; None: only what traffic shows
        self._failover = failover  # `failover: replay`; None for `reinitialize`
        self._binder = binder
        # `session_ids: sealed`: sessions route by their token; the store holds only moved ones.
        self.sealed = sealed
        self._max_age = max_age
        self._changed()
        self._clock = clock  # wall clock: bind times are compared across processes and restarts
        # True while new sessions must be refused (on_store_error: fail, and the store is down).
        self._refuse_new = refuse_new
        self._metrics = metrics or Metrics(CollectorRegistry())
        self._store = store
        self._background: set[asyncio.Task[None]] = set()
        self._forgetting: set[str] = set()  # sessions whose store delete has not finished yet
        self._shared: SharedAffinity | None = None
        self.reconfigure(
            strategy,
            session_ttl,
            affinity=affinity,
            shared_affinity=shared_affinity,
        )

    def reconfigure(
        self,
        strategy: Strategy,
        session_ttl: float,
        *,
        affinity: Affinity | None,
        shared_affinity: SharedAffinity | None,
    ) -> None:
        """Swap the policy parts (a reload): the next decision uses them; requests already routed
        keep their backend. The shared-affinity client replaced here is the caller's to close."""
        self.affinity = affinity
        self._tasks = affinity.tasks if affinity is not None else None
        self._states = affinity.states if affinity is not None else None
        self._shared = shared_affinity if self._tasks is not None or self._states is not None else None
        self._strategy = strategy
        self._ttl = session_ttl

    # The parts a reload swaps; `_reads_value` says whether a plain session's value is read past
    # its owner on every request.
    @property
    def failover(self) -> Replay | None:
        """`failover: replay`; None for `reinitialize`."""
        return self._failover

    @failover.setter
    def failover(self, failover: Replay | None) -> None:
        self._failover = failover
        self._changed()

    @property
    def binder(self) -> SessionBinder | None:
        return self._binder

    @binder.setter
    def binder(self, binder: SessionBinder | None) -> None:
        self._binder = binder
        self._changed()

    @property
    def max_age(self) -> float | None:
        """session_max_age, for plain ids (a sealed token checks its own)."""
        return self._max_age

    @max_age.setter
    def max_age(self, max_age: float | None) -> None:
        self._max_age = max_age
        self._changed()

    def _changed(self) -> None:
        self._reads_value = (
            self._failover is not None or self._binder is not None or self._max_age is not None
        )

    @property
    def shared_affinity(self) -> SharedAffinity | None:
        return self._shared

    def refuse_new_when(self, refuse_new: Callable[[], bool] | None) -> None:
        self._refuse_new = refuse_new

    def route(self, facts: RequestFacts) -> Backend | Awaitable[Backend]:
        """The backend for `facts`: at once when known locally, else an awaitable store lookup.

        Raises SessionNotFound for an unknown session and NoBackendAvailable when nothing can take
        a new one.
        """
        if facts.era is Era.MODERN:
            return self._route_modern(facts)
        sid = facts.session_id
        if sid is None:
            if facts.sessionless:
                return self._route_sessionless(facts)
            if self._refuse_new is not None and self._refuse_new():
                raise NoBackendAvailable("Session store unavailable")  # 503 + Retry-After
            return self.pick(facts)
        if self.sealed is not None:
            return self._route_sealed(facts, self.sealed)
        owner = self._store.peek(sid)
        if owner is UNKNOWN:
            return self._lookup(facts)
        # A local answer, the memory store's included, is a cache hit.
        (self._metrics.lookup_miss if owner is None else self._metrics.lookup_cache_hit).value += 1
        return self._owner_backend(facts, owner)

    def pick(self, facts: RequestFacts, exclude: Collection[str] = ()) -> Backend:
        """A backend for a new session or a stateless request, skipping names in `exclude`: one that
        serves the request's era (legacy sessions never land on a modern-only backend, and back),
        and for a session-less legacy request one that serves it without a session (`_serving`)."""
        candidates = self._candidates(facts, exclude)
        return self._choose(_serving(candidates) if facts.sessionless else candidates)

    def _candidates(self, facts: RequestFacts, exclude: Collection[str] = ()) -> list[Backend]:
        era, pool = facts.era, facts.pool
        return [
            b
            for b in self.backends.available()
            if era in b.eras and b.name not in exclude and (pool is None or b.name in pool)
        ]

    def _choose(self, candidates: list[Backend]) -> Backend:
        backend = self._strategy.pick(candidates)
        if backend is None:
            raise NoBackendAvailable("No backend available")
        return backend

    # -- legacy requests without a session -------------------------------------------------------

    def _route_sessionless(self, facts: RequestFacts) -> Backend | Awaitable[Backend]:
        """A session-less legacy request that is not an initialize: to a stateless backend. The
        kind of the backends not known yet is learned; while no stateless one is known (a cold
        proxy), the request waits for that, each probe within its backend's health timeout."""
        candidates = self._candidates(facts)
        if len(candidates) < 2:
            return self._choose(candidates)  # nothing to choose between
        stateless, unknown = _kinds(candidates)
        modes = self._modes
        learning = modes.learn(unknown) if unknown and modes is not None else None
        if stateless:
            return self._choose(stateless)
        if learning:
            return self._pick_after(learning, facts)
        return self._choose(unknown or candidates)

    async def _pick_after(self, learning: list[asyncio.Task[None]], facts: RequestFacts) -> Backend:
        await asyncio.wait(learning)  # not cancelled with this request: other requests share them
        return self.pick(facts)

    # -- 2026-07-28 requests ------------------------------------------------------------------------

    @property
    def reads_names(self) -> bool:
        """Routing looks at Mcp-Name (the task affinity map): the data plane must capture it."""
        return self._tasks is not None

    def _route_modern(self, facts: RequestFacts) -> Backend | Awaitable[Backend]:
        method = facts.mcp_method
        tasks, states = self._tasks, self._states
        facts.watch = (states is not None and method in MRTR_METHODS) or (
            tasks is not None and method in TASK_CREATING
        )
        if tasks is not None and method in TASK_METHODS and facts.mcp_name is not None:
            kind, key, amap = TASKS, decoded(facts.mcp_name) or "", tasks
        elif states is not None and facts.state_key is not None:
            kind, key, amap = REQUEST_STATE, facts.state_key, states
        else:
            return self.pick(facts)
        name = amap.get(key)
        if name is None and self._shared is not None:
            return self._shared_lookup(kind, key, facts)
        owner = self._sticky(kind, name)
        return owner if owner is not None else self.pick(facts)

    async def _shared_lookup(self, kind: str, key: str, facts: RequestFacts) -> Backend:
        """Unknown here: another replica may have learned it (Redis). A failure is a miss."""
        assert self._shared is not None
        owner = self._sticky(kind, await self._shared.get(kind, key))
        return owner if owner is not None else self.pick(facts)

    def _sticky(self, kind: str, name: str | None) -> Backend | None:
        """The backend an affinity map names, if it is still configured, up and modern-capable. It
        wins over a rule's pool: the task or the state exists nowhere else."""
        backend = self.backends.get(name) if name is not None else None
        usable = backend is not None and backend.up and Era.MODERN in backend.eras
        self._metrics.affinity[(kind, "hit" if usable else "miss")].value += 1
        return backend if usable else None

    def learn_result(self, backend: Backend, message: object) -> None:
        """A message of a watched response: remember the task or request state it created."""
        learned = self.affinity.learn(message, backend.name) if self.affinity is not None else None
        if learned is not None and self._shared is not None:
            self._spawn(self._shared.put(learned.kind, learned.key, backend.name, learned.ttl))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lookup(self, facts: RequestFacts) -> Backend:
        sid = facts.session_id
        assert sid is not None
        try:
            owner = await self._store.get(sid)
        except StoreError as exc:
            log.warning("session store lookup failed: %s", exc)
            raise NoBackendAvailable("Session store unavailable") from exc
        (self._metrics.lookup_miss if owner is None else self._metrics.lookup_store_hit).value += 1
        backend = self._owner_backend(facts, owner)
        return backend if isinstance(backend, Backend) else await backend

    def _owner_backend(self, facts: RequestFacts, owner: str | None) -> Backend | Awaitable[Backend]:
        if owner is None:
            raise SessionNotFound()
        owner_id, _, rest = owner.partition(SEPARATOR)
        backend = self.backends.owner(owner_id)
        if self._reads_value or (backend is not None and backend.gone_at):
            return self._checked(facts, backend, decode_rest(owner_id, rest))
        # Nothing configured reads the rest of the value: the owner decides.
        if backend is None:
            return self.lost(facts, None, "backend_lost")
        if backend.evicted:  # its drain_timeout passed: moved (replay) or ended
            return self.lost(facts, backend, "backend_lost")
        return backend

    def _checked(
        self, facts: RequestFacts, backend: Backend | None, binding: Binding
    ) -> Backend | Awaitable[Backend]:
        if self._failover is not None:
            self._failover.used(facts.session_id or "")
        if binding.alias is not None:  # replay failover moved it: the new backend's id
            facts.upstream_sid, facts.moved = binding.alias, True
        if self.max_age is not None and self._clock() - binding.bound > self.max_age:
            sid = facts.session_id
            assert sid is not None
            self._forget(sid, backend, "expired")
            raise SessionNotFound()
        return self._resolve(facts, backend, binding.tag, binding.bound)

    def _route_sealed(self, facts: RequestFacts, sealed: Seal) -> Backend | Awaitable[Backend]:
        """A sealed id names its owner itself: no store lookup. A session replay failover moved is
        the one the store knows (its token -> a fresh token)."""
        sid = facts.session_id
        assert sid is not None
        opened = sealed.opened.get(sid) if sealed.max_age is None else None  # the hot path: a hit
        if opened is None or not opened.owner:  # not opened yet, too old, or ended here
            opened = sealed.open(sid)  # SessionNotFound when it does not open
        if self._failover is not None:
            self._failover.used(sid)
            moved = self._store.peek(sid)
            if isinstance(moved, str):
                opened = sealed.open(moved)
                facts.moved = True
        self._metrics.lookup_cache_hit.value += 1
        facts.upstream_sid = opened.backend_sid
        backend = self.backends.owner(opened.owner)
        if (
            self._binder is None
            and backend is not None
            and backend.gone_at <= opened.issued
            and not backend.evicted
        ):
            return backend  # nothing more to check: the usual case, decided here
        return self._resolve(facts, backend, opened.tag, opened.issued)

    def _resolve(
        self, facts: RequestFacts, backend: Backend | None, tag: str | None, bound: float
    ) -> Backend | Awaitable[Backend]:
        """`backend` (the live owner, None if gone) for a session bound at `bound` with `tag`, a
        replay, or 404."""
        if self.binder is not None and not _same_tag(tag, facts.tag):
            # Another credential than the session's: it does not exist for this caller. The
            # session itself stays: its owner may still use it.
            log.info("session used with another credential than its own; answered as unknown")
            self._metrics.rejected("credential")
            raise SessionNotFound()
        if backend is None:
            # The mapping names a backend no longer configured, or a managed backend's process that
            # has since been replaced: its sessions are gone.
            return self.lost(facts, None, "backend_lost")
        if backend.gone_at > bound:
            # Bound before its backend last went away: the process that knew it is gone, whatever
            # the one now at that address would answer (some answer 400, which no client recovers from).
            return self.lost(facts, backend, "backend_restarted")
        if backend.evicted:
            # Its drain_timeout passed: the sessions left on it are moved (replay) or ended.
            return self.lost(facts, backend, "backend_lost")
        return backend

    def lost(self, facts: RequestFacts, gone: Backend | None, reason: str) -> Awaitable[Backend]:
        """The session's owner is gone: a replay where configured, else the session ends (404). A
        backend that restarted since the session was bound may take the replay (if it is up)."""
        sid = facts.session_id
        assert sid is not None
        if self.failover is not None and self.failover.can_replay(sid):
            return self.failover.replay(self, facts, gone, avoid=reason != "backend_restarted")
        self._forget(sid, gone, reason)
        raise SessionNotFound()

    def learn(
        self,
        facts: RequestFacts,
        backend: Backend,
        status: int,
        session_id: bytes | None,
        target: bytes = b"",
    ) -> Awaitable[None] | None:
        """React to a response head; an awaitable when the client must wait for a store write.

        A mapping is learned only from a 2xx answer carrying Mcp-Session-Id to a request that carried
        none (stateful servers put fresh, unusable ids on their 400s). A 404 to a session request,
        or a 2xx to its DELETE, ends the session. The answers to session-less requests also tell
        whether the backend keeps sessions: a 2xx with an id, yes; a 2xx without one to a POST of
        the MCP endpoint (`target`), no; a 400 to a session-less request from a backend known
        stateless sends its kind back to be learned again. With sealed ids `session_id` is the new
        token (`seal`), which needs no store.
        """
        if facts.era is Era.MODERN:
            return None
        sid = facts.session_id
        if sid is None:
            # The kind the answer shows, looked at only when it differs from what is known.
            if 200 <= status < 300:
                if session_id is not None:
                    if backend.session_mode != STATEFUL:
                        self._learn_kind(facts, backend, status, True, target)
                    if self.sealed is not None:
                        backend.sessions += 1
                        self._metrics.session_created(backend.name)
                        return None
                    return self._bind(session_id, backend, facts.tag if self.binder is not None else None)
                if backend.session_mode != STATELESS:
                    self._learn_kind(facts, backend, status, False, target)
            elif status == 400 and backend.session_mode == STATELESS and facts.sessionless:
                self._learn_kind(facts, backend, status, False, target)
            return None
        if status == 404 or (facts.method == b"DELETE" and 200 <= status < 300):
            self._forget(sid, backend, "backend_404" if status == 404 else "delete")
        return None

    def _learn_kind(
        self, facts: RequestFacts, backend: Backend, status: int, with_id: bool, target: bytes
    ) -> None:
        """What the answer to a session-less legacy request says of the backend's kind."""
        if backend.declared_mode is not None:
            return  # the file's word
        mode = backend.session_mode
        if 200 <= status < 300:
            if with_id:
                if mode != STATEFUL:
                    _learned(backend, STATEFUL, "a request without a session got one")
            elif mode != STATELESS and facts.method == b"POST" and backend.serves_mcp(target):
                _learned(backend, STATELESS, "a request without a session was served without one")
        elif status == 400 and facts.sessionless and mode == STATELESS:
            # Refused for want of a session, perhaps: a stateless server restarted stateful.
            backend.forget_mode()
            if self._modes is not None:
                self._modes.forget(backend)

    def seal(self, facts: RequestFacts, backend: Backend, session_id: bytes) -> bytes | None:
        """The sealed token the client gets for the new session `session_id` of `backend`; None
        (not sealed, relayed as it is: nothing binds it) for a malformed id. SessionIdTooLong (502)
        when it does not fit."""
        assert self.sealed is not None
        if not protocol.valid_session_id(session_id):
            log.warning("backend %s issued a malformed Mcp-Session-Id; not bound", backend.name)
            return None
        tag = facts.tag if self.binder is not None else None
        return self.sealed.seal(backend.owner_id, session_id, tag).encode("ascii")

    def owner_gone(self, facts: RequestFacts, backend: Backend) -> SessionNotFound:
        """The session's backend is unreachable: forget the session; the client must re-initialize."""
        if facts.session_id is not None:
            log.info("backend %s unreachable; ending session", backend.name)
            self._forget(facts.session_id, backend, "backend_lost")
        return SessionNotFound()

    def session_lost(self, sid: str, backend: Backend | None) -> None:
        """A session that could not be moved elsewhere ends."""
        self._forget(sid, backend, "backend_lost")

    async def adopt(self, facts: RequestFacts, gone: Backend | None) -> Backend | None:
        """Another proxy may have moved the session already (its owner gone for it too): the live
        backend the shared store now names, with `facts` set for it; None if there is none."""
        sid = facts.session_id
        assert sid is not None
        try:
            value = await self._store.refresh(sid)
        except StoreError as exc:
            log.warning("session store lookup failed: %s", exc)
            return None
        if value is None:
            return None
        if self.sealed is not None:
            try:
                opened = self.sealed.open(value)
            except SessionNotFound:
                return None
            owner_id, bound, alias = opened.owner, opened.issued, opened.backend_sid
        else:
            binding = decode_owner(value)
            if binding.alias is None:
                return None
            owner_id, bound, alias = binding.owner, binding.bound, binding.alias
        backend = self.backends.owner(owner_id)
        if backend is None or backend is gone or backend.gone_at > bound or not backend.available:
            return None
        facts.upstream_sid, facts.moved = alias, True
        return backend

    async def rebind(
        self, facts: RequestFacts, backend: Backend, gone: Backend | None, new_sid: bytes
    ) -> None:
        """Replay failover moved the session to `backend`, which knows it as `new_sid`: record the
        new owner over the old one, where every proxy finds it. With sealed ids the client keeps its
        token, and the store maps it to a fresh one."""
        sid = facts.session_id
        assert sid is not None
        tag = facts.tag if self.binder is not None else None
        if self.sealed is not None:
            value = self.sealed.seal(backend.owner_id, new_sid, tag)
        else:
            value = encode_owner(backend.owner_id, tag, self._clock(), new_sid)
        facts.upstream_sid, facts.moved = new_sid, True
        try:
            await self._store.put(sid, value, self._ttl)
        except StoreError as exc:
            log.warning("could not store a moved session: %s", exc)
        if gone is not None and gone.sessions > 0:
            gone.sessions -= 1
        backend.sessions += 1

    async def _bind(self, raw_sid: bytes, backend: Backend, tag: str | None) -> None:
        if not protocol.valid_session_id(raw_sid):
            log.warning("backend %s issued a malformed Mcp-Session-Id; not bound", backend.name)
            return
        sid = raw_sid.decode("ascii")
        try:
            value = encode_owner(backend.owner_id, tag, self._clock())
            owner = await self._store.bind(sid, value, self._ttl)
        except StoreError as exc:
            log.warning("could not store session of backend %s: %s", backend.name, exc)
            if self._refuse_new is not None:  # on_store_error: fail (a Cluster slot down)
                raise NoBackendAvailable("Session store unavailable") from exc
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
        if self.failover is not None:
            self.failover.discard(sid)
        if self.sealed is not None and not self.sealed.end(sid):
            return  # ended here before: counted then
        self._metrics.session_ended(reason)
        live = self.sealed is not None or self._store.peek(sid) is not None
        if backend is not None and backend.sessions > 0 and live:
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

    def ended_elsewhere(self, sid: str) -> None:
        """Another proxy ended the session (store event): its local traces go too."""
        if self._failover is not None:
            self._failover.forget_local(sid)
        if self.sealed is not None:
            self.sealed.end(sid)

    def session_expired(self, sid: str, owner: str) -> None:
        """Store callback: an entry expired; keep the backend's session count honest."""
        self._metrics.session_ended("expired")
        if self.failover is not None:
            self.failover.discard(sid)
        backend = self.backends.owner(backend_of(owner))
        if backend is not None and backend.sessions > 0:
            backend.sessions -= 1

    async def close(self) -> None:
        if self.failover is not None:
            await self.failover.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._shared is not None:
            await self._shared.close()


def _serving(candidates: list[Backend]) -> list[Backend]:
    """The candidates for a session-less legacy request: the stateless ones; else those of an
    unknown kind (it could not be learned); else all of them, every one stateful, which answers
    400 "Missing session ID" as the server itself would."""
    stateless, unknown = _kinds(candidates)
    return stateless or unknown or candidates


def _kinds(candidates: list[Backend]) -> tuple[list[Backend], list[Backend]]:
    """The stateless candidates and those of an unknown kind, in one pass."""
    stateless: list[Backend] = []
    unknown: list[Backend] = []
    for backend in candidates:
        mode = backend.session_mode
        if mode == STATELESS:
            stateless.append(backend)
        elif mode == kinds.UNKNOWN:
            unknown.append(backend)
    return stateless, unknown


def _learned(backend: Backend, mode: str, why: str) -> None:
    backend.learned_mode(mode)
    log.info("backend %s is %s (%s)", backend.name, mode, why)


def _same_tag(bound: str | None, tag: str | None) -> bool:
    if bound is None or tag is None:
        return bound is tag
    return hmac.compare_digest(bound, tag)
