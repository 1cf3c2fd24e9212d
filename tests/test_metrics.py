"""The observability parts without sockets: Metrics, the store wrapper, readiness, the access log
and logging formats, and their configuration. End-to-end behaviour is in test_observability.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mcpbalancer import __version__
from mcpbalancer.config import ConfigError, LogConfig, MetricsConfig, parse_config
from mcpbalancer.control.probes import Readiness, Verdict
from mcpbalancer.errors import StoreError
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.observability.logs import (
    ATOMIC_CHARS,
    AccessLog,
    JsonFormatter,
    SessionHasher,
    access_enabled,
    configure_logging,
)
from mcpbalancer.observability.metrics import NO_BACKEND, Metrics
from mcpbalancer.protocol import Era
from mcpbalancer.routing.balancer import LeastSessions
from mcpbalancer.routing.router import Router, classify
from mcpbalancer.store.instrumented import InstrumentedStore
from mcpbalancer.store.memory import MemoryStore
from tests.mcp_helpers import wait_until

LEGACY, MODERN = Era.LEGACY, Era.MODERN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


# --- Metrics -----------------------------------------------------------------------------------------


def test_answers_are_counted_by_backend_era_method_and_class(metrics: Metrics) -> None:
    metrics.answered("a", LEGACY, b"POST", 200, None, 0.003)
    metrics.answered("a", LEGACY, b"POST", 202, None, 0.0002)
    metrics.answered("a", MODERN, b"POST", 404, b"tools/call", 0.02)
    metrics.answered(NO_BACKEND, LEGACY, b"DELETE", 404, None, None)
    metrics.answered("a", LEGACY, b"PROPFIND", 599, None, 1.0)
    metrics.answered("a", LEGACY, b"GET", 999, None, 1.0)

    def requests(backend: str, era: str, method: str, code: str) -> float | None:
        labels = {"backend": backend, "era": era, "method": method, "code": code, "service": "default"}
        return sample(metrics, "mcpbalancer_requests_total", **labels)

    assert requests("a", "legacy", "POST", "2xx") == 2
    assert requests("a", "modern", "POST", "4xx") == 1
    assert requests("none", "legacy", "DELETE", "4xx") == 1
    assert requests("a", "legacy", "other", "5xx") == 1  # methods and classes are bounded
    assert requests("a", "legacy", "GET", "other") == 1

    def bucket(le: str) -> float | None:
        labels = {"backend": "a", "era": "legacy", "le": le, "service": "default"}
        return sample(metrics, "mcpbalancer_request_duration_seconds_bucket", **labels)

    assert (bucket("0.0005"), bucket("0.0025"), bucket("0.005"), bucket("+Inf")) == (1, 1, 2, 4)
    duration = sample(
        metrics, "mcpbalancer_request_duration_seconds_sum", backend="a", era="legacy", service="default"
    )
    assert duration == pytest.approx(2.0032)
    # The proxy's own answers have no backend latency.
    assert (
        sample(
            metrics,
            "mcpbalancer_request_duration_seconds_count",
            backend="none",
            era="legacy",
            service="default",
        )
        is None
    )


def test_mcp_methods_are_bounded(metrics: Metrics) -> None:
    for i in range(500):
        metrics.answered("a", MODERN, b"POST", 200, f"tools/{i}".encode(), 0.001)
    metrics.answered("a", MODERN, b"POST", 200, b"tools/call", 0.001)
    metrics.answered("a", MODERN, b"POST", 200, b"tools/call", 0.001)
    metrics.answered("a", LEGACY, b"POST", 200, None, 0.001)
    metrics.answered("a", LEGACY, b"GET", 200, None, 0.001)  # not a JSON-RPC message: not counted
    assert sample(metrics, "mcpbalancer_mcp_requests_total", era="modern", mcp_method="other") == 500
    assert sample(metrics, "mcpbalancer_mcp_requests_total", era="modern", mcp_method="tools/call") == 2
    assert sample(metrics, "mcpbalancer_mcp_requests_total", era="legacy", mcp_method="other") == 1
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert len(families["mcpbalancer_mcp_requests"].samples) == 3


def test_exposition_is_valid_and_complete(metrics: Metrics) -> None:
    metrics.session_created("a")
    metrics.session_ended("backend_404")
    metrics.upstream_error("a", "reset")
    metrics.store_operation("get", True, 0.0003)
    metrics.store_operation("get", False, 0.25)
    metrics.health_check("a", "ok")
    metrics.stream_started("a")
    metrics.stream_ended("a", 42.0)
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert families["mcpbalancer_build_info"].samples[0].labels == {"version": __version__}
    assert sample(metrics, "mcpbalancer_build_info", version=__version__) == 1
    assert sample(metrics, "mcpbalancer_store_operations_total", op="get", result="error") == 1
    assert sample(metrics, "mcpbalancer_store_latency_seconds_count", op="get") == 2
    assert sample(metrics, "mcpbalancer_health_checks_total", backend="a", result="ok") == 1
    assert sample(metrics, "mcpbalancer_sse_streams_active", backend="a") == 0
    assert sample(metrics, "mcpbalancer_sse_stream_duration_seconds_bucket", le="60.0") == 1
    assert sample(metrics, "mcpbalancer_sse_stream_duration_seconds_bucket", le="15.0") == 0
    # Families without labels, and the fixed reasons, export from zero.
    assert sample(metrics, "mcpbalancer_sse_heartbeats_total") == 0
    assert sample(metrics, "mcpbalancer_client_disconnects_total") == 0
    assert sample(metrics, "mcpbalancer_sessions_ended_total", reason="expired") == 0
    assert sample(metrics, "mcpbalancer_session_lookups_total", result="store_hit") == 0


def test_backend_state_is_read_at_scrape_time() -> None:
    backends = [Backend("a", "h", 1), Backend("b", "h", 2)]
    current = list(backends)
    metrics = Metrics(CollectorRegistry(), lambda: current)
    backends[0].up = False
    backends[1].draining = True
    backends[1].sessions = 7
    assert sample(metrics, "mcpbalancer_backend_up", backend="a") == 0
    assert sample(metrics, "mcpbalancer_backend_up", backend="b") == 1
    assert sample(metrics, "mcpbalancer_backend_draining", backend="b") == 1
    assert sample(metrics, "mcpbalancer_sessions_active", backend="b") == 7
    current[:] = [Backend("c", "h", 3)]  # a reload replaced the list
    assert sample(metrics, "mcpbalancer_backend_up", backend="a") is None
    assert sample(metrics, "mcpbalancer_backend_up", backend="c") == 1


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)


# --- the router's session events ---------------------------------------------------------------------


async def test_memory_store_expiry_ends_a_session(metrics: Metrics) -> None:
    clock = FakeClock()
    a = Backend("a", "127.0.0.1", 9001)
    router: Router
    store = MemoryStore(clock=clock, on_expire=lambda sid, owner: router.session_expired(sid, owner))
    router = Router(BackendSet([a]), LeastSessions(random.Random(1)), store, 60.0, metrics)
    bound = router.learn(classify(b"POST", None, None), a, 200, b"s1")
    assert bound is not None
    await bound
    assert sample(metrics, "mcpbalancer_sessions_created_total", backend="a") == 1
    assert router.route(classify(b"POST", b"s1", None)) is a
    assert sample(metrics, "mcpbalancer_session_lookups_total", result="cache_hit") == 1

    clock.now += 61
    with pytest.raises(Exception, match="Session not found"):
        router.route(classify(b"POST", b"s1", None))
    assert sample(metrics, "mcpbalancer_sessions_ended_total", reason="expired") == 1
    assert sample(metrics, "mcpbalancer_session_lookups_total", result="miss") == 1
    assert a.sessions == 0
    await router.close()


# --- the store wrapper ---------------------------------------------------------------------------------


class BrokenStore(MemoryStore):
    async def get(self, sid: str) -> str | None:
        raise StoreError("redis: ConnectionError: down")

    async def ping(self) -> None:
        raise StoreError("redis: TimeoutError: ")


async def test_instrumented_store_counts_and_times_async_operations(metrics: Metrics) -> None:
    inner = MemoryStore()
    store = InstrumentedStore(inner, metrics)
    assert store.peek == inner.peek  # the hot path is not wrapped
    assert await store.bind("s", "a", 60) == "a"
    assert await store.get("s") == "a"
    assert await store.touch("s", 60)
    await store.delete("s")
    await store.ping()
    assert store.peek("s") is None
    for op in ("bind", "get", "touch", "delete", "ping"):
        assert sample(metrics, "mcpbalancer_store_operations_total", op=op, result="ok") == 1, op
        assert sample(metrics, "mcpbalancer_store_latency_seconds_count", op=op) == 1, op
    assert sample(metrics, "mcpbalancer_store_operations_total", op="peek", result="ok") is None

    broken = InstrumentedStore(BrokenStore(), metrics)
    with pytest.raises(StoreError):
        await broken.get("s")
    with pytest.raises(StoreError):
        await broken.ping()
    assert sample(metrics, "mcpbalancer_store_operations_total", op="get", result="error") == 1
    assert sample(metrics, "mcpbalancer_store_operations_total", op="ping", result="error") == 1
    await store.close()


# --- readiness -------------------------------------------------------------------------------------------


class CountingPing:
    def __init__(self) -> None:
        self.calls = 0
        self.error: str | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> None:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise StoreError(self.error)


async def test_readiness_pings_the_store_at_most_once_a_second() -> None:
    clock, ping = FakeClock(), CountingPing()
    backends = [Backend("a", "h", 1)]
    readiness = Readiness(lambda: backends, ping, clock=clock)
    assert not ping.calls  # not asked before a probe

    ping.gate.clear()
    probes = [asyncio.ensure_future(readiness.check()) for _ in range(20)]
    await asyncio.sleep(0)  # every probe is now waiting on the one ping
    ping.gate.set()
    assert set(await asyncio.gather(*probes)) == {Verdict(True, "ready", "ready", "ok")}
    assert ping.calls == 1

    clock.now += 0.9
    ping.error = "redis: TimeoutError: "
    assert (await readiness.check()).store == "ok"  # still the cached answer
    assert ping.calls == 1
    clock.now += 0.2
    # on_store_error: degrade (the default): the proxy still places and routes sessions.
    reason = "session store unreachable: redis: TimeoutError: ; new sessions are bound locally"
    assert await readiness.check() == Verdict(True, "degraded", reason, "unreachable")
    assert ping.calls == 2

    backends[0].up = False
    clock.now += 5
    # The store is not asked when no backend could serve anyway; its last known state is shown.
    assert await readiness.check() == Verdict(False, "unavailable", "no backend up", "unreachable")
    assert ping.calls == 2


async def test_readiness_with_on_store_error_fail_needs_the_store() -> None:
    clock, ping = FakeClock(), CountingPing()
    backends = [Backend("a", "h", 1)]
    readiness = Readiness(lambda: backends, ping, store_required=True, clock=clock)
    assert await readiness.check() == Verdict(True, "ready", "ready", "ok")
    ping.error = "redis: ConnectionError: refused"
    clock.now += 5
    reason = "session store unreachable: redis: ConnectionError: refused; new sessions are refused"
    assert await readiness.check() == Verdict(False, "unavailable", reason, "unreachable")
    backends[0].up = False
    fresh = Readiness(lambda: backends, ping, store_required=True, clock=clock)
    assert await fresh.check() == Verdict(False, "unavailable", "no backend up", "unknown")


# --- the access log ---------------------------------------------------------------------------------------


def fake_exchange(**changes: Any) -> Any:
    head = SimpleNamespace(
        method=b"POST",
        target=b"/mcp",
        session_id=b"3f2a9c0d4e5b6a7c8d9e0f1a2b3c4d5e",
        protocol_version=b"2025-11-25",
        mcp_method=None,
    )
    exchange = SimpleNamespace(
        head=head,
        facts=None,
        client=SimpleNamespace(peer_ip=b"10.0.0.7"),
        backend=Backend("mcp-1", "h", 1),
        status=200,
        sent=321,
        received_at=time.perf_counter() - 0.0015,
        outcome="ok",
        created=None,
        service="default",
        request_id=None,
    )
    for key, value in changes.items():
        setattr(head if hasattr(head, key) else exchange, key, value)
    return exchange


async def test_access_lines_are_json_whatever_the_request_carried() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, hasher=SessionHasher(b"k" * 16), clock=lambda: 1_700_000_000.0421)
    log.write(fake_exchange())
    odd = fake_exchange(
        target=b'/mcp?q="\\\x7f\xe9' + b"x" * 5000,
        mcp_method=b'tools/"call"\\',
        protocol_version=b"2026-07-28",
        session_id=None,
        backend=None,
        status=404,
        outcome="error",
    )
    log.write(odd)
    assert stream.getvalue() == ""  # gathered, written at the next flush
    log.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["ts"] == "2023-11-14T22:13:20.042Z"
    assert first["session"] == SessionHasher(b"k" * 16)(b"3f2a9c0d4e5b6a7c8d9e0f1a2b3c4d5e")
    assert first["session"] != SessionHasher(b"j" * 16)(b"3f2a9c0d4e5b6a7c8d9e0f1a2b3c4d5e")
    assert (first["backend"], first["status"], first["bytes"], first["era"]) == ("mcp-1", 200, 321, "legacy")
    assert 1000 <= first["duration_us"] < 10_000_000
    assert second["path"].startswith('/mcp?q="\\\x7f\xe9x')
    assert len(second["path"]) == 2048
    assert (second["mcp_method"], second["era"], second["session"]) == ('tools/"call"\\', "modern", None)
    assert (second["backend"], second["status"], second["outcome"]) == (None, 404, "error")
    assert "3f2a9c0d" not in stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_access_lines_name_the_worker_and_the_session_an_answer_created(fmt: str) -> None:
    hasher = SessionHasher(b"k" * 16)
    stream, alone = io.StringIO(), io.StringIO()
    log, unnumbered = AccessLog(stream, fmt=fmt, hasher=hasher, worker=1), AccessLog(alone, fmt=fmt)
    log.write(fake_exchange(session_id=None, created=b"minted-by-the-backend"))
    log.write(fake_exchange(session_id=None))
    unnumbered.write(fake_exchange())
    log.flush()
    unnumbered.flush()
    created, plain = stream.getvalue().splitlines()
    tag = hasher(b"minted-by-the-backend")
    if fmt == "json":
        assert (json.loads(created)["session"], json.loads(created)["worker"]) == (tag, 1)
        assert (json.loads(plain)["session"], json.loads(plain)["worker"]) == (None, 1)
        assert json.loads(alone.getvalue())["worker"] is None
    else:
        assert created.endswith(" outcome=ok request_id=- worker=1")
        assert f" session={tag} " in created
        assert " session=- " in plain
        assert alone.getvalue().endswith(" worker=-\n")
    assert "minted" not in stream.getvalue()


ACCESS_FIELDS = (
    "ts", "type", "client", "method", "path", "era", "service", "session", "backend", "status", "bytes",
    "duration_us", "mcp_method", "outcome", "request_id", "worker",
)  # fmt: skip


async def test_both_formats_carry_the_same_fields_in_the_same_order() -> None:
    lines = {}
    for fmt in ("json", "text"):
        stream = io.StringIO()
        log = AccessLog(stream, fmt=fmt, worker=2)
        log.write(fake_exchange(service="tools", request_id=b"req-42", status=502, outcome="error"))
        log.close()
        lines[fmt] = stream.getvalue()
    entry = json.loads(lines["json"])
    assert tuple(entry) == ACCESS_FIELDS
    assert (entry["service"], entry["request_id"], entry["worker"]) == ("tools", "req-42", 2)
    # The text line names the same fields (those after the duration as key=value), in that order.
    keys = re.findall(r" (\w+)=", lines["text"])
    assert keys == ["era", "service", "session", "backend", "mcp", "outcome", "request_id", "worker"]
    assert " service=tools " in lines["text"]
    assert lines["text"].endswith(" outcome=error request_id=req-42 worker=2\n")


async def test_access_log_flushes_on_a_timer_and_in_batches() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    for _ in range(1023):
        log.write(fake_exchange())
    assert stream.getvalue() == ""
    log.write(fake_exchange())
    assert len(stream.getvalue().splitlines()) == 1024
    log.write(fake_exchange())

    async def flushed() -> bool:
        return len(stream.getvalue().splitlines()) == 1025

    await wait_until(flushed, "the flush timer to write the last line")
    log.close()


async def test_a_broken_access_stream_disables_the_log(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    stream.close()
    log.write(fake_exchange())
    log.flush()  # no exception reaches the data plane
    log.write(fake_exchange())
    log.close()
    assert "access log disabled" in caplog.text


async def test_text_format() -> None:
    stream = io.StringIO()
    log = AccessLog(stream, fmt="text", hasher=SessionHasher(b"k" * 16), clock=lambda: 1_700_000_000.5)
    log.write(fake_exchange(outcome="client_disconnect", status=0))
    log.close()
    tag = SessionHasher(b"k" * 16)(b"3f2a9c0d4e5b6a7c8d9e0f1a2b3c4d5e")
    line = stream.getvalue()
    prefix = '2023-11-14T22:13:20.500Z 10.0.0.7 "POST /mcp" 0 321 '
    assert line.startswith(prefix)
    assert line.endswith(
        f"us era=legacy service=default session={tag} backend=mcp-1 mcp=- outcome=client_disconnect "
        "request_id=- worker=-\n"
    )


class _Writes(io.StringIO):
    """Records what the writer handed over at each flush() (what a file object writes to the OS)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []
        self._mark = 0

    def flush(self) -> None:
        self.flushed.append(self.getvalue()[self._mark :])
        self._mark = len(self.getvalue())


