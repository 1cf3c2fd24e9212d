"""The measurements, run against every target; all targets are up at once.

Per target, on a freshly started proxy (`prepare`):
  1. create `base_sessions` sessions through the target (owners recorded from X-Backend)
  2. idle streams: one GET stream per session; proxy RSS before/after, event relay delay
  3. first event of a streamed POST (sequential, the stream held open after the event)
Then in `rounds` rounds, each visiting every target in turn (`round`), so that noise from the rest
of the machine falls on all targets alike and medians can be taken:
  4. latency at a fixed rate (open loop, Python driver), a slice of `latency_duration`
  5. saturation, JSON then SSE answers, over `sessions` sessions: req/s, proxy CPU, Redis commands
Last, per proxy (`route_cost`):
  6. saturation spread over all live sessions at `base_sessions` (`rounds` runs of half the
     duration), then the same after growing the live set to `big_sessions`

Other load on the machine can only make a run slower, so for what is repeated the report takes
the best round: highest req/s, least CPU per request, lowest percentile (as `timeit` takes the
minimum), and shows the worst next to it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import drivers
from drivers import Latencies, LoadResult, Session
from loads import Load
from procs import (
    LOAD_CPU,
    CpuTimes,
    busy_share,
    core_busy,
    machine_busy_seconds,
    other_cores,
    own_cpu_seconds,
    tree_cpu_times,
    tree_rss_kib,
)
from systems import Stub, Target, redis_commands


@dataclass(frozen=True)
class Plan:
    duration: float = 10.0
    warmup: float = 2.0
    rounds: int = 3
    connections: int = 64
    sessions: int = 200
    base_sessions: int = 1000
    big_sessions: int = 100_000
    streams: int = 1000
    stream_window: float = 5.0
    stream_interval_ms: float = 1000.0
    rate: float = 1000.0
    latency_duration: float = 15.0
    first_event_samples: int = 200
    hold_ms: int = 20
    # Before each timed run, wait (up to this many seconds in all) for other processes on the
    # machine to use less than `quiet_cores` of CPU.
    quiet_budget: float = 180.0
    quiet_cores: float = 0.15

    @classmethod
    def smoke(cls) -> Plan:
        return cls(
            duration=1.0,
            warmup=0.0,
            rounds=1,
            big_sessions=5000,
            streams=200,
            stream_window=1.0,
            latency_duration=1.5,
            first_event_samples=20,
            quiet_budget=0.0,
        )


@dataclass
class Loaded:
    """One saturation run, with what the proxy and Redis spent on it."""

    result: LoadResult
    cpu: CpuTimes | None = None
    redis_commands: int | None = None
    load_core_busy: float | None = None  # share of the load generator's core in use
    other_cores: float | None = None  # CPU the rest of the machine used meanwhile, in cores

    @property
    def cpu_us_per_request(self) -> CpuTimes | None:
        if self.cpu is None or not self.result.requests:
            return None
        n = self.result.requests
        return CpuTimes(self.cpu.user / n * 1e6, self.cpu.system / n * 1e6)

    @property
    def utilisation(self) -> float | None:
        return self.cpu.total / self.result.seconds if self.cpu and self.result.seconds else None

    @property
    def redis_per_request(self) -> float | None:
        if self.redis_commands is None or not self.result.requests:
            return None
        return self.redis_commands / self.result.requests


@dataclass
class Series:
    """The same saturation run repeated over rounds; the best round is the estimate."""

    runs: list[Loaded] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [r.result.rate for r in self.runs]

    def rate(self) -> float | None:
        return max(self.rates()) if self.runs else None

    def cpu(self) -> CpuTimes | None:
        """The per-request CPU of the cheapest run, split in user and kernel time."""
        known = [c for r in self.runs if (c := r.cpu_us_per_request)]
        return min(known, key=lambda c: c.total) if known else None

    def cpu_totals(self) -> list[float]:
        return [c.total for r in self.runs if (c := r.cpu_us_per_request)]

    def other_cores(self) -> float | None:
        return _median([r.other_cores for r in self.runs])

    def utilisation(self) -> float | None:
        return _median([r.utilisation for r in self.runs])

    def load_core_busy(self) -> float | None:
        return _median([r.load_core_busy for r in self.runs])


@dataclass
class LatencyRounds:
    """Latency samples per round; a percentile is the lowest of the rounds' percentiles."""

    rounds: list[Latencies] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        values = [r.percentile(q) for r in self.rounds if r.samples]
        return min(values) if values else float("nan")

    def worst(self, q: float) -> float:
        values = [r.percentile(q) for r in self.rounds if r.samples]
        return max(values) if values else float("nan")


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@dataclass
class TargetResult:
    name: str
    json: Series = field(default_factory=Series)
    sse: Series = field(default_factory=Series)
    latency: LatencyRounds = field(default_factory=LatencyRounds)
    first_event: Latencies | None = None
    relay: Latencies | None = None
    stream_kib: float | None = None
    route_small: Series = field(default_factory=Series)
    route_big: Series = field(default_factory=Series)
    live_small: int = 0
    live_big: int = 0
    redis_per_bind: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def count(self, step: str, errors: int) -> None:
        if errors:
            self.errors[step] = self.errors.get(step, 0) + errors

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def loaded_runs(self) -> list[Loaded]:
        return [*self.json.runs, *self.sse.runs, *self.route_small.runs, *self.route_big.runs]


