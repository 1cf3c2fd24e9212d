"""The configuration's building blocks: scalar types as YAML gives them, the base of every section,
and the sections the proxy reads as they are.

Each key is written once, with its type, range, default and description: the validation, the
defaults the proxy runs with and the JSON Schema (schema.py) come from there. A value is checked by
its type and by the pure functions of checks.py; a check across keys is a model validator raising
`invalid(at, problem)`, where `at` is the key path below the model. loading.py turns pydantic's
errors into `FILE: key.path: problem`.

The sections whose shape is also what the proxy reads (timeouts, limits, metrics, log, affinity;
health in health.py) are frozen, slotted dataclasses used as they are. The others (the top level, a
backend entry, a route: file.py) are turned into the objects of runtime.py by build.py.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Annotated, Any, Final

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    StringConstraints,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from mcpbalancer.config import checks
from mcpbalancer.config.checks import BACKEND_NAME, BACKEND_NAME_RULE, HEADER_NAME, ORIGIN

BALANCE_STRATEGIES: Final = ("least_sessions", "p2c", "round_robin")
FAILOVER_MODES: Final = ("reinitialize", "replay")
# What makes replay failover move a session: its owner gone (refused, removed, restarted), or the
# owner answering 404 for a session the proxy holds (it forgot it: restarted at the same address).
REPLAY_TRIGGERS: Final = ("gone", "backend_404")
SESSION_ID_MODES: Final = ("plain", "sealed")
STORE_ERROR_MODES: Final = ("degrade", "fail")
LOG_FORMATS: Final = ("json", "text")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
ERAS: Final = ("legacy", "modern")
SESSION_MODES: Final = ("auto", "stateful", "stateless")
SCHEMES: Final = ("http", "https")
# One address family per discovery entry: an instance with both an A and an AAAA record would
# otherwise be two backends, with twice its share of new sessions.
FAMILIES: Final = ("ipv4", "ipv6")
DEFAULT_STORE_PREFIX: Final = "mcpb:"
DEFAULT_LOCAL_CACHE_SIZE: Final = 100_000
DEFAULT_SHUTDOWN_TIMEOUT: Final = 10.0
DEFAULT_MCP_PATH: Final = "/mcp"
# The name of the service of the top-level `backends` (`services` entries have their own): the
# access log, the metrics' `service` label, the status page, the sealed ids.
DEFAULT_SERVICE: Final = "default"
MAX_REPLICAS: Final = 64
MAX_WORKERS: Final = 1024  # a typo guard, not a tuning limit
DENY_STATUSES: Final = tuple(int(s) for s in HTTPStatus if 400 <= s <= 499)

Loc = tuple[str | int, ...]


def invalid(at: Loc, problem: str) -> PydanticCustomError:
    """A problem at key path `at` below the model being validated (pydantic would put an error a
    model validator raises at the model itself)."""
    return PydanticCustomError("config", "{problem}", {"at": at, "problem": problem})


class _Check:
    """A check on a string after its type: a validator whose ValueError says what is wrong, and
    what the JSON Schema can say of it (`extra`), so that editors flag a bad value too."""

    def __init__(self, check: Callable[[str], str], **extra: object) -> None:
        self.check = check
        self.extra = extra

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return {**handler(schema), **self.extra}


def _matching(regex: re.Pattern[str], rule: str) -> _Check:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must be {rule}, got {value!r}")
        return value

    return _Check(check, pattern=f"^(?:{regex.pattern})$")


def one_of(choices: tuple[str, ...]) -> _Check:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return _Check(check, enum=list(choices))


def _secret_text(raw: object) -> object:
    """A string, or an error that does not quote the value: a token is a secret, even mistyped."""
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {kind_of(raw)}")
    return raw


def kind_of(raw: object) -> str:
    """What a value is, without the value: for the messages about secrets."""
    if isinstance(raw, bool):
        return "true or false"
    if isinstance(raw, int | float):
        return "a number"
    return "a mapping" if isinstance(raw, Mapping) else "a list" if isinstance(raw, list) else "null"


# Scalars as YAML gives them: no "3600" for a number, no 1 for true. An int is a valid number (and
# is stored as a float); a bool is not a number.
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, StringConstraints(strict=True, min_length=1)]
HostPort = Annotated[Text, AfterValidator(checks.check_host_port)]
Name = Annotated[Text, _matching(BACKEND_NAME, BACKEND_NAME_RULE)]
Origin = Annotated[Text, _Check(checks.check_origin, pattern=f"^(?:\\*|{ORIGIN.pattern})$")]
HostName = Annotated[Text, _Check(checks.check_host_name, pattern=f"^(?:{checks.HOST_NAME.pattern})$")]
HeaderName = Annotated[Text, _matching(HEADER_NAME, checks.HEADER_RULE)]
ServerName = Annotated[Text, _matching(checks.SERVER_NAME, checks.SERVER_NAME_RULE)]
DnsName = Annotated[Text, _matching(checks.DNS_NAME, checks.DNS_NAME_RULE)]
NameServer = Annotated[Text, AfterValidator(checks.check_nameserver)]
EndpointPath = Annotated[Text, _Check(checks.check_endpoint_path, pattern=f"^{checks.URL_PATH.pattern}$")]
Scheme = Annotated[Text, one_of(SCHEMES)]
Family = Annotated[Text, one_of(FAMILIES)]
Port = Annotated[Integer, Field(ge=1, le=65535)]
ProbePath = Annotated[Text, _Check(checks.check_probe_path, pattern=f"^{checks.URL_PATH.pattern}$")]
McpPath = Annotated[Text, _Check(checks.check_mcp_path, pattern='^/[!"$->@-~]{0,255}$')]
MetricsPath = Annotated[Text, _Check(checks.check_metrics_path, pattern=f"^{checks.URL_PATH.pattern}$")]
Balance = Annotated[Text, one_of(BALANCE_STRATEGIES)]
Failover = Annotated[Text, one_of(FAILOVER_MODES)]
StoreErrorMode = Annotated[Text, one_of(STORE_ERROR_MODES)]
LogFormat = Annotated[Text, one_of(LOG_FORMATS)]
LogLevel = Annotated[Text, one_of(LOG_LEVELS)]
Era = Annotated[Text, one_of(ERAS)]
SessionMode = Annotated[Text, one_of(SESSION_MODES)]
ReplayTrigger = Annotated[Text, one_of(REPLAY_TRIGGERS)]
SessionIds = Annotated[Text, one_of(SESSION_ID_MODES)]
# No length or pattern in the JSON Schema: editors would flag the `${NAME}` a token is written as.
AdminToken = Annotated[str, BeforeValidator(_secret_text), AfterValidator(checks.check_admin_token)]

MODEL = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True, slots=True, config=MODEL)
class Section:
    """Refuses keys the section does not have, one error naming the key and the allowed ones."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            allowed = tuple(f.name for f in dataclasses.fields(cls))
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key", {"at": (key,), "allowed": allowed}
                    )
        return data


