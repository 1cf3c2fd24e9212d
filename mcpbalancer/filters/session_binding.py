"""The request filters of `bind_sessions`: tag a legacy request with the keyed hash of its bound
credential (routing/binding.py) — a header's value, or the TLS client certificate's subject —
which the router compares with the tag its session was bound with, and which a new session is
bound with."""

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


class ClientCertBinding:
    """`bind_sessions: client_cert`: the tag is of the subject of the connection's verified client
    certificate (read once, when the connection was made). A connection without one is what a
    request without the bound header is to SessionBinding: no tag. There is no credential to send
    again (replay failover), the certificate being the connection's."""

    def __init__(self, binder: SessionBinder) -> None:
        self._binder = binder

    def request(self, ctx: Context, facts: RequestFacts) -> None:
        if facts.era is Era.LEGACY:
            facts.tag = self._binder.tag(ctx.client_subject)
