"""Markdown tables from the results: absolute numbers, ratios, and the issue's targets checked."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from procs import CpuTimes
from scenario import Plan, Series, TargetResult

DIRECT, HAPROXY = "direct", "haproxy"
NA = "—"


def _num(value: float | None, spec: str) -> str:
    return NA if value is None or math.isnan(value) else format(value, spec)


def _rate(runs: Series | None) -> float | None:
    return runs.rate() if runs is not None else None


def _cpu_of(runs: Series | None) -> CpuTimes | None:
    return runs.cpu() if runs is not None else None


def _cpu(runs: Series | None) -> float | None:
    cpu = _cpu_of(runs)
    return cpu.total if cpu is not None else None


def _cpu_split(runs: Series | None) -> str:
    cpu = _cpu_of(runs)
    if cpu is None:
        return NA
    return f"{cpu.total:.1f} ({cpu.user:.1f} u + {cpu.system:.1f} k)"


def _rate_spread(runs: Series) -> str:
    rates = runs.rates()
    if not rates:
        return NA
    text = f"{max(rates):,.0f}"
    return text if len(rates) == 1 else f"{text} (worst {min(rates):,.0f})"


def _cpu_spread(runs: Series) -> str:
    text = _cpu_split(runs)
    totals = runs.cpu_totals()
    return text if len(totals) < 2 else f"{text} (worst {max(totals):.1f})"


def _pct(r: TargetResult, attr: str, q: float) -> float | None:
    lat = getattr(r, attr)
    return lat.percentile(q) if lat is not None else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def absolute_table(results: Sequence[TargetResult], plan: Plan) -> list[str]:
    c = plan.connections
    spread = f", best of {plan.rounds}" if plan.rounds > 1 else ""
    rows: list[tuple[str, Callable[[TargetResult], str]]] = [
        (f"JSON req/s ({c} conns, {plan.sessions} sessions){spread}", lambda r: _rate_spread(r.json)),
        (f"SSE req/s ({c} conns){spread}", lambda r: _rate_spread(r.sse)),
        (f"proxy CPU µs/req, JSON (user + kernel){spread}", lambda r: _cpu_spread(r.json)),
        (f"proxy CPU µs/req, SSE (user + kernel){spread}", lambda r: _cpu_spread(r.sse)),
        ("proxy process CPU share during JSON run", lambda r: _num(r.json.utilisation(), ".0%")),
        ("load core (wrk + stubs) busy during JSON run", lambda r: _num(r.json.load_core_busy(), ".0%")),
        ("other processes' CPU during JSON runs (cores)", lambda r: _num(r.json.other_cores(), ".2f")),
        (f"latency p50 at {plan.rate:.0f} req/s (ms){spread}", lambda r: _latency(r, 50)),
        (f"latency p99 at {plan.rate:.0f} req/s (ms){spread}", lambda r: _latency(r, 99)),
        ("first event of streamed POST p50 (ms)", lambda r: _num(_pct(r, "first_event", 50), ".3f")),
        ("first event of streamed POST p99 (ms)", lambda r: _num(_pct(r, "first_event", 99), ".3f")),
        (f"event relay p50, {plan.streams} idle streams (ms)", lambda r: _num(_pct(r, "relay", 50), ".3f")),
        (f"event relay p99, {plan.streams} idle streams (ms)", lambda r: _num(_pct(r, "relay", 99), ".3f")),
        ("proxy RSS per idle stream (KiB)", lambda r: _num(r.stream_kib, ".1f")),
        (f"route: JSON req/s, small live set{spread}", lambda r: _live(r.route_small, r.live_small)),
        (f"route: JSON req/s, big live set{spread}", lambda r: _live(r.route_big, r.live_big)),
        ("route: proxy CPU µs/req small / big", lambda r: _pair(_cpu(r.route_small), _cpu(r.route_big))),
        ("Redis commands per routed request", lambda r: _num(_redis_per_request(r), ".4f")),
        ("Redis commands per new session", lambda r: _num(r.redis_per_bind, ".2f")),
        ("errors (non-2xx, affinity, socket)", _errors),
    ]
    header = ["metric", *(r.name for r in results)]
    return _table(header, [[label, *(cell(r) for r in results)] for label, cell in rows])


def _latency(r: TargetResult, q: float) -> str:
    best, worst = r.latency.percentile(q), r.latency.worst(q)
    text = _num(best, ".3f")
    return text if len(r.latency.rounds) < 2 or math.isnan(worst) else f"{text} (worst {worst:.3f})"


def _live(runs: Series, live: int) -> str:
    return NA if not runs.runs else f"{_rate_spread(runs)} @ {live:,}"


def _pair(a: float | None, b: float | None) -> str:
    return NA if a is None or b is None else f"{a:.1f} / {b:.1f}"


def _redis_per_request(r: TargetResult) -> float | None:
    known = [v for x in r.loaded_runs() if (v := x.redis_per_request) is not None]
    return max(known) if known else None


def _errors(r: TargetResult) -> str:
    if not r.errors:
        return "0"
    return f"**{r.total_errors}** (" + ", ".join(f"{k}: {v}" for k, v in r.errors.items()) + ")"


# -- ratios and targets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    label: str
    goal: str
    value: Callable[[TargetResult, TargetResult | None, TargetResult | None], float | None]
    passes: Callable[[float], bool]
    spec: str


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _of(r: TargetResult | None, attr: str, q: float) -> float | None:
    return _pct(r, attr, q) if r is not None else None


CHECKS = [
    Check(
        "JSON req/s ÷ HAProxy",
        "≥ 0.80",
        lambda r, h, d: _ratio(_rate(r.json), _rate(h.json) if h else None),
        lambda v: v >= 0.8,
        ".2f",
    ),
    Check(
        "SSE req/s ÷ HAProxy",
        "≥ 0.80",
        lambda r, h, d: _ratio(_rate(r.sse), _rate(h.sse) if h else None),
        lambda v: v >= 0.8,
        ".2f",
    ),
    Check(
        "proxy CPU/req JSON ÷ HAProxy",
        "≤ 1.50",
        lambda r, h, d: _ratio(_cpu(r.json), _cpu(h.json) if h else None),
        lambda v: v <= 1.5,
        ".2f",
    ),
    Check(
        "proxy CPU/req SSE ÷ HAProxy",
        "≤ 1.50",
        lambda r, h, d: _ratio(_cpu(r.sse), _cpu(h.sse) if h else None),
        lambda v: v <= 1.5,
        ".2f",
    ),
    Check(
        "added latency p50 over direct (ms)",
        "≤ +0.35",
        lambda r, h, d: _diff(_of(r, "latency", 50), _of(d, "latency", 50)),
        lambda v: v <= 0.35,
        "+.3f",
    ),
    Check(
        "added latency p99 over direct (ms)",
        "≤ +1.00",
        lambda r, h, d: _diff(_of(r, "latency", 99), _of(d, "latency", 99)),
        lambda v: v <= 1.0,
        "+.3f",
    ),
    Check(
        "first event of streamed POST p99 (ms)",
        "< 5",
        lambda r, h, d: _of(r, "first_event", 99),
        lambda v: v < 5,
        ".3f",
    ),
    Check(
        "idle-stream event relay p50 minus HAProxy (ms)",
        "≤ +0.10",
        lambda r, h, d: _diff(_of(r, "relay", 50), _of(h, "relay", 50)),
        lambda v: v <= 0.1,
        "+.3f",
    ),
    Check(
        "proxy RSS per idle stream (KiB)",
        "< 20",
        lambda r, h, d: r.stream_kib,
        lambda v: v < 20,
        ".1f",
    ),
    Check(
        "route req/s big live set ÷ small",
        "≥ 0.90 (flat)",
        lambda r, h, d: _ratio(_rate(r.route_big), _rate(r.route_small)),
        lambda v: v >= 0.9,
        ".2f",
    ),
    Check(
        "Redis commands per routed request",
        "≈ 0 (< 0.01)",
        lambda r, h, d: _redis_per_request(r),
        lambda v: v < 0.01,
        ".4f",
    ),
    Check("errors + affinity misses", "0", lambda r, h, d: float(r.total_errors), lambda v: v == 0, ".0f"),
]


def checks_table(results: Sequence[TargetResult]) -> list[str]:
    by_name = {r.name: r for r in results}
    haproxy, direct = by_name.get(HAPROXY), by_name.get(DIRECT)
    tested = [r for r in results if r.name not in (DIRECT,)]
    rows = []
    for check in CHECKS:
        cells = []
        for r in tested:
            value = check.value(r, haproxy, direct)
            if value is None or math.isnan(value):
                cells.append(NA)
            elif r.name == HAPROXY:
                cells.append(format(value, check.spec))
            else:
                cells.append(f"{format(value, check.spec)} {'✅' if check.passes(value) else '❌'}")
        rows.append([check.label, check.goal, *cells])
    return _table(["target", "goal", *(r.name for r in tested)], rows)


def ratio_vs_direct_table(results: Sequence[TargetResult]) -> list[str]:
    direct = next((r for r in results if r.name == DIRECT), None)
    if direct is None:
        return []
    others = [r for r in results if r is not direct]
    rows = [
        ["JSON req/s ÷ direct", *(_num(_ratio(_rate(r.json), _rate(direct.json)), ".2f") for r in others)],
        ["SSE req/s ÷ direct", *(_num(_ratio(_rate(r.sse), _rate(direct.sse)), ".2f") for r in others)],
    ]
    return _table(["ratio", *(r.name for r in others)], rows)