async def test_a_shared_access_stream_gets_whole_lines_in_atomic_writes() -> None:
    # Worker processes share stdout: every write is whole lines of at most ATOMIC_CHARS (so at most
    # PIPE_BUF bytes, which a pipe never interleaves with another process's write).
    stream = _Writes()
    log = AccessLog(stream, shared=True)
    long_path = fake_exchange(target=b"/mcp?" + b"x" * 3000)
    for i in range(300):
        log.write(long_path if i == 7 else fake_exchange())
    log.close()
    writes = [w for w in stream.flushed if w]
    assert len(writes) > 1
    assert all(w.endswith("\n") for w in writes)
    assert [len(w) <= ATOMIC_CHARS for w in writes].count(False) == 1  # the long line, on its own
    assert sum(w.count("\n") for w in writes) == 300
    unshared = _Writes()
    log = AccessLog(unshared)
    for _ in range(300):
        log.write(fake_exchange())
    log.close()
    assert len([w for w in unshared.flushed if w]) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_worker_says_so_in_its_lifecycle_lines(fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format=fmt), stream=stream, worker=3)
    try:
        logging.getLogger("mcpbalancer.app").info("listening")
    finally:
        logging.basicConfig(handlers=[logging.NullHandler()], force=True)
    line = stream.getvalue()
    if fmt == "json":
        assert json.loads(line)["worker"] == 3
    else:
        assert line.endswith(" INFO mcpbalancer.app: listening worker=3\n")


