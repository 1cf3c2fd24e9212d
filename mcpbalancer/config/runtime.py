"""What the proxy reads: the frozen Config built from a validated file, and its backends and routes.

The sections shaped like the file's (timeouts, limits, health, ...) are the models themselves
(models.py). The rest differ from the file: `listen` is split into listeners (the first one's host
and port kept as listen_host, listen_port), a backend's URL
into its parts, a managed entry into its replicas, a `discover` entry into a DiscoveryConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mcpbalancer.config.access import AccessConfig
from mcpbalancer.config.health import HealthConfig
from mcpbalancer.config.models import (
    DEFAULT_LOCAL_CACHE_SIZE,
    DEFAULT_MCP_PATH,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STORE_PREFIX,
    ERAS,
    AffinityConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    TimeoutsConfig,
    TracingConfig,
)


class SessionKey:
    """One of `session_keys`, decoded. Its bytes never appear in a repr, a log line or an error."""

    __slots__ = ("material",)

    def __init__(self, material: bytes) -> None:
        self.material = material

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SessionKey) and other.material == self.material

    def __hash__(self) -> int:
        return hash(self.material)

    def __repr__(self) -> str:
        return "SessionKey(<secret>)"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How the proxy speaks TLS to an https:// backend. Paths are as written in the file (relative
    ones are read from the config file's directory). The default verifies the backend's certificate
    against the system's CA store, for the URL's host name."""

    ca: str | None = None  # PEM file of the CAs to trust instead of the system store
    server_name: str | None = None  # the name to send as SNI and to verify, instead of the URL's host
    cert: str | None = None  # client certificate (PEM) for backends that require one (mutual TLS)
    key: str | None = None  # its private key, when not in the `cert` file
    insecure_skip_verify: bool = False  # accept any certificate (logged as a warning)
    at: str = field(default="tls", compare=False)  # the key path, for error messages


