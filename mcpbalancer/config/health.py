"""The `health` section: the global block, a backend's own `health:` mapping, and the merge of the
one over the other.

A backend entry may carry any health key; what it does not give comes from the global block
(`merged`). The result is a whole HealthConfig per backend, which is what the checker and the
probes read, so nothing downstream knows which key came from where. Discovery (endpoints found by
DNS) takes its group's settings through the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, Field
from pydantic.dataclasses import dataclass

from mcpbalancer.config.checks import describe
from mcpbalancer.config.models import (
    DEFAULT_MCP_PATH,
    MODEL,
    HeaderName,
    Integer,
    Number,
    ProbePath,
    Section,
    Text,
    one_of,
)

PROBES: Final = ("discover", "http")
PROBE_METHODS: Final = ("GET", "HEAD")
# Set by the probe itself, from the request it makes: a value here would break its framing.
_PROBE_OWN: Final = frozenset({"content-length", "transfer-encoding", "connection", "te", "upgrade"})


def _statuses(raw: object) -> object:
    """A list (YAML gives one), not a lone number: `expect_status: 200` is a likely slip."""
    if raw is not None and not isinstance(raw, list | tuple):
        raise ValueError(f"must be a list of HTTP status codes such as [200, 204], got {describe(raw)}")
    return raw


def _headers(raw: object) -> object:
    """{Name: value}, both strings; the value check names the header and says to quote it, because
    YAML reads `X-Port: 8080` as a number."""
    if raw is None:
        return raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"must be a mapping of header names to strings, got {describe(raw)}")
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ValueError(f"{describe(name)} is not a header name (a string)")
        if not isinstance(value, str):
            raise ValueError(f"{name}: the value must be a string, got {describe(value)} (quote it)")
        if any((ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F for ch in value):
            raise ValueError(f"{name}: the value must not contain control characters (line breaks)")
        if name.lower() in _PROBE_OWN:
            raise ValueError(f"{name}: is set by the probe itself and cannot be given")
    return raw


Probe = Annotated[Text, one_of(PROBES)]
ProbeMethod = Annotated[Text, one_of(PROBE_METHODS)]
Status = Annotated[Integer, Field(ge=100, le=599)]
Statuses = Annotated[tuple[Status, ...], Field(min_length=1), BeforeValidator(_statuses)]
Headers = Annotated[dict[HeaderName, str], BeforeValidator(_headers)]


@dataclass(frozen=True, slots=True, config=MODEL)
class HealthConfig(Section):
    """Active health checks: one probe per backend every `interval` seconds. `probe: discover` (the
    default) POSTs a 2026-07-28 `server/discover` to `path`, and the answer must be an MCP
    endpoint's; `probe: http` sends `method` to `path` and wants a status of `expect_status`. A
    probe that fails that way, a refused connection or a 404 marks the backend down at once; a 5xx
    or a timeout counts toward `fall`. Down backends take no new sessions but keep their existing
    ones. A backend's own `health:` mapping overrides any of these keys for it."""

    interval: Number = Field(
        default=1.0,
        ge=0,
        description="Seconds between probes of a backend (fractional allowed); 0 = no active checks.",
    )
    timeout: Number = Field(default=1.0, gt=0, description="Seconds a probe may take.")
    path: ProbePath = Field(
        default=DEFAULT_MCP_PATH,
        description="Path probed, as a client's request for it would be forwarded. Default: `mcp_path`, so "
        "each backend's MCP endpoint is probed.",
    )
    fall: Integer = Field(
        default=2,
        ge=1,
        le=100,
        description="Failures in a row (probes, or timeouts and 5xx on traffic) that mark a backend down.",
    )
    rise: Integer = Field(
        default=2, ge=1, le=100, description="Successful probes in a row that bring a backend back."
    )
    probe: Probe = Field(
        default="discover",
        description="discover: a stateless 2026-07-28 server/discover POST whose answer must be an MCP "
        "endpoint's; http: a plain `method` request to `path` that must answer a status of `expect_status` "
        "(a readiness route such as /ready). Neither creates a session.",
    )
    method: ProbeMethod = Field(default="GET", description="With probe: http, GET or HEAD.")
    expect_status: Statuses = Field(
        default=(200,),
        description="With probe: http, the statuses that mean ready (100-599); any other, a timeout or a "
        "connection error is a failed probe.",
    )
    headers: Headers = Field(
        default_factory=dict,
        description="Header fields sent with every probe, e.g. a token for a server that guards its health "
        "route; values take ${NAME}.",
        json_schema_extra={"default": {}},
    )


@dataclass(frozen=True, slots=True, config=MODEL)
class BackendHealth(Section):
    """This backend's own health settings: any key of the global `health` block, which gives the
    keys left out."""

    interval: Number | None = Field(default=None, ge=0, description="As health.interval, for this backend.")
    timeout: Number | None = Field(default=None, gt=0, description="As health.timeout, for this backend.")
    path: ProbePath | None = Field(default=None, description="As health.path, for this backend.")
    fall: Integer | None = Field(default=None, ge=1, le=100, description="As health.fall, for this backend.")
    rise: Integer | None = Field(default=None, ge=1, le=100, description="As health.rise, for this backend.")
    probe: Probe | None = Field(default=None, description="As health.probe, for this backend.")
    method: ProbeMethod | None = Field(default=None, description="As health.method, for this backend.")
    expect_status: Statuses | None = Field(
        default=None, description="As health.expect_status, for this backend."
    )
    headers: Headers | None = Field(
        default=None, description="As health.headers, for this backend; replaces the global ones whole."
    )


def merged(base: HealthConfig, own: BackendHealth | None) -> HealthConfig:
    """`base` with every key `own` gives replaced: a backend's (or a discovery group's) settings."""
    if own is None:
        return base
    given: dict[str, Any] = {
        f.name: value for f in dataclasses.fields(own) if (value := getattr(own, f.name)) is not None
    }
    return dataclasses.replace(base, **given) if given else base
