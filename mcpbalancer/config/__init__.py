"""YAML → validated, frozen configuration objects.

Every error is a ConfigError reading `FILE: key.path: what is wrong`. Validation is built from one
small `_Section` type: a mapping with its key path that refuses unknown keys, plus typed readers
(`number`, `integer`, `string`, `choice`, `parsed`, `section`, `section_list`). A new section is a
frozen dataclass and a short function calling those readers.

Converters (`_as_number`, `_split_host_port`, ...) are pure and raise ValueError saying what is wrong;
`_Section.read` is the one place that turns that into an error naming the key path.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Final, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from mcpbalancer.errors import ConfigError

BALANCE_STRATEGIES: Final = ("least_sessions", "p2c", "round_robin")
FAILOVER_MODES: Final = ("reinitialize", "replay")
DEFAULT_STORE_PREFIX: Final = "mcpb:"
DEFAULT_LOCAL_CACHE_SIZE: Final = 100_000
DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0
LOG_FORMATS: Final = ("json", "text")
ERAS: Final = ("legacy", "modern")
STORE_ERROR_MODES: Final = ("degrade", "fail")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# Paths the proxy answers itself on the public listener; the metrics path must not shadow them.
PROBE_PATHS: Final = ("/healthz", "/readyz")
_URL_PATH = re.compile(r"/[!-~]{0,255}", re.ASCII)

# The backend name is the session's owner id in Redis: keep it short and free of separators.
_BACKEND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BACKEND_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Bracketed IPv6 or a host without colons, then a decimal port. re.ASCII keeps \d to 0-9.
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\s:/\[\]]+)):(?P<port>\d{1,5})", re.ASCII)
_REDIS_SCHEMES: Final = ("redis", "rediss")

_HTTP_STATUSES: Final = frozenset(int(status) for status in HTTPStatus)

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    url: str
    scheme: str
    host: str
    port: int
    path_prefix: str
    weight: int = 1
    drain: bool = False
    drain_timeout: float = 0.0  # seconds after the drain starts; 0 = wait for the sessions forever
    eras: tuple[str, ...] = ERAS  # the MCP protocol eras this backend serves
    # A managed backend (`command` in YAML): the proxy runs this command line; host and port are
    # known once the process is up (port 0 here). None for a backend given by `url`.
    command: str | None = None


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 5.0
    # Legacy JSON tools send their response head only when the tool is done, hence the long default.
    response_headers: float = 300.0
    stream_idle: float = 0.0


@dataclass(frozen=True, slots=True)
class HealthConfig:
    # One probe per `interval` (seconds, fractional allowed): `fall` failures in a row mark a backend
    # down, `rise` successes in a row bring it back. `path` is appended to the backend URL's path.
    interval: float = 1.0
    timeout: float = 1.0
    path: str = "/mcp"
    fall: int = 2
    rise: int = 2


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    header_bytes: int = 65536
    header_count: int = 100
    body_bytes: int = 16 * 1024 * 1024
    connections: int = 10_000  # open client connections; more are answered 503 and closed
    head_timeout: float = 10.0  # seconds from a connection's (or a request's) first byte to its whole head
    keepalive_timeout: float = 60.0  # seconds an idle keep-alive client connection is kept


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "json"
    level: str = "info"
    access: bool = True


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One `routes` entry: match on a 2026-07-28 request's headers, then a pool or a deny status."""

    method: str | None = None  # Mcp-Method, exact
    name: str | None = None  # glob on the decoded Mcp-Name
    params: tuple[tuple[str, str], ...] = ()  # (Name, value): header Mcp-Param-<Name> equals value
    pool: str | None = None
    deny: int | None = None


