"""One request/response exchange: the per-request context of filters/phases.py, and the order of
the phases of a request's life.

The exchange sits between a ClientConnection (which parsed the request head, ran the
early_request filters and feeds the body) and an UpstreamConnection (which parses the backend's
answer). At its turn it classifies the request, runs the request filters, reads the whole body
first when a request_body filter wants it, then asks the router for the backend (upstream_peer).
The request relay (request_relay.py) takes it from there, the response relay (response_relay.py)
brings the answer back, and endings.py finishes it.

Everything is callbacks; a Task is made only where something must be awaited: a store lookup for a
session not in the local cache, a new backend connection, or a session binding written to a
shared store before the client may see the id.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from mcpbalancer import protocol
from mcpbalancer.dataplane.endings import Endings
from mcpbalancer.dataplane.framing import CONTINUE, LAST_CHUNK, content_length
from mcpbalancer.dataplane.head import RequestHead
from mcpbalancer.dataplane.request_relay import RequestRelay
from mcpbalancer.dataplane.response_relay import ResponseRelay
from mcpbalancer.dataplane.state import ClientSide, ExchangePlane
from mcpbalancer.errors import ProxyError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.routing.router import classify

__all__ = ["ClientSide", "Exchange", "ExchangePlane"]


class Exchange(RequestRelay, ResponseRelay, Endings):
    __slots__ = ()

    def __init__(self, plane: ExchangePlane, client: ClientSide, head: RequestHead) -> None:
        self._defaults()
        self.plane = plane
        self.client = client
        self.head = head
        self.keep_alive = head.keep_alive
        self.received_at = time.perf_counter()
        self._body = []
        self._replay = []
        self._out = []
        failover = plane.router.failover
        if failover is not None:
            if head.session_id is None:
                if (
                    head.method == b"POST"
                    and protocol.era_of(None, head.protocol_version) is protocol.Era.LEGACY
                ):
                    self._capture = []
            elif failover.on_backend_404 and head.method != b"DELETE":
                self._resend = []

    @property
    def streaming(self) -> bool:
        """Relaying an event stream, a response with no end of its own."""
        return self._stream is not None and not self.done

    # -- lifecycle driven by the client connection ------------------------------------------------

    def fail_before_start(self, err: ProxyError) -> None:
        """Answer `err` instead of forwarding, once this exchange's turn comes."""
        self._preset = err

    def preset_answer(self, status: int, answer: bytes) -> None:
        """Answer with these bytes instead of forwarding, once this exchange's turn comes."""
        self._preset_raw = (status, answer)

    def start(self) -> None:
        """This exchange is at the head of its connection's queue: its request phases run."""
        self._turn = True
        if self._preset is not None:
            self._answer_error(self._preset)
            return
        if self._preset_raw is not None:
            self._answer_preset(*self._preset_raw)
            return
        head = self.head
        plane = self.plane
        local = plane.local.get(head.target)
        if local is not None:
            self._serve_local(local)
            return
        phases = plane.phases
        try:
            self.facts = facts = classify(
                head.method,
                head.session_id,
                head.protocol_version,
                head.mcp_method,
                head.mcp_name,
                head.headers,
            )
            if phases.request is not None and (pending := phases.request(self, facts)) is not None:
                self._then(pending, self._filtered)  # a filter must ask something first
                return
        except ProxyError as err:
            self._answer_error(err)
            return
        if head.has_body and phases.wants_body is not None and phases.wants_body(facts):
            self._read_body_first()
            return
        self._route()

    def _filtered(self) -> None:
        """The request filters are done (after one of them waited): the body, then the route."""
        phases = self.plane.phases
        assert self.facts is not None
        if self.head.has_body and phases.wants_body is not None and phases.wants_body(self.facts):
            self._read_body_first()
            return
        self._route()

    def _read_body_first(self) -> None:
        """A request_body filter wants the whole body: read it (bounded by the least body_limit of
        the filters, and by limits.body_bytes), then run them, then route."""
        head, facts = self.head, self.facts
        assert facts is not None
        phases = self.plane.phases
        limit = phases.body_limit(facts) if phases.body_limit is not None else None
        if limit is not None:
            declared = 0 if head.chunked else content_length(head.content_length) or 0
            if max(self._body_bytes, declared) > limit:
                self._too_large()  # it could not be read whole: refused, mostly unread
                return
            self._body_limit = limit
        self._awaiting_body = True
        if head.expect_continue and not self.request_complete:
            self.client.write(CONTINUE)
            head.expect_continue = False
        if self.request_complete:
            self._route_with_body()
        else:
            self.client.resume_reading()  # paused if a filter kept it waiting past REPLAY_LIMIT

    def _then(self, pending: Awaitable[None], then: Callable[[], None]) -> None:
        """Go on with `then` once a filter's `pending` work is done (a ProxyError answers)."""

        async def run() -> None:
            try:
                await pending
            except ProxyError as err:
                self._answer_error(err)
                return
            if not self.done:
                then()

        self._task = self.plane.loop.create_task(run())

    def _route(self) -> None:
        """The upstream_peer phase: the router's decision, at once or after a store lookup."""
        assert self.facts is not None
        try:
            target = self.plane.router.route(self.facts)
        except ProxyError as err:
            self._answer_error(err)
            return
        if isinstance(target, Backend):
            self._use(target)
        else:
            self._await(target, "store_lookup" if self.facts.session_id is not None else "affinity_lookup")

    def _route_with_body(self) -> None:
        """The whole body is here: the request_body filters, then the routing decision."""
        assert self.facts is not None
        self._awaiting_body = False
        if self._body_limit and self._body_bytes > self._body_limit:
            self._too_large()  # it came whole before the bound was checked (under REPLAY_LIMIT)
            return
        check = self.plane.phases.request_body
        if check is not None:
            try:
                pending = check(self, self.facts, b"".join(self._body))
            except ProxyError as err:
                self._answer_error(err)
                return
            if pending is not None:
                self._then(pending, self._route)
                return
        self._route()

    def request_done(self) -> None:
        self.request_complete = True
        if self.done:
            return
        if self._awaiting_body:
            self._route_with_body()
            return
        if self.upstream is not None and self.head.chunked:
            self._send(LAST_CHUNK)
            self._terminated = True

    def request_broken(self, err: ProxyError) -> bool:
        """The rest of the request cannot be parsed: answer `err` (in turn) instead, and end the
        upstream request, which would otherwise wait for a body that never comes. False if this
        exchange is over already."""
        if self.done:
            return False
        self.keep_alive = False
        if self._turn:
            self._answer_error(err)
        else:
            self._body = []
            self._preset = err
        return True

    def client_lost(self) -> None:
        """The client went away: closing the upstream request is the cancellation signal."""
        if self.done:
            return
        stream = self._stream
        if self.cut_by is not None:
            self.outcome = self.cut_by
        elif stream is not None and self._held is None and stream.answered():
            # The client had its whole answer and closed the stream before the backend ended it
            # (the mcp SDK closes right after the response event): delivered, not a disconnect.
            self.outcome = "ok"
        else:
            self.plane.metrics.disconnects.value += 1
            self.outcome = "client_disconnect"
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)
