"""`rate_limits`: token buckets by principal, session, client address or tool.

Every rule whose `match` fits a request counts it, in the bucket of the request's `key` value for
that rule; the request is refused (429, Retry-After, JSON-RPC -32033) when any of them is empty, and
then no bucket is charged (store/ratelimit.py takes them all or none). A refused request never
reaches a backend and never counts against its health. Refusals are counted by rule index.

A rule on a tool or a method needs the request's JSON-RPC calls: a 2026-07-28 request names them in
headers, a legacy one in its body, which is then read (bounded) and counted in the request-body
phase; a batch counts once per matching call. A request without the key's value (no session yet,
no tool) is not counted by that rule.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mcpbalancer.config import RateLimit, RateMatch
from mcpbalancer.errors import RateLimited
from mcpbalancer.filters.calls import Call, calls_of_body, known_calls, reads_body
from mcpbalancer.filters.clientip import TrustedProxies
from mcpbalancer.observability.metrics import Metrics, Value
from mcpbalancer.routing.router import RequestFacts
from mcpbalancer.store.ratelimit import Item, Rate, Refusal, retry_seconds


class Buckets(Protocol):
    """LocalBuckets answer at once, SharedBuckets after a Redis round trip."""

    def take(self, items: Sequence[Item]) -> Refusal | Awaitable[Refusal | None] | None: ...


class Head(Protocol):
    @property
    def forwarded_for(self) -> bytes | None: ...
    @property
    def has_body(self) -> bool: ...


class Context(Protocol):
    @property
    def head(self) -> Head: ...
    @property
    def peer_ip(self) -> bytes: ...


def rates_of(rules: Sequence[RateLimit]) -> list[Rate]:
    """The bucket shape of each rule, by index."""
    return [Rate.of(*rule.per, rule.size) for rule in rules]


def _glob(pattern: str | None) -> re.Pattern[str] | None:
    return None if pattern is None else re.compile(fnmatch.translate(pattern), re.DOTALL)


@dataclass(frozen=True, slots=True)
class _Rule:
    key: str
    principal: re.Pattern[str] | None
    tool: re.Pattern[str] | None
    method: str | None
    reads_calls: bool
    refused: Value

    def fits(self, call: Call) -> bool:
        method, tool = call
        if self.method is not None and method != self.method:
            return False
        return self.tool is None or (tool is not None and self.tool.match(tool) is not None)


class RateLimits:
    def __init__(
        self,
        rules: Sequence[RateLimit],
        buckets: Buckets,
        metrics: Metrics,
        trusted: TrustedProxies | None = None,
        *,
        body_limit: int,
    ) -> None:
        self._body_limit = body_limit  # limits.policy_body_bytes
        self._buckets = buckets
        self._trusted = trusted or TrustedProxies()
        self._rules = tuple(self._compile(i, rule, metrics) for i, rule in enumerate(rules))
        self.reads_names = any(rule.reads_calls for rule in self._rules)  # modern: Mcp-Name

    @staticmethod
    def _compile(index: int, rule: RateLimit, metrics: Metrics) -> _Rule:
        match = rule.match or RateMatch()
        refused = metrics.rate_limited.labels(str(index))
        reads = rule.reads_calls
        return _Rule(rule.key, _glob(match.principal), _glob(match.tool), match.method, reads, refused)

    # -- phases -----------------------------------------------------------------------------------

    def request(self, ctx: Context, facts: RequestFacts) -> Awaitable[None] | None:
        if ctx.head.has_body and self.wants_body(facts):
            return None  # a legacy POST with rules on its calls: counted once its body is read
        if self.reads_names and reads_body(facts):
            facts.calls = ()  # a legacy POST without a body calls nothing
        return self._count(ctx, facts)

    def wants_body(self, facts: RequestFacts) -> bool:
        return self.reads_names and reads_body(facts)

    def body_limit(self, facts: RequestFacts) -> int | None:
        return self._body_limit if self.wants_body(facts) else None

    def request_body(self, ctx: Context, facts: RequestFacts, body: bytes, message: object) -> object:
        """The request counted once its calls are known; an awaitable while Redis answers."""
        if not self.wants_body(facts):
            return message  # another filter wanted the body; this one counted the request already
        if facts.calls is None:
            facts.calls = calls_of_body(body)
        pending = self._count(ctx, facts)
        return message if pending is None else pending

    # -- counting ---------------------------------------------------------------------------------

    def _count(self, ctx: Context, facts: RequestFacts) -> Awaitable[None] | None:
        items = self._items(ctx, facts)
        if not items:
            return None
        taken = self._buckets.take(items)
        if taken is None or isinstance(taken, Refusal):
            self._raise_if(taken)
            return None
        return self._settle(taken)

    async def _settle(self, taken: Awaitable[Refusal | None]) -> None:
        self._raise_if(await taken)

    def _raise_if(self, refusal: Refusal | None) -> None:
        if refusal is None:
            return
        self._rules[refusal.rule].refused.value += 1
        retry = retry_seconds(refusal.retry_after)
        raise RateLimited(f"Too Many Requests: rate_limits[{refusal.rule}]", retry_after=retry)

    def _items(self, ctx: Context, facts: RequestFacts) -> list[Item]:
        principal = facts.principal
        calls: tuple[Call, ...] | None = None
        items: list[Item] = []
        for index, rule in enumerate(self._rules):
            if rule.principal is not None and (
                principal is None or rule.principal.match(principal.name) is None
            ):
                continue
            if not rule.reads_calls:
                key = self._key(rule.key, ctx, facts)
                if key is not None:
                    items.append((index, key, 1))
                continue
            if calls is None:
                calls = known_calls(facts)
            fitting = [call for call in calls if rule.fits(call)]
            if not fitting:
                continue
            if rule.key == "tool":
                tools: dict[str, int] = {}
                for _, tool in fitting:
                    if tool is not None:
                        tools[tool] = tools.get(tool, 0) + 1
                items += ((index, tool, cost) for tool, cost in tools.items())
            elif (key := self._key(rule.key, ctx, facts)) is not None:
                items.append((index, key, len(fitting)))
        return items

    def _key(self, kind: str, ctx: Context, facts: RequestFacts) -> str | None:
        if kind == "principal":
            return facts.principal.id if facts.principal is not None else None
        if kind == "session":
            return facts.session_id
        if kind == "client_ip":
            return self._trusted.client_ip(ctx.peer_ip, ctx.head.forwarded_for).decode("ascii", "replace")
        return None  # "tool" is counted per call