@dataclass(frozen=True, slots=True)
class AffinityConfig:
    tasks: bool = False  # taskId -> the backend that created the task
    request_state: bool = False  # MRTR requestState -> the backend that issued it
    max_entries: int = 100_000  # per map; the least recently used entry goes first
    task_ttl: float = 86_400.0  # seconds; a task's own ttlMs is used when shorter
    request_state_ttl: float = 600.0  # seconds a requestState is remembered


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str
    listen_port: int
    store: str
    session_ttl: float
    balance: str
    heartbeat: float
    backends: tuple[BackendConfig, ...]
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    store_prefix: str = DEFAULT_STORE_PREFIX
    local_cache_size: int = DEFAULT_LOCAL_CACHE_SIZE
    source: str = "<config>"
    admin: tuple[str, int] | None = None  # (host, port) of the control listener; None = off
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    health: HealthConfig = HealthConfig()
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    affinity: AffinityConfig = AffinityConfig()
    validate_headers: bool = False
    failover: str = "reinitialize"  # or "replay": re-run a lost session's initialize elsewhere
    # Exact origins ("https://app.example") allowed to call cross-origin, or "*"; empty = only
    # requests without Origin or whose Origin names the request's Host.
    allowed_origins: tuple[str, ...] = ()
    # Header whose value a session is bound to (lower-case), e.g. "authorization"; None = off.
    bind_sessions: str | None = None
    session_binding_key: str | None = None  # HMAC key of the binding; random per process if None
    on_store_error: str = "degrade"  # or "fail": what new sessions get while the shared store is down
    # Processes sharing the listen port (SO_REUSEPORT); > 1 makes the CLI a supervisor (supervisor.py).
    workers: int = 1


_TOP_KEYS: Final = (
    "listen",
    "store",
    "store_prefix",
    "local_cache_size",
    "session_ttl",
    "balance",
    "heartbeat",
    "backends",
    "timeouts",
    "limits",
    "admin",
    "metrics",
    "log",
    "health",
    "shutdown_timeout",
    "pools",
    "routes",
    "affinity",
    "validate_headers",
    "failover",
    "allowed_origins",
    "bind_sessions",
    "session_binding_key",
    "on_store_error",
    "workers",
)
_BACKEND_KEYS: Final = ("name", "url", "weight", "drain", "drain_timeout", "eras", "command", "replicas")
_ROUTE_KEYS: Final = ("match", "pool", "deny")
_MATCH_KEYS: Final = ("method", "name", "param")
# Mcp-Param-<Name>: the name part is an HTTP token without the characters headers may not carry.
_PARAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
MANAGED_HOST: Final = "127.0.0.1"
MAX_REPLICAS: Final = 64
MAX_WORKERS: Final = 1024  # a typo guard, not a tuning limit


class _Required:
    """Marks a key without a default."""


_REQUIRED: Final = _Required()


