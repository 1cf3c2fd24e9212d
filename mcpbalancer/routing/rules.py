"""Routing rules for 2026-07-28 requests: `pools` and `routes` from the config, compiled once.

Pure: a rule set is built at start-up and `match` is a function of a request's routing headers. Rules
are tried in order and the first match wins. A rule matches when every condition it names holds:
`method` equals `Mcp-Method`, `name` (a glob: `*`, `?`, `[seq]`, case-sensitive) matches the decoded
`Mcp-Name`, and each `param` equals the decoded `Mcp-Param-<Name>` header. Legacy requests carry none
of these headers reliably (legacy servers do not check them against the body) and never get here.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mcpbalancer.config import RouteConfig
from mcpbalancer.errors import Denied, MalformedHeader, denied
from mcpbalancer.protocol import HeaderEncodingError, decode_header_value

PARAM_PREFIX = b"mcp-param-"
DENY_LABEL = "deny"

# Finds a header value by its lower-case name; None when the request lacks it.
HeaderLookup = Callable[[bytes], "bytes | None"]


@dataclass(frozen=True, slots=True)
class Rule:
    index: int  # position in `routes`
    label: str  # the metric label: the index in `routes`, or "deny"
    method: str | None
    name: re.Pattern[str] | None
    params: tuple[tuple[bytes, str], ...]  # (lower-case header name, value)
    pool: frozenset[str] | None  # backend names
    deny: type[Denied] | None

    def matches(self, method: str | None, name: str | None, header: HeaderLookup) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.name is not None and (name is None or self.name.match(name) is None):
            return False
        return all(decoded(header(hname)) == value for hname, value in self.params)


class RuleSet:
    """The compiled `routes`, in order."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, method: bytes | None, raw_name: bytes | None, header: HeaderLookup) -> Rule | None:
        """The first rule matching the request's headers; MalformedHeader on a malformed encoded value."""
        mcp_method = decoded(method)
        name = decoded(raw_name)  # decoded even when no rule names one: a malformed value is a 400
        for rule in self.rules:
            if rule.matches(mcp_method, name, header):
                return rule
        return None


def compile_rules(routes: Sequence[RouteConfig], pools: Mapping[str, Sequence[str]]) -> RuleSet:
    return RuleSet([_compile(i, route, pools) for i, route in enumerate(routes)])


def _compile(index: int, route: RouteConfig, pools: Mapping[str, Sequence[str]]) -> Rule:
    name = None if route.name is None else re.compile(fnmatch.translate(route.name), re.DOTALL)
    params = tuple((PARAM_PREFIX + key.lower().encode("ascii"), value) for key, value in route.params)
    pool = None if route.pool is None else frozenset(pools[route.pool])
    deny = None if route.deny is None else denied(route.deny)
    label = DENY_LABEL if deny is not None else str(index)
    return Rule(index, label, route.method, name, params, pool, deny)


def decoded(value: bytes | None, header: str | None = None) -> str | None:
    """A routing header value decoded; MalformedHeader (400, naming `header` if given) for a malformed
    =?base64?...?= form."""
    if value is None:
        return None
    try:
        return decode_header_value(value)
    except HeaderEncodingError as exc:
        where = f"{header}: " if header else ""
        raise MalformedHeader(f"Bad Request: {where}{exc}") from exc


def header_lookup(headers: Sequence[tuple[bytes, bytes, bytes]]) -> HeaderLookup:
    """A lookup over the data plane's (lower-case name, name, value) list; the first field wins."""

    def find(lname: bytes) -> bytes | None:
        for name, _, value in headers:
            if name == lname:
                return value
        return None

    return find
