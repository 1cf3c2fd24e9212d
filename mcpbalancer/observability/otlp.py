"""The export thread's side of tracing (tracing.py): queued request records -> OpenTelemetry SDK
spans -> one OTLP/HTTP export. This module imports the SDK; tracing.py imports it only when tracing
is enabled, so a proxy without tracing never loads it.

The spans are made with the SDK's own Tracer, so that they are what the SDK would export, with the
ids the request path already chose and sent to the backend (an IdGenerator that hands those out)
and a span processor that keeps the ended spans for the batch. All of it runs on the export thread
only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any, Final, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from mcpbalancer import __version__, protocol
from mcpbalancer.config import TracingConfig
from mcpbalancer.observability.logs import HeadView, SessionHasher
from mcpbalancer.protocol import Era

EXPORT_TIMEOUT = 5.0  # seconds one export (with the exporter's retries) may take
# The bounded scan of a body that is not whole JSON (cut at tracing.SCAN_LIMIT): the first of each.
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,128})"')
_NAME = re.compile(rb'"(name|uri)"\s*:\s*"([^"\\]{1,512})"')
# Mcp-Method -> the attribute its Mcp-Name (or body's params.name / params.uri) is recorded as.
_TARGETS: Final = {
    "tools/call": "gen_ai.tool.name",
    "prompts/get": "gen_ai.prompt.name",
    "resources/read": "mcp.resource.uri",
    "resources/subscribe": "mcp.resource.uri",
    "resources/unsubscribe": "mcp.resource.uri",
}


class _Head(HeadView, Protocol):
    @property
    def http11(self) -> bool: ...
    @property
    def mcp_name(self) -> bytes | None: ...


class Record(Protocol):
    """A finished request as tracing.Span records it (a protocol: tracing.py imports this module)."""

    trace_id: int
    span_id: int
    parent_id: int | None
    start_ns: int
    end_ns: int
    status: int
    outcome: str
    backend: str | None
    service: str
    created: bytes | None
    peer: bytes
    body: bytes | None
    decision: str | None
    store_seconds: float | None

    @property
    def head(self) -> _Head: ...


class Builder:
    def __init__(self, config: TracingConfig, hasher: SessionHasher, exporter: SpanExporter | None) -> None:
        self._hasher = hasher
        self._ids = _ChosenIds()
        self._ended: list[ReadableSpan] = []
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        provider = TracerProvider(
            resource=resource, sampler=ALWAYS_ON, id_generator=self._ids, shutdown_on_exit=False
        )
        provider.add_span_processor(_Collect(self._ended))
        self._tracer = provider.get_tracer("mcpbalancer", __version__)
        self._exporter = exporter or OTLPSpanExporter(
            endpoint=config.endpoint, headers=dict(config.headers), timeout=EXPORT_TIMEOUT
        )
        # The exporter warns on every retry; failed batches are counted and logged as errors anyway.
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").setLevel(logging.ERROR)

    def export(self, records: Sequence[Record]) -> bool:
        for record in records:
            self._build(record)
        spans, self._ended[:] = list(self._ended), []
        return self._exporter.export(spans) is SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def _build(self, record: Record) -> None:
        context = Context()
        if record.parent_id is not None:
            parent = SpanContext(record.trace_id, record.parent_id, is_remote=True, trace_flags=TraceFlags(1))
            context = trace.set_span_in_context(NonRecordingSpan(parent), context)
        self._ids.choose(record.trace_id, record.span_id)
        name, attributes = describe(record, self._hasher)
        span = self._tracer.start_span(
            name, context=context, kind=SpanKind.SERVER, attributes=attributes, start_time=record.start_ns
        )
        if record.status >= 500 or record.outcome == "aborted":
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=max(record.end_ns, record.start_ns))


class _ChosenIds(IdGenerator):
    """Hands out the ids the request path chose (and sent to the backend in traceparent)."""

    def __init__(self) -> None:
        self._trace_id = self._span_id = 0

    def choose(self, trace_id: int, span_id: int) -> None:
        self._trace_id, self._span_id = trace_id, span_id

    def generate_span_id(self) -> int:
        return self._span_id

    def generate_trace_id(self) -> int:
        return self._trace_id


class _Collect(SpanProcessor):
    """Keeps the ended spans for the batch being built."""

    def __init__(self, ended: list[ReadableSpan]) -> None:
        self._ended = ended

    def on_end(self, span: ReadableSpan) -> None:
        self._ended.append(span)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass


def describe(record: Record, hasher: SessionHasher) -> tuple[str, dict[str, Any]]:
    """The span name and attributes of a finished request (OTel HTTP and MCP conventions, then the
    proxy's own under `mcpbalancer.`)."""
    head = record.head
    era = protocol.era_of(head.session_id, head.protocol_version)
    attributes: dict[str, Any] = {
        "http.request.method": head.method.decode("latin-1"),
        "url.path": head.target.partition(b"?")[0].decode("latin-1")[:2048],
        "url.scheme": "http",
        "network.protocol.name": "http",
        "network.protocol.version": "1.1" if head.http11 else "1.0",
        "client.address": record.peer.decode("latin-1"),
    }
    if record.status:
        attributes["http.response.status_code"] = record.status
    if record.status >= 500:
        attributes["error.type"] = str(record.status)
    elif record.outcome in ("aborted", "client_disconnect", "shutdown"):
        attributes["error.type"] = record.outcome
    method, target, request_id = _mcp(record, era)
    if method is not None:
        attributes["mcp.method.name"] = method
        if method == "tools/call":
            attributes["gen_ai.operation.name"] = "execute_tool"
        if target is not None and method in _TARGETS:
            attributes[_TARGETS[method]] = target
    if request_id is not None:
        attributes["jsonrpc.request.id"] = request_id
    if head.protocol_version is not None:
        attributes["mcp.protocol.version"] = head.protocol_version.decode("latin-1").strip()
    sid = head.session_id if head.session_id is not None else record.created
    if sid is not None:
        attributes["mcp.session.id"] = hasher(sid)  # a keyed hash, as in the access log: never the id
    attributes["mcpbalancer.service"] = record.service
    attributes["mcpbalancer.era"] = era.value
    attributes["mcpbalancer.outcome"] = record.outcome
    attributes["mcpbalancer.route.decision"] = _decision(record, era)
    if record.backend is not None:
        attributes["mcpbalancer.backend"] = record.backend
    if record.store_seconds is not None:
        attributes["mcpbalancer.store.duration"] = record.store_seconds
    name = attributes["http.request.method"]
    if method is not None:
        name = f"{method} {target}" if target is not None and method in _TARGETS else method
    return name, attributes


def _decision(record: Record, era: Era) -> str:
    """cache_hit, store_lookup, new_session, stateless, affinity_lookup, replay, or refused (the
    proxy answered before a backend was chosen)."""
    if record.backend is None and record.outcome == "error":
        return "refused"
    if record.decision is not None:
        return record.decision
    if record.head.session_id is not None:
        return "cache_hit"
    return "stateless" if era is Era.MODERN else "new_session"


def _mcp(record: Record, era: Era) -> tuple[str | None, str | None, str | None]:
    """(method, its target, JSON-RPC id): from Mcp-Method and Mcp-Name for a 2026-07-28 request, from
    the bounded scan of the body for a legacy one."""
    head = record.head
    if era is Era.MODERN:
        return _header(head.mcp_method), _header(head.mcp_name), None
    if record.body is None:
        return None, None, None
    return scan_body(record.body)


def _header(value: bytes | None) -> str | None:
    if value is None:
        return None
    try:
        return protocol.decode_header_value(value)[:512]
    except protocol.HeaderEncodingError:
        return None


def scan_body(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(method, params.name or params.uri, id) of a JSON-RPC message (the first of a batch); a body
    cut at SCAN_LIMIT is searched for the first `"method"` and `"name"`/`"uri"` instead."""
    try:
        message = json.loads(body)
    except ValueError:
        method, name = _METHOD.search(body), _NAME.search(body)
        return (
            method[1].decode("utf-8", "replace") if method else None,
            name[2].decode("utf-8", "replace") if name else None,
            None,
        )
    if isinstance(message, list) and message:
        message = message[0]
    if not isinstance(message, dict):
        return None, None, None
    method, params, request_id = message.get("method"), message.get("params"), message.get("id")
    target = None
    if isinstance(params, dict):
        target = params.get("name", params.get("uri"))
    return (
        method if isinstance(method, str) else None,
        target[:512] if isinstance(target, str) else None,
        str(request_id) if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None,
    )
