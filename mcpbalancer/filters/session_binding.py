"""The request filter of `bind_sessions`: tags a legacy request with the keyed hash of its bound
credential (routing/binding.py), which the router compares with the tag its session was bound
with, and which a new session is bound with."""

from __future__ import annotations

from mcpbalancer.filters.phases import Context
from mcpbalancer.protocol import Era
from mcpbalancer.routing.binding import SessionBinder
from mcpbalancer.routing.router import RequestFacts


class SessionBinding:
    def __init__(self, binder: SessionBinder) -> None:
        self._binder = binder

    def request(self, ctx: Context, facts: RequestFacts) -> None:
        if facts.era is Era.LEGACY:
            facts.credential = credential = self._binder.value(ctx.head.headers)
            facts.tag = self._binder.tag(credential)
