"""The upstream_request filter of `failover: replay` (routing/failover.py): a session that was
moved to another backend is sent there under the id that backend issued for it, and without the
client's Last-Event-ID, whose events the new backend never issued."""

from __future__ import annotations

from typing import Protocol

from mcpbalancer import protocol
from mcpbalancer.filters.phases import HeadEdits
from mcpbalancer.routing.router import RequestFacts

_MOVED = frozenset({protocol.LAST_EVENT_ID})


class Moves(Protocol):
    """What the filter asks of replay failover (routing/failover.py's ReplayFailover)."""

    def alias(self, sid: str) -> bytes | None: ...
    def moved(self, sid: str) -> bool: ...


class ReplayAlias:
    def __init__(self, failover: Moves) -> None:
        self._failover = failover

    def upstream_request(self, facts: RequestFacts, edits: HeadEdits) -> None:
        sid = facts.session_id
        if sid is None:
            return
        alias = self._failover.alias(sid)
        if alias is not None:
            edits.session_id = alias
        if self._failover.moved(sid):
            edits.drop = edits.drop | _MOVED