def test_lifecycle_lines_in_json() -> None:
    stream = io.StringIO()
    configure_logging(LogConfig(format="json", level="warning"), stream=stream)
    try:
        logging.getLogger("mcpbalancer.fleet.health").warning('backend %s is "down"', "a")
        logging.getLogger("mcpbalancer.fleet.health").info("not at this level")
    finally:
        logging.basicConfig(handlers=[logging.NullHandler()], force=True)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry | {"ts": ""} == {
        "ts": "",
        "type": "event",
        "level": "warning",
        "logger": "mcpbalancer.fleet.health",
        "msg": 'backend a is "down"',
    }
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
    try:
        raise RuntimeError("inner")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    assert "RuntimeError: inner" in json.loads(JsonFormatter().format(record))["exc"]


def test_access_log_follows_the_level() -> None:
    assert access_enabled(LogConfig())
    assert access_enabled(LogConfig(level="debug"))
    assert not access_enabled(LogConfig(level="warning"))
    assert not access_enabled(LogConfig(access=False))


# --- configuration ------------------------------------------------------------------------------------


def config(**top: Any) -> Any:
    return parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:9001"}], **top}, "cfg.yaml")


def config_error(**top: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config(**top)
    return str(info.value)


def test_observability_defaults() -> None:
    parsed = config()
    assert parsed.admin is None
    assert parsed.metrics == MetricsConfig(enabled=True, path="/metrics")
    assert parsed.log == LogConfig(format="json", level="info", access=True)
    assert config(admin=None, metrics=None, log=None).log == LogConfig()


def test_observability_settings() -> None:
    parsed = config(
        admin="[::1]:9100",
        metrics={"enabled": False, "path": "/internal/metrics"},
        log={"format": "text", "level": "debug", "access": False},
    )
    assert parsed.admin == ("::1", 9100)
    assert parsed.metrics == MetricsConfig(enabled=False, path="/internal/metrics")
    assert parsed.log == LogConfig(format="text", level="debug", access=False)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"admin": "9100"}, "cfg.yaml: admin: "),
        ({"metrics": {"path": "metrics"}}, "cfg.yaml: metrics.path: must be a path starting with '/'"),
        ({"metrics": {"path": "/with space"}}, "cfg.yaml: metrics.path: must be a path"),
        ({"metrics": {"path": "/readyz"}}, "cfg.yaml: metrics.path: must not be /readyz"),
        ({"metrics": {"enabled": "yes"}}, "cfg.yaml: metrics.enabled: must be true or false, got 'yes'"),
        ({"metrics": {"port": 1}}, "cfg.yaml: metrics.port: unknown key; allowed: enabled, path"),
        ({"log": {"format": "xml"}}, "cfg.yaml: log.format: must be one of json, text; got 'xml'"),
        ({"log": {"level": "trace"}}, "cfg.yaml: log.level: must be one of debug, info, warning, error"),
        ({"log": {"access": 1}}, "cfg.yaml: log.access: must be true or false, got 1"),
    ],
)
def test_observability_errors_name_the_key(top: dict[str, Any], message: str) -> None:
    assert config_error(**top).startswith(message)
