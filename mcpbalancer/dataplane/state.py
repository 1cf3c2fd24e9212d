"""The state of one exchange, which its three relays share, and what it needs of the rest.

An exchange is one class (exchange.py) assembled from the parts of a request's life:
`RequestRelay` (request_relay.py: the request to the backend), `ResponseRelay`
(response_relay.py: the answer back) and `Endings` (endings.py: the proxy's own answers and the
end of the exchange). An event stream adds a `StreamRelay` object (stream_relay.py), made only
for a response that is one. Each part is a class over `ExchangeState`, so the parts call each
other as methods of one object: splitting the file added no call to a request.

`ExchangeState` holds the class-level defaults (a new exchange writes only what its request
changes: forty assignments in __init__ were a measurable part of a request's cost) and names the
methods one part calls in another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from mcpbalancer.config import DEFAULT_SERVICE, LimitsConfig, TimeoutsConfig
from mcpbalancer.dataplane.head import RequestHead
from mcpbalancer.dataplane.local import LocalHandler
from mcpbalancer.dataplane.stream_relay import StreamRelay
from mcpbalancer.dataplane.upstream import Output, UpstreamConnection, UpstreamPool
from mcpbalancer.errors import ProxyError
from mcpbalancer.filters.phases import BodyWatcher, HeadEdits, Phases, Ticket
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.logs import new_request_id, request_fields
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.observability.tracing import Span
from mcpbalancer.routing.router import RequestFacts, Router

# Request bytes kept until the first response byte, so a request sent on a keep-alive connection the
# backend had just closed can be sent again on a fresh one. Larger requests are not retried.
REPLAY_LIMIT = 64 * 1024


class ClientSide(Output, Protocol):
    """What an exchange needs of its client connection (client.py's ClientConnection), which makes
    the exchange: a protocol, so that the exchange does not import the connection back."""

    peer_ip: bytes
    client_subject: bytes | None  # a verified TLS client certificate's subject (RFC 4514), else None
    reading: bool  # inside data_received: backend writes wait in held_upstream until it ends
    held_upstream: list[ExchangeState]
    write_paused: bool  # the client's transport buffer is full

    def write(self, data: bytes) -> None: ...
    def write_chunk(self, data: bytes) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def exchange_finished(self, exchange: ExchangeState) -> None: ...
    def rest_timer(self) -> None: ...


class ExchangePlane(Protocol):
    """What an exchange reads of what every connection shares (plane.py's DataPlane)."""

    router: Router
    pools: dict[str, UpstreamPool]
    metrics: Metrics
    phases: Phases  # the configured filters (filters/phases.py)
    local: Mapping[bytes, LocalHandler]  # paths the proxy answers itself
    heartbeat: float
    timeouts: TimeoutsConfig
    limits: LimitsConfig
    loop: asyncio.AbstractEventLoop


class ExchangeState:
    # Slots, not an instance dict: an exchange sets more names over a process's life than a
    # shared-key dict holds (30), so each became a full dict (~830 bytes, and its build).
    __slots__ = (
        "_awaiting_body",
        "_beat",
        "_body",
        "_body_bytes",
        "_body_limit",
        "_capture",
        "_chunked_out",
        "_edits",
        "_held",
        "_held_complete",
        "_held_for",
        "_no_body",
        "_out",
        "_preset",
        "_preset_raw",
        "_replay",
        "_replay_bytes",
        "_request_id",
        "_resend",
        "_retried",
        "_reused",
        "_started",
        "_stream",
        "_task",
        "_terminated",
        "_ticket",
        "_tried",
        "_turn",
        "_until_close",
        "_watcher",
        "backend",
        "client",
        "created",
        "cut_by",
        "done",
        "facts",
        "head",
        "keep_alive",
        "outcome",
        "plane",
        "received_at",
        "request_complete",
        "sent",
        "service",
        "service_missing",
        "status",
        "trace",
        "upstream",
    )

    plane: ExchangePlane
    client: ClientSide
    head: RequestHead
    keep_alive: bool
    received_at: float
    _body: list[bytes]  # request body received before a backend connection exists
    _replay: list[bytes] | None
    _out: list[bytes]  # backend writes held while the client read is handled

    def _defaults(self) -> None:
        """The fields a new exchange starts with (Exchange.__init__)."""
        self.facts: RequestFacts | None = None
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self.done = False
        self.request_complete = False
        self._body_bytes = 0
        self._replay_bytes = 0
        self._retried = False
        self._terminated = False  # the last chunk of a chunked request body was sent
        self._tried: tuple[str, ...] = ()  # backends that refused a connection for this request
        self._started = False  # response head written to the client
        self._held: list[bytes] | None = None  # response bytes held while a binding is stored
        self._chunked_out = False
        self._no_body = False
        self._until_close = False
        self._reused = False
        self._held_complete = False
        self._stream: StreamRelay | None = None  # an event stream being relayed
        self._task: asyncio.Task[None] | None = None
        self._preset: ProxyError | None = None
        self._preset_raw: tuple[int, bytes] | None = None  # (status, whole answer): a CORS preflight
        self._turn = False  # at the head of the client's queue: may write to the client
        self._beat = 0.0  # heartbeat interval of this response; 0 when none may be injected
        # For metrics and the access log.
        self.status = 0  # the status the client was sent; 0 while none
        self.sent = 0  # response body bytes relayed
        self.outcome = "ok"  # or error, aborted, client_disconnect, shutdown, local
        self.cut_by: str | None = None  # the outcome when the proxy closes the client connection (shutdown)
        self.created: bytes | None = None  # the session id a 2xx answer to a request without one minted
        self.service = DEFAULT_SERVICE
        self.service_missing = False  # `services`: none matches this request (answered 404)
        self._request_id: bytes | None = None  # made for an error answer when the client sent none
        self.trace: Span | None = None  # this request's span, set by the tracing filter when sampled
        self._awaiting_body = False  # routing waits for the whole request body (a request_body filter)
        self._watcher: BodyWatcher | None = None  # a response_body filter watching this response
        self._edits: HeadEdits | None = None  # the upstream_request filters' changes to the head sent
        self._body_limit = 0  # a request_body filter's bound on the awaited body (body_limit); 0: none
        self._ticket: Ticket | None = None  # an upstream_peer filter's hold on the backend (max_in_flight)
        self._held_for: Backend | None = None  # the backend the upstream_peer filter was asked about
        # Replay failover: the body of a legacy request without a session (an initialize, if it
        # binds one), and with `replay_on: [backend_404]` a session request's body, to send again
        # once the session is replayed.
        self._capture: list[bytes] | None = None
        self._resend: list[bytes] | None = None

    @property
    def peer_ip(self) -> bytes:
        """The client's address, for the filters (filters/phases.py Context)."""
        return self.client.peer_ip

    @property
    def client_subject(self) -> bytes | None:
        """The subject of the connection's verified TLS client certificate, for the filters."""
        return self.client.client_subject

    @property
    def request_id(self) -> bytes | None:
        """The client's X-Request-Id (kept), or the one made for this exchange's error answer."""
        return self._request_id if self._request_id is not None else self.head.request_id

    def log_fields(self) -> dict[str, str]:
        """`extra=` of a log line about this request: its service and request id (made now if the
        client sent none, so that the error answer that follows carries the same one)."""
        if self.request_id is None:
            self._request_id = new_request_id()
        return request_fields(self.service, self.request_id)

    # Called across the parts (each is defined in exactly one of them).
    def _use(self, backend: Backend) -> None:
        raise NotImplementedError

    def _then(self, pending: Awaitable[None], then: Callable[[], None]) -> None:
        raise NotImplementedError

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _retry_fresh(self) -> None:
        raise NotImplementedError

    def _tls_failed(self, backend: Backend, problem: str, *, connecting: bool) -> None:
        raise NotImplementedError

    def flush_upstream(self) -> None:
        raise NotImplementedError

    # The upstream connection's ResponseSink (upstream.py), which the response relay implements.
    def response_begun(self) -> None:
        raise NotImplementedError

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError

    def response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def response_done(self) -> None:
        raise NotImplementedError

    def response_timeout(self) -> None:
        raise NotImplementedError

    def upstream_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def upstream_writable(self, writable: bool) -> None:
        raise NotImplementedError

    def _upstream_failed(self, kind: str) -> None:
        raise NotImplementedError

    def _answer_error(self, err: ProxyError) -> None:
        raise NotImplementedError

    def _await(self, awaitable: Awaitable[Backend], decision: str) -> None:
        raise NotImplementedError

    def _abort_client(self) -> None:
        raise NotImplementedError

    def _finish(self, reusable: bool) -> None:
        raise NotImplementedError

    def _too_large(self) -> None:
        raise NotImplementedError
