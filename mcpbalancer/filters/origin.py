"""Origin checks and CORS answers (MCP servers must validate Origin against DNS rebinding).

Pure: header bytes in, a decision or response bytes out. Policy:
- no `Origin` header: allowed (not a browser, or a same-origin navigation);
- `allowed_origins` lists `*`: every origin is allowed;
- `allowed_origins` lists origins: exactly those are allowed (compared case-insensitively);
- `allowed_origins` empty (the default): an http(s) origin whose host is in `allowed_hosts` is
  allowed (any port), any other is refused. A rebinding page's origin names the page's own host,
  which is the request's Host too, so the request's Host proves nothing; the list does. Only when
  `allowed_hosts` allows every host is the origin compared with the request's `Host` instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from mcpbalancer.errors import OriginNotAllowed
from mcpbalancer.filters.hosts import HostPolicy, hostname
from mcpbalancer.filters.phases import MutableHead, Verdict

ALLOW_METHODS = b"GET, POST, DELETE, OPTIONS"
# The headers MCP clients send; a preflight's own Access-Control-Request-Headers are echoed as well,
# because tools may declare Mcp-Param-<Name> headers nobody can list in advance.
ALLOW_HEADERS = (
    b"Content-Type, Accept, Authorization, Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name, "
    b"Last-Event-ID"
)
EXPOSE_HEADERS = b"Mcp-Session-Id, MCP-Protocol-Version"
PREFLIGHT_MAX_AGE = b"600"
_DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}
_TOKEN_LIST = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_, ")


class OriginPolicy:
    def __init__(self, allowed: Iterable[str] = (), hosts: HostPolicy | None = None) -> None:
        allowed = tuple(allowed)
        self.any = "*" in allowed
        self.explicit = bool(allowed)
        self._allowed = frozenset(o.lower().encode("ascii") for o in allowed if o != "*")
        self._hosts = None if hosts is None or hosts.any else hosts  # None: the same-host rule

    def allows(self, origin: bytes, host: bytes | None) -> bool:
        if self.any:
            return True
        value = origin.strip().lower()
        if value in self._allowed:
            return True
        if self.explicit:
            return False
        if self._hosts is None:
            return host is not None and same_host(value, host)
        scheme, sep, authority = value.partition(b"://")
        return bool(sep) and scheme in _DEFAULT_PORTS and self._hosts.allows_name(hostname(authority))

    def cors_headers(self, origin: bytes) -> bytes:
        """Header lines for the answer to an allowed cross-origin request."""
        return b"Access-Control-Allow-Origin: %b\r\nAccess-Control-Expose-Headers: %b\r\nVary: Origin\r\n" % (
            origin.strip(),
            EXPOSE_HEADERS,
        )

    def preflight(self, origin: bytes, requested_headers: bytes | None, keep_alive: bool) -> bytes:
        """The whole 204 answer to an allowed CORS preflight."""
        allow = ALLOW_HEADERS
        if requested_headers and set(requested_headers) <= _TOKEN_LIST:
            allow = allow + b", " + requested_headers.strip()
        return (
            b"HTTP/1.1 204 No Content\r\n%b"
            b"Access-Control-Allow-Methods: %b\r\nAccess-Control-Allow-Headers: %b\r\n"
            b"Access-Control-Max-Age: %b\r\nCache-Control: no-store\r\nConnection: %b\r\n\r\n"
            % (
                self.cors_headers(origin),
                ALLOW_METHODS,
                allow,
                PREFLIGHT_MAX_AGE,
                b"keep-alive" if keep_alive else b"close",
            )
        )


class OriginFilter:
    """The early_request filter of the Origin policy: a refused Origin gets 403; an allowed one
    gets its CORS preflight answered here, and its other answers carry the CORS header lines."""

    def __init__(self, policy: OriginPolicy) -> None:
        self.policy = policy

    def early_request(self, head: MutableHead) -> Verdict | None:
        origin = head.origin
        if origin is None:
            return None
        policy = self.policy
        if not policy.allows(origin, head.host):
            return OriginNotAllowed()
        if head.method == b"OPTIONS" and any(
            n == b"access-control-request-method" for n, _, _ in head.headers
        ):
            return 204, policy.preflight(origin, head.cors_request_headers, head.keep_alive)
        head.cors = policy.cors_headers(origin)
        return None


def same_host(origin: bytes, host: bytes) -> bool:
    """`origin` (lower-case, "scheme://host[:port]") names the same host[:port] as `host`."""
    scheme, sep, authority = origin.partition(b"://")
    if not sep or not authority:
        return False
    host = host.strip().lower()
    default = _DEFAULT_PORTS.get(scheme)
    if default is not None:
        authority = authority.removesuffix(default)
        host = host.removesuffix(default)
    return authority == host