class _Invalid(ConfigError):
    """A problem at a key path, before the source is known; parse_config prefixes the file name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)


# --- public entry points ---------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc)}") from None
    return parse_config(data, source)


def parse_config(data: object, source: str = "<config>") -> Config:
    if data is None:
        raise ConfigError(f"{source}: the configuration is empty; at least `backends` is required")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {_describe(data)}")
    try:
        config = _config(_Section(data, "", _TOP_KEYS), source)
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return check_workers(config)


def check_workers(config: Config, key: str = "workers") -> Config:
    """`config`, or ConfigError when its worker count does not fit the rest of it. `key` is how the
    count was given (`workers` in the file, `--workers` on the command line), for the message."""
    problem = _workers_problem(config)
    if problem is not None:
        raise ConfigError(f"{config.source}: {key}: {problem}")
    return config


def host_port(host: str, port: int) -> str:
    """The inverse of parse_listen: `host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(value: str, key: str = "listen") -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host without brackets, port); ConfigError names `key`."""
    try:
        return _split_host_port(value)
    except ValueError as exc:
        raise _Invalid(key, str(exc)) from None


# --- sections --------------------------------------------------------------------------------------


def _config(top: _Section, source: str) -> Config:
    host, port = top.parsed("listen", _split_host_port, "127.0.0.1:8080")
    heartbeat = top.number("heartbeat", 15.0, ge=0)
    backends = _backends(top)
    pools = _pools(top, {b.name for b in backends})
    return Config(
        listen_host=host,
        listen_port=port,
        store=top.parsed("store", _check_store, "memory"),
        session_ttl=top.number("session_ttl", 3600.0, gt=0),
        balance=top.choice("balance", BALANCE_STRATEGIES, "least_sessions"),
        heartbeat=heartbeat,
        backends=backends,
        timeouts=_timeouts(top.section("timeouts", _field_names(TimeoutsConfig)), heartbeat),
        limits=_limits(top.section("limits", _field_names(LimitsConfig))),
        store_prefix=top.string("store_prefix", DEFAULT_STORE_PREFIX),
        local_cache_size=top.integer("local_cache_size", DEFAULT_LOCAL_CACHE_SIZE, ge=1),
        source=source,
        admin=top.parsed("admin", _split_host_port) if top.has("admin") else None,
        metrics=_metrics(top.section("metrics", _field_names(MetricsConfig))),
        log=_log(top.section("log", _field_names(LogConfig))),
        health=_health(top.section("health", _field_names(HealthConfig))),
        shutdown_timeout=top.number("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT, ge=0),
        pools=pools,
        routes=_routes(top, pools),
        affinity=_affinity(top.section("affinity", _field_names(AffinityConfig))),
        validate_headers=top.boolean("validate_headers", False),
        failover=top.choice("failover", FAILOVER_MODES, "reinitialize"),
        allowed_origins=top.read("allowed_origins", _as_origins, []),
        **_binding(top),
        on_store_error=top.choice("on_store_error", STORE_ERROR_MODES, "degrade"),
        workers=top.integer("workers", 1, ge=1, le=MAX_WORKERS),
    )


def _workers_problem(config: Config) -> str | None:
    n = config.workers
    if not 1 <= n <= MAX_WORKERS:
        return f"must be 1-{MAX_WORKERS}, got {n}"
    if n == 1:
        return None
    if config.store == "memory":
        return (
            f"{n} workers need a Redis `store`: the memory store is per process, so a session "
            "initialized on one worker would be unknown (404) to the others; set `store: redis://...` "
            "or use 1 worker"
        )
    if config.listen_port == 0:
        return f"{n} workers need a fixed `listen` port: with port 0 each worker would get a different one"
    managed = [b.name for b in config.backends if b.command is not None]
    if managed:
        names = ", ".join(managed[:3]) + (", ..." if len(managed) > 3 else "")
        return (
            f"{n} workers cannot run managed (`command`) backends ({names}): each worker "
            "would start its own copies, and a session on one worker's copy is unknown to the other "
            "workers; run the servers yourself and list their `url`s, or use 1 worker"
        )
    return _admin_ports_problem(config)


def admin_of_worker(config: Config, index: int) -> tuple[str, int] | None:
    """Worker `index` (0-based) serves `admin` on its port + index, so every worker is a scrape target
    of its own; port 0 stays 0 (each worker picks a free one)."""
    if config.admin is None:
        return None
    host, port = config.admin
    return host, port + index if port else 0


def _admin_ports_problem(config: Config) -> str | None:
    if config.admin is None or config.admin[1] == 0:
        return None
    host, first = config.admin
    last = first + config.workers - 1
    ports = f"{config.workers} workers serve `admin` on ports {first}-{last} (port + worker index)"
    if last > 65535:
        return f"{ports}: past 65535"
    wildcard = ("0.0.0.0", "::")
    same_host = host == config.listen_host or host in wildcard or config.listen_host in wildcard
    if same_host and first <= config.listen_port <= last:
        return f"{ports}, which includes the `listen` port {config.listen_port}"
    return None


def _binding(top: _Section) -> dict[str, str | None]:
    header = (
        top.string("bind_sessions", pattern=_HEADER_NAME, rule=_HEADER_RULE)
        if top.has("bind_sessions")
        else None
    )
    key = top.string("session_binding_key") if top.has("session_binding_key") else None
    if key is not None and len(key) < 16:
        raise top.invalid("session_binding_key", "must be at least 16 characters (a random secret)")
    if (
        header is not None
        and key is None
        and top.has("store")
        and top.parsed("store", _check_store) != "memory"
    ):
        raise top.invalid(
            "session_binding_key",
            "is required when bind_sessions is set and the store is Redis: every proxy replica must "
            "hash credentials with the same key (a per-process random key would tie sessions to one replica)",
        )
    return {"bind_sessions": header.lower() if header else None, "session_binding_key": key}


