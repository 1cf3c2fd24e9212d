"""`tool_policy`: which tools a caller may call, for both protocol eras.

Rules are tried in order; the first whose tool-name globs match the tool and whose `when` holds for
the caller decides (`allow` or `deny`), and a call no rule matches is denied. A denied call is
answered 403 with JSON-RPC error -32032 (errors.ToolDenied), and no backend sees it.

- 2026-07-28: the tool is the `Mcp-Name` of a `tools/call` (request phase, no body read). The backend
  must refuse a body that disagrees with the header (the spec's HEADER_MISMATCH), or
  `validate_headers: true` makes the proxy check it.
- Legacy: the tool is in the JSON body, read whole and bounded (filters/calls.py) in the request-body
  phase; a batch is checked whole and refused whole if any call in it is denied.

Pure policy: the rules are compiled once; a decision is a few regex matches.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mcpbalancer.config import ToolRule, When
from mcpbalancer.errors import BadRequest, ToolDenied
from mcpbalancer.filters.calls import Call, calls_of_body, known_calls, may_call_a_tool, reads_body
from mcpbalancer.observability.metrics import Metrics, Value
from mcpbalancer.protocol import Era
from mcpbalancer.routing.binding import Principal
from mcpbalancer.routing.router import RequestFacts

log = logging.getLogger(__name__)

DEFAULT_LABEL: Final = "default"  # the metric label of a call no rule matched (denied)


def glob(pattern: str) -> re.Pattern[str]:
    """A case-sensitive glob (* ? [seq]) as a compiled regex, as `routes` match names."""
    return re.compile(fnmatch.translate(pattern), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled `when`: every given part must hold for the principal."""

    principal: re.Pattern[str] | None
    scope: str | None
    claims: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, when: When | None) -> Condition | None:
        if when is None or (when.principal, when.scope, when.claim) == (None, None, None):
            return None
        principal = None if when.principal is None else glob(when.principal)
        return cls(principal, when.scope, tuple((when.claim or {}).items()))

    def holds(self, principal: Principal | None) -> bool:
        if principal is None:
            return False
        if self.principal is not None and self.principal.match(principal.name) is None:
            return False
        if self.scope is not None and self.scope not in principal.scopes:
            return False
        return all(_claim_has(principal.claims.get(name), value) for name, value in self.claims)


def _claim_has(claim: object, value: str) -> bool:
    return claim == value or (isinstance(claim, list) and value in claim)


@dataclass(frozen=True, slots=True)
class _Rule:
    allow: bool
    names: re.Pattern[str]
    when: Condition | None
    allowed: Value  # this rule's decisions, counted
    denied: Value


class ToolPolicy:
    reads_names = True  # 2026-07-28 tool calls are decided on Mcp-Name

    def __init__(self, rules: Sequence[ToolRule], metrics: Metrics, body_limit: int) -> None:
        self._body_limit = body_limit  # limits.policy_body_bytes
        family = metrics.tool_policy_decisions
        self._rules = tuple(
            _Rule(
                rule.allow is not None,
                re.compile("|".join(glob(name).pattern for name in rule.names), re.DOTALL),
                Condition.of(rule.when),
                family.labels(str(i), "allow"),
                family.labels(str(i), "deny"),
            )
            for i, rule in enumerate(rules)
        )
        self._default = family.labels(DEFAULT_LABEL, "deny")

    # -- phases -----------------------------------------------------------------------------------

    def request(self, ctx: object, facts: RequestFacts) -> None:
        if reads_body(facts):
            return  # a legacy POST: decided on its body
        if facts.era is Era.MODERN and facts.method == b"POST" and facts.mcp_method is None:
            # Without Mcp-Method nothing says what the body calls: it could be any tool.
            raise BadRequest("Bad Request: a 2026-07-28 request must carry Mcp-Method")
        self.check(known_calls(facts), facts.principal)

    def wants_body(self, facts: RequestFacts) -> bool:
        return reads_body(facts)

    def body_limit(self, facts: RequestFacts) -> int | None:
        return self._body_limit if reads_body(facts) else None

    def request_body(self, ctx: object, facts: RequestFacts, body: bytes, message: object) -> object:
        if not reads_body(facts):
            return message  # decided in the request phase
        if facts.calls is None:
            if not may_call_a_tool(body):
                return message  # no tools/call in it, not even escaped: nothing to decide
            facts.calls = calls_of_body(body)
        self.check(facts.calls, facts.principal)
        return message

    # -- the decision -----------------------------------------------------------------------------

    def check(self, calls: Sequence[Call], principal: Principal | None) -> None:
        """ToolDenied when any call of `calls` is denied to `principal`."""
        for _, tool in calls:
            if tool is not None and not self.allows(tool, principal):
                who = f" for {principal.name}" if principal is not None else ""
                log.info("tool_policy: %r denied%s", tool[:100], who)
                raise ToolDenied(f"Forbidden: tool {tool[:100]!r} is not allowed{who}")

    def allows(self, tool: str, principal: Principal | None) -> bool:
        for rule in self._rules:
            if rule.names.match(tool) is not None and (rule.when is None or rule.when.holds(principal)):
                (rule.allowed if rule.allow else rule.denied).value += 1
                return rule.allow
        self._default.value += 1
        return False
