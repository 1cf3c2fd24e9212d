"""OpenTelemetry traces: one SERVER span per request, exported over OTLP/HTTP in batches.

Two entry points, one per phase of a request, so that the feature registers as a filter:

- `request(head)`, when the request head is routed: reads the client's W3C `traceparent`, decides
  sampling (a sampled parent is followed, an unsampled one never is; a request without one is
  sampled by `sample_ratio` of its new trace id), picks the span's id and rewrites `traceparent` in
  the head so the backend's spans are children of the proxy's. `tracestate` is never touched. An
  unsampled request gets no span and keeps its headers as they came.
- `Span.finish(exchange)`, at the logging phase: takes the few fields the span needs and queues
  it. Nothing else is done on the request path: no span object, no attribute, no JSON.

An export thread turns the queued records into SDK spans (through the SDK's own Tracer, with the
ids chosen above), fills their attributes (the OTel HTTP and MCP conventions; the method and tool of
a legacy request come from a bounded scan of its body, made here, off the request path) and exports
them with the SDK's OTLP/HTTP exporter. The queue is bounded: with the collector down or slow, the
thread waits in the exporter's retries while new records beyond QUEUE_LIMIT are dropped and
counted, so an outage costs bounded memory and no latency. `close()` exports what is left, bounded
in time. The SDK is imported only when tracing is enabled.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Final, Protocol

from mcpbalancer import protocol
from mcpbalancer.config import TracingConfig
from mcpbalancer.observability.logs import HeadView, Named, Peer, SessionHasher
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol import Era

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

TRACEPARENT: Final = b"traceparent"
QUEUE_LIMIT: Final = 2048  # finished spans waiting for the export thread; more are dropped
BATCH: Final = 512  # spans per export request
EXPORT_DELAY: Final = 1.0  # seconds a span may wait for a batch to fill

CLOSE_TIMEOUT: Final = 5.0
SCAN_LIMIT: Final = 4096  # bytes of a legacy request body kept for the method and tool
_ID_MASK: Final = (1 << 64) - 1
# A version-00 traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>. Later versions
# may append fields; their first four are read the same way.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")


class _Head(HeadView, Protocol):
    headers: list[tuple[bytes, bytes, bytes]]

    @property
    def http11(self) -> bool: ...
    @property
    def mcp_name(self) -> bytes | None: ...
    @property
    def has_body(self) -> bool: ...


class TracedExchange(Protocol):
    """What a span reads of its finished exchange (dataplane/exchange.py): a protocol, like the
    access log's AccessRecord, because the data plane calls in here."""

    trace: Span | None
    status: int
    outcome: str
    created: bytes | None
    service: str

    @property
    def head(self) -> _Head: ...
    @property
    def client(self) -> Peer: ...
    @property
    def backend(self) -> Named | None: ...


class Span:
    """One sampled request, as the request path records it: ids, times and references to what the
    export thread reads later. The exchange fills `body` (first chunk of a legacy body), `decision`
    and `store_seconds` where it awaits the store."""

    # Class-level defaults: a span writes only what its request sets (as Exchange does).
    body: bytes | None = None
    wants_body = False
    decision: str | None = None
    store_seconds: float | None = None
    end_ns = 0
    status = 0
    outcome = ""
    backend: str | None = None
    service = ""
    created: bytes | None = None
    peer = b""

    def __init__(self, tracing: Tracing, head: _Head, trace_id: int, parent_id: int | None) -> None:
        self._tracing = tracing
        self.head = head
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = tracing.new_span_id()
        self.start_ns = time.time_ns()
        # Only a legacy request's body names its method: 2026-07-28 requests carry Mcp-Method.
        if head.has_body and protocol.era_of(head.session_id, head.protocol_version) is Era.LEGACY:
            self.wants_body = True

    @property
    def traceparent(self) -> bytes:
        return b"00-%032x-%016x-01" % (self.trace_id, self.span_id)

    def finish(self, exchange: TracedExchange) -> None:
        """The logging phase: the exchange is over; queue the span for export."""
        self.end_ns = time.time_ns()
        self.status, self.outcome, self.service = exchange.status, exchange.outcome, exchange.service
        backend = exchange.backend
        self.backend = backend.name if backend is not None else None
        self.created = exchange.created
        self.peer = exchange.client.peer_ip
        self._tracing.queue(self)