def _backends(top: _Section) -> tuple[BackendConfig, ...]:
    entries = top.section_list("backends", _BACKEND_KEYS)
    backends: list[BackendConfig] = []
    first_seen: dict[str, str] = {}
    for entry in entries:
        for backend in _backend(entry):
            if backend.name in first_seen:
                # Names are session owners in the store; two backends with one name would share sessions.
                also = first_seen[backend.name]
                raise entry.invalid("name", f"duplicate name {backend.name!r} (also {also})")
            first_seen[backend.name] = entry.at("name")
            backends.append(backend)
    return tuple(backends)


def _backend(entry: _Section) -> list[BackendConfig]:
    name = entry.string("name", pattern=_BACKEND_NAME, rule=_BACKEND_NAME_RULE)
    weight = entry.integer("weight", 1, ge=1, le=1000)
    if entry.has("command"):
        return _managed(entry, name, weight)
    if entry.has("replicas"):
        raise entry.invalid("replicas", "is only allowed with `command` (a managed backend), not with `url`")
    if not entry.has("url"):
        raise entry.invalid("url", "is required (or `command` for a backend the proxy runs itself)")
    url = entry.string("url")
    scheme, host, port, path_prefix = entry.parsed("url", _split_backend_url)
    return [BackendConfig(name, url, scheme, host, port, path_prefix, *_placement(entry, weight))]


def _placement(entry: _Section, weight: int) -> tuple[int, bool, float, tuple[str, ...]]:
    """What url and command backends share: weight, drain, drain_timeout, eras."""
    drain = entry.boolean("drain", False)
    drain_timeout = entry.number("drain_timeout", 0.0, ge=0)
    eras = entry.read("eras", _as_eras, list(ERAS))
    return weight, drain, drain_timeout, eras


def _pools(top: _Section, backends: Collection[str]) -> dict[str, tuple[str, ...]]:
    raw = top.read("pools", _as_mapping, {})
    pools: dict[str, tuple[str, ...]] = {}
    for name, members in raw.items():
        path = top.at(f"pools.{name}")
        if not isinstance(name, str) or not _BACKEND_NAME.fullmatch(name):
            raise _Invalid(path, f"a pool name must be {_BACKEND_NAME_RULE}")
        try:
            items = _as_nonempty_list(members)
        except ValueError as exc:
            raise _Invalid(path, str(exc)) from None
        for i, member in enumerate(items):
            if member not in backends:
                raise _Invalid(f"{path}[{i}]", f"unknown backend {member!r}; backends: {', '.join(backends)}")
        pools[name] = tuple(dict.fromkeys(str(m) for m in items))
    return pools


def _routes(top: _Section, pools: Mapping[str, tuple[str, ...]]) -> tuple[RouteConfig, ...]:
    if not top.has("routes"):
        return ()
    return tuple(_route(entry, pools) for entry in top.section_list("routes", _ROUTE_KEYS))


def _route(entry: _Section, pools: Mapping[str, tuple[str, ...]]) -> RouteConfig:
    if entry.has("pool") == entry.has("deny"):
        raise _Invalid(entry.path, "needs exactly one of `pool` (where to send) or `deny` (a 4xx status)")
    pool = deny = None
    if entry.has("pool"):
        pool = entry.string("pool")
        if pool not in pools:
            known = ", ".join(pools) or "none defined"
            raise entry.invalid("pool", f"unknown pool {pool!r}; pools: {known}")
    else:
        deny = entry.integer("deny")
        if not 400 <= deny <= 499 or deny not in _HTTP_STATUSES:
            raise entry.invalid("deny", f"must be an HTTP 4xx status such as 403, got {deny}")
    match = entry.section("match", _MATCH_KEYS)
    return RouteConfig(
        method=match.string("method") if match.has("method") else None,
        name=match.string("name") if match.has("name") else None,
        params=match.read("param", _as_params, {}),
        pool=pool,
        deny=deny,
    )


def _affinity(section: _Section) -> AffinityConfig:
    default = AffinityConfig()
    return AffinityConfig(
        tasks=section.boolean("tasks", default.tasks),
        request_state=section.boolean("request_state", default.request_state),
        max_entries=section.integer("max_entries", default.max_entries, ge=1),
        task_ttl=section.number("task_ttl", default.task_ttl, gt=0),
        request_state_ttl=section.number("request_state_ttl", default.request_state_ttl, gt=0),
    )


