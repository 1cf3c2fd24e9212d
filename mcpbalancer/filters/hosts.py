"""The Host allow list (`allowed_hosts`): DNS-rebinding protection at the proxy's front door.

A page on a name its author controls (`evil.example.com`) whose DNS is switched to the proxy's
address makes the victim's browser send `Host: evil.example.com` and a matching `Origin`, so an
Origin check against the request's own Host lets it through. The proxy therefore checks `Host`
itself against a list of names, once per request head, before anything is forwarded (the backend
sees its own Host and could not tell).

Pure: header bytes in, a decision out. Entries are exact names (`mcp.example.com`, `127.0.0.1`,
`[::1]`) or globs with `*` and `?` (`*.example.com`); `*` alone allows every Host. The port of a
Host is never compared: a rebinding attack is told by its name, and a proxy behind a port mapping
sees whatever port the client used.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Final

from mcpbalancer.errors import MisdirectedRequest
from mcpbalancer.filters.phases import MutableHead

# What the MCP SDKs accept for a local server: the loopback names, with any port.
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "[::1]")
# Decisions are cached by the Host value as received; a client sends the same one every time.
# Bounded (each set is cleared when full) so a stream of made-up names cannot grow them.
SEEN_LIMIT: Final = 256
_WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})


class HostPolicy:
    """Which `Host` values may be served. With `ip_literals`, any IP address is a name too."""

    def __init__(self, patterns: Iterable[str], *, ip_literals: bool = False) -> None:
        patterns = tuple(p.lower() for p in patterns)
        self.any = "*" in patterns
        self.patterns = patterns
        self.ip_literals = ip_literals
        globs = [p for p in patterns if _is_glob(p) and p != "*"]
        self._names = frozenset(p.encode("ascii") for p in patterns if not _is_glob(p))
        self._glob = re.compile(b"(?:%b)\\Z" % b"|".join(map(_glob_regex, globs))) if globs else None
        # Host values (as received) found allowed: the data plane tests membership itself, so a
        # known Host costs a request one set lookup and no call. Cleared in place, never replaced.
        self.known: set[bytes] = set()
        self._refused: set[bytes] = set()

    def allows(self, host: bytes) -> bool:
        """A `Host` header value as received (`name[:port]`, `[v6][:port]`)."""
        if host in self.known:
            return True
        if host in self._refused:
            return False
        allowed = self.allows_name(hostname(host))
        seen = self.known if allowed else self._refused
        if len(seen) >= SEEN_LIMIT:
            seen.clear()
        seen.add(host)
        return allowed

    def allows_name(self, name: bytes) -> bool:
        """A lower-case host name without its port (an IPv6 address in brackets)."""
        if self.any or name in self._names:
            return True
        if self._glob is not None and self._glob.match(name) is not None:
            return True
        return self.ip_literals and is_ip_literal(name)


class HostFilter:
    """The early_request filter of `allowed_hosts`: a Host not on the list gets 421, and nothing
    is forwarded. Registered only when the list does not allow every Host."""

    def __init__(self, policy: HostPolicy) -> None:
        self.policy = policy
        self._known = policy.known

    def early_request(self, head: MutableHead) -> MisdirectedRequest | None:
        host = head.host
        if host is None or host in self._known or self.policy.allows(host):
            return None
        name = host[:100].decode("latin-1")
        return MisdirectedRequest(f"Misdirected Request: Host {name!r} is not in allowed_hosts")


def for_listen(allowed: Iterable[str] | None, listen_host: str, named: Iterable[str] = ()) -> HostPolicy:
    """The policy for `allowed_hosts` as configured (None: not set) on a proxy listening on
    `listen_host`. Unset on a loopback address: the loopback names. Unset elsewhere: the loopback
    names, the listen name if it is one, and any IP address, since a Host that is an IP literal
    cannot come from a rebinding page (that needs a DNS name the attacker controls); other names
    are refused until the operator lists them. Unset, the `named` hosts (the services' own
    `match.host`: names the operator wrote) are allowed too."""
    if allowed is not None:
        return HostPolicy(allowed)
    if is_loopback(listen_host):
        return HostPolicy((*LOOPBACK_NAMES, *named))
    names: tuple[str, ...] = (*LOOPBACK_NAMES, *named)
    if listen_host.isascii() and listen_host.lower() not in _WILDCARDS and not _is_address(listen_host):
        names += (listen_host,)
    return HostPolicy(names, ip_literals=True)


def hostname(host: bytes) -> bytes:
    """The lower-case name of a Host value, without the port; an IPv6 address keeps its brackets."""
    value = host.strip().lower()
    if value.startswith(b"["):
        end = value.find(b"]")
        return value[: end + 1] if end > 0 else value
    name, sep, _ = value.rpartition(b":")
    return name if sep else value


def is_loopback(listen_host: str) -> bool:
    """The listen address accepts connections from this machine only."""
    if listen_host.lower() == "localhost":
        return True
    return _is_address(listen_host) and ipaddress.ip_address(listen_host.strip("[]")).is_loopback


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def is_ip_literal(name: bytes) -> bool:
    """`name` is a dotted IPv4 address or a bracketed IPv6 address."""
    text = name.decode("ascii", "replace")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    elif ":" in text:
        return False  # an IPv6 address in a Host must be bracketed
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_glob(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def _glob_regex(pattern: str) -> bytes:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return "".join(parts).encode("ascii")
