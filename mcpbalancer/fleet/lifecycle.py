"""The backends at run time: built from the config, re-shaped by a reload or by discovery, drained,
reported.

The BackendSet and the pools dict are updated in place, because the router and the data plane hold
references to them. A removed backend leaves the set at once (its sessions answer 404), but its
exchanges in flight keep their Backend object and connections and run to their end.

Discovered backends (fleet/discovery.py) are members too, each tagged with its `discover` entry;
`sync` sets one entry's members. One that DNS no longer lists has *vanished*: it is drained, keeps
serving its sessions, and stays a member until `retire` finds it done with (nothing in flight, and
down or past its drain_timeout), because a session's owner must be a member to be routed to.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from mcpbalancer.config import DEFAULT_MCP_PATH, BackendConfig, TlsConfig
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.protocol import Era

log = logging.getLogger(__name__)


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)  # discovered backends that vanished from DNS

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated or self.drained)

    def as_json(self) -> dict[str, list[str]]:
        return {"added": self.added, "removed": self.removed, "updated": self.updated}


def _backend(config: BackendConfig, contexts: Mapping[str, ssl.SSLContext], mcp_path: bytes) -> Backend:
    return Backend(
        name=config.name,
        host=config.host,
        port=config.port,
        weight=config.weight,
        tls=config.scheme == "https",
        endpoint=config.path.encode("ascii"),
        mcp_path=mcp_path,
        eras=frozenset(Era(era) for era in config.eras),
        up=config.command is None,  # a managed backend is up once its process serves
        ssl_context=_context(config, contexts.get(config.name)),
        server_name=config.tls.server_name if config.tls is not None else None,
    )


def _context(config: BackendConfig, context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The backend's TLS context; an https backend without one would be spoken to in plain text."""
    if config.tls is not None and context is None:
        raise ValueError(f"backend {config.name} is https but was given no TLS context")
    return context


class Pool(Protocol):
    """What the fleet does with a backend's connection pool (the data plane's UpstreamPool)."""

    def close(self) -> None: ...


P = TypeVar("P", bound=Pool)