def _managed(entry: _Section, name: str, weight: int) -> list[BackendConfig]:
    """`replicas` backends named `<name>-1` ... `<name>-N`, each running `command`."""
    if entry.has("url"):
        raise entry.invalid("url", "give either `url` or `command`, not both")
    command = entry.parsed("command", _check_command)
    replicas = entry.integer("replicas", 1, ge=1, le=MAX_REPLICAS)
    names = [f"{name}-{i}" for i in range(1, replicas + 1)]
    if not _BACKEND_NAME.fullmatch(names[-1]):
        raise entry.invalid(
            "name", f"with the replica suffix must be {_BACKEND_NAME_RULE}, got {names[-1]!r}"
        )
    placement = _placement(entry, weight)
    return [BackendConfig(n, "", "http", MANAGED_HOST, 0, "", *placement, command) for n in names]


def _timeouts(section: _Section, heartbeat: float) -> TimeoutsConfig:
    default = TimeoutsConfig()
    stream_idle = section.number("stream_idle", default.stream_idle, ge=0)
    if heartbeat > 0 and 0 < stream_idle <= heartbeat:
        # Heartbeats are written after `heartbeat` seconds of upstream silence; an idle cut at or
        # before that moment would end every quiet stream before a single heartbeat went out.
        problem = f"must be greater than heartbeat ({heartbeat:g}) or 0 (off), got {stream_idle:g}"
        raise section.invalid("stream_idle", problem)
    return TimeoutsConfig(
        connect=section.number("connect", default.connect, gt=0),
        response_headers=section.number("response_headers", default.response_headers, gt=0),
        stream_idle=stream_idle,
    )


def _limits(section: _Section) -> LimitsConfig:
    default = LimitsConfig()
    return LimitsConfig(
        header_bytes=section.integer("header_bytes", default.header_bytes, ge=1024),
        header_count=section.integer("header_count", default.header_count, ge=8),
        body_bytes=section.integer("body_bytes", default.body_bytes, ge=1024),
        connections=section.integer("connections", default.connections, ge=1),
        head_timeout=section.number("head_timeout", default.head_timeout, gt=0),
        keepalive_timeout=section.number("keepalive_timeout", default.keepalive_timeout, gt=0),
    )


def _metrics(section: _Section) -> MetricsConfig:
    default = MetricsConfig()
    path = section.parsed("path", _check_metrics_path, default.path)
    return MetricsConfig(enabled=section.boolean("enabled", default.enabled), path=path)


def _health(section: _Section) -> HealthConfig:
    default = HealthConfig()
    interval = section.number("interval", default.interval, ge=0)  # 0: no active checks
    timeout = section.number("timeout", default.timeout, gt=0)
    return HealthConfig(
        interval=interval,
        timeout=timeout,
        path=section.parsed("path", _check_probe_path, default.path),
        fall=section.integer("fall", default.fall, ge=1, le=100),
        rise=section.integer("rise", default.rise, ge=1, le=100),
    )


def _log(section: _Section) -> LogConfig:
    default = LogConfig()
    return LogConfig(
        format=section.choice("format", LOG_FORMATS, default.format),
        level=section.choice("level", LOG_LEVELS, default.level),
        access=section.boolean("access", default.access),
    )


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


# --- the reader ------------------------------------------------------------------------------------


