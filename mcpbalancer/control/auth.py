"""Who may use the admin listener: `Authorization: Bearer <token>`, when `admin.token` is set.

Every path of the listener needs the token except OPEN ones (the probes and the metrics page, for
kubelet and Prometheus), so a page added later (the status page) is guarded without asking. The
check is a middleware on the listener's aiohttp application; a handler that wants to know itself
calls `authorized(request)`.

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, against every configured token
without stopping at a match: the time does not depend on how much of a token was right, nor on
which token matched, nor on the lengths. The tokens are read through a callable at each request, so
a reload (a rotation: old and new, then new only) applies to the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from mcpbalancer.config import host_port
from mcpbalancer.control.audit import Audit
from mcpbalancer.filters.hosts import is_loopback

log = logging.getLogger(__name__)

PROBES: Final = ("/healthz", "/readyz")
_SCHEME: Final = "bearer"
_REALM: Final = 'Bearer realm="mcpbalancer admin"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class AdminAuth:
    """`tokens()` the accepted bearer tokens (empty: no authentication); `open_paths` answered
    without one."""

    def __init__(self, tokens: Callable[[], tuple[str, ...]], open_paths: Iterable[str] = PROBES) -> None:
        self._tokens = tokens
        self.open_paths = frozenset(open_paths)
        self._cached: tuple[tuple[str, ...], tuple[bytes, ...]] = ((), ())

    @property
    def required(self) -> bool:
        return bool(self._tokens())

    def authorized(self, request: web.BaseRequest) -> bool:
        """The request may use the admin listener: no token is configured, or it carries one."""
        return self.problem(request.headers.get("Authorization")) is None

    def problem(self, authorization: str | None) -> str | None:
        """None when `authorization` (the header's value) is accepted; else `missing` or `invalid`."""
        digests = self._digests()
        if not digests:
            return None
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() != _SCHEME or not credential.strip():
            return "missing"
        given = _digest(credential.strip().encode("utf-8", "surrogateescape"))
        match = False
        for digest in digests:
            match |= hmac.compare_digest(given, digest)
        return None if match else "invalid"

    def _digests(self) -> tuple[bytes, ...]:
        tokens = self._tokens()
        if tokens != self._cached[0]:
            self._cached = (tokens, tuple(_digest(t) for t in tokens))
        return self._cached[1]


AUTH: Final = web.AppKey("auth", AdminAuth)


def authorized(request: web.BaseRequest) -> bool:
    """Whether `request` may see what the admin listener serves (True where no token is set)."""
    auth = request.app.get(AUTH) if isinstance(request, web.Request) else None
    return auth is None or auth.authorized(request)


def unauthorized(problem: str) -> web.Response:
    """401 with the challenge (RFC 6750: `error="invalid_token"` when a token was wrong)."""
    challenge = _REALM if problem == "missing" else f'{_REALM}, error="invalid_token"'
    message = "missing bearer token" if problem == "missing" else "invalid bearer token"
    body = json.dumps({"error": message}).encode()
    response = web.Response(status=401, body=body, content_type="application/json")
    response.headers["WWW-Authenticate"] = challenge
    response.headers["Cache-Control"] = "no-store"
    return response


def guard(auth: AdminAuth, audit: Audit | None) -> Middleware:
    """The middleware: 401 for a request without an accepted token, except on the open paths;
    each refusal is audited (a log line and the counter)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in auth.open_paths:
            return await handler(request)
        problem = auth.problem(request.headers.get("Authorization"))
        if problem is None:
            return await handler(request)
        if audit is not None:
            audit.refused(request, problem)
        return unauthorized(problem)

    return middleware


def install(app: web.Application, auth: AdminAuth, audit: Audit | None) -> None:
    """Guard every route of `app`, the ones added later too."""
    app[AUTH] = auth
    app.middlewares.append(guard(auth, audit))


def warn_if_open(host: str, port: int, auth: AdminAuth) -> None:
    """The warning of an admin API anyone on the network may use."""
    if not auth.required and not is_loopback(host):
        log.warning(
            "admin listens on %s, not a loopback address, without a token: anyone who reaches it can "
            "drain backends and reload the configuration; set admin.token",
            host_port(host, port),
        )