@dataclass(frozen=True, slots=True)
class ServerTlsConfig:
    """TLS terminated on a listener (`listen[i].tls`). Paths as written in the file."""

    cert: str  # PEM: the server certificate, its chain after it (and its key, without `key`)
    key: str | None = None
    client_ca: str | None = None  # PEM: the CAs client certificates are verified against (mTLS)
    require_client_cert: bool = False
    min_version: str = "1.2"  # "1.2" or "1.3"
    at: str = field(default="listen[0].tls", compare=False)  # the key path, for error messages


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One listener: where, and whether it terminates TLS."""

    host: str
    port: int
    tls: ServerTlsConfig | None = None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def shape(self) -> tuple[str, int, bool]:
        """What only a restart changes: the socket, and whether TLS is spoken on it."""
        return self.host, self.port, self.tls is not None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    url: str
    scheme: str
    host: str
    port: int
    path: str  # the URL's path: the server's MCP endpoint; "" when the URL has none
    weight: int = 1
    drain: bool = False
    drain_timeout: float = 0.0  # seconds after the drain starts; 0 = wait for the sessions forever
    eras: tuple[str, ...] = ERAS  # the MCP protocol eras this backend serves
    # A managed backend (`command` in YAML): the proxy runs this command line; host and port are
    # known once the process is up (port 0 here). None for a backend given by `url`.
    command: str | None = None
    # TLS settings of an https:// backend (always set for one, defaults if the file has no `tls`).
    tls: TlsConfig | None = None
    # Its health settings: its own `health:` keys over the global block's (config/health.py merged).
    health: HealthConfig = field(default_factory=HealthConfig)
    session_mode: str = "auto"  # auto (learned), stateful or stateless
    max_in_flight: int | None = None  # requests sent at once (GET streams not counted); None = no limit
    queue_timeout: float = 10.0  # seconds a request waits for a slot, then 503


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """A `discover` entry: where to look its instances up, and the settings each of them takes.

    `template` is the BackendConfig every discovered backend is made from (fleet/discovery.py
    fills in its name, address and, from an SRV record, weight): whatever an entry's settings are,
    a discovered backend has the same, as a `url` entry would."""

    name: str
    dns: str | None  # A/AAAA records of this name are the instances, on `port`
    srv: str | None  # or the targets of this SRV name
    port: int | None
    interval: float = 5.0
    timeout: float = 2.0
    family: str = "ipv4"  # "ipv4" (A records) or "ipv6" (AAAA)
    scheme: str = "http"
    path: str = ""  # the instances' MCP endpoint; "" = none
    nameservers: tuple[tuple[str, int], ...] = ()  # (IP, port) to ask; () = the system's resolv.conf
    template: BackendConfig = field(default_factory=lambda: BackendConfig("", "", "http", "", 0, ""))

    @property
    def query(self) -> tuple[object, ...]:
        """What is asked of DNS: a change of it means another answer."""
        return (self.dns, self.srv, self.port, self.family, self.nameservers, self.timeout)

    @property
    def tls_name(self) -> str:
        """The name an https instance's certificate is verified for by default: the name looked
        up, without an SRV name's `_service._proto.` labels."""
        name = self.dns or self.srv or ""
        labels = name.rstrip(".").split(".")
        while len(labels) > 1 and labels[0].startswith("_"):
            labels.pop(0)
        return ".".join(labels)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One `routes` entry: match on a 2026-07-28 request's headers, then a pool or a deny status."""

    method: str | None = None  # Mcp-Method, exact
    name: str | None = None  # glob on the decoded Mcp-Name
    params: tuple[tuple[str, str], ...] = ()  # (Name, value): header Mcp-Param-<Name> equals value
    pool: str | None = None
    deny: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str
    listen_port: int
    store: str
    session_ttl: float
    balance: str
    heartbeat: float
    backends: tuple[BackendConfig, ...]  # the fixed ones: `url` and `command` entries
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    store_prefix: str = DEFAULT_STORE_PREFIX
    local_cache_size: int = DEFAULT_LOCAL_CACHE_SIZE
    source: str = "<config>"
    admin: tuple[str, int] | None = None  # (host, port) of the control listener; None = off
    # Bearer tokens the admin API accepts (any of them); empty = no authentication. Never printed.
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    validate_headers: bool = False
    failover: str = "reinitialize"  # or "replay": re-run a lost session's initialize elsewhere
    # With replay: what moves a session, "gone" (owner refused, removed, restarted) and/or
    # "backend_404" (the owner answered 404: it forgot the session).
    replay_on: tuple[str, ...] = ("gone",)
    session_ids: str = "plain"  # or "sealed": clients see a token naming the backend (routing/sealed.py)
    session_keys: tuple[SessionKey, ...] = ()  # the first seals, every one opens
    session_max_age: float | None = None  # seconds from the initialize after which a session is gone
    # Exact origins ("https://app.example") allowed to call cross-origin, or "*"; empty = only
    # requests without Origin or whose Origin names the request's Host.
    allowed_origins: tuple[str, ...] = ()
    # Host names (exact, or globs with * and ?; "*" = any) the proxy answers for; None = not set:
    # the loopback names on a loopback `listen`, else those and IP addresses (hosts.for_listen).
    allowed_hosts: tuple[str, ...] | None = None
    # Header whose value a session is bound to (lower-case), e.g. "authorization"; None = off.
    bind_sessions: str | None = None
    session_binding_key: str | None = None  # HMAC key of the binding; random per process if None
    on_store_error: str = "degrade"  # or "fail": what new sessions get while the shared store is down
    # Processes sharing the listen port (SO_REUSEPORT); > 1 makes the CLI a supervisor (supervisor.py).
    workers: int = 1
    # The path clients use for MCP; requests for it go to each backend's endpoint (its URL's path).
    mcp_path: str = DEFAULT_MCP_PATH
    # Who may call what and how often (auth, tool_policy, rate_limits): one record, per service.
    access: AccessConfig = field(default_factory=AccessConfig)
    # Networks of proxies in front whose X-Forwarded-For / X-Forwarded-Proto are believed.
    trusted_proxies: tuple[str, ...] = ()
    # The `discover` entries: backends found in DNS at run time (fleet/discovery.py).
    discovery: tuple[DiscoveryConfig, ...] = ()
    # Every `listen` entry, the first being listen_host:listen_port; () = that one alone, plain.
    listeners: tuple[ListenerConfig, ...] = ()
    # The `services` entries (config/services.py); the top-level backends are the default service.
    services: tuple[ServiceConfig, ...] = ()

    @property
    def all_listeners(self) -> tuple[ListenerConfig, ...]:
        return self.listeners or (ListenerConfig(self.listen_host, self.listen_port),)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One `services` entry: how requests are matched to it, and its own Config (the top-level one
    with the service's keys in place of the top-level ones, `services` empty)."""

    name: str
    host: str | None  # lower-case Host name or glob; None = any Host
    path_prefix: str | None  # "/github"; None = every path
    strip_prefix: bool
    config: Config


def host_port(host: str, port: int) -> str:
    """The inverse of parse_listen: `host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