class _Section:
    """One YAML mapping, its key path, and readers whose errors name `path.key`."""

    def __init__(self, data: object, path: str, allowed: Collection[str]) -> None:
        if not isinstance(data, Mapping):
            raise _Invalid(path, f"must be a mapping, got {_describe(data)}")
        unknown = [key for key in data if key not in allowed]
        if unknown:
            raise _Invalid(self._join(path, unknown[0]), f"unknown key; allowed: {', '.join(allowed)}")
        self._data: Mapping[object, object] = data
        self.path = path

    @staticmethod
    def _join(path: str, key: object) -> str:
        return f"{path}.{key}" if path else str(key)

    def at(self, key: str) -> str:
        return self._join(self.path, key)

    def invalid(self, key: str, problem: str) -> ConfigError:
        return _Invalid(self.at(key), problem)

    def read(self, key: str, convert: Callable[[object], _T], default: object = _REQUIRED) -> _T:
        """`convert` applied to the value at `key` (or to `default` when the key is absent)."""
        raw = self._data.get(key, default)
        if isinstance(raw, _Required):
            raise self.invalid(key, "is required")
        try:
            return convert(raw)
        except ValueError as exc:
            raise self.invalid(key, str(exc)) from None

    def number(
        self,
        key: str,
        default: float | _Required = _REQUIRED,
        *,
        gt: float | None = None,
        ge: float | None = None,
    ) -> float:
        return self.read(key, lambda raw: float(_in_range(_as_number(raw), gt=gt, ge=ge)), default)

    def integer(
        self, key: str, default: int | _Required = _REQUIRED, *, ge: int | None = None, le: int | None = None
    ) -> int:
        return self.read(key, lambda raw: _in_range(_as_integer(raw), ge=ge, le=le), default)

    def string(
        self,
        key: str,
        default: str | _Required = _REQUIRED,
        *,
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
    ) -> str:
        return self.read(key, lambda raw: _as_string(raw, pattern, rule), default)

    def boolean(self, key: str, default: bool | _Required = _REQUIRED) -> bool:
        return self.read(key, _as_bool, default)

    def has(self, key: str) -> bool:
        """The key is present and not null."""
        return self._data.get(key) is not None

    def choice(self, key: str, choices: Collection[str], default: str | _Required = _REQUIRED) -> str:
        return self.read(key, lambda raw: _as_choice(raw, choices), default)

    def parsed(self, key: str, parse: Callable[[str], _T], default: str | _Required = _REQUIRED) -> _T:
        """A string run through `parse` (which raises ValueError saying what is wrong)."""
        return self.read(key, lambda raw: parse(_as_string(raw)), default)

    def section(self, key: str, allowed: Collection[str]) -> _Section:
        # `timeouts:` with every child commented out loads as null: read it as "all defaults".
        raw = self._data.get(key)
        return _Section({} if raw is None else raw, self.at(key), allowed)

    def section_list(self, key: str, allowed: Collection[str]) -> list[_Section]:
        """A required, non-empty list of mappings, each checked against `allowed`."""
        items = self.read(key, _as_nonempty_list)
        return [_Section(item, f"{self.at(key)}[{i}]", allowed) for i, item in enumerate(items)]


# --- converters: pure, raise ValueError saying what is wrong ---------------------------------------


def _describe(raw: object) -> str:
    """A value as the user wrote it in YAML, for 'got ...' in messages."""
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, Mapping):
        return "a mapping"
    if isinstance(raw, list):
        return "a list"
    return repr(raw)


def _as_number(raw: object) -> int | float:
    # bool is an int subclass; `timeout: yes` is a mistake, not 1 second.
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ValueError(f"must be a number, got {_describe(raw)}")
    if not math.isfinite(raw):
        raise ValueError(f"must be a finite number, got {raw}")
    return raw


def _as_integer(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"must be an integer, got {_describe(raw)}")
    return raw


def _in_range(value: _N, *, gt: float | None = None, ge: float | None = None, le: float | None = None) -> _N:
    if gt is not None and not value > gt:
        raise ValueError(f"must be > {gt}, got {value}")
    if ge is not None and not value >= ge:
        raise ValueError(f"must be >= {ge}, got {value}")
    if le is not None and not value <= le:
        raise ValueError(f"must be <= {le}, got {value}")
    return value


def _as_string(raw: object, pattern: re.Pattern[str] | None = None, rule: str = "") -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {_describe(raw)}")
    if not raw:
        raise ValueError("must not be empty")
    if pattern is not None and not pattern.fullmatch(raw):
        raise ValueError(f"must be {rule}, got {raw!r}")
    return raw


def _as_bool(raw: object) -> bool:
    if not isinstance(raw, bool):
        raise ValueError(f"must be true or false, got {_describe(raw)}")
    return raw


def _as_choice(raw: object, choices: Collection[str]) -> str:
    value = _as_string(raw)
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _as_mapping(raw: object) -> Mapping[object, object]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"must be a mapping, got {_describe(raw)}")
    return raw


