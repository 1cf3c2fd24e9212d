"""Every Prometheus metric of mcpbalancer, in one object built on an injected registry.

The names and labels are the interface operators build dashboards on (docs/monitoring.md). Labels
are bounded: backend, era, HTTP method, status class, MCP method from a fixed list, reason, result,
kind, op — never a session id, tool name, URI or task id.

The data plane calls in here once or twice per request, so the hot methods do O(1) work and never
resolve labels: a label child is looked up once, kept in a dict keyed by the raw values the data
plane already holds, and reused. The children are plain cells, not prometheus_client's metric
classes: those take a lock per update (about 0.4 µs per counter increment and 0.9 µs per histogram
observation here, 4% of a relayed request's CPU), and everything that touches these cells runs on
the one event loop, scrapes included. The registry and the exposition are prometheus_client's.
Backend state (up, draining, sessions) is not pushed at all: a collector reads the live Backend
objects when Prometheus scrapes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Generic, NamedTuple, Protocol, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from mcpbalancer import __version__
from mcpbalancer.config.models import DEFAULT_SERVICE
from mcpbalancer.protocol import Era

EXPOSITION_CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# The backend label of requests the proxy answered itself (unknown session, no backend, bad request).
NO_BACKEND: Final = "none"
OTHER: Final = "other"

# Time to response head: sub-millisecond relays up to tool calls that answer after minutes.
REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip
# SSE responses live from a tool call's milliseconds to a client's whole working day.
STREAM_BUCKETS: Final = (0.1, 1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 8 * 3600, 24 * 3600)
# Redis round trips; the store gives up after its op timeout (0.25 s by default).
STORE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

SESSION_END_REASONS: Final = ("delete", "expired", "backend_lost", "backend_404", "backend_restarted")
# Sealed session ids (session_ids: sealed): tokens issued, opened (a local cache miss), or refused.
SEALED_RESULTS: Final = ("issued", "opened", "malformed", "unknown_key", "invalid", "expired", "too_long")
FAILOVER_RESULTS: Final = ("moved", "failed")
LOOKUP_RESULTS: Final = ("cache_hit", "store_hit", "miss")
UPSTREAM_ERROR_KINDS: Final = ("connect", "reset", "timeout", "tls")
AFFINITY_KINDS: Final = ("tasks", "request_state")
AFFINITY_RESULTS: Final = ("hit", "miss")
DISCOVERY_RESULTS: Final = ("ok", "empty", "error")
# Why a TLS handshake on a listener failed: a protocol fault (plain HTTP to the TLS port, no common
# version or cipher, garbage), a certificate refused (none where one is required, an unknown CA),
# not done within limits.head_timeout, the client closed during it, anything else.
TLS_FAILURE_REASONS: Final = ("protocol", "certificate", "timeout", "closed", "other")
# Why the proxy refused a request (or a connection) instead of forwarding it.
REJECT_REASONS: Final = (
    "framing",  # unparseable or ambiguous HTTP: CL+TE, bad lengths or chunks, obs-fold, control bytes
    "version",  # not HTTP/1.0 or 1.1, or Transfer-Encoding on HTTP/1.0
    "host",  # HTTP/1.1 without Host, several Host fields, absolute-form for another host
    "host_not_allowed",  # a Host not in allowed_hosts (DNS rebinding, or a name to add to the list)
    "method",  # CONNECT
    "session_id",  # a malformed Mcp-Session-Id, or conflicting Mcp-Session-Id fields
    "mcp_name",  # conflicting Mcp-Name fields on a 2026-07-28 request
    "header_limit",  # header_bytes, header_count
    "body_limit",  # body_bytes
    "origin",  # Origin not allowed
    "connections",  # limits.connections reached
    "head_timeout",  # the request head did not arrive within limits.head_timeout
    "credential",  # a bound session used with another credential (answered 404)
    "rule",  # a `deny:` routing rule
    "header_encoding",  # a routing header's =?base64?...?= value does not decode
    "strict",  # validate_headers: Mcp-Method/Mcp-Name disagree with the body, or it is not JSON-RPC
    "auth",  # auth: no credential, or an invalid one (401)
    "scope",  # auth: a credential without a required scope (403)
    "tool_policy",  # a tool_policy rule denied the tool called (403)
    "rate_limit",  # a rate_limits bucket was empty (429)
    "backend_busy",  # a backend's max_in_flight stayed full for its queue_timeout (503)
    "call_body",  # a legacy body read for its tool calls is not JSON, or names a key twice (400)
    "no_service",  # `services`: no service matches the request's Host and path (404)
)
# How requests fared with `auth`: cached (a token verified before, until its expiry), verified (its
# signature checked now), key (an API key), public (a public path), and the refusals.
AUTH_RESULTS: Final = ("cached", "verified", "key", "public", "missing", "invalid", "scope", "unavailable")
JWKS_RESULTS: Final = ("ok", "error")
# What an admin request asked for (a route's name on the admin listener), and how it ended.
ADMIN_ACTIONS: Final = (
    "backends",
    "drain",
    "undrain",
    "reload",
    "status",
    "services",
    "service_drain",
    "service_undrain",
    "other",
)
ADMIN_OUTCOMES: Final = (
    "ok",  # done (with workers: by every worker serving)
    "unauthorized",  # no token, or a wrong one (401)
    "not_found",  # an unknown backend (404)
    "invalid",  # a reload of an invalid file (400)
    "restart_required",  # a reload of a file that changes a restart-only setting (409)
    "failed",  # with workers: a worker did not answer or did not apply it (502), or none serves (503)
)
_HTTP_METHODS: Final = frozenset({"GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"})

# JSON-RPC methods of the MCP revisions 2025-03-26 … 2026-07-28; anything else is counted as "other".
MCP_METHODS: Final = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "sampling/createMessage",
        "elicitation/create",
        "roots/list",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/update",
        "tasks/cancel",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/message",
        "notifications/roots/list_changed",
        "notifications/resources/list_changed",
        "notifications/resources/updated",
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/elicitation/complete",
        "notifications/tasks/status",
    }
)


# --- cells: the children of the metric families ---------------------------------------------------


class Value:
    """A counter or gauge child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Observations:
    """A histogram child: per-bucket counts (not cumulative; the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: `le`
        self.sum += amount


_C = TypeVar("_C", Value, Observations)


class _Family(Generic[_C]):
    """One metric family on the registry; `labels(...)` creates a child, once per label values."""

    def __init__(self, registry: CollectorRegistry, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labels)
        self._children: dict[tuple[str, ...], _C] = {}
        if not self.labelnames:
            self.labels()  # a family without labels is exported from zero
        registry.register(self)

    def labels(self, *values: str) -> _C:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child

    def drop(self, index: int, value: str) -> None:
        """Remove the children whose label number `index` is `value`."""
        for values in [v for v in self._children if v[index] == value]:
            del self._children[values]

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for values, child in self._children.items():
            self._add(family, values, child)
        return [family]

    def _new(self) -> _C:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, values: tuple[str, ...], child: _C) -> None:
        raise NotImplementedError


class _Counter(_Family[Value]):
    def _new(self) -> Value:
        return Value()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: Value) -> None:
        family.add_metric(values, child.value)  # type: ignore[attr-defined]


class _Gauge(_Family[Value]):
    def _new(self) -> Value:
        return Value()

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: Value) -> None:
        family.add_metric(values, child.value)  # type: ignore[attr-defined]


class _Histogram(_Family[Observations]):
    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [*(repr(b) for b in self.bounds), "+Inf"]  # Prometheus spells bounds like Go
        super().__init__(registry, name, doc, labels)

    def _new(self) -> Observations:
        return Observations(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: Observations) -> None:
        cumulative, buckets = 0, []
        for le, count in zip(self._le, child.counts, strict=True):
            cumulative += count
            buckets.append((le, float(cumulative)))
        family.add_metric(values, buckets, child.sum)  # type: ignore[attr-defined]


# --- the metrics -----------------------------------------------------------------------------------

_ResponseKey = tuple[str, Era, bytes, int]


class Traffic(NamedTuple):
    """Metrics.traffic(): totals since start, and the streams open now."""

    requests: float
    errors: float  # 5xx answers, the backends' and the proxy's own
    durations: tuple[int, ...]  # time-to-head observations per REQUEST_BUCKETS bucket (+Inf last)
    duration_sum: float
    streams: float


class Metrics:
    """The metrics of one proxy. `backends` returns the live Backend objects; it is called at every
    scrape, so a reloaded backend list shows up without re-registering anything. Not thread-safe:
    update and scrape from the event loop that runs the proxy."""

    def __init__(
        self,
        registry: CollectorRegistry,
        backends: Callable[[], Iterable[LiveBackend]] = tuple,
        *,
        version: str = __version__,
        runtime: bool = False,
    ) -> None:
        self.registry = registry
        # The service a backend belongs to (app.py sets it with `services`); a name the proxy never
        # had is the default service's, as is the proxy's own answer outside any service.
        self.service_of: Callable[[str], str] = _default_service
        self._define(registry)
        registry.register(_BackendState(backends))
        if runtime:
            # Process CPU, memory and fds, the Python version, GC: what every exporter shows.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.build_info.labels(version).value = 1
        self._resolve()

    def _define(self, r: CollectorRegistry) -> None:
        self.requests = _Counter(
            r,
            "mcpbalancer_requests_total",
            "Requests answered, by backend ('none': answered by the proxy), era, HTTP method, status class, "
            "service.",
            ("backend", "era", "method", "code", "service"),
        )
        self.request_duration = _Histogram(
            r,
            "mcpbalancer_request_duration_seconds",
            "Time from the request head to the backend's response head.",
            ("backend", "era", "service"),
            buckets=REQUEST_BUCKETS,
        )
        self.mcp_requests = _Counter(
            r,
            "mcpbalancer_mcp_requests_total",
            "POST requests by JSON-RPC method from the Mcp-Method header ('other': unknown or absent).",
            ("era", "mcp_method"),
        )
        self.sessions_created = _Counter(
            r, "mcpbalancer_sessions_created_total", "Sessions bound to a backend.", ("backend",)
        )
        self.sessions_ended = _Counter(
            r, "mcpbalancer_sessions_ended_total", "Sessions forgotten, by reason.", ("reason",)
        )
        self.session_failovers = _Counter(
            r,
            "mcpbalancer_session_failovers_total",
            "Replay failovers of sessions whose owner was gone: moved to a live backend, or failed (404).",
            ("result",),
        )
        self.sealed_ids = _Counter(
            r,
            "mcpbalancer_sealed_ids_total",
            "Sealed session ids: issued, opened (not in the local cache), or refused with 404 (malformed, "
            "unknown_key, invalid: tampered or another service's, expired: older than session_max_age); "
            "too_long: a backend id too long to seal (502).",
            ("result",),
        )
        self.managed_exits = _Counter(
            r,
            "mcpbalancer_managed_exits_total",
            "Managed backend processes that exited after they had started (each is started again).",
            ("backend",),
        )
        self.session_lookups = _Counter(
            r,
            "mcpbalancer_session_lookups_total",
            "Session id lookups: answered by the local map, by the shared store, or not found.",
            ("result",),
        )
        self.sse_streams_active = _Gauge(
            r, "mcpbalancer_sse_streams_active", "Open text/event-stream responses.", ("backend",)
        )
        self.sse_heartbeats = _Counter(
            r, "mcpbalancer_sse_heartbeats_total", "': ping' comments written on silent SSE streams."
        )
        self.sse_stream_duration = _Histogram(
            r,
            "mcpbalancer_sse_stream_duration_seconds",
            "Lifetime of text/event-stream responses, from response head to end.",
            buckets=STREAM_BUCKETS,
        )
        self.health_checks = _Counter(
            r, "mcpbalancer_health_checks_total", "Active health checks by result.", ("backend", "result")
        )
        self.store_operations = _Counter(
            r,
            "mcpbalancer_store_operations_total",
            "Operations on the shared session store, by result (ok, error).",
            ("op", "result"),
        )
        self.store_latency = _Histogram(
            r,
            "mcpbalancer_store_latency_seconds",
            "Latency of shared session store operations.",
            ("op",),
            buckets=STORE_BUCKETS,
        )
        self.upstream_errors = _Counter(
            r,
            "mcpbalancer_upstream_errors_total",
            "Backend failures: connect (refused, unreachable), reset (closed or broken before the end of "
            "the response), timeout (connect, response head, stream idle), tls (handshake or certificate).",
            ("backend", "kind"),
        )
        self.client_disconnects = _Counter(
            r, "mcpbalancer_client_disconnects_total", "Clients that went away before their response ended."
        )
        self.route_rule_hits = _Counter(
            r,
            "mcpbalancer_route_rule_hits_total",
            "2026-07-28 requests matched by a routing rule: its index in `routes`, or 'deny'.",
            ("rule",),
        )
        self.affinity_lookups = _Counter(
            r,
            "mcpbalancer_affinity_lookups_total",
            "Affinity lookups (kind: tasks, request_state) by result (hit, miss).",
            ("kind", "result"),
        )
        self.rejected_requests = _Counter(
            r,
            "mcpbalancer_rejected_requests_total",
            "Requests and connections the proxy refused instead of forwarding, by reason.",
            ("reason",),
        )
        self.store_degraded_state = _Gauge(
            r,
            "mcpbalancer_store_degraded",
            "1 while the shared session store fails: known sessions route from the local cache, new ones "
            "are bound locally (on_store_error: degrade) or refused (fail).",
        )
        self.store_resynced_sessions = _Counter(
            r,
            "mcpbalancer_store_resynced_sessions_total",
            "Sessions re-asserted (SET NX) to the shared store after an outage or a loss of its data.",
        )
        self._define_access(r)
        self.trace_spans = _Counter(
            r,
            "mcpbalancer_trace_spans_total",
            "Spans of sampled requests (tracing): exported, failed (the collector refused or did not "
            "answer), dropped (the export queue was full).",
            ("result",),
        )
        self.discovery_lookups = _Counter(
            r,
            "mcpbalancer_discovery_lookups_total",
            "DNS lookups of `discover` entries, by result: ok (addresses), empty (none: the last known "
            "backends are kept), error (no answer: kept too).",
            ("entry", "result"),
        )
        self.discovery_backends = _Gauge(
            r,
            "mcpbalancer_discovery_backends",
            "Addresses in the last answer with addresses of a `discover` entry.",
            ("entry",),
        )
        self.discovery_stale = _Gauge(
            r,
            "mcpbalancer_discovery_stale",
            "1 while the last lookup of a `discover` entry failed or was empty; its last known backends "
            "are kept.",
            ("entry",),
        )
        self.admin_requests = _Counter(
            r,
            "mcpbalancer_admin_requests_total",
            "Requests to the admin API (and the status page), by action and outcome.",
            ("action", "outcome"),
        )
        self.build_info = _Gauge(
            r, "mcpbalancer_build_info", "Always 1; the version is a label.", ("version",)
        )
        self.tls_handshake_failures = _Counter(
            r,
            "mcpbalancer_tls_handshake_failures_total",
            "TLS handshakes on a listener that failed, by reason: protocol, certificate, timeout, closed, "
            "other.",
            ("reason",),
        )
        self.tls_certificate_expiry = _Gauge(
            r,
            "mcpbalancer_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate a TLS listener (its address as configured) serves, in seconds "
            "since the epoch.",
            ("listener",),
        )

    def _define_access(self, r: CollectorRegistry) -> None:
        """The families of auth, tool_policy, rate_limits and the backends' max_in_flight."""
        self.auth_requests = _Counter(
            r,
            "mcpbalancer_auth_requests_total",
            "Requests checked by auth, by result: cached, verified, key, public; missing, invalid, scope "
            "(refused); unavailable (no key set to check a token with).",
            ("result",),
        )
        self.jwks_refreshes = _Counter(
            r,
            "mcpbalancer_jwks_refreshes_total",
            "Fetches of the authorization server's key set (jwks_url), by result (ok, error).",
            ("result",),
        )
        self.tool_policy_decisions = _Counter(
            r,
            "mcpbalancer_tool_policy_decisions_total",
            "Tool calls decided by tool_policy: the rule's index ('default': no rule matched), and the "
            "decision (allow, deny).",
            ("rule", "decision"),
        )
        self.rate_limited = _Counter(
            r,
            "mcpbalancer_rate_limited_total",
            "Requests refused (429) by a rate limit: the index of its rule in `rate_limits`.",
            ("rule",),
        )
        self.rate_limit_local = _Counter(
            r,
            "mcpbalancer_rate_limit_local_total",
            "Requests counted by this proxy's own buckets because the shared (Redis) buckets failed.",
        )
        self.rate_limit_degraded_state = _Gauge(
            r,
            "mcpbalancer_rate_limit_degraded",
            "1 while the shared rate-limit buckets fail and every proxy counts on its own.",
        )
        self.queue_timeouts = _Counter(
            r,
            "mcpbalancer_backend_queue_timeouts_total",
            "Requests answered 503 because the backend's max_in_flight stayed full for queue_timeout.",
            ("backend",),
        )

    def _resolve(self) -> None:
        """The children the hot path uses, resolved once."""
        self.lookup_cache_hit, self.lookup_store_hit, self.lookup_miss = (
            self.session_lookups.labels(result) for result in LOOKUP_RESULTS
        )
        self.heartbeats = self.sse_heartbeats.labels()
        self.disconnects = self.client_disconnects.labels()
        self._stream_durations = self.sse_stream_duration.labels()
        self._streams: dict[str, Value] = {}  # sse_streams_active by backend, resolved once each
        self._ended = {reason: self.sessions_ended.labels(reason) for reason in SESSION_END_REASONS}
        self._failovers = {result: self.session_failovers.labels(result) for result in FAILOVER_RESULTS}
        self.sealed = {result: self.sealed_ids.labels(result) for result in SEALED_RESULTS}
        self.store_degraded = self.store_degraded_state.labels()
        self.store_resynced = self.store_resynced_sessions.labels()
        self._rejected = {reason: self.rejected_requests.labels(reason) for reason in REJECT_REASONS}
        self._tls_failures: dict[str, Value] = {}
        self.auth = {result: self.auth_requests.labels(result) for result in AUTH_RESULTS}
        self.jwks = {result: self.jwks_refreshes.labels(result) for result in JWKS_RESULTS}
        self.rate_local = self.rate_limit_local.labels()
        self.rate_degraded = self.rate_limit_degraded_state.labels()
        self._responses: dict[_ResponseKey, tuple[Value, Observations | None]] = {}
        self._mcp: dict[tuple[Era, bytes], Value] = {}
        self._mcp_other = {era: self.mcp_requests.labels(era.value, OTHER) for era in Era}
        self.affinity = {
            (kind, result): self.affinity_lookups.labels(kind, result)
            for kind in AFFINITY_KINDS
            for result in AFFINITY_RESULTS
        }

    def trace_spans_children(self) -> tuple[Value, Value, Value]:
        """The exported, dropped and failed counters of the tracing (exported from zero once asked
        for: a proxy without tracing has no such series)."""
        exported, dropped, failed = (self.trace_spans.labels(r) for r in ("exported", "dropped", "failed"))
        return exported, dropped, failed

    def rule_hits(self, label: str) -> Value:
        """The counter child of one routing rule, for the router to resolve once per rule."""
        return self.route_rule_hits.labels(label)

    # -- per request (hot) --------------------------------------------------------------------------

    def answered(
        self,
        backend: str,
        era: Era,
        method: bytes,
        status: int,
        mcp_method: bytes | None,
        seconds: float | None,
    ) -> None:
        """A response status was decided: the backend's, `seconds` after the request head, or the
        proxy's own (`backend` NO_BACKEND, `seconds` None). A backend's series name its service
        (`service_of`, asked once per cell)."""
        key = (backend, era, method, status // 100)
        children = self._responses.get(key)
        if children is None:
            children = self._response_children(key)
        counter, histogram = children
        counter.value += 1
        if seconds is not None and histogram is not None:  # Observations.observe, written out
            histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
            histogram.sum += seconds
        if method == b"POST":
            mcp = self._mcp.get((era, mcp_method)) if mcp_method is not None else None
            (mcp or self._mcp_child(era, mcp_method)).value += 1

    def answered_by_proxy(
        self, backend: str, era: Era, method: bytes, status: int, mcp_method: bytes | None, service: str
    ) -> None:
        """The proxy's own answer (`backend` NO_BACKEND unless one was chosen) to a request of
        `service`: counted under that service, which no backend names."""
        if backend == NO_BACKEND and service != DEFAULT_SERVICE:
            backend = f"{NO_BACKEND}/{service}"  # a cell of its own, labelled backend="none"
        self.answered(backend, era, method, status, mcp_method, None)

    def _response_children(self, key: _ResponseKey) -> tuple[Value, Observations | None]:
        backend, era, raw_method, status_class = key
        method = raw_method.decode("latin-1")
        method = method if method in _HTTP_METHODS else OTHER
        code = f"{status_class}xx" if 1 <= status_class <= 5 else OTHER
        backend, _, service = backend.partition("/")  # "none/<service>": the proxy's, in a service
        service = service or self.service_of(backend)
        counter = self.requests.labels(backend, era.value, method, code, service)
        histogram = (
            None if backend == NO_BACKEND else self.request_duration.labels(backend, era.value, service)
        )
        children = self._responses[key] = (counter, histogram)
        return children

    def _mcp_child(self, era: Era, raw: bytes | None) -> Value:
        name = raw.decode("latin-1") if raw is not None else OTHER
        if name not in MCP_METHODS:
            return self._mcp_other[era]  # not cached: the raw value is the client's to choose
        assert raw is not None
        child = self._mcp[(era, raw)] = self.mcp_requests.labels(era.value, name)
        return child

    def stream_started(self, backend: str) -> None:
        (self._streams.get(backend) or self._streams_child(backend)).value += 1

    def stream_ended(self, backend: str, seconds: float) -> None:
        (self._streams.get(backend) or self._streams_child(backend)).value -= 1
        durations = self._stream_durations
        durations.counts[bisect_left(durations.bounds, seconds)] += 1
        durations.sum += seconds

    def _streams_child(self, backend: str) -> Value:
        child = self._streams[backend] = self.sse_streams_active.labels(backend)
        return child

    # -- events -------------------------------------------------------------------------------------

    def session_created(self, backend: str) -> None:
        self.sessions_created.labels(backend).value += 1

    def session_ended(self, reason: str) -> None:
        """`reason` is one of SESSION_END_REASONS."""
        self._ended[reason].value += 1

    def session_failover(self, result: str) -> None:
        """`result` is one of FAILOVER_RESULTS."""
        self._failovers[result].value += 1

    def managed_exit(self, backend: str) -> None:
        self.managed_exits.labels(backend).value += 1

    def rejected(self, reason: str) -> None:
        """`reason` is one of REJECT_REASONS."""
        self._rejected[reason].value += 1

    def tls_listening(self) -> None:
        """A TLS listener serves: its failure series exist from zero (a plain proxy has none)."""
        if not self._tls_failures:
            self._tls_failures = {r: self.tls_handshake_failures.labels(r) for r in TLS_FAILURE_REASONS}

    def tls_handshake_failed(self, reason: str) -> None:
        """`reason` is one of TLS_FAILURE_REASONS (tls_listening was called)."""
        self._tls_failures[reason].value += 1

    def upstream_error(self, backend: str, kind: str) -> None:
        """`kind` is one of UPSTREAM_ERROR_KINDS."""
        self.upstream_errors.labels(backend, kind).value += 1

    def store_operation(self, op: str, ok: bool, seconds: float) -> None:
        self.store_operations.labels(op, "ok" if ok else "error").value += 1
        self.store_latency.labels(op).observe(seconds)

    def admin_request(self, action: str, outcome: str) -> None:
        """`action` one of ADMIN_ACTIONS, `outcome` one of ADMIN_OUTCOMES."""
        self.admin_requests.labels(action, outcome).value += 1

    def health_check(self, backend: str, result: str) -> None:
        """For the active health checker; `result` from a small fixed set (e.g. ok, fail, timeout)."""
        self.health_checks.labels(backend, result).value += 1

    # -- reading back (the status page) ------------------------------------------------------------

    def traffic(self) -> Traffic:
        """Totals since start over every label: requests, 5xx answers, the time-to-head histogram,
        and the event streams open now. Off the hot path: it walks the children."""
        requests = errors = 0.0
        for (_, _, _, code, _), child in self.requests._children.items():
            requests += child.value
            if code == "5xx":
                errors += child.value
        counts = [0] * (len(REQUEST_BUCKETS) + 1)
        total = 0.0
        for histogram in self.request_duration._children.values():
            counts = [a + b for a, b in zip(counts, histogram.counts, strict=True)]
            total += histogram.sum
        streams = sum(child.value for child in self.sse_streams_active._children.values())
        return Traffic(requests, errors, tuple(counts), total, streams)

    def discovery_lookup(self, entry: str, result: str, backends: int, *, stale: bool) -> None:
        """One lookup of a `discover` entry; `result` is one of DISCOVERY_RESULTS."""
        self.discovery_lookups.labels(entry, result).value += 1
        self.discovery_backends.labels(entry).value = backends
        self.discovery_stale.labels(entry).value = 1 if stale else 0

    def forget(self, label: str, value: str) -> None:
        """Drop every series whose `label` is `value`: a discovered backend that left for good, a
        `discover` entry removed by a reload. Backends come and go with DNS; their series must not
        pile up."""
        for family in self._families():
            if label in family.labelnames:
                family.drop(family.labelnames.index(label), value)
        if label == "backend":
            for key in [key for key in self._responses if key[0] == value]:
                del self._responses[key]
            self._streams.pop(value, None)

    def forget_services(self) -> None:
        """The backends' services changed (a reload of `services`): their cells are looked up anew
        (the series already counted stay under the service they were counted for)."""
        self._responses.clear()

    def _families(self) -> list[_Family[Any]]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    # -- exposition ---------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (EXPOSITION_CONTENT_TYPE)."""
        return generate_latest(self.registry)


def _default_service(backend: str) -> str:
    return DEFAULT_SERVICE


class LiveBackend(Protocol):
    """What the backend gauges read of a backend (fleet/backends.py's Backend)."""

    @property
    def name(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def sessions(self) -> int: ...
    @property
    def calls(self) -> int: ...
    @property
    def streams(self) -> int: ...
    @property
    def queued(self) -> int: ...


class _BackendState:
    """backend_up, backend_draining, sessions_active and the in-flight counts, read from the live
    Backend objects."""

    def __init__(self, backends: Callable[[], Iterable[LiveBackend]]) -> None:
        self._backends = backends

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        families = self._families()
        up, draining, sessions, calls, streams, queued = families
        for backend in self._backends():
            up.add_metric([backend.name], 1 if backend.up else 0)
            draining.add_metric([backend.name], 1 if backend.draining else 0)
            sessions.add_metric([backend.name], backend.sessions)
            calls.add_metric([backend.name], backend.calls)
            streams.add_metric([backend.name], backend.streams)
            queued.add_metric([backend.name], backend.queued)
        return list(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["backend"])

        return (
            gauge("mcpbalancer_backend_up", "1 when the backend is considered up."),
            gauge("mcpbalancer_backend_draining", "1 when the backend takes no new sessions."),
            gauge(
                "mcpbalancer_sessions_active",
                "Sessions this proxy bound to the backend and has not seen end.",
            ),
            gauge(
                "mcpbalancer_backend_calls_in_flight",
                "Requests holding one of the backend's max_in_flight slots (backends with a limit).",
            ),
            gauge(
                "mcpbalancer_backend_streams_open",
                "GET event streams open to the backend, counted apart from max_in_flight.",
            ),
            gauge(
                "mcpbalancer_backend_queued",
                "Requests waiting for one of the backend's max_in_flight slots.",
            ),
        )
