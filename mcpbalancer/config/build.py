"""A validated ConfigFile → the runtime Config, and the checks a Config gets after the command line
changed it (`--workers`)."""

from __future__ import annotations

import os

from mcpbalancer.config.access import AccessConfig, AuthConfig
from mcpbalancer.config.checks import (
    KEY_FILE_PREFIX,
    decode_session_key,
    split_backend_url,
    split_host_port,
    split_nameserver,
)
from mcpbalancer.config.file import (
    MANAGED_HOST,
    BackendEntry,
    ConfigFile,
    DiscoverSection,
    RouteEntry,
    RouteMatch,
    TlsSection,
)
from mcpbalancer.config.health import HealthConfig, merged
from mcpbalancer.config.listeners import ListenEntry
from mcpbalancer.config.models import (
    MAX_WORKERS,
    AffinityConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    TimeoutsConfig,
    TracingConfig,
)
from mcpbalancer.config.runtime import (
    BackendConfig,
    Config,
    DiscoveryConfig,
    ListenerConfig,
    RouteConfig,
    ServerTlsConfig,
    SessionKey,
    TlsConfig,
)
from mcpbalancer.errors import ConfigError
from mcpbalancer.fileaccess import unreadable


def build(file: ConfigFile, source: str) -> Config:
    listeners = tuple(_listener(entry, i) for i, entry in enumerate(file.listen))
    host, port = listeners[0].host, listeners[0].port
    health = file.health or HealthConfig()
    return Config(
        listen_host=host,
        listen_port=port,
        store=file.store,
        session_ttl=file.session_ttl,
        balance=file.balance,
        heartbeat=file.heartbeat,
        backends=tuple(
            backend
            for i, entry in enumerate(file.backends)
            if entry.discover is None
            for backend in _backends(entry, i, health)
        ),
        timeouts=file.timeouts or TimeoutsConfig(),
        limits=file.limits or LimitsConfig(),
        store_prefix=file.store_prefix,
        local_cache_size=file.local_cache_size,
        source=source,
        admin=None if file.admin is None else split_host_port(file.admin.listen),
        admin_tokens=() if file.admin is None or file.admin.token is None else file.admin.token,
        metrics=file.metrics or MetricsConfig(),
        log=file.log or LogConfig(),
        tracing=file.tracing or TracingConfig(),
        health=health,
        shutdown_timeout=file.shutdown_timeout,
        pools={name: tuple(dict.fromkeys(members)) for name, members in (file.pools or {}).items()},
        routes=tuple(_route(entry) for entry in file.routes or ()),
        affinity=file.affinity or AffinityConfig(),
        validate_headers=file.validate_headers,
        failover=file.failover.mode,
        replay_on=file.failover.replay_on,
        session_ids=file.session_ids,
        session_keys=_session_keys(file.session_keys or (), source),
        session_max_age=file.session_max_age,
        allowed_origins=tuple(file.allowed_origins or ()),
        allowed_hosts=tuple(file.allowed_hosts) if file.allowed_hosts else None,  # empty: the default
        bind_sessions=None if file.bind_sessions is None else file.bind_sessions.lower(),
        session_binding_key=file.session_binding_key,
        on_store_error=file.on_store_error,
        workers=file.workers,
        mcp_path=file.mcp_path,
        access=AccessConfig(
            auth=file.auth or AuthConfig(mode="off"),
            tool_policy=tuple(file.tool_policy or ()),
            rate_limits=tuple(file.rate_limits or ()),
        ),
        trusted_proxies=tuple(file.trusted_proxies or ()),
        discovery=tuple(
            _discovery(entry, entry.discover, i, health)
            for i, entry in enumerate(file.backends)
            if entry.discover is not None
        ),
        # One plain listener is listen_host:listen_port alone, as a Config made in code says it.
        listeners=() if len(listeners) == 1 and listeners[0].tls is None else listeners,
    )


def _listener(entry: ListenEntry, index: int) -> ListenerConfig:
    host, port = split_host_port(entry.address)
    tls = entry.tls
    if tls is None:
        return ListenerConfig(host, port)
    return ListenerConfig(
        host,
        port,
        ServerTlsConfig(
            cert=tls.cert,
            key=tls.key,
            client_ca=tls.client_ca,
            require_client_cert=tls.require_client_cert,
            min_version=tls.min_version,
            at=f"listen[{index}].tls",
        ),
    )


def _session_keys(refs: tuple[str, ...], source: str) -> tuple[SessionKey, ...]:
    """The keys, files read (a relative path from the config file's directory); ConfigError naming
    the entry, never quoting a key."""
    keys: list[SessionKey] = []
    for i, ref in enumerate(refs):
        at = f"{source}: session_keys[{i}]"
        text = ref
        if ref.startswith(KEY_FILE_PREFIX):
            path = os.path.join(os.path.dirname(source), ref[len(KEY_FILE_PREFIX) :].strip())
            text = _read_key_file(path, at)
        try:
            key = SessionKey(decode_session_key(text))
        except ValueError as exc:
            raise ConfigError(f"{at}: {exc}") from None
        if key in keys:
            raise ConfigError(f"{at}: the same key as session_keys[{keys.index(key)}]")
        keys.append(key)
    return tuple(keys)


