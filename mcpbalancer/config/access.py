"""Who may call what, and how often: the `auth`, `tool_policy` and `rate_limits` sections.

The three are one record, AccessConfig, that the filters of mcpbalancer/filters/ read as it is: the
top level of the file is one such record today, and a service of its own would carry another. The
sections are frozen, slotted pydantic dataclasses (models.py), used at run time as validated.
Checks that involve other keys of the file (a `when.principal` needs `auth`) are in file.py.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Annotated, Final, Self
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator
from pydantic.dataclasses import dataclass as model

from mcpbalancer.config.checks import URL_PATH, describe
from mcpbalancer.config.models import (
    MODEL,
    Flag,
    HeaderName,
    Integer,
    Number,
    Section,
    Text,
    _Check,
    _matching,
    invalid,
    one_of,
)

AUTH_MODES: Final = ("enforce", "off")
# Asymmetric signatures only: `none` and the HMAC family (HS*) are never accepted, so a public key
# can never be used as an HMAC secret (the classic algorithm-confusion forgery).
JWT_ALGORITHMS: Final = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
RESOURCE_METADATA_MODES: Final = ("proxy", "backend")
RATE_KEYS: Final = ("principal", "session", "client_ip", "tool")
# Each unit by its name, plural and short forms: 5/s, 5/second, 100/min, 1000/h, 10000/day ...
RATE_UNITS: Final = {
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
RATE: Final = re.compile(r"(?P<count>[1-9][0-9]{0,8})/(?P<unit>[a-z]+)", re.ASCII)
RATE_RULE: Final = "'<count>/<unit>' with a unit of second, minute, hour or day, such as '100/minute'"
SHA256_HEX: Final = re.compile(r"[0-9A-Fa-f]{64}", re.ASCII)
# A principal as it may travel in a forwarded header: visible ASCII, no separators of our own.
PRINCIPAL: Final = re.compile(r"[!-~]{1,128}", re.ASCII)
PRINCIPAL_RULE: Final = "1-128 visible ASCII characters"
_LOOPBACK_NAMES: Final = ("localhost",)


def _alg(value: str) -> str:
    if value.lower() == "none" or value.upper().startswith("HS"):
        raise ValueError(
            f"{value!r} is never accepted: `none` is no signature, and an HMAC algorithm would let a "
            f"public key serve as the secret; use one of {', '.join(JWT_ALGORITHMS)}"
        )
    if value not in JWT_ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(JWT_ALGORITHMS)}; got {value!r}")
    return value


def _one_or_list(raw: object) -> object:
    """A single string is a list of one: `audience: https://mcp.example.com/mcp`."""
    return [raw] if isinstance(raw, str) else raw


def _jwks_url(value: str) -> str:
    """https://, or http:// to this machine only: keys fetched in clear text from elsewhere could be
    anyone's."""
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme == "https" and host:
        return value
    if parts.scheme == "http" and host and _is_loopback(host):
        return value
    raise ValueError(f"must be an https:// URL (http:// only to a loopback address), got {value!r}")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"must be an http(s):// URL, got {value!r}")
    return value


def _public_path(value: str) -> str:
    if not URL_PATH.fullmatch(value):
        raise ValueError(f"must be a path starting with '/', visible ASCII, got {value!r}")
    return value


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"must be an IP address or a network such as 10.0.0.0/8, got {value!r}") from None
    return value


def parse_rate(value: str) -> tuple[int, float]:
    """'100/minute' -> (100, 60.0): the count and the period in seconds."""
    found = RATE.fullmatch(value)
    if found is None or found["unit"] not in RATE_UNITS:
        raise ValueError(f"must be {RATE_RULE}, got {value!r}")
    return int(found["count"]), float(RATE_UNITS[found["unit"]])


def _rate(value: str) -> str:
    parse_rate(value)
    return value


def _scopes(raw: object) -> object:
    if isinstance(raw, str):
        raise ValueError(f"must be a list of scopes, got {describe(raw)} (write [{raw}])")
    return raw


