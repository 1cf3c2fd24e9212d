"""The top level of the configuration file, its backend entries and its routes.

Their shape is the file's, not the proxy's (`listen` is a "host:port" string or a list, a managed entry
stands for `replicas` backends): build.py turns a validated ConfigFile into a runtime.Config, and
schema.py derives the JSON Schema from it. The checks across keys are here, as model validators, so
that nothing invalid gets that far.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Self

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import CoreSchema

from mcpbalancer.config import checks
from mcpbalancer.config.access import AuthConfig, Network, RateLimit, ToolRule
from mcpbalancer.config.checks import BACKEND_NAME, BACKEND_NAME_RULE, PARAM_NAME, describe
from mcpbalancer.config.health import BackendHealth, HealthConfig
from mcpbalancer.config.listeners import CLIENT_CERT, DEFAULT_LISTEN, Listeners, duplicate, tls_listeners
from mcpbalancer.config.models import (
    DEFAULT_LOCAL_CACHE_SIZE,
    DEFAULT_MCP_PATH,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_STORE_PREFIX,
    DENY_STATUSES,
    ERAS,
    FAILOVER_MODES,
    MAX_REPLICAS,
    MAX_WORKERS,
    MODEL,
    AdminToken,
    AffinityConfig,
    Balance,
    DnsName,
    EndpointPath,
    Era,
    Failover,
    Family,
    Flag,
    HeaderName,
    HostName,
    HostPort,
    Integer,
    LimitsConfig,
    LogConfig,
    McpPath,
    MetricsConfig,
    Name,
    NameServer,
    Number,
    Origin,
    Port,
    ReplayTrigger,
    Scheme,
    Section,
    ServerName,
    SessionIds,
    SessionMode,
    StoreErrorMode,
    Text,
    TimeoutsConfig,
    TracingConfig,
    invalid,
    kind_of,
)

MANAGED_HOST: Final = "127.0.0.1"
_NEEDS_AUTH: Final = "needs `auth` (mode: enforce)"


def _distinct(eras: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(eras)) != len(eras):
        raise ValueError(f"lists an era twice: {', '.join(eras)}")
    return eras


def _distinct_triggers(triggers: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(triggers)) != len(triggers):
        raise ValueError(f"lists a trigger twice: {', '.join(triggers)}")
    return triggers


def _deny_status(status: int) -> int:
    if status not in DENY_STATUSES:
        raise ValueError(f"must be an HTTP 4xx status such as 403, got {status}")
    return status


def _list_of(what: str) -> BeforeValidator:
    """A list, or an error saying of what: `allowed_origins: "*"` is a likely slip."""

    def check(raw: object) -> object:
        if raw is not None and not isinstance(raw, list | tuple):
            raise ValueError(f"must be a list of {what}, got {describe(raw)}")
        return raw

    return BeforeValidator(check)


Url = Annotated[Text, AfterValidator(checks.check_backend_url)]
Command = Annotated[Text, AfterValidator(checks.check_command)]
Eras = Annotated[tuple[Era, ...], Field(min_length=1), AfterValidator(_distinct)]
Members = Annotated[tuple[Text, ...], Field(min_length=1)]
Store = Annotated[Text, AfterValidator(checks.check_store)]
DenyStatus = Annotated[Integer, AfterValidator(_deny_status)]
ParamName = Annotated[str, Field(pattern=f"^{PARAM_NAME.pattern}$")]
Params = Annotated[dict[ParamName, str], BeforeValidator(checks.check_params)]
Origins = Annotated[tuple[Origin, ...], _list_of("origins")]
Hosts = Annotated[tuple[HostName, ...], _list_of("host names")]
NameServers = Annotated[tuple[NameServer, ...], Field(min_length=1), _list_of("IP addresses")]
BindingKey = Annotated[str, Field(strict=True, min_length=16)]
SessionKeyRef = Annotated[Text, AfterValidator(checks.check_session_key)]
SessionKeys = Annotated[tuple[SessionKeyRef, ...], _list_of("keys")]
ReplayOn = Annotated[tuple[ReplayTrigger, ...], Field(min_length=1), AfterValidator(_distinct_triggers)]


def _failover_short_form(raw: object) -> object:
    """`failover: replay` is `{mode: replay}` (replay_on: [gone]); `reinitialize` likewise."""
    if isinstance(raw, str):
        if raw not in FAILOVER_MODES:
            choices = ", ".join(FAILOVER_MODES)
            raise ValueError(
                f"must be one of {choices}, or a mapping with `mode` and `replay_on`; got {raw!r}"
            )
        return {"mode": raw}
    return raw


class _OrShortForm:
    """The JSON Schema of a section that may also be written as one of `choices`."""

    def __init__(self, *choices: str) -> None:
        self.choices = list(choices)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return {"anyOf": [{"type": "string", "enum": self.choices}, handler(schema)]}


def _one_or_more(raw: object) -> object:
    """`token: "x"` is `token: ["x"]`; a list is what a rotation needs (the old and the new)."""
    if isinstance(raw, str):
        return (raw,)
    if raw is not None and not isinstance(raw, list | tuple):
        raise ValueError(f"must be a string or a list of strings, got {kind_of(raw)}")
    return raw


def _admin_shorthand(raw: object) -> object:
    """`admin: "host:port"` is `admin: {listen: "host:port"}`; an error in it names `admin`."""
    if isinstance(raw, str):
        checks.check_host_port(raw)
        return {"listen": raw}
    if raw is not None and not isinstance(raw, Mapping):
        raise ValueError(f"must be 'host:port' or a mapping with `listen` and `token`, got {describe(raw)}")
    return raw


AdminTokens = Annotated[
    tuple[AdminToken, ...],
    Field(min_length=1),
    BeforeValidator(_one_or_more, json_schema_input_type=AdminToken | list[AdminToken]),
]


@dataclass(frozen=True, slots=True, config=MODEL)
class TlsSection(Section):
    """How the proxy speaks TLS to an https:// backend. By default it verifies the backend's
    certificate against the system's CA store, for the URL's host name (also sent as SNI)."""

    ca: Text | None = Field(
        default=None,
        description="PEM file of the CAs to trust instead of the system store; a relative path is read "
        "from the config file's directory.",
    )
    server_name: ServerName | None = Field(
        default=None, description="The name to send as SNI and to verify, instead of the URL's host."
    )
    cert: Text | None = Field(
        default=None, description="Client certificate (PEM) for backends that require one (mutual TLS)."
    )
    key: Text | None = Field(
        default=None, description="The client certificate's private key, when not in `cert`."
    )
    insecure_skip_verify: Flag = Field(
        default=False, description="Accept any certificate: nothing is verified (logged as a warning)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.key is not None and self.cert is None:
            raise invalid(("key",), "needs `cert`: the client certificate this key belongs to")
        if self.insecure_skip_verify and self.ca is not None:
            raise invalid(("ca",), "has no effect with insecure_skip_verify: nothing is verified")
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class FailoverSection(Section):
    """What happens to a session whose owner is lost. `failover: replay` is short for
    `{mode: replay, replay_on: [gone]}`."""

    mode: Failover = Field(
        default="reinitialize",
        description="reinitialize (404; the client initializes again) or replay (re-run the session's "
        "initialize on a live backend, keeping the client's session id).",
    )
    replay_on: ReplayOn = Field(
        default=("gone",),
        description="With replay: what moves a session. gone: its owner refuses connections, was removed "
        "or restarted; backend_404 (opt-in): its owner answers 404 for it, having forgotten it.",
    )


Failovers = Annotated[FailoverSection, BeforeValidator(_failover_short_form), _OrShortForm(*FAILOVER_MODES)]


@dataclass(frozen=True, slots=True, config=MODEL)
class DiscoverSection(Section):
    """Backends found in DNS: every address of `dns` (on `port`), or every target of the SRV name
    `srv`, is a backend, looked up again every `interval` seconds. A new address takes sessions at
    once; one that disappears is drained. A failed or empty answer keeps the last known set."""

    dns: DnsName | None = Field(
        default=None,
        description="A name whose A (or AAAA) records are the instances: a Kubernetes headless Service, a "
        "Compose service, a Consul or Nomad service name. Needs `port`.",
    )
    srv: DnsName | None = Field(
        default=None,
        description="Instead of `dns`: an SRV name such as _mcp._tcp.tools.example; each target's address "
        "and port is an instance, its record's weight the backend's weight.",
    )
    port: Port | None = Field(default=None, description="With `dns`: the port the instances serve on.")
    interval: Number = Field(default=5.0, ge=0.1, description="Seconds between two lookups.")
    timeout: Number = Field(
        default=2.0, gt=0, description="Seconds a lookup may take before it counts as failed."
    )
    family: Family = Field(
        default="ipv4",
        description="Which addresses are instances: ipv4 (A records) or ipv6 (AAAA records); one family, "
        "so that an instance with both is not counted twice.",
    )
    scheme: Scheme = Field(default="http", description="http or https (then `tls` applies).")
    path: EndpointPath | None = Field(
        default=None,
        description="The instances' MCP endpoint, as the path of a `url` (e.g. /mcp); absent: every "
        "request path is sent as it came.",
    )
    nameservers: NameServers | None = Field(
        default=None,
        description="DNS servers to ask instead of the system's (/etc/resolv.conf): IP addresses, "
        "optionally with a port ('127.0.0.1:5353', '[fd00::10]:53').",
    )

    @model_validator(mode="after")
    def _one_name(self) -> Self:
        if (self.dns is None) == (self.srv is None):
            raise invalid((), "needs exactly one of `dns` (with `port`) or `srv`")
        if self.dns is not None and self.port is None:
            raise invalid(("port",), "is required with `dns`: A records carry no port")
        if self.srv is not None and self.port is not None:
            raise invalid(("port",), "is not used with `srv`: each SRV record carries its port")
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class AdminSection(Section):
    """The control listener: /metrics, /healthz, /readyz, the admin API and the status page, apart
    from MCP traffic. With `workers` it answers for every worker."""

    listen: HostPort = Field(description="host:port of the control listener (IPv6 as [::1]:9100).")
    token: AdminTokens | None = Field(
        default=None,
        description="Bearer token (at least 16 characters; ${NAME} keeps it out of the file), or a list "
        "of them, any of which is accepted (to rotate one without a gap). With it, /admin/... and the "
        "status page need `Authorization: Bearer <token>`; /metrics, /healthz and /readyz stay open. "
        "Without it the admin API is open: a warning when `listen` is not a loopback address.",
    )


Admin = Annotated[
    AdminSection, BeforeValidator(_admin_shorthand, json_schema_input_type=HostPort | AdminSection)
]


@dataclass(frozen=True, slots=True, config=MODEL)
class BackendEntry(Section):
    """One MCP server: a `url` the proxy forwards to, or a `command` the proxy runs itself; or the
    servers `discover` finds in DNS."""

    name: Name = Field(
        description="Stable id, unique, stored in the session store as the session's owner: keep it when "
        "a URL changes. A managed entry's instances are named <name>-1 ... <name>-N, a discovered "
        "entry's <name>@<address>:<port>."
    )
    url: Url | None = Field(
        default=None,
        description="http:// or https:// URL (port 80/443 by default). A path names the server's MCP "
        "endpoint, kept as written: requests for `mcp_path` go there, any other path unchanged; without "
        "a path every request path is sent as it came. No query, fragment or user:password@. Required "
        "unless `command` is given.",
    )
    weight: Integer = Field(
        default=1,
        ge=1,
        le=1000,
        description="Share of new sessions; a larger weight gets proportionally more. With `discover.srv`"
        " each record's own weight is used instead.",
    )
    drain: Flag = Field(
        default=False,
        description="true: no new sessions, existing ones keep being served. On a reload the file is "
        "the source of truth: a backend no longer marked `drain` is undrained.",
    )
    drain_timeout: Number = Field(
        default=0.0,
        ge=0,
        description="Seconds after a drain starts until the remaining sessions answer 404 (or move, with "
        "failover: replay) and their GET streams are closed; requests in flight finish. 0 = wait for the "
        "sessions to end by themselves.",
    )
    eras: Eras = Field(
        default=ERAS,
        description="MCP protocol eras the backend serves: legacy sessions (2025-xx revisions) go only "
        "to legacy backends, stateless 2026-07-28 requests only to modern ones.",
    )
    command: Command | None = Field(
        default=None,
        description="Instead of `url`: a command line the proxy runs (split like a shell would, run "
        "without one). Placeholders: {port} (a free port the proxy picked), {host}, {name}, {python} "
        "(mcpbalancer's interpreter). Without {port} the process must print 'READY <port>' on stdout.",
    )
    replicas: Integer | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description="With `command` only: how many processes, named <name>-1 ... <name>-N. Default 1.",
        json_schema_extra={"default": 1},
    )
    tls: TlsSection | None = Field(
        default=None,
        description="TLS to an https:// `url` (or `discover.scheme: https`); without it the certificate "
        "is verified against the system's CAs. Not for http:// or `command` backends.",
    )
    discover: DiscoverSection | None = Field(
        default=None,
        description="Instead of `url`: the backends are the instances a DNS name lists, found again every "
        "`interval` seconds; `weight`, `eras`, `tls`, `drain`, `drain_timeout`, `health` and `session_mode` "
        "apply to each.",
    )
    health: BackendHealth | None = Field(
        default=None,
        description="This backend's own health settings, over the global `health` block: any of its keys.",
    )
    session_mode: SessionMode = Field(
        default="auto",
        description="Whether the server keeps sessions: auto (learned from its answers), stateful or "
        "stateless. A legacy request without a session id that is not an initialize goes only to a "
        "backend that serves it without a session; a value given here wins over what is learned.",
    )
    max_in_flight: Integer | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Requests each proxy process sends the backend at once (GET event streams are not "
        "counted); more wait up to `queue_timeout`. Off when absent.",
    )
    queue_timeout: Number = Field(
        default=10.0,
        ge=0,
        description="Seconds a request waits for one of `max_in_flight` to end; then 503 with Retry-After.",
    )

    @property
    def names(self) -> tuple[str, ...]:
        """The backends this entry stands for (a discovery entry's are known at run time)."""
        if self.discover is not None:
            return ()
        if self.command is None:
            return (self.name,)
        return tuple(f"{self.name}-{i}" for i in range(1, (self.replicas or 1) + 1))

    @model_validator(mode="before")
    @classmethod
    def _no_weight_with_srv(cls, data: Any) -> Any:
        """An SRV record carries its weight; a `weight` beside `srv` would be silently unused."""
        if isinstance(data, Mapping) and "weight" in data:
            discover = data.get("discover")
            if isinstance(discover, Mapping) and discover.get("srv") is not None:
                problem = "is not used with `discover.srv`: each backend takes its SRV record's weight"
                raise invalid(("weight",), problem)
        return data

    @model_validator(mode="after")
    def _url_or_command(self) -> Self:
        if self.discover is not None:
            return self._discovered()
        if self.command is None:
            if self.replicas is not None:
                raise invalid(
                    ("replicas",), "is only allowed with `command` (a managed backend), not with `url`"
                )
            if self.url is None:
                problem = (
                    "is required (or `command` for a backend the proxy runs itself, or `discover` for "
                    "backends found in DNS)"
                )
                raise invalid(("url",), problem)
            if self.tls is not None and checks.split_backend_url(self.url)[0] != "https":
                raise invalid(("tls",), "is only for an https:// `url`; this backend is plain HTTP")
            return self
        if self.url is not None:
            raise invalid(("url",), "give either `url` or `command`, not both")
        if self.tls is not None:
            problem = "is only for an https:// `url`; managed backends serve plain HTTP on 127.0.0.1"
            raise invalid(("tls",), problem)
        if not BACKEND_NAME.fullmatch(self.names[-1]):
            problem = f"with the replica suffix must be {BACKEND_NAME_RULE}, got {self.names[-1]!r}"
            raise invalid(("name",), problem)
        return self

    def _discovered(self) -> Self:
        assert self.discover is not None
        for key in ("url", "command", "replicas"):
            if getattr(self, key) is not None:
                raise invalid((key,), "is not used with `discover`: the backends are the instances DNS lists")
        if self.tls is not None and self.discover.scheme != "https":
            raise invalid(("tls",), "is only for `discover.scheme: https`; these backends are plain HTTP")
        return self


@dataclass(frozen=True, slots=True, config=MODEL)
class RouteMatch(Section):
    """Conditions on a 2026-07-28 request's headers; all given ones must hold, none matches every
    request."""

    method: Text | None = Field(default=None, description="Mcp-Method, exactly, e.g. tools/call.")
    name: Text | None = Field(
        default=None,
        description="A glob (* ? [seq], case-sensitive) on the decoded Mcp-Name: a tool or prompt name, "
        "a resource URI, a task id.",
    )
    param: Params | None = Field(
        default={},
        description="{Name: value}: header Mcp-Param-<Name> must equal the value exactly after decoding.",
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class RouteEntry(Section):
    """A rule for 2026-07-28 requests: `match`, then exactly one of `pool` or `deny`."""

    match: RouteMatch | None = Field(
        default=RouteMatch(), description="What the rule applies to; empty: every request."
    )
    pool: Text | None = Field(
        default=None, description="A name from `pools`; the request goes to a backend of it."
    )
    deny: DenyStatus | None = Field(
        default=None,
        description="A 4xx status the proxy answers with a JSON-RPC error; no backend sees the request.",
        json_schema_extra={"enum": list(DENY_STATUSES)},
    )

    @model_validator(mode="after")
    def _pool_or_deny(self) -> Self:
        if (self.pool is None) == (self.deny is None):
            raise invalid((), "needs exactly one of `pool` (where to send) or `deny` (a 4xx status)")
        return self


PathPrefix = Annotated[Text, AfterValidator(checks.check_path_prefix)]


def _required_unless_services(schema: dict[str, Any]) -> None:
    """The schema of `backends`: no default (the file needs it, or `services`)."""
    schema.pop("default", None)


def _backends_or_services_schema(schema: dict[str, Any]) -> None:
    """The file's schema: non-empty `backends`, or non-empty `services`, or both."""
    schema["anyOf"] = [
        {"required": ["backends"], "properties": {"backends": {"minItems": 1}}},
        {"required": ["services"], "properties": {"services": {"minItems": 1}}},
    ]


@dataclass(frozen=True, slots=True, config=MODEL)
class ServiceMatch(Section):
    """Which requests a service takes: a Host glob and/or a path prefix; at least one."""

    host: HostName | None = Field(
        default=None,
        description="Host name (no port), exact or a glob with * and ?; absent: any Host. An exact name "
        "wins over a glob, a glob over no host, at the same path_prefix.",
    )
    path_prefix: PathPrefix | None = Field(
        default=None,
        description="Path the request target starts with, on a segment boundary (/github matches "
        "/github and /github/..., not /githubx); the longest matching prefix wins. Starts with '/', "
        "does not end with it.",
    )

    @model_validator(mode="after")
    def _something(self) -> Self:
        if self.host is None and self.path_prefix is None:
            raise invalid((), "needs `host`, `path_prefix` or both (the top-level `backends` take the rest)")
        if self.host is not None and not self.host.strip("*"):
            raise invalid(("host",), "must name hosts; leave `host` out to match any Host")
        return self


_INHERITED: Final = "As the top-level key, for this service; absent: the top-level value."


@dataclass(frozen=True, slots=True, config=MODEL)
class ServiceEntry(Section):
    """One MCP service behind the listener: its own backends, session namespace and settings.
    Per-service keys a service does not set take the top-level value (except backends, pools and
    routes, which are its own)."""

    name: Name = Field(description="Unique service name: the `service` label and log field, the admin API.")
    match: ServiceMatch = Field(description="The requests this service takes: `host`, `path_prefix` or both.")
    strip_prefix: Flag = Field(
        default=True,
        description="Remove match.path_prefix from the target before routing and forwarding: "
        "/github/mcp is then `mcp_path` /mcp, sent to each backend's MCP endpoint.",
    )
    backends: tuple[BackendEntry, ...] = Field(
        default=(), description="This service's MCP server instances, as the top-level `backends`."
    )
    balance: Balance | None = Field(default=None, description=_INHERITED)
    session_ttl: Number | None = Field(default=None, gt=0, description=_INHERITED)
    heartbeat: Number | None = Field(default=None, ge=0, description=_INHERITED)
    timeouts: TimeoutsConfig | None = Field(default=None, description=_INHERITED)
    health: HealthConfig | None = Field(default=None, description=_INHERITED)
    pools: dict[Name, Members] | None = Field(
        default=None, description="As `pools`, of this service's backends."
    )
    routes: tuple[RouteEntry, ...] | None = Field(
        default=None, description="As `routes`, to this service's pools."
    )
    affinity: AffinityConfig | None = Field(default=None, description=_INHERITED)
    validate_headers: Flag | None = Field(default=None, description=_INHERITED)
    failover: Failovers | None = Field(default=None, description=_INHERITED)
    bind_sessions: HeaderName | None = Field(default=None, description=_INHERITED)
    session_binding_key: BindingKey | None = Field(default=None, description=_INHERITED)
    session_max_age: Number | None = Field(default=None, gt=0, description=_INHERITED)
    mcp_path: McpPath | None = Field(default=None, description=_INHERITED)
    auth: AuthConfig | None = Field(default=None, description=_INHERITED)
    tool_policy: tuple[ToolRule, ...] | None = Field(default=None, description=_INHERITED)
    rate_limits: tuple[RateLimit, ...] | None = Field(default=None, description=_INHERITED)


@dataclass(
    frozen=True,
    slots=True,
    kw_only=True,
    config=ConfigDict(**MODEL, json_schema_extra=_backends_or_services_schema),
)
class ConfigFile(Section):
    """mcpbalancer configuration. Every key except `backends` is optional. String values may name
    environment variables as ${NAME} ($${ for a literal ${)."""

    listen: Listeners = Field(
        default=DEFAULT_LISTEN,
        validate_default=True,
        description="Address the proxy accepts MCP clients on, as host:port (IPv6 as [::1]:8080); port 0 "
        'picks a free one. Or a list of listeners: "host:port" strings (plain HTTP) and mappings '
        "{address, tls} (HTTPS), side by side.",
    )
    store: Store = Field(
        default="memory",
        description="Where the session -> backend map lives: memory (this process only, lost on "
        "restart), or a redis://, rediss:// or unix:// URL shared by several proxies.",
    )
    store_prefix: Text = Field(
        default=DEFAULT_STORE_PREFIX,
        description="Prefix of every Redis key the proxy writes, so deployments can share one.",
    )
    local_cache_size: Integer = Field(
        default=DEFAULT_LOCAL_CACHE_SIZE,
        ge=1,
        description="Sessions remembered in the local cache in front of Redis; they stay routable while "
        "Redis is down.",
    )
    session_ttl: Number = Field(
        default=3600.0,
        gt=0,
        description="Seconds a session mapping lives without traffic; every request slides it.",
    )
    balance: Balance = Field(
        default="least_sessions",
        description="How a new session (or a stateless 2026-07-28 request) picks a backend, weighted: "
        "least_sessions, p2c (power of two choices) or round_robin.",
    )
    heartbeat: Number = Field(
        default=15.0,
        ge=0,
        description="Seconds of upstream silence on an SSE response before the proxy writes a ': ping' "
        "comment to the client; 0 = off.",
    )
    backends: tuple[BackendEntry, ...] = Field(
        default=(),
        description="The MCP server instances; at least one unless `services` are given (then these are "
        "the service named default, which takes the requests no service matches).",
        json_schema_extra=_required_unless_services,
    )
    timeouts: TimeoutsConfig | None = Field(default=TimeoutsConfig(), description=TimeoutsConfig.__doc__)
    limits: LimitsConfig | None = Field(default=LimitsConfig(), description=LimitsConfig.__doc__)
    admin: Admin | None = Field(
        default=None,
        description="The control listener (/metrics, /healthz, /readyz, the admin API), apart from MCP "
        'traffic: "host:port", or a mapping with `listen` and `token`. Off when absent.',
    )
    metrics: MetricsConfig | None = Field(default=MetricsConfig(), description=MetricsConfig.__doc__)
    log: LogConfig | None = Field(default=LogConfig(), description=LogConfig.__doc__)
    tracing: TracingConfig | None = Field(default=TracingConfig(), description=TracingConfig.__doc__)
    health: HealthConfig | None = Field(default=HealthConfig(), description=HealthConfig.__doc__)
    shutdown_timeout: Number = Field(
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        ge=0,
        description="Seconds SIGTERM waits for requests in flight before closing them.",
    )
    pools: dict[Name, Members] | None = Field(
        default={}, description="Named, non-empty lists of backend names that `routes` send requests to."
    )
    routes: tuple[RouteEntry, ...] | None = Field(
        default=(),
        description="Rules for 2026-07-28 requests, in order, first match wins; never for legacy sessions.",
    )
    affinity: AffinityConfig | None = Field(default=AffinityConfig(), description=AffinityConfig.__doc__)
    validate_headers: Flag = Field(
        default=False,
        description="Strict mode: read the JSON body of every 2026-07-28 request and answer 400 (-32020) "
        "when Mcp-Method or Mcp-Name disagree with it.",
    )
    failover: Failovers = Field(
        default="reinitialize",
        validate_default=True,
        description="When a session's owner is gone: reinitialize (404; the client initializes again), "
        "replay (re-run the session's initialize on a live backend, keeping the session id), or a "
        "mapping {mode, replay_on}.",
    )
    allowed_origins: Origins | None = Field(
        default=(),
        description="Browser origins allowed to call the proxy: exact origins or '*'. Empty: requests "
        "without Origin or whose Origin names the request's Host; any other gets 403.",
    )
    allowed_hosts: Hosts | None = Field(
        default=None,
        description="Host names the proxy answers for (Host header): exact names, globs with * and ?, "
        "IPv6 addresses in brackets, or '*' for any; no port (any port matches); others get 421. Empty "
        "or absent: the loopback names on a loopback `listen`, else those and IP addresses.",
    )
    bind_sessions: HeaderName | None = Field(
        default=None,
        description="Header a new session is bound to, e.g. authorization: a request with the session id "
        "and another value gets 404; or client_cert: the subject of the verified TLS client certificate "
        "(needs a listener with tls.client_ca). Off when absent.",
    )
    session_binding_key: BindingKey | None = Field(
        default=None,
        description="HMAC key of the binding, at least 16 characters of random secret (${NAME} keeps it "
        "out of the file). Default: random per process; required with a Redis store.",
    )
    session_ids: SessionIds = Field(
        default="plain",
        description="plain: clients see the backend's own session id, routed by the store. sealed: they "
        "see a token sealed with `session_keys` (AES-256-GCM) that names the backend, so any proxy with "
        "the keys routes it without a store, and a restart keeps every session.",
    )
    session_keys: SessionKeys | None = Field(
        default=(),
        description="With session_ids: sealed (required then): keys of at least 32 random bytes, base64 "
        "(`mcpbalancer keygen` prints one), ${NAME}, or file:PATH. The first seals, every one opens: "
        "put a new key first to rotate, remove an old one to void its tokens. No default.",
    )
    session_max_age: Number | None = Field(
        default=None,
        gt=0,
        description="Seconds a session lives at most from its initialize, used or not; older ones get "
        "404. Off when absent.",
    )
    on_store_error: StoreErrorMode = Field(
        default="degrade",
        description="What new sessions get while the Redis store is down: degrade (bound in the local "
        "cache, written back later) or fail (503 with Retry-After: 1).",
    )
    workers: Integer = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description="Processes serving `listen` together (SO_REUSEPORT); more than 1 needs a Redis "
        "`store`, a fixed `listen` port and no `command` backends. `--workers` overrides it.",
    )
    mcp_path: McpPath = Field(
        default=DEFAULT_MCP_PATH,
        description="The path clients use for MCP. A request for it goes to each backend's MCP endpoint: "
        "the path of its `url`, or this same path for a url without one. Every other path is forwarded "
        "as it came. Not /healthz, /readyz, nor metrics.path when the metrics are served on `listen`.",
    )

    auth: AuthConfig | None = Field(default=None, description=AuthConfig.__doc__)
    tool_policy: tuple[ToolRule, ...] | None = Field(
        default=(),
        description="Which tools may be called, by whom: rules in order, the first whose tool glob and "
        "`when` match decides; a call no rule matches is denied.",
    )
    rate_limits: tuple[RateLimit, ...] | None = Field(
        default=(),
        description="Token buckets; every rule whose `match` fits a request counts it. Shared by the "
        "proxies of a Redis `store`.",
    )
    trusted_proxies: tuple[Network, ...] | None = Field(
        default=(),
        description="Addresses or networks of proxies in front of this one: only their X-Forwarded-For "
        "and X-Forwarded-Proto are believed (client_ip rate limits, the resource URL).",
    )
    services: tuple[ServiceEntry, ...] | None = Field(
        default=(),
        description="Several MCP services behind the one listener, each picked by Host and path prefix, "
        "with its own backends and session namespace; see docs/configuration.md#services.",
    )

    @model_validator(mode="before")
    @classmethod
    def _health_path_follows_mcp_path(cls, data: Any) -> Any:
        """health.path is `mcp_path` unless the file says otherwise; only the raw file knows whether
        it does."""
        if not isinstance(data, Mapping):
            return data
        health, mcp_path = data.get("health"), data.get("mcp_path")
        if (
            not isinstance(mcp_path, str)
            or not isinstance(health, Mapping | None)
            or "path" in (health or {})
        ):
            return data
        try:
            checks.check_mcp_path(mcp_path)
        except ValueError:
            return data  # mcp_path's own error says what is wrong, once
        return {**data, "health": {**(health or {}), "path": mcp_path}}

    @model_validator(mode="before")
    @classmethod
    def _backends_or_services(cls, data: Any) -> Any:
        """`backends` may be left out (or empty) only when `services` are given."""
        if not isinstance(data, Mapping) or data.get("services"):
            return data
        if "backends" not in data:
            raise invalid(("backends",), "is required (or `services`)")
        if isinstance(data["backends"], list | tuple) and not data["backends"]:
            raise invalid(("backends",), "must have at least one entry (or give `services`)")
        return data

    @model_validator(mode="after")
    def _across_keys(self) -> Self:
        names = self._backend_names()
        self._check_pools(names)
        self._check_routes()
        self._check_stream_idle()
        self._check_listeners()
        self._check_binding()
        self._check_sealed()
        self._check_metrics_path()
        self._check_access()
        return self

    def _backend_names(self) -> list[str]:
        # Names are session owners in the store; two backends with one name would share sessions.
        # A discovery entry's name is the prefix of its backends' names: unique too.
        first_seen: dict[str, int] = {}
        for i, entry in enumerate(self.backends):
            for name in entry.names or (entry.name,):
                if name in first_seen:
                    also = f"backends[{first_seen[name]}].name"
                    raise invalid(("backends", i, "name"), f"duplicate name {name!r} (also {also})")
                first_seen[name] = i
        return [name for entry in self.backends for name in entry.names]

    def _check_pools(self, backends: list[str]) -> None:
        discovered = {entry.name for entry in self.backends if entry.discover is not None}
        for pool, members in (self.pools or {}).items():
            for i, member in enumerate(members):
                if member in discovered:
                    problem = (
                        f"{member!r} is a `discover` entry; a pool names fixed backends (discovered "
                        "ones come and go with DNS)"
                    )
                    raise invalid(("pools", pool, i), problem)
                if member not in backends:
                    problem = f"unknown backend {member!r}; backends: {', '.join(backends)}"
                    raise invalid(("pools", pool, i), problem)

    def _check_routes(self) -> None:
        pools = self.pools or {}
        for i, route in enumerate(self.routes or ()):
            if route.pool is not None and route.pool not in pools:
                known = ", ".join(pools) or "none defined"
                raise invalid(("routes", i, "pool"), f"unknown pool {route.pool!r}; pools: {known}")

    def _check_stream_idle(self) -> None:
        stream_idle = (self.timeouts or TimeoutsConfig()).stream_idle
        if self.heartbeat > 0 and 0 < stream_idle <= self.heartbeat:
            # Heartbeats are written after `heartbeat` seconds of upstream silence; an idle cut at or
            # before that moment would end every quiet stream before a single heartbeat went out.
            problem = f"must be greater than heartbeat ({self.heartbeat:g}) or 0 (off), got {stream_idle:g}"
            raise invalid(("timeouts", "stream_idle"), problem)

    def _check_listeners(self) -> None:
        clash = duplicate(self.listen)
        if clash is not None:
            raise invalid(("listen", clash[0], "address"), clash[1])

    def _check_binding(self) -> None:
        if self.bind_sessions is not None and self.bind_sessions.lower() == CLIENT_CERT:
            if not any(tls.client_ca is not None for tls in tls_listeners(self.listen)):
                raise invalid(
                    ("bind_sessions",),
                    "client_cert needs a TLS listener with `tls.client_ca`: without one no client "
                    "certificate is ever verified",
                )
            if self.auth is not None and self.auth.enforced:
                raise invalid(
                    ("bind_sessions",),
                    "client_cert cannot be combined with `auth`: with auth, sessions are bound to "
                    "the authenticated principal",
                )
        if self.bind_sessions is not None and self.session_binding_key is None and self.store != "memory":
            raise invalid(
                ("session_binding_key",),
                "is required when bind_sessions is set and the store is Redis: every proxy replica must "
                "hash credentials with the same key (a per-process random key would tie sessions to one "
                "replica)",
            )

    def _check_access(self) -> None:
        auth = self.auth
        enforced = auth is not None and auth.enforced
        for i, rule in enumerate(self.tool_policy or ()):
            when = rule.when
            if when is not None and not enforced and (when.principal, when.scope, when.claim) != (None,) * 3:
                raise invalid(("tool_policy", i, "when"), f"{_NEEDS_AUTH}: without it no caller has one")
        if self.tool_policy and all(rule.allow is None for rule in self.tool_policy):
            problem = "denies every tool: a call no rule matches is denied; end it with `- allow: ['*']`"
            raise invalid(("tool_policy",), problem)
        for i, limit in enumerate(self.rate_limits or ()):
            if not enforced and (limit.key == "principal" or (limit.match and limit.match.principal)):
                raise invalid(("rate_limits", i), f"counts principals, which {_NEEDS_AUTH}")
        if auth is None:
            return
        if enforced and self.session_binding_key is None and self.store != "memory":
            raise invalid(
                ("session_binding_key",),
                "is required with auth and a Redis store: sessions are bound to their principal by an "
                "HMAC every proxy replica must compute with the same key",
            )

    def _check_sealed(self) -> None:
        if self.session_ids == "sealed" and not self.session_keys:
            raise invalid(
                ("session_keys",),
                "is required with session_ids: sealed: the keys session ids are sealed with "
                "(`mcpbalancer keygen` prints one); there is no built-in key",
            )
        if self.session_ids == "plain" and self.session_keys:
            raise invalid(("session_keys",), "is only used with session_ids: sealed")
        if (
            self.session_ids == "sealed"
            and self.bind_sessions is not None
            and self.session_binding_key is None
        ):
            raise invalid(
                ("session_binding_key",),
                "is required when bind_sessions is set with session_ids: sealed: every proxy, and the "
                "same one after a restart, must hash credentials with the same key",
            )
        if self.failover.mode != "replay" and self.failover.replay_on != ("gone",):
            raise invalid(("failover", "replay_on"), "needs mode: replay")

    def _check_metrics_path(self) -> None:
        metrics = self.metrics or MetricsConfig()
        if self.admin is None and metrics.enabled and metrics.path == self.mcp_path:
            problem = f"must not be `mcp_path` ({self.mcp_path}) while the metrics are served on `listen`"
            raise invalid(("metrics", "path"), problem)
