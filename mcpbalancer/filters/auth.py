"""`auth`: the proxy as an OAuth 2.0 resource server (the MCP authorization spec), and API keys.

Request phase: every request needs a credential, except the protected-resource metadata and the
`public_paths`.
- `Authorization: Bearer <JWT>`: the signature is checked with the authorization server's keys
  (filters/jwks.py), for an algorithm of `algorithms` only, then `iss`, `aud`, `exp` and `nbf`
  (with `leeway`); `sub` is the principal. A verified token is remembered until it expires, so a
  session's later requests cost one dict lookup, not a signature check.
- An API key (`Authorization: Bearer <key>`, or `api_key_header`): its SHA-256 is compared with
  every configured one in constant time; the key's `name` is the principal.
- No credential, or an invalid one: 401 with `WWW-Authenticate: Bearer resource_metadata="<url>"`
  (RFC 9728 §5.1) and a JSON-RPC error (-32030); a credential without `required_scopes`: 403
  `insufficient_scope` (-32031).
The principal goes into the request's facts: the tool policy and rate limits read it, and a legacy
session is bound to it (routing/binding.py): another principal presenting its id gets 404.

Early phase: `/.well-known/oauth-protected-resource` (and the form with the MCP path after it) is
answered from the config, `resource` being the request's own scheme, host and MCP path; with
`resource_metadata: backend` it goes to a backend instead.

Upstream-request phase: the principal is forwarded in `principal_header` (a client's own value of
that header never is), and `Authorization` is passed on or stripped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Protocol

import jwt
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)

from mcpbalancer.config import AuthConfig
from mcpbalancer.errors import AuthUnavailable, BadRequest, InsufficientScope, Unauthorized
from mcpbalancer.filters.clientip import TrustedProxies
from mcpbalancer.filters.jwks import KeySet
from mcpbalancer.filters.phases import HeadEdits
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.routing.binding import Principal, SessionBinder
from mcpbalancer.routing.router import RequestFacts

log = logging.getLogger(__name__)

WELL_KNOWN: Final = b"/.well-known/oauth-protected-resource"
AUTHORIZATION: Final = b"authorization"
CACHE_SIZE: Final = 10_000  # verified tokens remembered; an eleventh thousand clears the expired ones
_BEARER: Final = b"bearer "
_REQUIRED_CLAIMS: Final = ["exp", "iss", "aud", "sub"]


class Keys(Protocol):
    """A source of the current KeySet (jwks.JwksSource, jwks.StaticKeys)."""

    current: KeySet | None

    def refresh_for_unknown(self) -> Awaitable[None] | None: ...


class Head(Protocol):
    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes, bytes]]: ...


class Context(Protocol):
    @property
    def head(self) -> Head: ...
    @property
    def peer_ip(self) -> bytes: ...


class Authenticator:
    reads_names = False

    def __init__(
        self,
        config: AuthConfig,
        *,
        keys: Keys | None,
        binder: SessionBinder,
        metrics: Metrics,
        mcp_path: str,
        trusted: TrustedProxies | None = None,
        clock: Callable[[], float] = time.time,
        public_prefix: str = "",
    ) -> None:
        self.config = config
        self._keys = keys
        self._binder = binder
        self._results = metrics.auth
        self._trusted = trusted or TrustedProxies()
        self._clock = clock
        self._mcp_path = mcp_path.encode("ascii")
        # A `services` entry's stripped path_prefix: the requests come without it, the URLs the
        # client is told (the resource, its metadata) carry it.
        self._public_path = public_prefix + mcp_path
        self._algorithms = tuple(config.algorithms)
        self._audience = list(config.audience)
        self._key_header = None if config.api_key_header is None else config.api_key_header.lower().encode()
        self._api_keys = [
            (bytes.fromhex(key.sha256), Principal(key.name, "key", frozenset(key.scopes)))
            for key in config.api_keys
        ]
        self._required = frozenset(config.required_scopes)
        self._public = _paths(config.public_paths)
        metadata: tuple[bytes, ...] = (WELL_KNOWN, WELL_KNOWN + self._mcp_path)
        if config.resource_metadata == "backend":
            self._public = (frozenset(self._public[0] | set(metadata)), self._public[1])
            metadata = ()
        self._metadata = frozenset(metadata)
        self._cache: dict[bytes, tuple[Principal, float, KeySet | None]] = {}
        self._drop = frozenset(
            name
            for name in (
                None if config.principal_header is None else config.principal_header.lower().encode(),
                None if config.forward_authorization else AUTHORIZATION,
                None if config.forward_authorization else self._key_header,
            )
            if name is not None
        )
        self._principal_header = None if config.principal_header is None else config.principal_header.encode()
        # Per principal, what every request of theirs needs: the session tag (unless a header is
        # bound too) and the forwarded header line. Bounded like the token cache.
        self._tags: dict[str, str] = {}
        self._lines: dict[str, bytes] = {}

    # -- early phase: the protected-resource metadata ---------------------------------------------

    def early_request(self, head: Head, peer_ip: bytes) -> tuple[int, bytes] | None:
        if not self._metadata or not head.target.startswith(WELL_KNOWN):
            return None
        path = head.target.partition(b"?")[0]
        if path not in self._metadata:
            return None
        if head.method not in (b"GET", b"HEAD"):
            return 405, _json_answer(405, b"", head.keep_alive, allow=True)
        body = json.dumps(self._metadata_document(head, peer_ip), separators=(",", ":")).encode()
        return 200, _json_answer(200, b"" if head.method == b"HEAD" else body, head.keep_alive, len(body))

    def _metadata_document(self, head: Head, peer_ip: bytes) -> dict[str, Any]:
        config = self.config
        document: dict[str, Any] = {"resource": self._origin(head, peer_ip) + self._public_path}
        servers = list(config.authorization_servers) or ([config.issuer] if config.issuer else [])
        if servers:
            document["authorization_servers"] = servers
        if config.scopes_supported:
            document["scopes_supported"] = list(config.scopes_supported)
        document["bearer_methods_supported"] = ["header"]
        return document

    def _origin(self, head: Head, peer_ip: bytes) -> str:
        proto = _header(head.headers, b"x-forwarded-proto")
        scheme = "https" if self._trusted.forwarded_tls(peer_ip, proto) else "http"
        host = (head.host or b"localhost").decode("latin-1")
        return f"{scheme}://{host}"

    def challenge(self, ctx: Context, error: str | None = None, description: str | None = None) -> str:
        """The WWW-Authenticate value of a refusal."""
        url = self._origin(ctx.head, ctx.peer_ip) + WELL_KNOWN.decode() + self._public_path
        parts = []
        if error is not None:
            parts.append(f'error="{error}"')
        if description is not None:
            parts.append(f'error_description="{_quoted(description)}"')
        if self._required and error in (None, "insufficient_scope"):
            parts.append(f'scope="{_quoted(" ".join(sorted(self._required)))}"')
        parts.append(f'resource_metadata="{_quoted(url)}"')
        return "Bearer " + ", ".join(parts)

    # -- request phase ----------------------------------------------------------------------------

    def request(self, ctx: Context, facts: RequestFacts) -> Awaitable[None] | None:
        head = ctx.head
        if self._public[0] or self._public[1]:
            path = head.target.partition(b"?")[0]
            if path in self._public[0] or path.startswith(self._public[1]):
                self._results["public"].value += 1
                return None
        headers = head.headers
        key = _only(headers, self._key_header) if self._key_header is not None else None
        authorization = _only(headers, AUTHORIZATION)
        if key is not None:
            self._admit(ctx, facts, self._api_key(ctx, key), authorization)
            return None
        if authorization is None:
            self._results["missing"].value += 1
            raise Unauthorized("Unauthorized: a bearer token is required", challenge=self.challenge(ctx))
        cached = self._cache.get(authorization)
        if cached is not None:
            principal, until, keys = cached
            if until > self._clock() and (keys is None or self._keys is None or keys is self._keys.current):
                self._results["cached"].value += 1
                self._admit(ctx, facts, principal, authorization)
                return None
            del self._cache[authorization]
        if authorization[:7].lower() != _BEARER:
            self._results["invalid"].value += 1
            raise self._invalid(ctx, "the Authorization scheme must be Bearer")
        token = authorization[7:].strip()
        if self._keys is None or token.count(b".") != 2:
            self._admit(ctx, facts, self._api_key(ctx, token), authorization)
            return None
        found = self._token(ctx, token, authorization)
        if isinstance(found, Principal):
            self._admit(ctx, facts, found, authorization)
            return None
        return self._admit_later(ctx, facts, found, authorization)

    async def _admit_later(
        self, ctx: Context, facts: RequestFacts, found: Awaitable[Principal], authorization: bytes
    ) -> None:
        self._admit(ctx, facts, await found, authorization)

    def _admit(
        self, ctx: Context, facts: RequestFacts, principal: Principal, authorization: bytes | None
    ) -> None:
        if not self._required <= principal.scopes:
            self._results["scope"].value += 1
            missing = " ".join(sorted(self._required - principal.scopes))
            raise InsufficientScope(
                f"Forbidden: insufficient scope, needs {missing}",
                challenge=self.challenge(ctx, "insufficient_scope"),
            )
        facts.principal = principal
        if facts.era is Era.LEGACY:
            binder = self._binder
            if binder.header_bound:  # bind_sessions as well: the header's value is bound too
                facts.credential = binder.value(ctx.head.headers)
                facts.tag = binder.principal_tag(principal, facts.credential)
                return
            # What the replay failover sends the new backend, if the backend gets it.
            facts.credential = authorization if self.config.forward_authorization else None
            tag = self._tags.get(principal.id)
            if tag is None:
                tag = self._tags[principal.id] = binder.principal_tag(principal, None)
                if len(self._tags) > CACHE_SIZE:
                    self._tags.clear()
            facts.tag = tag

    def _invalid(self, ctx: Context, why: str) -> Unauthorized:
        return Unauthorized(f"Unauthorized: {why}", challenge=self.challenge(ctx, "invalid_token", why))

    # -- API keys ---------------------------------------------------------------------------------

    def _api_key(self, ctx: Context, key: bytes) -> Principal:
        digest = hashlib.sha256(key.strip()).digest()
        found = None
        for known, principal in self._api_keys:  # every one compared, no early exit
            if hmac.compare_digest(digest, known):
                found = principal
        if found is None:
            self._results["invalid"].value += 1
            raise self._invalid(ctx, "unknown API key" if self._api_keys else "invalid token")
        self._results["key"].value += 1
        return found

    # -- JWT --------------------------------------------------------------------------------------

    def _token(self, ctx: Context, token: bytes, authorization: bytes) -> Principal | Awaitable[Principal]:
        assert self._keys is not None
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            return self._not_a_token(ctx, token, "malformed token")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self._algorithms:
            self._results["invalid"].value += 1
            raise self._invalid(ctx, f"the algorithm {str(alg)[:20]!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            return self._not_a_token(ctx, token, "malformed token")
        keys = self._keys.current
        if keys is None or (kid is not None and not keys.knows(kid)):
            pending = self._keys.refresh_for_unknown()
            if pending is None:
                return self._no_key(ctx, keys)
            return self._after_refresh(ctx, pending, token, authorization, alg, kid)
        return self._decoded(ctx, keys, token, authorization, alg, kid)

    async def _after_refresh(
        self,
        ctx: Context,
        pending: Awaitable[None],
        token: bytes,
        authorization: bytes,
        alg: str,
        kid: str | None,
    ) -> Principal:
        assert self._keys is not None
        await pending
        keys = self._keys.current
        if keys is None or (kid is not None and not keys.knows(kid)):
            return self._no_key(ctx, keys)
        return self._decoded(ctx, keys, token, authorization, alg, kid)

    def _no_key(self, ctx: Context, keys: KeySet | None) -> Principal:
        if keys is None:
            self._results["unavailable"].value += 1
            raise AuthUnavailable()
        self._results["invalid"].value += 1
        raise self._invalid(ctx, "the token's key id is unknown")

    def _not_a_token(self, ctx: Context, token: bytes, why: str) -> Principal:
        """Not a JWT after all: it may still be an API key."""
        if self._api_keys:
            return self._api_key(ctx, token)
        self._results["invalid"].value += 1
        raise self._invalid(ctx, why)

    def _decoded(
        self, ctx: Context, keys: KeySet, token: bytes, authorization: bytes, alg: str, kid: str | None
    ) -> Principal:
        config = self.config
        why = f"no key for {alg}"
        for key in keys.find(kid, alg):
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=config.issuer,
                    leeway=config.leeway,
                    options={"require": _REQUIRED_CLAIMS},
                )
            except InvalidSignatureError:
                why = "bad signature"
                continue
            except PyJWTError as exc:
                self._results["invalid"].value += 1
                raise self._invalid(ctx, _reason(exc)) from None
            principal = _principal(claims)
            if principal is None:
                self._results["invalid"].value += 1
                raise self._invalid(ctx, "the sub claim must be a string of visible characters")
            self._remember(authorization, principal, float(claims["exp"]) + config.leeway, keys)
            self._results["verified"].value += 1
            return principal
        if self._api_keys:
            return self._api_key(ctx, token)
        self._results["invalid"].value += 1
        raise self._invalid(ctx, why)

    def _remember(self, authorization: bytes, principal: Principal, until: float, keys: KeySet) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            now = self._clock()
            for stale in [token for token, (_, valid, _) in cache.items() if valid <= now]:
                del cache[stale]
            if len(cache) >= CACHE_SIZE:
                cache.clear()
        cache[authorization] = (principal, until, keys)

    # -- upstream-request phase -------------------------------------------------------------------

    def upstream_request(self, facts: RequestFacts, edits: HeadEdits) -> None:
        if self._drop:
            edits.drop = edits.drop | self._drop
        principal = facts.principal
        if principal is not None and self._principal_header is not None:
            line = self._lines.get(principal.name)
            if line is None:
                line = b"%b: %b\r\n" % (self._principal_header, _header_value(principal.name))
                if len(self._lines) >= CACHE_SIZE:
                    self._lines.clear()
                self._lines[principal.name] = line
            edits.add.append(line)


def _principal(claims: dict[str, Any]) -> Principal | None:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 256 or not sub.isprintable():
        return None
    return Principal(sub, "jwt", _scopes(claims), claims)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """`scope` (RFC 8693: space-separated) or `scp` (a list, or a string) of a token."""
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


def _reason(exc: PyJWTError) -> str:
    if isinstance(exc, ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, ImmatureSignatureError):
        return "the token is not valid yet"
    if isinstance(exc, InvalidAudienceError):
        return "the token is for another audience"
    if isinstance(exc, InvalidIssuerError):
        return "the token is from another issuer"
    if isinstance(exc, MissingRequiredClaimError):
        return f"the token has no {exc.claim} claim"
    return "invalid token"


def _only(headers: Sequence[tuple[bytes, bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the credential header `name`; BadRequest when the request has it twice: the
    proxy would check one and the backend might read the other."""
    found = None
    for lname, _, value in headers:
        if lname == name:
            if found is not None:
                raise BadRequest(f"Bad Request: more than one {name.decode()} header")
            found = value
    return found


def _header(headers: Sequence[tuple[bytes, bytes, bytes]], name: bytes | None) -> bytes | None:
    for lname, _, value in headers:
        if lname == name:
            return value
    return None


def _header_value(name: str) -> bytes:
    """The principal as a header value: as it is when visible ASCII, else in MCP's =?base64?...?=."""
    if name.isascii() and all(" " <= ch <= "~" for ch in name):
        return name.encode("ascii")
    return b"=?base64?" + base64.b64encode(name.encode("utf-8")) + b"?="


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _paths(paths: Iterable[str]) -> tuple[frozenset[bytes], tuple[bytes, ...]]:
    """(exact paths, prefixes) of `public_paths`: a trailing `*` makes a prefix."""
    exact = frozenset(p.encode() for p in paths if not p.endswith("*"))
    prefixes = tuple(p[:-1].encode() for p in paths if p.endswith("*"))
    return exact, prefixes


def _json_answer(
    status: int, body: bytes, keep_alive: bool, length: int | None = None, *, allow: bool = False
) -> bytes:
    reason = {200: "OK", 405: "Method Not Allowed"}[status]
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body) if length is None else length}",
        "Cache-Control: no-store",
        "Access-Control-Allow-Origin: *",  # a public document; browser-based clients fetch it
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