Algorithm = Annotated[Text, _Check(_alg, enum=list(JWT_ALGORITHMS))]
AuthMode = Annotated[Text, one_of(AUTH_MODES)]
ResourceMetadataMode = Annotated[Text, one_of(RESOURCE_METADATA_MODES)]
RateKey = Annotated[Text, one_of(RATE_KEYS)]
Rate = Annotated[Text, _Check(_rate, pattern=f"^{RATE.pattern}$")]
Sha256 = Annotated[Text, _matching(SHA256_HEX, "64 hex digits (the SHA-256 of the key)")]
PrincipalName = Annotated[Text, _matching(PRINCIPAL, PRINCIPAL_RULE)]
Glob = Text
# One string, or a list of them: what the schema says too, so that editors accept both.
_STRING: Final = {"type": "string", "minLength": 1}
_ONE_OR_LIST: Final = WithJsonSchema({"anyOf": [_STRING, {"type": "array", "items": _STRING, "minItems": 1}]})
Globs = Annotated[tuple[Glob, ...], BeforeValidator(_one_or_list), Field(min_length=1), _ONE_OR_LIST]
Audience = Annotated[tuple[Text, ...], BeforeValidator(_one_or_list), _ONE_OR_LIST]
Scopes = Annotated[tuple[Text, ...], BeforeValidator(_scopes)]
JwksUrl = Annotated[Text, _Check(_jwks_url)]
ServerUrl = Annotated[Text, _Check(_https_url)]
PublicPath = Annotated[Text, _Check(_public_path)]
Network = Annotated[Text, _Check(_network)]


@model(frozen=True, slots=True, config=MODEL)
class ApiKey(Section):
    """One API key: its name (the principal) and the SHA-256 of the key, never the key itself."""

    name: PrincipalName = Field(description="The principal the key stands for; unique.")
    sha256: Sha256 = Field(
        description="SHA-256 of the key, in hex (`printf %s KEY | sha256sum`); compared in constant time."
    )
    scopes: Scopes = Field(default=(), description="Scopes the key grants, for `required_scopes` and `when`.")


@model(frozen=True, slots=True, config=MODEL)
class AuthConfig(Section):
    """Authentication of every request (the proxy is an OAuth 2.0 resource server): JWT bearer tokens
    checked against the authorization server's keys, and/or API keys."""

    mode: AuthMode = Field(
        default="enforce",
        description="enforce: a request without a valid credential gets 401; off: nothing is checked "
        "(logged as a warning). Without an `auth` section authentication is off.",
    )
    issuer: Text | None = Field(default=None, description="The `iss` every token must carry.")
    audience: Audience = Field(
        default=(),
        description="The `aud` a token must carry (one of these): this MCP server's resource URL.",
    )
    jwks_url: JwksUrl | None = Field(
        default=None,
        description="https:// URL of the authorization server's JSON Web Key Set; fetched at start, "
        "refreshed every `jwks_refresh` seconds and on an unknown `kid`.",
    )
    jwks_file: Text | None = Field(
        default=None,
        description="Instead of `jwks_url`: a JWKS file, read at start and on every reload (a relative "
        "path is read from the config file's directory).",
    )
    algorithms: Annotated[tuple[Algorithm, ...], Field(min_length=1)] = Field(
        default=("RS256", "ES256"),
        description="Signature algorithms accepted (asymmetric only; `none` and HS* are refused).",
    )
    leeway: Number = Field(
        default=30.0, ge=0, le=600, description="Seconds of clock skew allowed on `exp`, `nbf` and `iat`."
    )
    required_scopes: Scopes = Field(
        default=(), description="Scopes every credential must grant; missing: 403 insufficient_scope."
    )
    api_keys: tuple[ApiKey, ...] = Field(
        default=(),
        description="API keys, sent as `Authorization: Bearer <key>` (or in `api_key_header`).",
    )
    api_key_header: HeaderName | None = Field(
        default=None, description="A header that carries an API key instead of Authorization, e.g. x-api-key."
    )
    authorization_servers: tuple[ServerUrl, ...] = Field(
        default=(),
        description="Issuer URLs listed in the protected-resource metadata; default: `issuer`.",
    )
    scopes_supported: Scopes = Field(
        default=(), description="Scopes listed in the protected-resource metadata."
    )
    resource_metadata: ResourceMetadataMode = Field(
        default="proxy",
        description="proxy: the proxy answers /.well-known/oauth-protected-resource from this section; "
        "backend: the request is passed to a backend, which answers it.",
    )
    principal_header: HeaderName | None = Field(
        default=None,
        description="Header the principal (token `sub`, or the key's name) is forwarded in; a client's "
        "own value of it is always dropped. Off when absent.",
    )
    forward_authorization: Flag = Field(
        default=True, description="Pass the client's Authorization header on to the backend; false strips it."
    )
    public_paths: tuple[PublicPath, ...] = Field(
        default=(),
        description="Paths (a trailing * is a prefix) passed on without a credential, such as an "
        "authorization server's /authorize and /token on a backend.",
    )
    jwks_refresh: Number = Field(
        default=300.0, ge=10, description="Seconds between refreshes of the key set from `jwks_url`."
    )
    jwks_cooldown: Number = Field(
        default=30.0,
        ge=1,
        description="Least seconds between refreshes asked for by tokens with an unknown `kid`.",
    )

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce"

    @property
    def jwt(self) -> bool:
        """Tokens are checked against a key set."""
        return self.jwks_url is not None or self.jwks_file is not None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.jwks_url is not None and self.jwks_file is not None:
            raise invalid(("jwks_file",), "give either `jwks_url` or `jwks_file`, not both")
        if self.jwt:
            for key in ("issuer", "audience"):
                if not getattr(self, key):
                    problem = f"is required with `{'jwks_url' if self.jwks_url else 'jwks_file'}`"
                    raise invalid(
                        (key,), f"{problem}: a token for another issuer or resource must be refused"
                    )
        elif self.issuer is not None or self.audience:
            raise invalid(("jwks_url",), "is required for `issuer` and `audience` (or `jwks_file`)")
        if self.enforced and not self.jwt and not self.api_keys:
            raise invalid((), "enforce needs a way to authenticate: `jwks_url`, `jwks_file` or `api_keys`")
        self._unique_keys()
        return self

    def _unique_keys(self) -> None:
        names: dict[str, int] = {}
        digests: dict[str, int] = {}
        for i, key in enumerate(self.api_keys):
            if key.name in names:
                raise invalid(("api_keys", i, "name"), f"duplicate name (also api_keys[{names[key.name]}])")
            digest = key.sha256.lower()
            if digest in digests:
                raise invalid(("api_keys", i, "sha256"), f"the same key as api_keys[{digests[digest]}]")
            names[key.name], digests[digest] = i, i


