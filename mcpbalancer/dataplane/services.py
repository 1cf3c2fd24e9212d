"""Which service a request is for: its Host against each service's host glob, its path against
each path prefix (whole segments), the longest prefix first; and the target the service sees.

Pure: no I/O, nothing of the data plane. The data plane holds a ServiceMap only when `services`
are configured; without them no request asks it anything.

OAuth discovery documents name the resource in the path after the well-known part (RFC 9728 §3.1,
RFC 8414 §3.1): `/.well-known/oauth-protected-resource/github/mcp` is matched on `/github/mcp`,
and the service's backends are asked for `/.well-known/oauth-protected-resource/mcp` when the
prefix is stripped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from mcpbalancer.filters.hosts import hostname

T = TypeVar("T")
_Matcher = Callable[[bytes], object]

WELL_KNOWN: Final = (
    b"/.well-known/oauth-protected-resource",
    b"/.well-known/oauth-authorization-server",
    b"/.well-known/openid-configuration",
)
_WELL_KNOWN_START: Final = b"/.well-known/"
HOST_CACHE: Final = 256
_SEGMENT_END: Final = frozenset(b"/?")


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """One service as the map matches it: `host` lower-case (exact or glob, None = any),
    `prefix` b"/github" (None = every path), and what a match gives (`target`)."""

    host: str | None
    prefix: bytes | None
    strip: bool
    target: T
    default: bool = False  # the top-level backends: taken when no other matches


class ServiceMap(Generic[T]):
    def __init__(self, routes: Iterable[Route[T]]) -> None:
        # Longest prefix first; at one prefix an exact host, then a glob, then none; the default last.
        self.routes = sorted(routes, key=_rank, reverse=True)
        self._matchers = [(_host_matcher(r.host), r) for r in self.routes]
        self._by_host = any(r.host is not None for r in self.routes)
        # Host values as received -> their lower-case name: a client sends the same one every time.
        # Bounded (cleared when full) so a stream of made-up names cannot grow it.
        self._names: dict[bytes, bytes] = {}

    def pick(self, host: bytes | None, target: bytes) -> tuple[T, bytes] | None:
        """The service for a request (Host value as received, origin-form target) and the target it
        is to see; None when none matches."""
        name = self._name(host) if self._by_host and host is not None else b""
        path, well_known = target, b""
        if target.startswith(_WELL_KNOWN_START):
            for base in WELL_KNOWN:
                if target.startswith(base) and (
                    len(target) == len(base) or target[len(base)] in _SEGMENT_END
                ):
                    well_known, path = base, target[len(base) :]
                    break
        for matches, route in self._matchers:
            if matches is not None and not matches(name):
                continue
            prefix = route.prefix
            if prefix is None:
                return route.target, target
            if not _under(path, prefix):
                continue
            if not route.strip:
                return route.target, target
            rest = path[len(prefix) :]
            if well_known:
                return route.target, well_known + rest
            return route.target, rest if rest.startswith(b"/") else b"/" + rest
        return None

    def _name(self, host: bytes) -> bytes:
        name = self._names.get(host)
        if name is None:
            if len(self._names) >= HOST_CACHE:
                self._names.clear()
            name = self._names[host] = hostname(host)
        return name


def _under(path: bytes, prefix: bytes) -> bool:
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] in _SEGMENT_END)


def _rank(route: Route[T]) -> tuple[int, int]:
    if route.default:
        return -1, -1
    specificity = 0 if route.host is None else 1 if "*" in route.host or "?" in route.host else 2
    return len(route.prefix or b""), specificity


def _host_matcher(host: str | None) -> _Matcher | None:
    if host is None:
        return None
    if "*" not in host and "?" not in host:
        return host.encode("ascii").__eq__
    pattern = re.escape(host.encode("ascii")).replace(rb"\*", b".*").replace(rb"\?", b".")
    return re.compile(pattern + rb"\Z").match
