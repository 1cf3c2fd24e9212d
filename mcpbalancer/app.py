"""Composition root: builds the store, backends, balancer, router and data plane from a Config.

Nothing else in the package constructs these parts; tests build a Proxy from a Config and run it
in their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final, TextIO

from prometheus_client import CollectorRegistry

from mcpbalancer import __version__
from mcpbalancer.config import (
    DEFAULT_SERVICE,
    AuthConfig,
    BackendConfig,
    Config,
    HealthConfig,
    host_port,
    load_config,
)
from mcpbalancer.config.listeners import CLIENT_CERT
from mcpbalancer.config.runtime import ServiceConfig
from mcpbalancer.config.services import match_of, service_config
from mcpbalancer.control.admin import AdminApi
from mcpbalancer.control.audit import Audit
from mcpbalancer.control.auth import PROBES, AdminAuth, warn_if_open
from mcpbalancer.control.probes import Readiness, local_endpoints
from mcpbalancer.control.server import ControlServer
from mcpbalancer.control.status import MergedMapping, ProcessInfo, Reload, StatusPage
from mcpbalancer.dataplane.client import ServicePlaneLike
from mcpbalancer.dataplane.handshake import TlsEndpoint, TlsListener
from mcpbalancer.dataplane.listener_tls import ServerTls, listener_tls
from mcpbalancer.dataplane.local import LocalHandler
from mcpbalancer.dataplane.plane import DataPlane, ServicePlane
from mcpbalancer.dataplane.services import Route, ServiceMap
from mcpbalancer.dataplane.tls import backend_contexts
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.errors import BackendStartError, ConfigError, ListenError, RestartRequired
from mcpbalancer.filters.affinity import AffinityLearning, RequestStateKey
from mcpbalancer.filters.clientip import TrustedProxies
from mcpbalancer.filters.concurrency import ConcurrencyLimits
from mcpbalancer.filters.failover import ReplayAlias
from mcpbalancer.filters.front_door import FrontDoor
from mcpbalancer.filters.headercheck import StrictHeaders
from mcpbalancer.filters.hosts import HostFilter, HostPolicy, for_listen
from mcpbalancer.filters.origin import OriginFilter, OriginPolicy
from mcpbalancer.filters.phases import Phases, compose
from mcpbalancer.filters.ratelimit import Buckets, RateLimits, rates_of
from mcpbalancer.filters.route_rules import RouteRules
from mcpbalancer.filters.sealed import SealedSessions
from mcpbalancer.filters.session_binding import ClientCertBinding, SessionBinding
from mcpbalancer.filters.toolpolicy import ToolPolicy
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.discovery import Discovery
from mcpbalancer.fleet.generations import Generations
from mcpbalancer.fleet.health import HealthChecker
from mcpbalancer.fleet.http_probe import HttpProbe
from mcpbalancer.fleet.lifecycle import Changes, Fleet
from mcpbalancer.fleet.managed import ManagedBackends
from mcpbalancer.fleet.resolver import DnsResolver
from mcpbalancer.fleet.session_modes import PingProbe, SessionModes
from mcpbalancer.observability.logs import AccessLog, SessionHasher, access_enabled, reconfigure_logging
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.observability.tracing import Tracing
from mcpbalancer.routing.affinity import Affinity
from mcpbalancer.routing.balancer import Strategy, make_strategy
from mcpbalancer.routing.binding import SessionBinder
from mcpbalancer.routing.failover import Failover
from mcpbalancer.routing.router import Router
from mcpbalancer.routing.rules import compile_rules
from mcpbalancer.routing.sealed import SealedIds
from mcpbalancer.store import SessionStore
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.factory import create_store
from mcpbalancer.store.ratelimit import LocalBuckets, SharedBuckets
from mcpbalancer.store.records import SharedRecords
from mcpbalancer.store.redis import RedisStore
from mcpbalancer.store.shared import SharedAffinity

if TYPE_CHECKING:
    from mcpbalancer.filters.jwks import JwksSource, StaticKeys

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 30.0
SHUTDOWN_POLL = 0.05
# Every Config field, by what a reload (SIGHUP, POST /admin/reload) does with it. A change to a
# RESTART_ONLY one refuses the whole reload; the LIVE ones are applied together. A test checks that
# each field is in exactly one of them.
RESTART_ONLY: Final = frozenset(
    {
        "listen_host",  # `listen`: the socket is bound once (and shared by the workers)
        "listen_port",
        "workers",  # the supervisor forks them at start
        "store",  # the sessions live in it: a new store would know none of them
        "store_prefix",  # the same: the keys already written are under the old prefix
        "session_ids",  # plain or sealed: a switch would end every session, which a restart says
        "admin",  # the control listener is bound once; /admin/reload itself is served there
        "metrics",  # its page is a route of the listener(s), registered when they start
    }
)
# The fields whose key in the file has another name.
_FILE_KEYS: Final = {"listen_host": "listen", "listen_port": "listen", "replay_on": "failover"}
LIVE: Final = frozenset(
    {
        "source",  # the file itself; reloads read the same one
        "backends",
        "discovery",  # the `discover` entries: looked up again at once when their lookup changed
        "health",
        "shutdown_timeout",
        "mcp_path",
        "balance",
        "heartbeat",
        "timeouts",
        "limits",  # header_bytes/header_count: connections opened after the reload
        "session_ttl",
        "local_cache_size",  # the cache (and the replay records) shrink or grow in place
        "log",
        "tracing",  # a change starts a new exporter; spans begun before end with the old one
        "pools",
        "routes",
        "affinity",  # a change starts the maps afresh: entries learned before are dropped
        "validate_headers",
        "failover",
        "replay_on",  # `failover.replay_on`
        "session_keys",  # a new first key seals from now on; a removed key's tokens stop opening
        "session_max_age",
        "allowed_origins",
        "allowed_hosts",  # the Host check and the Origin rule that reads it
        "bind_sessions",  # a change ends the sessions bound under the old binding (404)
        "session_binding_key",
        "on_store_error",
        "access",  # auth, tool_policy, rate_limits: the buckets start afresh when rate_limits change
        "trusted_proxies",
        "admin_tokens",  # `admin.token`: a rotation is a reload with the old and the new, then the new
        "services",  # added, changed (their LIVE settings, as the top-level ones) and removed
        # `listen` entries: their TLS files and settings are read again (new handshakes use them);
        # their addresses, and whether each speaks TLS, are restart only (restart_only_problem).
        "listeners",
    }
)


def restart_only_problem(running: Config, new: Config) -> str | None:
    """What a reload to `new` cannot apply (a RESTART_ONLY setting changed), or None."""
    changed = {k for k in RESTART_ONLY if getattr(new, k) != getattr(running, k)}
    if [x.shape for x in new.all_listeners] != [x.shape for x in running.all_listeners]:
        changed.add("listen_host")  # a listener added, removed, moved, or TLS turned on or off
    if not changed:
        return None
    keys = ", ".join(f"`{k}`" for k in sorted({_FILE_KEYS.get(k, k) for k in changed}))
    return f"{keys} changed; a restart is needed to apply it, nothing of the file was applied"


def _shared_affinity(config: Config) -> SharedAffinity | None:
    """With a Redis store and affinity on, affinity entries are shared with the other replicas."""
    if not _shared_affinity_wanted(config):
        return None
    return SharedAffinity.from_url(config.store, prefix=config.store_prefix)


def _host_policy(config: Config, *, warn: bool = True, named: tuple[str, ...] = ()) -> HostPolicy:
    """`allowed_hosts` for the listen address (with the services' hosts when it is not set), with a
    warning when it is open or left to the default on an address other machines reach (once: not
    again for each service)."""
    policy = for_listen(config.allowed_hosts, config.listen_host, named)
    if not warn:
        return policy
    if policy.any:
        log.warning("allowed_hosts: '*' accepts every Host: DNS-rebinding protection is off")
    elif config.allowed_hosts is None and policy.ip_literals:
        log.warning(
            "listen %s is not a loopback address and allowed_hosts is not set: only IP addresses and "
            "%s are accepted as Host (others get 421); list the names clients use in allowed_hosts",
            config.listen_host,
            ", ".join(policy.patterns),
        )
    return policy


def _shared_affinity_wanted(config: Config) -> bool:
    return config.store != "memory" and (config.affinity.tasks or config.affinity.request_state)


def _binder(config: Config) -> SessionBinder | None:
    """The session binding: to a header (`bind_sessions`), or to the principal with `auth`."""
    key = config.session_binding_key
    secret = key.encode() if key is not None else None
    if config.access.auth.enforced:
        header = config.bind_sessions
        return SessionBinder(header or "authorization", secret, by_principal=True, header_bound=bool(header))
    if config.bind_sessions is None:
        return None
    return SessionBinder(config.bind_sessions, secret)


def _binding(config: Config) -> tuple[object, ...]:
    """What the binder is made of: a change ends the sessions bound under the old one."""
    return config.bind_sessions, config.session_binding_key, config.access.auth.enforced


def key_file(config: Config) -> StaticKeys | None:
    """The key set of `auth.jwks_file`, read now (at start, by --check, on every reload); None
    without one. PyJWT and the key-set code are loaded only when auth is on: a proxy without it
    carries none of their objects (some 6000, which every full garbage collection walks) nor
    their import time."""
    auth = config.access.auth
    if not auth.enforced or auth.jwks_file is None:
        return None
    from mcpbalancer.filters.jwks import configured_keys  # only with auth: see above

    return configured_keys(config)


def _jwks_settings(config: Config) -> tuple[object, ...] | None:
    auth = config.access.auth
    if not auth.enforced or auth.jwks_url is None:
        return None
    return auth.jwks_url, auth.algorithms, auth.jwks_refresh, auth.jwks_cooldown


def _process(backend: BackendConfig) -> BackendConfig:
    """What of a managed backend only a restart changes: all but its health and session mode."""
    return dataclasses.replace(backend, health=HealthConfig(), session_mode="auto")


def _without_credentials(store: str) -> str:
    """A store URL as the status page shows it: no user or password."""
    parts = urllib.parse.urlsplit(store)
    if parts.password is None and parts.username is None:
        return store
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _stripped(service: ServiceConfig) -> str:
    """What a service's requests lose before it sees them: its path_prefix when stripped."""
    return service.path_prefix or "" if service.strip_prefix else ""


def _unchanged(config: Config) -> Config:
    return config


def _sealed(config: Config, metrics: Metrics, service: str) -> SealedIds | None:
    if config.session_ids != "sealed":
        return None
    return SealedIds(
        [key.material for key in config.session_keys],
        max_age=config.session_max_age,
        capacity=config.local_cache_size,
        metrics=metrics,
        service=service,  # a token of one service does not open at another
    )


def _plain_max_age(config: Config) -> float | None:
    """session_max_age as the router checks it: a sealed token carries its own issue time."""
    return config.session_max_age if config.session_ids == "plain" else None


class Proxy:
    """One running mcpbalancer: `await start()`, serve, `await stop()`."""

    access_log: AccessLog | None
    metrics: Metrics
    router: Router
    health: HealthChecker
    tracing: Tracing | None
    control: ControlServer | None
    admin_auth: AdminAuth | None
    readiness: Readiness
    _worker: int | None
    _local: Mapping[bytes, LocalHandler]

    def __init__(
        self,
        config: Config,
        *,
        shutdown_timeout: float | None = None,
        registry: CollectorRegistry | None = None,
        access_stream: TextIO | None = None,
        adjust: Callable[[Config], Config] | None = None,
        session_tag_key: bytes | None = None,
        worker: int | None = None,
        control_socket: str | None = None,
        parent: Proxy | None = None,
        service: str = DEFAULT_SERVICE,
        public_prefix: str = "",
    ) -> None:
        self.config = config
        # A `services` entry is a Proxy without a listener, run by its parent (the top-level one),
        # whose metrics, logs and tracing it shares; `services` are the parent's, by name.
        self._parent = parent
        self.service = service
        self.public_prefix = public_prefix  # a service's stripped path_prefix (the auth URLs carry it)
        self.services: dict[str, Proxy] = {}
        self._prepared = False  # ready to serve: its managed backends up, its first lookups done
        self._started = False  # its background work runs
        self.started_at = time.time()
        self.last_reload: Reload | None = None
        # What the command line changed in `config` (--log-level, --workers, a worker's admin port),
        # applied to every reloaded file too, so a reload neither drops it nor warns about it.
        self._adjust = adjust or _unchanged
        # An explicit argument wins over the config's `shutdown_timeout` (and over its reloads).
        self._shutdown_override = shutdown_timeout
        contexts = backend_contexts(config)
        self.fleet = Fleet(
            config.backends,
            # A pool made after a reload (a backend added or moved) takes the timeout then in force.
            pool=lambda backend: UpstreamPool(backend, connect_timeout=self.config.timeouts.connect),
            contexts=contexts,
            mcp_path=config.mcp_path,
        )
        self.backends = self.fleet.backends
        self._probe = HttpProbe(lambda: self.health.config)
        self._ping = PingProbe(lambda: self.health.config)
        self.modes = SessionModes(self._ping)
        self.metrics = (
            parent.metrics
            if parent is not None
            else Metrics(registry or CollectorRegistry(), self.all_backends, runtime=True)
        )
        self.store: SessionStore = create_store(
            config.store,
            prefix=config.store_prefix,
            cache_size=config.local_cache_size,
            on_expire=lambda sid, owner: self.router.session_expired(sid, owner),
            session_ttl=config.session_ttl,
            metrics=self.metrics,
            fail_new=config.on_store_error == "fail",
        )
        # When each backend was last seen to go away, shared with the other proxies through the store.
        self.generations = Generations(
            self.backends, self.store if isinstance(self.store, CachedStore) else None
        )
        # Kept as the class the proxy runs; the router sees it only through its Replay protocol.
        self.failover = failover = self._failover(config, None)
        self.sealed = _sealed(config, self.metrics, service)
        binder = _binder(config)
        self.router = Router(
            self.backends,
            make_strategy(config.balance),
            self.store,
            config.session_ttl,
            self.metrics,
            affinity=Affinity(config.affinity),
            shared_affinity=_shared_affinity(config),
            failover=failover,
            binder=binder,
            refuse_new=self._refuse_new(config),
            modes=self.modes,
            sealed=self.sealed,
            max_age=_plain_max_age(config),
        )
        self.health = HealthChecker(
            config.health,
            self.fleet.set_status,
            self._probe,
            metrics=self.metrics,
            on_gone=self.generations.gone,
        )
        self._plane: DataPlane | None = None
        self._retired: set[asyncio.Task[None]] = set()  # closing parts a reload replaced
        self._concurrency = ConcurrencyLimits(self.metrics)
        self._jwks: JwksSource | None = None
        self._jwks_task: asyncio.Task[None] | None = None
        self._buckets: Buckets | None = None
        self.access_filters = self._access_filters(config, None, key_file(config))
        self.discovery = Discovery(
            config.discovery, self.fleet, DnsResolver(), contexts=contexts, metrics=self.metrics
        )
        self.fleet.on_remove = self._removed
        # The listeners are the top-level proxy's: a service has none of its own.
        self._endpoints: list[TlsEndpoint | None] = []
        if parent is not None:
            self._as_service(parent)
        else:
            tls = listener_tls(config)  # read now: a bad certificate file fails here, as a backend's does
            self._observability(config, access_stream, session_tag_key, worker, control_socket)
            self._endpoints = [
                None if t is None else TlsEndpoint(listener.address, t)
                for listener, t in zip(config.all_listeners, tls, strict=True)
            ]
            self._certificates(config, tls)
        if self.control is not None:
            AdminApi(
                self.admin_services,
                self.reload,
                audit=None if control_socket is not None else Audit(self.metrics),
                source=lambda: self.config.source,
            ).install(self.control.app)
            self._status_page().install(self.control.app)
        self.managed = ManagedBackends(config.backends, self.backends, metrics=self.metrics)
        self._servers: list[asyncio.Server | TlsListener] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._checker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        for entry in config.services if parent is None else ():
            self.services[entry.name] = self._service(entry.name, config)
        if self.services:
            self.metrics.service_of = self._service_of

    def set_drained(self, backend: str, drained: bool) -> bool:
        """Drain (or undrain) a backend of any service; False if no service has it."""
        for _, _, fleet, _ in self.admin_services():
            if fleet.backends.get(backend) is not None:
                return fleet.drain(backend) if drained else fleet.undrain(backend)
        return False

    def _service_of(self, backend: str) -> str:
        """The service of a backend name (the metrics' `service` label, asked once per cell)."""
        for name, child in self.services.items():
            if child.backends.get(backend) is not None:
                return name
        return DEFAULT_SERVICE

    def _service(self, name: str, config: Config) -> Proxy:
        entry = next(s for s in config.services if s.name == name)
        return Proxy(
            service_config(config, entry),
            parent=self,
            service=name,
            adjust=self._adjust,
            public_prefix=_stripped(entry),
        )

    def _as_service(self, parent: Proxy) -> None:
        """A service's share of what the parent observes with: its metrics, logs, tracing."""
        self.readiness = Readiness(lambda: self.router.backends, self.store.ping)
        self.tracing = parent.tracing
        self.access_log = parent.access_log
        self._worker = parent._worker
        self.admin_auth = None
        self.control = None
        self._local = {}

    def all_backends(self) -> list[Backend]:
        """The backends of every service, the default one's first."""
        backends = list(self.router.backends)
        for child in self.services.values():
            backends += child.router.backends
        return backends

    def admin_services(self) -> list[tuple[str, ServiceConfig | None, Fleet[Any], HealthChecker]]:
        """(name, its `services` entry or None for the default, fleet, health) of every service."""
        parts: list[tuple[str, ServiceConfig | None, Fleet[Any], HealthChecker]] = []
        if self.config.backends or self.config.discovery or not self.services:
            parts.append((DEFAULT_SERVICE, None, self.fleet, self.health))
        entries = {s.name: s for s in self.config.services}
        for name, child in self.services.items():
            parts.append((name, entries.get(name), child.fleet, child.health))
        return parts

    @property
    def shutdown_timeout(self) -> float:
        return self.config.shutdown_timeout if self._shutdown_override is None else self._shutdown_override

    def reload(self) -> Changes:
        """Re-read the config file and apply every LIVE setting of it.

        Raises ConfigError (and changes nothing) when the file is invalid or a TLS file of it
        cannot be used; RestartRequired (and changes nothing) when it changes a RESTART_ONLY one.
        The outcome is kept for the status page.
        """
        try:
            changes = self._reload()
        except ConfigError as exc:
            self.last_reload = Reload(time.time(), f"refused: {exc}")
            raise
        added, removed = ", ".join(changes.added) or "none", ", ".join(changes.removed) or "none"
        self.last_reload = Reload(time.time(), f"ok (added {added}; removed {removed})")
        return changes

    def _reload(self) -> Changes:
        try:
            new = self._adjust(load_config(self.config.source))
            prepared = self._prepare(new)  # TLS and key set files read again: renewed ones are used
            tls = listener_tls(new)  # and the listeners': new handshakes take the new pair
            children = {
                s.name: (c, self._prepare(c)) for s in new.services for c in (service_config(new, s),)
            }
        except ConfigError as exc:
            log.error("reload rejected, running configuration kept: %s", exc)
            raise
        self._refuse_restart_only(new)
        for name, (config, _) in children.items():
            if name in self.services:
                self.services[name]._keep_managed(config.backends)  # refuses a clash, before any change
        before = {s.name: s for s in self.config.services}
        changes = self._apply(new, *prepared)
        self._apply_services(new, children, changes, before)
        for endpoint, server_tls in zip(self._endpoints, tls, strict=True):
            if endpoint is not None and server_tls is not None:
                endpoint.tls = server_tls
        self._certificates(new, tls)
        log.info(
            "reloaded %s: added %s, removed %s, updated %s",
            new.source,
            changes.added or "none",
            changes.removed or "none",
            changes.updated or "none",
        )
        return changes

    @staticmethod
    def _prepare(config: Config) -> tuple[dict[str, Any], StaticKeys | None]:
        return backend_contexts(config), key_file(config)

    def _apply(self, new: Config, contexts: dict[str, Any], keys: StaticKeys | None) -> Changes:
        """Apply the LIVE settings of `new` (this service's, or the top-level's)."""
        backends = self._keep_managed(new.backends)
        entries = {entry.name for entry in new.discovery}
        changes = self.fleet.apply(backends, contexts, mcp_path=new.mcp_path, discovered=entries)
        self.discovery.reconfigure(new.discovery, contexts)
        self.health.reconfigure(new.health)
        self.health.track(self.backends)
        self._apply_policy(self.config, new, keys)
        self.config = dataclasses.replace(new, backends=backends)
        return changes

    def _apply_services(
        self,
        new: Config,
        children: Mapping[str, tuple[Config, tuple[dict[str, Any], StaticKeys | None]]],
        changes: Changes,
        before: Mapping[str, ServiceConfig],
    ) -> None:
        """Services added (started in the background; matched once started), changed, removed
        (closed: their sessions are unknown anywhere else, 404)."""
        for name in [n for n in self.services if n not in children]:
            child = self.services.pop(name)
            changes.removed += [b.name for b in child.backends]
            log.info("reload: service %s removed; its sessions end (404)", name)
            if self._plane is not None:
                for backend in child.backends:
                    self._plane.abort_streams(backend)
            self._retire(child.close_parts())
        for name, (config, prepared) in children.items():
            running = self.services.get(name)
            if running is None:
                child = self.services[name] = self._service(name, new)
                changes.added += [b.name for b in child.backends]
                log.info("reload: service %s added", name)
                if self._plane is not None:
                    self._retire(self._start_service(child))
                continue
            entry = next(s for s in new.services if s.name == name)
            old = before.get(name)
            if old is not None and match_of(old) != match_of(entry):
                log.info("reload: service %s now matches %s (was %s)", name, match_of(entry), match_of(old))
            running.tracing, running.access_log = self.tracing, self.access_log
            running.public_prefix = _stripped(entry)
            own = running._apply(config, *prepared)
            for kind in ("added", "removed", "updated"):
                getattr(changes, kind).extend(getattr(own, kind))
        self.metrics.service_of = self._service_of
        self.metrics.forget_services()
        self._serve_services()

    async def _start_service(self, child: Proxy) -> None:
        assert self._plane is not None
        await child.start_parts(self._plane)
        self._serve_services()

    def _removed(self, backend: Backend) -> None:
        """A discovered backend left for good: its health state and metric series go with it."""
        self.health.forget(b.name for b in self.backends)
        self.metrics.forget("backend", backend.name)

    def _refuse_restart_only(self, new: Config) -> None:
        """RestartRequired (and nothing applied) when `new` changes a RESTART_ONLY setting."""
        problem = restart_only_problem(self.config, new)
        if problem is None:
            return
        log.error("reload refused, running configuration kept: %s", problem)
        raise RestartRequired(f"{new.source}: {problem}")

    def _apply_policy(self, old: Config, new: Config, keys: StaticKeys | None = None) -> None:
        """Swap the parts built from the LIVE settings; what did not change keeps its state (the
        balancer's turn, the affinity maps, the replay records, a random binding key)."""
        router = self.router
        for pool in self.fleet.pools.values():  # the next connection of each is bounded anew
            pool.connect_timeout = new.timeouts.connect
        if isinstance(self.store, CachedStore):
            self.store.resize(new.local_cache_size, new.session_ttl)
        strategy: Strategy = router._strategy
        if new.balance != old.balance:
            strategy = make_strategy(new.balance)
        affinity = router.affinity
        if new.affinity != old.affinity:
            affinity = Affinity(new.affinity)
        shared = router.shared_affinity
        if (_shared_affinity_wanted(new), new.affinity) != (_shared_affinity_wanted(old), old.affinity):
            self._retire(shared.close() if shared is not None else None)
            shared = _shared_affinity(new)
        router.reconfigure(
            strategy,
            new.session_ttl,
            affinity=affinity,
            shared_affinity=shared,
        )
        router.failover = self.failover = self._failover(new, self.failover)
        if _binding(new) != _binding(old):
            router.binder = _binder(new)
        self.access_filters = self._access_filters(new, old, keys)
        router.max_age = _plain_max_age(new)
        if self.sealed is not None:
            session_keys = [key.material for key in new.session_keys]
            self.sealed.configure(session_keys, max_age=new.session_max_age, capacity=new.local_cache_size)
        router.refuse_new_when(self._refuse_new(new))
        self.readiness.store_required = new.on_store_error == "fail"
        if new.log != old.log and self._parent is None:  # a service logs with its parent's
            reconfigure_logging(new.log, worker=self._worker)
            self._swap_access_log(new)
        if new.tracing != old.tracing and self._parent is None:
            self._swap_tracing(new)
        plane = self._plane
        if plane is not None:
            plane.configure(
                heartbeat=new.heartbeat,
                timeouts=new.timeouts,
                limits=new.limits,
                phases=self.compose_phases(new),
            )

    def compose_phases(self, config: Config) -> Phases:
        """The filters `config` turns on, each at its phases (filters/phases.py). This is the one
        place a filter is registered: a feature that is not configured is not in the list, and
        costs a request nothing. At each phase, filters run in this order."""
        router = self.router
        top = self.config if self._parent is None else self._parent.config
        named = tuple(s.host for s in top.services if s.host is not None)
        hosts = _host_policy(config, warn=self._parent is None, named=named)
        origins = OriginFilter(OriginPolicy(config.allowed_origins, hosts))
        filters: list[object] = [FrontDoor(None if hosts.any else HostFilter(hosts), origins)]
        if self.tracing is not None:
            filters.append(self.tracing)  # request: the span and traceparent (refusals too); logging: its end
        filters += self.access_filters  # auth next: the filters after it read the principal
        if router.binder is not None and not router.binder.by_principal:  # else auth binds
            by_cert = config.bind_sessions == CLIENT_CERT
            filters.append(ClientCertBinding(router.binder) if by_cert else SessionBinding(router.binder))
        rules = compile_rules(config.routes, config.pools)
        if rules:
            filters.append(RouteRules(rules, self.metrics))
        if config.validate_headers:
            filters.append(StrictHeaders())  # parses the body first: the next filter reuses it
        affinity = router.affinity
        if affinity is not None and affinity.states is not None:
            filters.append(RequestStateKey())
        if affinity is not None and (affinity.tasks is not None or affinity.states is not None):
            filters.append(AffinityLearning(router))
        if router.sealed is not None:
            filters.append(SealedSessions(router))  # the backend's own id out, a token back in
        elif self.failover is not None:
            filters.append(ReplayAlias())  # a moved session's id at its new backend
        if self.access_log is not None:
            filters.append(self.access_log)
        filters.append(self.health)  # passive health: fail_to_connect, error_while_proxy
        return compose(filters)

    # -- the access filters: auth, tool_policy, rate_limits, max_in_flight ------------------------

    def _access_filters(self, config: Config, old: Config | None, keys: StaticKeys | None) -> list[object]:
        """The access filters `config` asks for, in their order (compose_phases registers them).
        What did not change is kept: the key set fetched, the rate-limit buckets, the lines of
        requests waiting for a slot."""
        access = config.access
        trusted = TrustedProxies(config.trusted_proxies)
        filters: list[object] = []
        turned_off = access.auth.mode == "off" and access.auth != AuthConfig(mode="off")
        if turned_off and (old is None or old.access.auth != access.auth):  # once, not at every reload
            log.warning("auth.mode: off: requests are not authenticated, every client may call any tool")
        if access.auth.enforced:
            from mcpbalancer.filters.auth import Authenticator  # only with auth: see key_file

            assert self.router.binder is not None
            source = self._key_source(config, old) if keys is None else keys
            filters.append(
                Authenticator(
                    access.auth,
                    keys=source,
                    binder=self.router.binder,
                    metrics=self.metrics,
                    mcp_path=config.mcp_path,
                    trusted=trusted,
                    public_prefix=self.public_prefix,
                )
            )
        else:
            self._key_source(config, old)  # closes a fetcher no longer wanted
        if access.tool_policy:
            filters.append(ToolPolicy(access.tool_policy, self.metrics, config.limits.policy_body_bytes))
        buckets = self._rate_buckets(config, old)
        if buckets is not None:
            limit = config.limits.policy_body_bytes
            filters.append(RateLimits(access.rate_limits, buckets, self.metrics, trusted, body_limit=limit))
        templates = (entry.template for entry in config.discovery)  # the backends DNS will give
        if any(b.max_in_flight is not None for b in (*config.backends, *templates)):
            filters.append(self._concurrency)
        return filters

    def _key_source(self, config: Config, old: Config | None) -> JwksSource | None:
        """The fetcher of `auth.jwks_url`: the running one when its settings did not change."""
        wanted = _jwks_settings(config)
        if self._jwks is not None and (old is None or _jwks_settings(old) != wanted):
            self._retire(self._jwks.close())
            if self._jwks_task is not None:
                self._jwks_task.cancel()
            self._jwks = self._jwks_task = None
        if wanted is None:
            return None
        if self._jwks is None:
            from mcpbalancer.filters.jwks import JwksSource  # only with auth: see key_file

            auth = config.access.auth
            assert auth.jwks_url is not None
            self._jwks = JwksSource(
                auth.jwks_url,
                auth.algorithms,
                self.metrics,
                refresh=auth.jwks_refresh,
                cooldown=auth.jwks_cooldown,
            )
            if self._started:  # a reload: started now, else at start()
                self._jwks_task = asyncio.get_running_loop().create_task(self._jwks.run())
        return self._jwks

    def _rate_buckets(self, config: Config, old: Config | None) -> Buckets | None:
        """The buckets of `rate_limits`: kept while the rules are the same, else new (and empty)."""
        rules = config.access.rate_limits
        if old is not None and old.access.rate_limits == rules and self._buckets is not None:
            return self._buckets
        if isinstance(self._buckets, SharedBuckets):
            self._retire(self._buckets.close())
        self._buckets = None
        if not rules:
            return None
        rates = rates_of(rules)
        if config.store == "memory":
            self._buckets = LocalBuckets(rates)
        else:
            client = RedisStore.from_url(config.store, prefix=config.store_prefix).client
            self._buckets = SharedBuckets(client, rates, prefix=config.store_prefix, metrics=self.metrics)
        return self._buckets

    def _failover(self, config: Config, running: Failover | None) -> Failover | None:
        """The replay failover `config` asks for: the running one (new limits, its records kept),
        a new one, or None; a running one no longer wanted is closed."""
        if config.failover != "replay":
            self._retire(running.close() if running is not None else None)
            return None
        limits: dict[str, Any] = {
            "max_records": config.local_cache_size,
            "connect_timeout": config.timeouts.connect,
            "response_timeout": config.timeouts.response_headers,
            "session_ttl": config.session_ttl,
            "on_backend_404": "backend_404" in config.replay_on,
        }
        if running is None:
            # With Redis, the records are shared: any proxy replays any session.
            shared = (
                None
                if config.store == "memory"
                else SharedRecords.from_url(config.store, config.store_prefix)
            )
            return Failover(metrics=self.metrics, shared=shared, **limits)
        running.configure(**limits)
        return running

    def _refuse_new(self, config: Config) -> Callable[[], bool] | None:
        return self._store_down if config.on_store_error == "fail" else None

    def _retire(self, closing: Coroutine[Any, Any, None] | None) -> None:
        """Close a part a reload replaced, in the background; stop() waits for it."""
        if closing is None:
            return
        task = asyncio.get_running_loop().create_task(closing)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def _swap_access_log(self, config: Config) -> None:
        old: AccessLog | None = self.access_log
        self.access_log = self._make_access_log(config)  # registered by the _compose that follows
        if old is not None:
            old.close()  # writes what it holds; exchanges ending from now on use the new one

    def _keep_managed(self, new: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        """Managed (`command`) backends are started and stopped with the process: a reload applies
        the file's `url` backends and keeps the managed ones as they run. ConfigError when a `url`
        backend takes the name of a running managed one."""
        running = tuple(b for b in self.config.backends if b.command is not None)
        urls = tuple(b for b in new if b.command is None)
        # A file that renames the managed entry may give a `url` backend a running instance's name:
        # refuse it here, before Fleet.apply would point the running instance at that url.
        clash = sorted({b.name for b in urls} & {b.name for b in running})
        if clash:
            problem = f"backend {', '.join(map(repr, clash))} is the name of a running managed backend"
            log.error("reload rejected, running configuration kept: %s", problem)
            raise ConfigError(f"{self.config.source}: {problem}")
        wanted = {b.name: b for b in new if b.command is not None}
        if [_process(b) for b in wanted.values()] != [_process(b) for b in running]:
            log.warning("reload: managed (`command`) backends change only on restart; kept as running")
        # Their health settings and session_mode are the file's, as any backend's.
        kept = tuple(
            dataclasses.replace(b, health=wanted[b.name].health, session_mode=wanted[b.name].session_mode)
            if b.name in wanted
            else b
            for b in running
        )
        return urls + kept

    def _observability(
        self,
        config: Config,
        access_stream: TextIO | None,
        session_tag_key: bytes | None,
        worker: int | None,
        control_socket: str | None,
    ) -> None:
        self.readiness = Readiness(
            self.all_backends,
            self.store.ping,
            store_required=config.on_store_error == "fail",
            discovery=self.discovery.status,
        )
        self._access_stream = access_stream
        # One key for the session tags of the access log and the spans (workers share the
        # supervisor's), so a session reads the same in both and across a log swap.
        self._session_tag_key = session_tag_key or os.urandom(16)
        self._worker = worker
        self.tracing = self._make_tracing(config)
        self.access_log = self._make_access_log(config)
        metrics = self.metrics if config.metrics.enabled else None
        # /metrics is served on the admin listener when there is one, else on the public one.
        self.admin_auth = None
        self.control = None
        if control_socket is not None:
            # A worker of a supervisor: its private channel, which only the supervisor uses; the
            # supervisor serves `admin`, checks the token and audits.
            self.control = ControlServer(
                "", 0, self.readiness, metrics, config.metrics.path, path=control_socket
            )
        elif config.admin is not None:
            open_paths = (*PROBES, config.metrics.path) if metrics is not None else PROBES
            self.admin_auth = AdminAuth(lambda: self.config.admin_tokens, open_paths)
            self.control = ControlServer(
                *config.admin,
                self.readiness,
                metrics,
                config.metrics.path,
                auth=self.admin_auth,
                audit=Audit(self.metrics),
            )
        public_metrics = config.metrics.path if metrics is not None and self.control is None else None
        self._local = local_endpoints(self.readiness, self.metrics, public_metrics)

    def _make_tracing(self, config: Config) -> Tracing | None:
        if not config.tracing.enabled:
            return None
        return Tracing(config.tracing, self.metrics, session_key=self._session_tag_key)

    def _swap_tracing(self, config: Config) -> None:
        old, self.tracing = self.tracing, self._make_tracing(config)
        if self.tracing is not None and self._plane is not None:
            self.tracing.start()
        if old is not None:  # exports what it holds, in a thread; stop() waits for it
            self._retire(asyncio.to_thread(old.close))

    def _status_page(self) -> StatusPage:
        def healths() -> list[HealthChecker]:
            return [self.health, *(child.health for child in self.services.values())]

        return StatusPage(
            lambda: {name: list(fleet.backends) for name, _, fleet, _ in self.admin_services()},
            self.metrics,
            self.readiness,
            self._process_info,
            last_check=MergedMapping(lambda: [h.last_check for h in healths()]),
            reasons=MergedMapping(lambda: [h.reasons for h in healths()]),
            health_interval=lambda: self.health.config.interval,
            down_reasons=MergedMapping(lambda: [h.down_reasons for h in healths()]),
        )

    def _process_info(self) -> ProcessInfo:
        return ProcessInfo(
            started=self.started_at,
            version=__version__,
            source=self.config.source,
            store=_without_credentials(self.config.store),
            worker=self._worker,
            last_reload=self.last_reload,
        )

    def _make_access_log(self, config: Config) -> AccessLog | None:
        if not access_enabled(config.log):
            return None
        return AccessLog(
            self._access_stream or sys.stdout,
            fmt=config.log.format,
            hasher=SessionHasher(self._session_tag_key),
            shared=config.workers > 1,
            worker=self._worker,  # a worker process: its index in every line, as in the event lines
        )

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return self.ports[0]

    @property
    def ports(self) -> list[int]:
        """The port of each listener, in `listen` order."""
        assert self._servers, "not started"
        return [int(server.sockets[0].getsockname()[1]) for server in self._servers]

    @property
    def url(self) -> str:
        """The URL of the first listener (https:// for a TLS one)."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [
            f"{'https' if listener.tls else 'http'}://{host_port(listener.host, port)}"
            for listener, port in zip(self.config.all_listeners, self.ports, strict=True)
        ]

    def _certificates(self, config: Config, tls: list[ServerTls | None]) -> None:
        """The expiry gauge of each TLS listener's certificate; a warning for one out of date."""
        for listener, server_tls in zip(config.all_listeners, tls, strict=True):
            if server_tls is None:
                continue
            self.metrics.tls_listening()
            self.metrics.tls_certificate_expiry.labels(
                listener.address
            ).value = server_tls.not_after.timestamp()
            now = time.time()
            if not server_tls.not_before.timestamp() <= now < server_tls.not_after.timestamp():
                log.warning(
                    "%s.cert: the certificate is not valid now (notBefore %s, notAfter %s): clients "
                    "will refuse it",
                    server_tls.at,
                    server_tls.not_before,
                    server_tls.not_after,
                )

    async def _listen(self, loop: asyncio.AbstractEventLoop, plane: DataPlane) -> None:
        """A server per listener: create_server for a plain one, a TlsListener for a TLS one."""
        # Worker processes share the ports; the kernel spreads connections over them.
        reuse_port = self.config.workers > 1
        for listener, endpoint in zip(self.config.all_listeners, self._endpoints, strict=True):
            try:
                if endpoint is not None:
                    server: asyncio.Server | TlsListener = TlsListener.open(
                        plane, endpoint, listener.host, listener.port, reuse_port=reuse_port
                    )
                else:
                    server = await loop.create_server(
                        plane.protocol_factory,
                        listener.host,
                        listener.port,
                        reuse_address=True,
                        reuse_port=reuse_port,
                        backlog=1024,
                    )
            except OSError as exc:
                self._close_servers()
                raise ListenError(f"cannot listen on {listener.address}: {exc}") from exc
            self._servers.append(server)

    def _close_servers(self) -> None:
        for server in self._servers:
            server.close()

    async def start(self) -> None:
        """Start the managed backends (BackendStartError if one fails), then serve."""
        await self._prepare_parts()
        for name, child in list(self.services.items()):
            try:
                await child._prepare_parts()
            except BaseException:
                await self._stop_services(upto=name)
                await self.managed.stop()
                await self.store.close()
                raise
        loop = asyncio.get_running_loop()
        self._plane = DataPlane(
            self.router,
            self.fleet.pools,
            heartbeat=self.config.heartbeat,
            timeouts=self.config.timeouts,
            limits=self.config.limits,
            loop=loop,
            metrics=self.metrics,
            local=self._local,
            phases=self.compose_phases(self.config),
        )
        if self.tracing is not None:
            self.tracing.start()
        self._serve_services()
        try:
            await self._listen(loop, self._plane)
        except BaseException:
            await self._stop_services()
            await self.managed.stop()  # cannot listen: the children started for nothing
            raise
        if self.control is not None:
            try:
                await self.control.start()
            except OSError as exc:
                self._close_servers()
                await self._stop_services()
                await self.managed.stop()
                where = self.control.path or host_port(self.control.host, self.control.requested_port)
                raise ListenError(f"cannot listen on {where} (admin): {exc}") from exc
            if self.admin_auth is not None:
                warn_if_open(self.control.host, self.control.port, self.admin_auth)
        self._run_parts(self._plane)
        for child in self.services.values():
            child._run_parts(self._plane)
        control = self.control
        admin = ""
        if control is not None:
            admin = f"; {'control channel' if control.path else 'admin'} on {control.address}"
        services = f" in {len(self.admin_services())} services" if self.services else ""
        log.info(
            "listening on %s with %d backends%s%s",
            ", ".join(self.urls),
            len(self.all_backends()),
            services,
            admin,
        )

    async def _prepare_parts(self) -> None:
        """What must answer before serving: the managed backends, the store, the first lookups."""
        if self.managed:
            try:
                await self.managed.start()
            except BackendStartError:
                await self.store.close()
                raise
        await self._check_store()
        await self.generations.load()
        await self.discovery.start()  # the first answers, so that it serves with its backends
        self._prepared = True

    def _run_parts(self, plane: DataPlane) -> None:
        """The background work of a running service: health checks, store events, key fetches."""
        loop = asyncio.get_running_loop()
        self._started = True
        if self._jwks is not None:
            self._jwks_task = loop.create_task(self._jwks.run())
        self.fleet.on_evict = plane.abort_streams
        self.fleet.start()
        if hasattr(self.store, "sweep"):
            self._sweeper = loop.create_task(self._sweep_forever())
        self._checker = loop.create_task(self.health.run(lambda: self.backends))
        if isinstance(self.store, CachedStore):
            self._watcher = loop.create_task(self.store.watch())
            self._listener = loop.create_task(
                self.store.listen(on_ended=self.router.ended_elsewhere, on_gone=self.generations.heard)
            )

    async def start_parts(self, plane: DataPlane) -> None:
        """Start a service (a Proxy without a listener) on its parent's data plane."""
        await self._prepare_parts()
        self._run_parts(plane)

    def _serve_services(self) -> None:
        """Hand the data plane the services as they are now (None without `services`)."""
        plane = self._plane
        if plane is None:
            return
        if not self.services:
            plane.serve(None)
            return
        routes: list[Route[ServicePlaneLike]] = []
        if self.config.backends or self.config.discovery:
            view = self._view(plane, DEFAULT_SERVICE, self, plane.phases)
            routes.append(Route(None, None, True, view, default=True))
        entries = {s.name: s for s in self.config.services}
        for name, child in self.services.items():
            entry = entries.get(name)
            if entry is None or not child._prepared:
                continue  # an added service still starting: matched once it has
            prefix = None if entry.path_prefix is None else entry.path_prefix.encode("ascii")
            view = self._view(plane, name, child, child.compose_phases(child.config))
            routes.append(Route(entry.host, prefix, entry.strip_prefix, view))
        plane.serve(ServiceMap(routes))

    @staticmethod
    def _view(plane: DataPlane, name: str, service: Proxy, phases: Phases) -> ServicePlane:
        config = service.config
        return ServicePlane(
            name,
            plane,
            service.router,
            service.fleet.pools,
            phases,
            heartbeat=config.heartbeat,
            timeouts=config.timeouts,
        )

    async def _stop_services(self, upto: str | None = None) -> None:
        for name, child in list(self.services.items()):
            if name == upto:
                break
            await child.close_parts()

    async def _check_store(self) -> None:
        """Ping a shared store before serving: an unreachable one is a warning now, not at the first
        session. The proxy starts either way (Redis may be starting too, and /readyz says what the
        outage means); with `fail` it refuses new sessions until the store answers."""
        if not isinstance(self.store, CachedStore):
            return
        problem = await self.store.check()
        if problem is None:
            return
        if self.config.on_store_error == "fail":
            outcome = "new sessions are refused (503) until it answers (on_store_error: fail)"
        else:
            outcome = "new sessions are bound locally and written to it once it answers"
        log.warning("session store unreachable at start-up: %s; %s", problem, outcome)

    def _store_down(self) -> bool:
        return isinstance(self.store, CachedStore) and self.store.degraded

    @staticmethod
    async def _wait_quiet(plane: DataPlane) -> None:
        """Until every connection closed, or only standalone GET streams are left (they never end)."""
        closed = asyncio.ensure_future(plane.wait_closed())
        try:
            while not closed.done() and plane.busy():
                await asyncio.wait([closed], timeout=SHUTDOWN_POLL)
        finally:
            closed.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.store.sweep()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop accepting, let in-flight exchanges finish (bounded), then close everything."""
        self._close_servers()
        plane = self._plane
        if plane is not None:
            plane.close_idle()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_timeout):
                    await self._wait_quiet(plane)
            plane.abort_all()
        await self._stop_services()
        await self.close_parts()
        if self.control is not None:
            await self.control.stop()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)  # the last spans, bounded in time
        for server in self._servers:
            await server.wait_closed()

    async def close_parts(self) -> None:
        """Close what a service runs (stop() does it for each, after the data plane)."""
        await self.discovery.close()
        self.fleet.close()
        # After the in-flight exchanges: a tool call running on a managed backend may finish.
        await self.managed.stop()
        for task in (self._sweeper, self._checker, self._watcher, self._jwks_task, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
        await self.modes.close()
        await self._probe.close()
        await self._ping.close()
        if self._jwks is not None:
            await self._jwks.close()
        if isinstance(self._buckets, SharedBuckets):
            await self._buckets.close()
        await self.router.close()
        await self.generations.close()
        await self.store.close()
