"""The upstream_request filter of the sessions a backend knows by another id than the client's:
one replay failover moved (routing/failover.py), or a sealed id's (routing/sealed.py). Routing sets
`facts.upstream_sid` and `facts.moved`; this filter puts them in the head: the session goes under
the id its backend issued, and, once moved, without the client's Last-Event-ID, whose events the new
backend never issued."""

from __future__ import annotations

from typing import Final

from mcpbalancer import protocol
from mcpbalancer.filters.phases import HeadEdits
from mcpbalancer.routing.router import RequestFacts

_MOVED: Final = frozenset({protocol.LAST_EVENT_ID})
_ONLY_MOVED: Final = HeadEdits(drop=_MOVED)
_KEPT: Final = 10_000  # sessions whose edits are kept, made once and handed out to each request


class ReplayAlias:
    def __init__(self) -> None:
        self._kept: dict[bytes, HeadEdits] = {}
        self._moved: dict[bytes, HeadEdits] = {}

    def upstream_edits(self, facts: RequestFacts) -> HeadEdits | None:
        """One HeadEdits per session (and move), reused: no object made per request."""
        sid = facts.upstream_sid
        if sid is None:
            return _ONLY_MOVED if facts.moved else None
        made = self._moved if facts.moved else self._kept
        edits = made.get(sid)
        if edits is None:
            edits = HeadEdits(session_id=sid, drop=_MOVED if facts.moved else frozenset())
            if len(made) >= _KEPT:
                del made[next(iter(made))]
            made[sid] = edits
        return edits
