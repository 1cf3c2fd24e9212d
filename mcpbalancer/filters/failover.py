"""The upstream_request filter of the sessions a backend knows by another id than the client's:
one replay failover moved (routing/failover.py), or a sealed id's (routing/sealed.py). Routing sets
`facts.upstream_sid` and `facts.moved`; this filter puts them in the head: the session goes under
the id its backend issued, and, once moved, without the client's Last-Event-ID, whose events the new
backend never issued."""

from __future__ import annotations

from mcpbalancer import protocol
from mcpbalancer.filters.phases import HeadEdits
from mcpbalancer.routing.router import RequestFacts

_MOVED = frozenset({protocol.LAST_EVENT_ID})


class ReplayAlias:
    def upstream_request(self, facts: RequestFacts, edits: HeadEdits) -> None:
        if facts.upstream_sid is not None:
            edits.session_id = facts.upstream_sid
        if facts.moved:
            edits.drop = edits.drop | _MOVED
