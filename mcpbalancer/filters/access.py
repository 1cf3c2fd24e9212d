"""Who may call what, and how often: the access filters composed into one record of phases.

The filters (auth.py, toolpolicy.py, ratelimit.py, concurrency.py) each implement the phases they
act at, by method name; `compose` makes one callable per phase, or None where no filter acts, and
returns None when no filter is configured at all, so the exchange pays one `is None` test:

    phase             when                                    filters
    early_request     before the request is classified        auth: the protected-resource metadata
    request           the head, classified (may answer it)    auth, tool policy (2026-07-28), rate limits
    request_body      the whole body, bounded                 tool policy (legacy), rate limits on calls
    upstream_peer     a backend was picked (may wait)         concurrency (max_in_flight)
    upstream_request  the head sent to the backend            auth: principal header, Authorization

`request_body` runs when any filter wants the body: each filter acts there only on the requests
its own `wants_body` names. A filter refuses by raising a ProxyError; `request` and `request_body`
may return an awaitable (a key set fetch, a Redis round trip), and the filters after it run once it
is done: they are always called in order, each seeing what the ones before it set in the facts (the
principal first).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mcpbalancer.filters.concurrency import Ticket
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.routing.router import RequestFacts


class Head(Protocol):
    """What the access filters read of a request head (dataplane/head.py's RequestHead)."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def forwarded_for(self) -> bytes | None: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes, bytes]]: ...


class Context(Protocol):
    """What the access filters read of an exchange, the per-request context."""

    @property
    def head(self) -> Head: ...
    @property
    def peer_ip(self) -> bytes: ...


Pending = Awaitable[None] | None
EarlyAnswer = Callable[[Head, bytes], "tuple[int, bytes] | None"]
RequestPhase = Callable[[Context, RequestFacts], Pending]
BodyPhase = Callable[[Context, RequestFacts, bytes], Pending]
Edits = tuple[frozenset[bytes], bytes]  # (lower-case names of fields not to forward, lines to add)


@dataclass(frozen=True, slots=True)
class AccessPhases:
    early_request: EarlyAnswer | None = None
    request: RequestPhase | None = None
    wants_body: Callable[[RequestFacts], bool] | None = None
    request_body: BodyPhase | None = None
    upstream_request: Callable[[RequestFacts], Edits] | None = None
    upstream_peer: Callable[[bytes, Backend], Ticket | None] | None = None
    body_limit: int = 0  # the largest body read for `request_body` (limits.policy_body_bytes)
    reads_names: bool = False  # a filter reads Mcp-Name: the client connection must capture it
    filters: tuple[object, ...] = ()


def compose(filters: Sequence[object], body_limit: int) -> AccessPhases | None:
    """The phases of `filters`, in order; None when there are none."""
    if not filters:
        return None

    def bound(method: str) -> list[Any]:
        return [getattr(f, method) for f in filters if callable(getattr(f, method, None))]

    early, peers, edits = bound("early_request"), bound("peer"), bound("upstream_request")
    wants = bound("wants_body")
    return AccessPhases(
        early_request=early[0] if len(early) == 1 else _first(early),
        request=_in_order(bound("request")),
        wants_body=None if not wants else wants[0] if len(wants) == 1 else _any(wants),
        request_body=_in_order(bound("request_body")),
        upstream_request=_edits(edits),
        upstream_peer=peers[0] if peers else None,
        body_limit=body_limit,
        reads_names=any(getattr(f, "reads_names", False) for f in filters),
        filters=tuple(filters),
    )


def _in_order(calls: list[Callable[..., Pending]]) -> Callable[..., Pending] | None:
    """One phase of several filters: each runs after the one before it is done."""
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]

    def run(*args: Any) -> Pending:
        for i, call in enumerate(calls):
            pending = call(*args)
            if pending is not None:
                return _rest(pending, calls[i + 1 :], args)
        return None

    return run


async def _rest(pending: Awaitable[None], calls: list[Callable[..., Pending]], args: tuple[Any, ...]) -> None:
    await pending
    for call in calls:
        later = call(*args)
        if later is not None:
            await later


def _first(calls: list[EarlyAnswer]) -> EarlyAnswer | None:
    if not calls:
        return None

    def run(head: Head, peer_ip: bytes) -> tuple[int, bytes] | None:
        for call in calls:
            answer = call(head, peer_ip)
            if answer is not None:
                return answer
        return None

    return run


def _any(calls: list[Callable[[RequestFacts], bool]]) -> Callable[[RequestFacts], bool]:
    return lambda facts: any(call(facts) for call in calls)


def _edits(calls: list[Callable[[RequestFacts], Edits]]) -> Callable[[RequestFacts], Edits] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]

    def run(facts: RequestFacts) -> Edits:
        drop: frozenset[bytes] = frozenset()
        add = b""
        for call in calls:
            more, lines = call(facts)
            drop, add = drop | more, add + lines
        return drop, add

    return run