# --- sections the proxy reads as they are --------------------------------------------------------


@dataclass(frozen=True, slots=True, config=MODEL)
class TimeoutsConfig(Section):
    """Timeouts towards the backends, in seconds."""

    connect: Number = Field(default=5.0, gt=0, description="Seconds to open a TCP connection to a backend.")
    # Legacy JSON tools send their response head only when the tool is done, hence the long default.
    response_headers: Number = Field(
        default=300.0,
        gt=0,
        description="Seconds to wait for a backend's response head. Legacy JSON-answering tools send it "
        "only when the tool is done, so this bounds the longest tool call.",
    )
    stream_idle: Number = Field(
        default=0.0,
        ge=0,
        description="Seconds of upstream silence allowed on a streaming response before the proxy gives "
        "up on it; 0 = off. When both are on, must be greater than `heartbeat`.",
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class LimitsConfig(Section):
    """Limits on what clients send."""

    header_bytes: Integer = Field(
        default=65536,
        ge=1024,
        description="Largest request head (request line and headers) in bytes; larger: 431.",
    )
    header_count: Integer = Field(
        default=100, ge=8, description="Most header fields in one request; more: 431."
    )
    body_bytes: Integer = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body in bytes; larger: 413."
    )
    policy_body_bytes: Integer = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest body of a legacy request read for its tool calls (with a `tool_policy` or a "
        "rate limit on tools or methods); larger: 413, since it cannot be checked.",
    )
    connections: Integer = Field(
        default=10_000,
        ge=1,
        description="Open client connections at most; one more is answered 503 (Retry-After: 1) and "
        "closed, never queued. Keep it under the process's file descriptor limit.",
    )
    head_timeout: Number = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a whole request head, from the connection's (or the "
        "request's) first byte; then 408 and close.",
    )
    keepalive_timeout: Number = Field(
        default=60.0,
        gt=0,
        description="Seconds an idle keep-alive client connection is kept open between requests.",
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class MetricsConfig(Section):
    """Prometheus metrics, on `admin` if set, else on `listen`."""

    enabled: Flag = Field(default=True, description="Serve Prometheus metrics.")
    path: MetricsPath = Field(
        default="/metrics",
        description="Path of the metrics page; not /healthz or /readyz, which the proxy answers itself.",
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class LogConfig(Section):
    """Logging: the access log on stdout, every other line on stderr."""

    format: LogFormat = Field(
        default="json", description="json or text, for the access log and every other log line."
    )
    level: LogLevel = Field(default="info", description="Lowest level logged; `--log-level` overrides it.")
    access: Flag = Field(
        default=True,
        description="One line per request on stdout (written at info level: off at warning and error).",
    )


def _check_otlp_endpoint(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL (the collector's /v1/traces), got {value!r}")
    return value


OtlpEndpoint = Annotated[Text, _Check(_check_otlp_endpoint, pattern="^https?://[^/?#]+(/.*)?$")]
TraceHeaders = Annotated[dict[HeaderName, Text], Field(strict=True)]


@dataclass(frozen=True, slots=True, config=MODEL)
class TracingConfig(Section):
    """OpenTelemetry traces: one span per request, a child of the client's `traceparent`, whose
    context the backend receives; exported in batches over OTLP/HTTP, off the request path."""

    enabled: Flag = Field(default=False, description="Make and export a span per request.")
    endpoint: OtlpEndpoint = Field(
        default="http://127.0.0.1:4318/v1/traces",
        description="The collector's OTLP/HTTP traces URL, path included (usually /v1/traces).",
    )
    sample_ratio: Number = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of requests without a sampled parent that get a span (by trace id); a request "
        "whose traceparent is sampled always gets one, one whose parent is not never does.",
    )
    service_name: Text = Field(
        default="mcpbalancer", description="The `service.name` of the spans' resource."
    )
    headers: TraceHeaders = Field(
        default={},
        description="HTTP headers sent with every export, e.g. an authorization for the collector "
        "(${NAME} keeps a secret out of the file).",
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class AffinityConfig(Section):
    """Affinity maps for 2026-07-28 requests, per proxy process and shared through a Redis `store`."""

    tasks: Flag = Field(
        default=False,
        description="Learn taskId -> backend from tools/call answers whose result is a task, and send "
        "tasks/get, tasks/update and tasks/cancel for that id to it.",
    )
    request_state: Flag = Field(
        default=False,
        description="Learn requestState -> backend from input_required answers, and send the retry "
        "carrying that requestState to it (the proxy then reads the body of tools/call, prompts/get "
        "and resources/read requests).",
    )
    max_entries: Integer = Field(
        default=100_000,
        ge=1,
        description="Entries per map (tasks, request states); the least recently used goes first.",
    )
    task_ttl: Number = Field(
        default=86_400.0,
        gt=0,
        description="Longest a task id is remembered, in seconds; a task's own ttlMs when shorter.",
    )
    request_state_ttl: Number = Field(
        default=600.0, gt=0, description="Seconds a requestState is remembered."
    )