def _read_key_file(path: str, at: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except PermissionError:
        raise ConfigError(f"{at}: {unreadable(path)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{at}: cannot read {path}: {type(exc).__name__}") from None


def _backends(entry: BackendEntry, index: int, health: HealthConfig) -> list[BackendConfig]:
    own = merged(health, entry.health)
    if entry.url is not None:
        scheme, host, port, path = split_backend_url(entry.url)
        tls = _tls(entry.tls or TlsSection(), f"backends[{index}].tls") if scheme == "https" else None
        return [_backend(entry, entry.name, entry.url, (scheme, host, port, path), tls, own)]
    # A managed entry (BackendEntry has exactly one of url and command): host and port are known
    # once the process is up.
    address = ("http", MANAGED_HOST, 0, "")
    return [_backend(entry, name, "", address, None, own) for name in entry.names]


def _discovery(
    entry: BackendEntry, discover: DiscoverSection, index: int, health: HealthConfig
) -> DiscoveryConfig:
    tls = None
    if discover.scheme == "https":
        tls = _tls(entry.tls or TlsSection(), f"backends[{index}].tls")
    # The settings of every backend it finds, its health keys and session_mode among them; name,
    # address and (SRV) weight are filled in then.
    path = "" if discover.path in (None, "/") else discover.path
    template = _backend(
        entry, entry.name, "", (discover.scheme, "", 0, path), tls, merged(health, entry.health)
    )
    return DiscoveryConfig(
        name=entry.name,
        dns=discover.dns,
        srv=discover.srv,
        port=discover.port,
        interval=discover.interval,
        timeout=discover.timeout,
        family=discover.family,
        scheme=discover.scheme,
        path=path,
        nameservers=tuple(split_nameserver(server) for server in discover.nameservers or ()),
        template=template,
    )


def _backend(
    entry: BackendEntry,
    name: str,
    url: str,
    address: tuple[str, str, int, str],
    tls: TlsConfig | None,
    health: HealthConfig,
) -> BackendConfig:
    scheme, host, port, path = address
    return BackendConfig(
        name,
        url,
        scheme,
        host,
        port,
        path,
        weight=entry.weight,
        drain=entry.drain,
        drain_timeout=entry.drain_timeout,
        eras=entry.eras,
        command=entry.command,
        tls=tls,
        health=health,
        session_mode=entry.session_mode,
        max_in_flight=entry.max_in_flight,
        queue_timeout=entry.queue_timeout,
    )


def _tls(section: TlsSection, at: str) -> TlsConfig:
    """An https backend's `tls` (all defaults when the file has none), with its key path."""
    return TlsConfig(
        ca=section.ca,
        server_name=section.server_name,
        cert=section.cert,
        key=section.key,
        insecure_skip_verify=section.insecure_skip_verify,
        at=at,
    )


def _route(entry: RouteEntry) -> RouteConfig:
    match = entry.match or RouteMatch()
    return RouteConfig(
        method=match.method,
        name=match.name,
        params=tuple((match.param or {}).items()),
        pool=entry.pool,
        deny=entry.deny,
    )


# --- checks of a Config after the command line changed it ------------------------------------------


def check_workers(config: Config, key: str = "workers") -> Config:
    """`config`, or ConfigError when its worker count does not fit the rest of it. `key` is how the
    count was given (`workers` in the file, `--workers` on the command line), for the message."""
    problem = _workers_problem(config)
    if problem is not None:
        raise ConfigError(f"{config.source}: {key}: {problem}")
    return config


def parse_listen(value: str, key: str = "listen") -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host without brackets, port); ConfigError names `key`."""
    try:
        return split_host_port(value)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _workers_problem(config: Config) -> str | None:
    n = config.workers
    if not 1 <= n <= MAX_WORKERS:
        return f"must be 1-{MAX_WORKERS}, got {n}"
    if n == 1:
        return None
    if config.store == "memory" and config.session_ids != "sealed":
        return (
            f"{n} workers need a Redis `store` or `session_ids: sealed`: the memory store is per "
            "process, so a session initialized on one worker would be unknown (404) to the others; set "
            "`store: redis://...`, seal the session ids, or use 1 worker"
        )
    if config.store == "memory" and (config.affinity.tasks or config.affinity.request_state):
        return (
            f"{n} workers need a Redis `store` for `affinity`: the task and request-state maps are per "
            "process with the memory store, and a poll or a retry may reach another worker"
        )
    if any(listener.port == 0 for listener in config.all_listeners):
        return f"{n} workers need a fixed `listen` port: with port 0 each worker would get a different one"
    managed = [b.name for b in config.backends if b.command is not None]
    if managed:
        names = ", ".join(managed[:3]) + (", ..." if len(managed) > 3 else "")
        return (
            f"{n} workers cannot run managed (`command`) backends ({names}): each worker "
            "would start its own copies, and a session on one worker's copy is unknown to the other "
            "workers; run the servers yourself and list their `url`s, or use 1 worker"
        )
    return None