class Fleet(Generic[P]):
    """Owns the BackendSet, the upstream pools, and the drain timers.

    `pool` makes a backend's pool: the pools are the data plane's, a layer above the fleet, which
    only makes and closes them. `contexts` are the TLS client contexts of the https backends by
    name (dataplane/tls.py builds them); a reload passes the ones built from the new file."""

    def __init__(
        self,
        configs: Iterable[BackendConfig],
        *,
        pool: Callable[[Backend], P],
        contexts: Mapping[str, ssl.SSLContext] | None = None,
        mcp_path: str = DEFAULT_MCP_PATH,
    ) -> None:
        self._pool = pool
        self._mcp_path = mcp_path.encode("ascii")
        contexts = contexts or {}
        self.backends = BackendSet(())
        self.pools: dict[str, P] = {}
        self.on_evict: Callable[[Backend], None] = lambda backend: None
        # A discovered backend left the set for good (retired): the composition root drops what
        # other parts keep by its name (health state, metric series).
        self.on_remove: Callable[[Backend], None] = lambda backend: None
        self._entries: dict[str, str] = {}  # discovered backend name -> its `discover` entry
        self._vanished: set[str] = set()  # discovered backends DNS no longer lists, draining
        self._drain_after: dict[str, float] = {}  # each discovered backend's drain_timeout
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._drain_timeouts: dict[str, float] = {}  # the drain_timeout each drain was started with
        self._pending_drains: dict[str, float] = {}  # drains from the config, armed at start()
        self._tls: dict[str, TlsConfig | None] = {}  # the `tls` settings each backend runs with
        members = []
        for config in configs:
            backend = _backend(config, contexts, self._mcp_path)
            self.pools[backend.name] = self._pool(backend)
            self._tls[backend.name] = config.tls
            if config.drain:
                backend.draining = True
                self._pending_drains[backend.name] = config.drain_timeout
            members.append(backend)
        self.backends.replace(members)

    def start(self) -> None:
        """Arm the drain timeouts of backends drained by the config (needs the running loop)."""
        for name, timeout in self._pending_drains.items():
            backend = self.backends.get(name)
            if backend is not None and backend.draining:
                self._arm(backend, timeout)
        self._pending_drains.clear()

    # -- the narrow interface of the health checker -----------------------------------------------

    def set_status(self, name: str, up: bool) -> None:
        backend = self.backends.get(name)
        if backend is not None:
            backend.up = up

    # -- drain ------------------------------------------------------------------------------------

    def drain(self, name: str, timeout: float = 0.0) -> bool:
        """No new sessions for `name`; after `timeout` (> 0) its sessions answer 404. False if unknown."""
        backend = self.backends.get(name)
        if backend is None:
            return False
        if not backend.draining:
            backend.draining = True
            log.info("backend %s draining", name)
            self._arm(backend, timeout)
        return True

    def undrain(self, name: str) -> bool:
        backend = self.backends.get(name)
        if backend is None:
            return False
        self._disarm(name)
        if backend.draining:
            log.info("backend %s undrained", name)
        backend.draining = backend.evicted = False
        return True

    def _arm(self, backend: Backend, timeout: float) -> None:
        self._disarm(backend.name)
        self._drain_timeouts[backend.name] = timeout
        if timeout > 0:
            loop = asyncio.get_running_loop()
            self._timers[backend.name] = loop.call_later(timeout, self._evict, backend)

    def _disarm(self, name: str) -> None:
        self._drain_timeouts.pop(name, None)
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _evict(self, backend: Backend) -> None:
        self._timers.pop(backend.name, None)
        if not backend.draining:
            return
        log.warning("backend %s: drain timeout; ending its %d sessions", backend.name, backend.sessions)
        backend.evicted = True
        self.on_evict(backend)

    # -- reload -----------------------------------------------------------------------------------

    def apply(
        self,
        configs: Iterable[BackendConfig],
        contexts: Mapping[str, ssl.SSLContext] | None = None,
        *,
        mcp_path: str | None = None,
        discovered: Collection[str] = (),
    ) -> Changes:
        """Make the running backends match `configs` (and, if given, `mcp_path`); the file is the
        source of truth. The backends found by the `discover` entries named in `discovered` stay
        (`sync` keeps them); those of other entries leave with their entry."""
        contexts = contexts or {}
        changes = Changes()
        members = []
        if mcp_path is not None:
            self._mcp_path = mcp_path.encode("ascii")
            for running in self.backends:
                running.mcp_path = self._mcp_path
        for config in configs:
            backend = self.backends.get(config.name)
            if backend is None:
                backend = self._add(config, contexts)
                changes.added.append(backend.name)
            elif config.command is None and self._update(backend, config, contexts.get(config.name)):
                # (A managed backend's address is its process's; managed.py moves it.)
                changes.updated.append(backend.name)
            self._drain_as_configured(backend, config, from_file=True)
            members.append(backend)
        members += [b for b in self.backends if self._entries.get(b.name) in discovered]
        names = {b.name for b in members}
        for backend in self.backends:
            if backend.name not in names:
                # Its pool stays in the dict (closed) for its exchanges still in flight.
                self._disarm(backend.name)
                self.pools[backend.name].close()
                self._forget_discovered(backend.name)
                changes.removed.append(backend.name)
        self.backends.replace(members)
        return changes

    def _drain_as_configured(self, backend: Backend, config: BackendConfig, *, from_file: bool) -> None:
        """`drain` as the file says. A DNS answer (not `from_file`) undrains only a backend that had
        vanished: a drain from the admin API lasts until the next reload, as for any backend."""
        if config.drain and backend.draining:
            if self._drain_timeouts.get(backend.name) != config.drain_timeout and not backend.evicted:
                self._arm(backend, config.drain_timeout)  # a new timeout counts from the reload
        elif config.drain:
            self.drain(backend.name, config.drain_timeout)
        elif from_file or backend.name in self._vanished:
            self.undrain(backend.name)
        self._vanished.discard(backend.name)

    # -- discovery --------------------------------------------------------------------------------

    def sync(
        self,
        entry: str,
        configs: Sequence[BackendConfig],
        contexts: Mapping[str, ssl.SSLContext] | None = None,
        *,
        from_file: bool = False,
    ) -> Changes:
        """The backends the `discover` entry `entry` finds now. A new one joins and takes sessions at
        once; a known one takes the entry's settings (and is undrained if it had vanished); the
        entry's others have vanished: drained (their drain_timeout counting from now) and kept until
        `retire`. `from_file`: the entry's settings were just reloaded (see `apply`)."""
        contexts = contexts or {}
        changes = Changes()
        members = [b for b in self.backends if self._entries.get(b.name) != entry]
        for config in configs:
            backend = self.backends.get(config.name)
            if backend is None:
                backend = self._add(config, contexts)
                self._entries[backend.name] = entry
                changes.added.append(backend.name)
            elif self._update(backend, config, contexts.get(config.name)):
                changes.updated.append(backend.name)
            self._drain_after[backend.name] = config.drain_timeout
            self._drain_as_configured(backend, config, from_file=from_file)
            members.append(backend)
        found = {config.name for config in configs}
        for backend in self.backends:
            if self._entries.get(backend.name) == entry and backend.name not in found:
                if backend.name not in self._vanished:
                    self._vanished.add(backend.name)
                    self._disarm(backend.name)  # an admin drain's timer gives way to the entry's
                    backend.draining = False
                    self.drain(backend.name, self._drain_after.get(backend.name, 0.0))
                    changes.drained.append(backend.name)
                members.append(backend)
        self.backends.replace(members)
        return changes

    def retire(self) -> list[str]:
        """Remove the vanished backends that are done with: nothing in flight, and down (it stopped
        answering) or evicted (its drain_timeout passed). Their sessions then answer 404 (or are
        replayed). A vanished backend that still answers stays: a session another proxy replica
        placed on it may still come here."""
        done = [
            b
            for b in self.backends
            if b.name in self._vanished and b.in_flight == 0 and (b.evicted or not b.up)
        ]
        if not done:
            return []
        self.backends.replace(b for b in self.backends if b not in done)
        for backend in done:
            self._disarm(backend.name)
            pool = self.pools.pop(backend.name, None)  # nothing in flight may still ask for it
            if pool is not None:
                pool.close()
            self._forget_discovered(backend.name)
            log.info("backend %s removed: gone from DNS and %s", backend.name, backend.state)
            self.on_remove(backend)
        return [b.name for b in done]

    def discovered(self, entry: str) -> list[Backend]:
        """The members found by `entry`, vanished ones included."""
        return [b for b in self.backends if self._entries.get(b.name) == entry]

    def vanished(self, name: str) -> bool:
        return name in self._vanished

    def _forget_discovered(self, name: str) -> None:
        self._entries.pop(name, None)
        self._vanished.discard(name)
        self._drain_after.pop(name, None)
        self._tls.pop(name, None)

    def _add(self, config: BackendConfig, contexts: Mapping[str, ssl.SSLContext]) -> Backend:
        backend = _backend(config, contexts, self._mcp_path)
        old = self.pools.get(backend.name)  # a pool left by an earlier removal
        if old is not None:
            old.close()
        self.pools[backend.name] = self._pool(backend)
        self._tls[backend.name] = config.tls
        return backend

    def _update(self, backend: Backend, config: BackendConfig, context: ssl.SSLContext | None) -> bool:
        context = _context(config, context)
        tls = config.scheme == "https"
        endpoint = config.path.encode("ascii")
        address = (config.host, config.port, tls, endpoint, config.tls)
        eras = frozenset(Era(era) for era in config.eras)
        changed = backend.weight != config.weight or backend.eras != eras
        backend.weight = config.weight
        backend.eras = eras
        was = (backend.host, backend.port, backend.tls, backend.endpoint, self._tls.get(backend.name))
        # New connections use the context built from the file just read (its files read again); the
        # idle ones were verified under the same settings and are kept unless the settings changed.
        backend.ssl_context = context
        backend.server_name = config.tls.server_name if config.tls is not None else None
        self._tls[backend.name] = config.tls
        if address != was:
            # Same name, so its sessions stay bound to it; new connections go to the new address.
            backend.set_address(config.host, config.port, tls)
            backend.endpoint = endpoint
            self.pools[backend.name].close()
            self.pools[backend.name] = self._pool(backend)
            changed = True
        return changed

    # -- report -----------------------------------------------------------------------------------

    def snapshot(self, last_check: dict[str, float], reasons: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {
                "name": b.name,
                "state": b.state,
                "weight": b.weight,
                "sessions": b.sessions,
                "in_flight": b.in_flight,
                "last_check": last_check.get(b.name),
                "reason": reasons.get(b.name),
            }
            for b in self.backends
        ]

    def close(self) -> None:
        for name in list(self._timers):
            self._disarm(name)
        for pool in self.pools.values():
            pool.close()