def _as_params(raw: object) -> tuple[tuple[str, str], ...]:
    params = []
    for name, value in _as_mapping(raw).items():
        if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a parameter name (header Mcp-Param-<name>)")
        if not isinstance(value, str):
            raise ValueError(f"{name}: the value must be a string, got {_describe(value)} (quote it)")
        params.append((name, value))
    return tuple(params)


def _as_eras(raw: object) -> tuple[str, ...]:
    items = _as_nonempty_list(raw)
    eras = tuple(_as_choice(item, ERAS) for item in items)
    if len(set(eras)) != len(eras):
        raise ValueError(f"lists an era twice: {', '.join(eras)}")
    return eras


def _as_nonempty_list(raw: object) -> list[object]:
    if not isinstance(raw, list):
        raise ValueError(f"must be a list, got {_describe(raw)}")
    if not raw:
        raise ValueError("must have at least one entry")
    return raw


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", re.ASCII)
_HEADER_RULE = "an HTTP header name such as 'authorization'"
_ORIGIN = re.compile(r"(?:https?)://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::\d{1,5})?", re.ASCII)


def _as_origins(raw: object) -> tuple[str, ...]:
    """`allowed_origins`: a list of "*" or exact origins (scheme://host[:port], no path)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"must be a list of origins, got {_describe(raw)}")
    origins = []
    for item in raw:
        value = _as_string(item)
        if value != "*" and not _ORIGIN.fullmatch(value):
            raise ValueError(
                f"entries must be '*' or an origin like 'https://app.example:8443', got {value!r}"
            )
        origins.append(value.lower())
    return tuple(origins)


def _split_host_port(value: str) -> tuple[str, int]:
    match = _HOST_PORT.fullmatch(value)
    if match is None:
        raise ValueError(f"must be 'host:port' (IPv6 as '[::1]:8080'), got {value!r}")
    host = match["host"] or match["v6"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return host, port


def _split_url(value: str) -> SplitResult:
    # urlsplit silently strips or drops whitespace and control characters; refuse them instead.
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"must not contain whitespace or control characters, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for the ValueError it raises on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}): {_redact(value)!r}") from None
    return parts


def _split_backend_url(value: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of a backend URL."""
    parts = _split_url(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {_redact(value)!r}")
    if "@" in parts.netloc:
        raise ValueError("must not contain user info (user:password@)")
    if "?" in value or "#" in value:
        raise ValueError(f"must not have a query or fragment, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"has no host, got {value!r}")
    if parts.port == 0:
        raise ValueError(f"port must be 1-65535, got {value!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _check_command(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split into words ({exc}): {value!r}") from None
    if not words:
        raise ValueError("must name a program")
    try:
        for word in words:
            word.format_map(_CommandCheck())
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        problem = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"{problem}; placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)} "
            "(double a brace for a literal one)"
        ) from None
    return value


PLACEHOLDERS: Final = ("port", "host", "name", "python")


class _CommandCheck(dict[str, str]):
    """format_map mapping that accepts exactly the command placeholders."""

    def __missing__(self, key: str) -> str:
        if key in PLACEHOLDERS:
            return ""
        raise KeyError(key)


def _check_metrics_path(value: str) -> str:
    if not _URL_PATH.fullmatch(value):
        raise ValueError(f"must be a path starting with '/', visible ASCII, at most 256 bytes; got {value!r}")
    if value in PROBE_PATHS:
        raise ValueError(f"must not be {value}: the proxy answers that path itself")
    return value


def _check_probe_path(value: str) -> str:
    if not _URL_PATH.fullmatch(value):
        raise ValueError(f"must be a path starting with '/', visible ASCII, at most 256 bytes; got {value!r}")
    return value


def _check_store(value: str) -> str:
    if value == "memory":
        return value
    parts = _split_url(value)
    if parts.scheme not in (*_REDIS_SCHEMES, "unix"):
        raise ValueError(f"must be 'memory' or a redis://, rediss:// or unix:// URL, got {_redact(value)!r}")
    if parts.scheme in _REDIS_SCHEMES and not parts.hostname:
        raise ValueError(f"a {parts.scheme}:// URL needs a host, got {_redact(value)!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"a unix:// URL needs a socket path, got {_redact(value)!r}")
    return value


def _redact(url: str) -> str:
    """The URL with any user info masked: error messages end up in logs, passwords must not."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{tail}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