@model(frozen=True, slots=True, config=MODEL)
class When(Section):
    """Conditions on the caller; all given ones must hold."""

    principal: Glob | None = Field(default=None, description="A glob on the principal (token sub, key name).")
    scope: Text | None = Field(default=None, description="A scope the credential must grant.")
    claim: dict[Text, Text] | None = Field(
        default=None,
        description="{claim: value}: the token's claim equals the value, or is a list holding it.",
    )


@model(frozen=True, slots=True, config=MODEL)
class ToolRule(Section):
    """One rule of `tool_policy`: `allow` or `deny` tool-name globs, for callers matching `when`."""

    allow: Globs | None = Field(default=None, description="Tool-name globs this rule allows.")
    deny: Globs | None = Field(default=None, description="Tool-name globs this rule denies.")
    when: When | None = Field(default=None, description="Only for callers matching this; none: every caller.")

    @property
    def names(self) -> tuple[str, ...]:
        return self.allow if self.allow is not None else self.deny or ()

    @model_validator(mode="after")
    def _allow_or_deny(self) -> Self:
        if (self.allow is None) == (self.deny is None):
            raise invalid((), "needs exactly one of `allow` or `deny` (a list of tool-name globs)")
        return self


@model(frozen=True, slots=True, config=MODEL)
class RateMatch(Section):
    """Which requests a rate limit counts; all given conditions must hold, none: every request."""

    principal: Glob | None = Field(default=None, description="A glob on the principal.")
    tool: Glob | None = Field(default=None, description="A glob on the name of the tool called.")
    method: Text | None = Field(default=None, description="The JSON-RPC method, exactly, e.g. tools/call.")


@model(frozen=True, slots=True, config=MODEL)
class RateLimit(Section):
    """A token bucket per value of `key`, for the requests `match` names."""

    key: RateKey = Field(description="What is counted: principal, session, client_ip or tool.")
    rate: Rate = Field(description="Refill rate, such as '100/minute' or '5/second'.")
    match: RateMatch | None = Field(default=RateMatch(), description="The requests counted; empty: all.")
    burst: Integer | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Requests allowed at once (the bucket's size); default: the rate's count.",
    )

    @property
    def per(self) -> tuple[int, float]:
        """(count, period in seconds) of `rate`."""
        return parse_rate(self.rate)

    @property
    def size(self) -> int:
        return self.burst if self.burst is not None else self.per[0]

    @property
    def reads_calls(self) -> bool:
        """The rule needs the JSON-RPC method or tool of a request."""
        match = self.match or RateMatch()
        return self.key == "tool" or match.tool is not None or match.method is not None


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may call what and how often: what the access filters of one service read."""

    auth: AuthConfig = field(default_factory=lambda: AuthConfig(mode="off"))
    tool_policy: tuple[ToolRule, ...] = ()
    rate_limits: tuple[RateLimit, ...] = ()

    @property
    def reads_calls(self) -> bool:
        """A legacy request's JSON body must be read (bounded) for its tool calls."""
        return bool(self.tool_policy) or any(rule.reads_calls for rule in self.rate_limits)
