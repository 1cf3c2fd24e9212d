"""The filter of `session_ids: sealed` (routing/sealed.py): the client holds a token, the backend its
own id.

- upstream_request: routing opened the token (the upstream_peer decision, which needs no store) and
  set `facts.upstream_sid`; the head carries that id instead of the token (and, for a session replay
  failover moved, no Last-Event-ID), as filters/failover.py does.
- session_id: a backend's new session id goes to the client sealed; SessionIdTooLong (502) when it
  does not fit in a session id.

The answers of a session's requests carry the backend's id back as the client's token: the
response relay swaps it, as for every id the upstream_request phase replaced.
"""

from __future__ import annotations

from mcpbalancer.filters.failover import ReplayAlias
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.protocol import Era
from mcpbalancer.routing.router import RequestFacts, Router


class SealedSessions(ReplayAlias):
    def __init__(self, router: Router) -> None:
        super().__init__()
        self._router = router

    def session_id(self, facts: RequestFacts, backend: Backend, session_id: bytes) -> bytes | None:
        if facts.era is not Era.LEGACY:
            return None
        return self._router.seal(facts, backend, session_id)