class _Context(Protocol):
    """The exchange as the tracing filter sees it (filters/phases.py's Context, and its span)."""

    trace: Span | None

    @property
    def head(self) -> _Head: ...


class Tracing:
    """The tracing of one proxy, a filter at two phases (filters/phases.py): `request` (the span,
    and the traceparent the backend gets) and `logging` (its end). `start()` the export thread,
    `close()` (blocking, bounded) to flush and stop it."""

    reads_names = True  # Mcp-Name names a 2026-07-28 request's tool: the connection captures it

    def __init__(
        self,
        config: TracingConfig,
        metrics: Metrics,
        *,
        session_key: bytes,
        exporter: SpanExporter | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._ratio_bound = int(config.sample_ratio * (1 << 64))
        self._rng = rng or random.Random(os.urandom(16))
        self._pending: collections.deque[Span] = collections.deque()
        self._wake = threading.Event()
        self._closing = False
        self._exported, self._dropped, self._failed = metrics.trace_spans_children()
        from mcpbalancer.observability.otlp import Builder  # the SDK, imported only when tracing is on

        self._builder = Builder(config, SessionHasher(session_key), exporter)
        self._thread = threading.Thread(target=self._run, name="mcpbalancer-tracing", daemon=True)

    # -- the request path -------------------------------------------------------------------------

    def new_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def request(self, ctx: _Context, facts: object) -> None:
        """The request phase: a span for this request if it is sampled, kept on the exchange."""
        ctx.trace = self.begin(ctx.head)

    def logging(self, ctx: TracedExchange) -> None:
        """The logging phase: the exchange is over; its span is queued for export."""
        span = ctx.trace
        if span is not None:
            span.finish(ctx)

    def begin(self, head: _Head) -> Span | None:
        """A span for this request if it is sampled (its traceparent rewritten), else None."""
        headers = head.headers
        found = [i for i, field in enumerate(headers) if field[0] == TRACEPARENT]
        parent = _parse(headers[found[0]][2]) if len(found) == 1 else None
        if parent is not None:
            trace_id, parent_id, sampled = parent
            if not sampled:
                return None  # the caller decided: forwarded as it came
        else:
            trace_id, parent_id = self._rng.getrandbits(128) or 1, None
            if (trace_id & _ID_MASK) >= self._ratio_bound:
                return None
        span = Span(self, head, trace_id, parent_id)
        for i in reversed(found):  # several traceparent fields are invalid: ours replaces them all
            del headers[i]
        headers.append((TRACEPARENT, TRACEPARENT, span.traceparent))
        return span

    def queue(self, span: Span) -> None:
        pending = self._pending
        if len(pending) >= QUEUE_LIMIT:
            self._dropped.value += 1
            return
        pending.append(span)
        if len(pending) == BATCH:
            self._wake.set()

    # -- the export thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Export what is queued (bounded by `timeout`), then stop. Blocks: call it in a thread."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._builder.shutdown()

    def _run(self) -> None:
        while True:
            self._wake.wait(EXPORT_DELAY)
            self._wake.clear()
            while self._pending:
                self._export_batch()
                if self._closing:
                    break
            if self._closing:
                return

    def _export_batch(self) -> None:
        pending = self._pending
        records = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
        try:
            ok = self._builder.export(records)
        except Exception:  # never let the thread die: the proxy would queue forever
            log.exception("tracing: exporting %d spans failed", len(records))
            ok = False
        (self._exported if ok else self._failed).value += len(records)


def _parse(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid traceparent, else None."""
    found = _TRACEPARENT.match(value.strip())
    if found is None:
        return None
    version, trace, parent, flags, rest = found.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    trace_id, parent_id = int(trace, 16), int(parent, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)
