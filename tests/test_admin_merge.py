"""How the supervisor merges its workers' answers: the admin API's backend lists and readiness
(control/merge.py), and the metrics pages (observability/aggregate.py). Pure functions and real
metrics pages, no sockets."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mcpbalancer.control import merge
from mcpbalancer.observability.aggregate import MAXED, PageSum
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.protocol import Era

MONITORING = Path(__file__).resolve().parents[1] / "docs" / "monitoring.md"


# --- /admin/backends ----------------------------------------------------------------------------------


def entry(name: str, state: str = "up", sessions: int = 0, **extra: object) -> dict[str, object]:
    return {"name": name, "state": state, "weight": 1, "sessions": sessions, "in_flight": 1, **extra}


def test_counts_are_summed_and_an_agreed_state_is_one_state() -> None:
    [a] = merge.backends({0: [entry("a", sessions=8)], 1: [entry("a", sessions=4)]})
    assert (a["name"], a["state"], a["sessions"], a["in_flight"], a["weight"]) == ("a", "up", 12, 2, 1)
    assert a["states"] == {"up": 2}
    assert [(w["worker"], w["sessions"]) for w in a["workers"]] == [(0, 8), (1, 4)]


def test_a_backend_down_on_one_worker_and_up_on_the_other_reports_both() -> None:
    down = entry("b", "down", reason="probe: connection refused by http://10.0.0.2:8000", last_check=20.0)
    up = entry("b", "up", reason=None, last_check=10.0)
    [b] = merge.backends({0: [up], 1: [down]})
    assert b["state"] == "up,down"
    assert b["states"] == {"up": 1, "down": 1}
    assert b["reason"] == "probe: connection refused by http://10.0.0.2:8000"  # the one given
    assert b["last_check"] == 20.0  # the latest
    assert [w["state"] for w in b["workers"]] == ["up", "down"]


def test_fields_the_merge_does_not_know_are_kept() -> None:
    # Fields another part adds (a probe's time, why a backend is down, its session mode).
    extra = {"last_probe": 5.5, "down_reason": None, "session_mode": "stateful"}
    [a] = merge.backends({0: [entry("a", **extra)], 1: [entry("a", **{**extra, "last_probe": 7.0})]})
    assert (a["last_probe"], a["down_reason"], a["session_mode"]) == (7.0, None, "stateful")


def test_a_backend_only_some_workers_know_is_listed_with_those() -> None:
    merged = merge.backends({0: [entry("a"), entry("new")], 1: [entry("a")]})
    assert [b["name"] for b in merged] == ["a", "new"]
    assert [w["worker"] for w in merged[1]["workers"]] == [0]


# --- /readyz ------------------------------------------------------------------------------------------

READY = {"status": "ready", "reason": "ready", "store": "ok"}


def test_ready_when_every_serving_worker_is() -> None:
    ready, body = merge.readiness({0: READY, 1: READY})
    assert ready
    assert (body["status"], body["reason"]) == ("ready", "ready")
    assert [w["worker"] for w in body["workers"]] == [0, 1]


def test_the_worst_worker_decides() -> None:
    degraded = {"status": "degraded", "reason": "session store unreachable: x", "store": "unreachable"}
    ready, body = merge.readiness({0: READY, 1: degraded})
    assert ready
    assert (body["status"], body["reason"]) == ("degraded", "worker 1: session store unreachable: x")
    ready, body = merge.readiness({0: READY, 1: None})  # did not answer
    assert not ready
    assert (body["status"], body["reason"]) == ("unavailable", "worker 1: no answer")
    assert merge.readiness({})[0] is False  # no worker serving


# --- /metrics -----------------------------------------------------------------------------------------


def page(requests: int = 0, *, streams: int = 0, backend_up: bool = True, seconds: float = 0.01) -> str:
    metrics = Metrics(CollectorRegistry(), lambda: [_Backend(backend_up)])
    for _ in range(requests):
        metrics.answered("a", Era.LEGACY, b"POST", 200, None, seconds)
    for _ in range(streams):
        metrics.stream_started("a")
    return metrics.exposition().decode()


class _Backend:
    name = "a"
    draining = False
    sessions = 3
    calls = streams = queued = 0  # max_in_flight's counts

    def __init__(self, up: bool) -> None:
        self.up = up


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


REQ = (
    "mcpbalancer_requests_total",
    (("backend", "a"), ("code", "2xx"), ("era", "legacy"), ("method", "POST"), ("service", "default")),
)
UP = ("mcpbalancer_backend_up", (("backend", "a"),))
SESSIONS = ("mcpbalancer_sessions_active", (("backend", "a"),))
STREAMS = ("mcpbalancer_sse_streams_active", (("backend", "a"),))
COUNT = (
    "mcpbalancer_request_duration_seconds_count",
    (("backend", "a"), ("era", "legacy"), ("service", "default")),
)
BUCKET = (
    "mcpbalancer_request_duration_seconds_bucket",
    (("backend", "a"), ("era", "legacy"), ("le", "0.01"), ("service", "default")),
)
BUILD = ("mcpbalancer_build_info", (("version", "0.1.0"),))


def test_counters_and_histograms_are_summed_gauges_summed_or_maxed() -> None:
    total = samples(
        PageSum().add({0: page(3, streams=1), 1: page(2, streams=2, backend_up=False)}, {0: 1, 1: 1})
    )
    assert total[REQ] == 5
    assert (total[COUNT], total[BUCKET]) == (5, 5)
    assert total[STREAMS] == 3  # an amount: summed
    assert total[SESSIONS] == 6
    assert total[UP] == 1  # a state: up on a worker is up for the proxy
    assert total[BUILD] == 1


def test_a_restarted_worker_does_not_make_the_sums_fall() -> None:
    pages = PageSum()
    assert samples(pages.add({0: page(3), 1: page(2)}, {0: 1, 1: 1}))[REQ] == 5
    # Worker 1 is a new process (run 2), counting from 0: the old one's 2 are kept.
    assert samples(pages.add({0: page(4), 1: page(1)}, {0: 1, 1: 2}))[REQ] == 4 + 2 + 1
    # Worker 0 missed a scrape but runs: its last counts stand in, its gauges go.
    total = samples(pages.add({1: page(1, streams=1)}, {0: 1, 1: 2}))
    assert total[REQ] == 4 + 2 + 1
    assert total[STREAMS] == 1
    # Worker 0 exited and is not back yet: its counts are kept.
    assert samples(pages.add({1: page(2)}, {1: 2}))[REQ] == 4 + 2 + 2


def test_every_maxed_gauge_is_a_gauge_and_the_docs_list_them() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(page(1))}
    runtime = Metrics(CollectorRegistry(), runtime=True).exposition().decode()
    families.update({f.name: f.type for f in text_string_to_metric_families(runtime)})
    assert {families.get(name) for name in MAXED} == {"gauge"}
    text = " ".join(MONITORING.read_text(encoding="utf-8").split())
    [maxed] = re.findall(r"taken as the largest value: (.*?)\.", text)
    assert sorted(re.findall(r"`(\w+)`", maxed)) == sorted(MAXED)