class Runner:
    """Runs the plan's steps; `stubs` are where the direct target's sessions are created."""

    def __init__(self, plan: Plan, load: Load, stubs: Sequence[Stub], pinned: bool) -> None:
        self.plan = plan
        self.load = load
        self.stubs = stubs
        self.pinned = pinned
        self._sessions: dict[str, list[Session]] = {}
        self._quiet_budget = plan.quiet_budget
        self.busy_starts = 0  # timed runs started while the machine was still busy

    async def _settle(self) -> None:
        """Wait, within the budget, until other processes leave the machine nearly idle."""
        if self.plan.quiet_budget <= 0:  # smoke: no waiting, no half-second probes
            return
        waited = 0.0
        while True:
            other = await other_cores(0.5)
            if other < self.plan.quiet_cores:
                break
            if self._quiet_budget <= 0:
                self.busy_starts += 1
                break
            self._quiet_budget -= 0.5
            waited += 0.5
        if waited:
            print(f"  (waited {waited:.1f}s for other load to calm down)", flush=True)

    def say(self, target: Target, message: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {target.name}: {message}", flush=True)

    async def prepare(self, target: Target) -> TargetResult:
        out = TargetResult(target.name)
        sessions = await self._create(target, out, self.plan.base_sessions)
        self._sessions[target.name] = sessions
        await self._streams(target, out, sessions)
        await self._first_event(target, out, sessions)
        if self.plan.warmup:
            await self.load.run(
                sessions[: self.plan.sessions], self.plan.warmup, self.plan.connections, False
            )
        return out

    async def round(self, target: Target, out: TargetResult) -> None:
        sessions = self._sessions[target.name][: self.plan.sessions]
        await self._latency(target, out, sessions)
        out.json.runs.append(await self._loaded(target, out, "JSON", sessions))
        out.sse.runs.append(await self._loaded(target, out, "SSE", sessions, sse=True))

    async def route_cost(self, target: Target, out: TargetResult) -> None:
        sessions = self._sessions[target.name]
        out.live_small = len(sessions)
        await self._route_runs(target, out, out.route_small, sessions)
        grown = sessions + await self._create(target, out, self.plan.big_sessions - len(sessions))
        out.live_big = len(grown)
        await self._route_runs(target, out, out.route_big, grown)

    async def _route_runs(
        self, target: Target, out: TargetResult, series: Series, sessions: Sequence[Session]
    ) -> None:
        duration = max(1.0, self.plan.duration / 2)
        for _ in range(self.plan.rounds):
            label = f"route@{len(sessions)}"
            series.runs.append(await self._loaded(target, out, label, sessions, duration=duration))

    # -- steps --------------------------------------------------------------------------------------

    async def _create(self, target: Target, out: TargetResult, count: int) -> list[Session]:
        ports = [target.port] if target.port is not None else [s.port for s in self.stubs]
        before = redis_commands(target.redis) if target.redis is not None else None
        started = time.perf_counter()
        sessions = await drivers.create_sessions(ports, count)
        elapsed = time.perf_counter() - started
        if before is not None and target.redis is not None:
            out.redis_per_bind = (redis_commands(target.redis) - before) / count
        self.say(target, f"created {count} sessions in {elapsed:.1f}s ({count / elapsed:,.0f}/s)")
        return sessions

    async def _streams(self, target: Target, out: TargetResult, sessions: Sequence[Session]) -> None:
        fleet = drivers.StreamFleet()
        rss_before = self._rss(target)
        await fleet.open(sessions[: self.plan.streams])
        await fleet.record(min(1.0, self.plan.stream_interval_ms / 1000 * 1.5))  # all streams warm
        rss_after = self._rss(target)
        out.relay = await fleet.record(self.plan.stream_window)
        await fleet.close()
        out.count("idle streams", out.relay.errors)
        if rss_before is not None and rss_after is not None:
            out.stream_kib = (rss_after - rss_before) / self.plan.streams
        self.say(target, f"{self.plan.streams} idle streams: relay p50 {out.relay.percentile(50):.3f} ms")

    async def _first_event(self, target: Target, out: TargetResult, sessions: Sequence[Session]) -> None:
        out.first_event = await drivers.first_event(
            sessions, self.plan.first_event_samples, self.plan.hold_ms
        )
        out.count("first event", out.first_event.errors)
        self.say(target, f"first event p50 {out.first_event.percentile(50):.3f} ms")

    async def _latency(self, target: Target, out: TargetResult, sessions: Sequence[Session]) -> None:
        await self._settle()
        part = await drivers.paced(sessions, self.plan.rate, self.plan.latency_duration / self.plan.rounds)
        out.latency.rounds.append(part)
        out.count("paced latency", part.errors)
        p50, p99 = part.percentile(50), part.percentile(99)
        self.say(target, f"latency at {self.plan.rate:.0f}/s: p50 {p50:.3f} ms, p99 {p99:.3f} ms")

    async def _loaded(
        self,
        target: Target,
        out: TargetResult,
        label: str,
        sessions: Sequence[Session],
        sse: bool = False,
        duration: float | None = None,
    ) -> Loaded:
        await self._settle()
        if target.redis is not None:
            target.redis.config_resetstat()
        cpu_before = tree_cpu_times(target.proxy.pid) if target.proxy is not None else None
        cores_before, machine_before, own_before = core_busy(), machine_busy_seconds(), own_cpu_seconds()
        seconds = self.plan.duration if duration is None else duration
        result = await self.load.run(sessions, seconds, self.plan.connections, sse)
        loaded = Loaded(result)
        if self.pinned:
            loaded.load_core_busy = busy_share(cores_before, core_busy(), LOAD_CPU)
        other = machine_busy_seconds() - machine_before - (own_cpu_seconds() - own_before)
        loaded.other_cores = max(0.0, other / result.seconds) if result.seconds else None
        if target.proxy is not None and cpu_before is not None:
            loaded.cpu = tree_cpu_times(target.proxy.pid) - cpu_before
        if target.redis is not None:
            loaded.redis_commands = redis_commands(target.redis)
        out.count(label, result.errors)
        cpu = loaded.cpu_us_per_request
        cpu_text = f", proxy CPU {cpu.total:.1f} µs/req" if cpu else ""
        self.say(target, f"{label}: {result.rate:,.0f} req/s, {result.errors} errors{cpu_text}")
        return loaded

    def _rss(self, target: Target) -> int | None:
        return tree_rss_kib(target.proxy.pid) if target.proxy is not None else None


def summary(result: TargetResult) -> dict[str, object]:
    """Numbers for `--json`: medians and percentiles, not raw samples."""

    def pct(lat: Latencies | LatencyRounds | None) -> dict[str, float] | None:
        return None if lat is None else {f"p{q}": lat.percentile(q) for q in (50, 90, 99)}

    def series(s: Series) -> dict[str, object]:
        cpu = s.cpu()
        return {
            "rates": s.rates(),
            "cpu_us_per_request": s.cpu_totals(),
            "best_cpu_user_kernel": None if cpu is None else [cpu.user, cpu.system],
            "other_cores": s.other_cores(),
        }

    return {
        "name": result.name,
        "json": series(result.json),
        "sse": series(result.sse),
        "latency_ms": pct(result.latency),
        "first_event_ms": pct(result.first_event),
        "relay_ms": pct(result.relay),
        "stream_kib": result.stream_kib,
        "route_small": series(result.route_small),
        "route_big": series(result.route_big),
        "live_small": result.live_small,
        "live_big": result.live_big,
        "redis_per_bind": result.redis_per_bind,
        "redis_per_request": [x.redis_per_request for x in result.loaded_runs()],
        "errors": result.errors,
    }
