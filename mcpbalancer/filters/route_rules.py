"""The request filter of `routes:` (routing/rules.py compiles them): the first rule whose match
fits a 2026-07-28 request denies it, or limits its backends to the rule's pool. A request with a
session id is a legacy one, and no rule applies to it."""

from __future__ import annotations

from mcpbalancer.filters.phases import Context
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.routing.router import RequestFacts
from mcpbalancer.routing.rules import RuleSet, header_lookup


class RouteRules:
    reads_names = True  # rules match Mcp-Name

    def __init__(self, rules: RuleSet, metrics: Metrics) -> None:
        self._rules = rules
        self._hits = [metrics.rule_hits(rule.label) for rule in rules.rules]

    def request(self, ctx: Context, facts: RequestFacts) -> None:
        if facts.era is not Era.MODERN:
            return
        rule = self._rules.match(facts.mcp_method, facts.mcp_name, header_lookup(facts.headers))
        if rule is None:
            return
        self._hits[rule.index].value += 1
        if rule.deny is not None:
            raise rule.deny()
        facts.pool = rule.pool
