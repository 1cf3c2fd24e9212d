"""The status page: `GET /` on the admin listener, one static HTML page that reloads itself.

What an operator opens first during an incident (HAProxy's stats page is the model): the services
and their backends with their state and why (the last probe), the sessions, requests in flight and
open streams, the error rate and latency over the last minute, the store's state, and the process:
uptime, version, the config file and its last reload.

The page is built on the server from the live objects, escaped, with no script, no framework and
nothing from another origin (its Content-Security-Policy forbids all of it); a `<meta refresh>`
reloads it. It is read-only: GET and HEAD. It is served only by the admin listener, so it has that
listener's access rules: its bind address, and whatever `guard` wraps its handler with (the admin
token check). The last-minute figures come from the metrics' own cells, sampled every few seconds
into a small window: nothing is added to the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeVar

from aiohttp import web

from mcpbalancer.control.probes import Readiness
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import REQUEST_BUCKETS, Metrics, Traffic

REFRESH: Final = 5  # seconds between reloads of the page
WINDOW: Final = 60.0  # seconds the error rate and latency are taken over
SAMPLE_EVERY: Final = 5.0
HEADERS: Final = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Guard = Callable[[Handler], Handler]  # e.g. the admin token check


@dataclass(frozen=True, slots=True)
class Reload:
    at: float  # Unix time
    outcome: str  # "ok: ..." or the reason it was refused


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    started: float  # Unix time
    version: str
    source: str  # the config file
    store: str  # "memory", or the Redis URL without credentials
    worker: int | None
    last_reload: Reload | None


class LastMinute(NamedTuple):
    seconds: float  # what the window covers (less than WINDOW just after start)
    requests_per_second: float
    error_ratio: float | None  # 5xx / all; None without requests
    mean: float | None  # time to response head, seconds
    p95: float | None  # the upper bound of the bucket holding the 95th percentile (inf: above all)


class Window:
    """Metrics.traffic() samples of the last WINDOW seconds; `last_minute` compares now with the oldest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, Traffic]] = deque()

    def add(self, traffic: Traffic) -> None:
        now = self._clock()
        self._samples.append((now, traffic))
        while len(self._samples) > 1 and now - self._samples[1][0] >= WINDOW:
            self._samples.popleft()

    def last_minute(self, now: Traffic) -> LastMinute:
        if not self._samples:
            return LastMinute(0.0, 0.0, None, None, None)
        clock = self._clock()
        # The newest sample at least WINDOW old; the oldest one just after start.
        at, then = self._samples[0]
        for sampled, traffic in self._samples:
            if clock - sampled < WINDOW:
                break
            at, then = sampled, traffic
        seconds = clock - at
        requests = now.requests - then.requests
        counts = [a - b for a, b in zip(now.durations, then.durations, strict=True)]
        observed = sum(counts)
        return LastMinute(
            seconds,
            requests / seconds if seconds > 0 else 0.0,
            (now.errors - then.errors) / requests if requests > 0 else None,
            (now.duration_sum - then.duration_sum) / observed if observed else None,
            _p95(counts, observed) if observed else None,
        )


def _p95(counts: list[int], observed: int) -> float:
    cumulative = 0
    for bound, count in zip((*REQUEST_BUCKETS, float("inf")), counts, strict=True):
        cumulative += count
        if cumulative >= 0.95 * observed:
            return float(bound)
    return float("inf")


class StatusPage:
    """The page and the sampling task behind its last-minute figures; `install` adds both to an
    aiohttp app (the admin listener's)."""

    def __init__(
        self,
        services: Callable[[], Mapping[str, Iterable[Backend]]],
        metrics: Metrics,
        readiness: Readiness,
        process: Callable[[], ProcessInfo],
        *,
        last_check: Mapping[str, float],
        reasons: Mapping[str, str],
        health_interval: Callable[[], float],
        down_reasons: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._services = services
        self._metrics = metrics
        self._readiness = readiness
        self._process = process
        self._last_check = last_check
        self._reasons = reasons
        self._down_reasons = down_reasons if down_reasons is not None else {}
        self._interval = health_interval
        self._clock = clock
        self.window = Window()

    def install(self, app: web.Application, guard: Guard | None = None) -> None:
        handler = self.page if guard is None else guard(self.page)
        app.router.add_get("/", handler, name="status")  # HEAD too; others: 405 with Allow
        app.cleanup_ctx.append(self._sampling)

    async def _sampling(self, app: web.Application) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                self.window.add(self._metrics.traffic())
                await asyncio.sleep(SAMPLE_EVERY)

        task = asyncio.get_running_loop().create_task(sample())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def page(self, request: web.Request) -> web.Response:
        verdict = await self._readiness.check()
        body = self.render(verdict.status, verdict.store)
        return web.Response(body=body.encode("utf-8"), headers=HEADERS)

    def render(self, readiness: str, store_state: str) -> str:
        now = self._clock()
        traffic = self._metrics.traffic()
        services = {name: list(backends) for name, backends in self._services().items()}
        every = [b for backends in services.values() for b in backends]
        process = self._process()
        cards = [
            ("Sessions", str(sum(b.sessions for b in every))),
            ("In flight", str(sum(b.in_flight for b in every))),
            ("Open streams", f"{traffic.streams:.0f}"),
            *_minute_cards(self.window.last_minute(traffic)),
        ]
        sections = "".join(self._service(name, backends, now) for name, backends in services.items())
        return _PAGE.format(
            refresh=REFRESH,
            readiness=_e(readiness),
            cards="".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in cards),
            services=sections,
            process=_process_rows(process, store_state, now),
            generated=_e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))),
        )

    def _service(self, name: str, backends: list[Backend], now: float) -> str:
        rows = "".join(self._backend_row(b, now) for b in backends)
        up = sum(1 for b in backends if b.up)
        return (
            f'<section class="service" data-service="{_e(name)}"><h2>Service {_e(name)} '
            f'<small>{up} of {len(backends)} up</small></h2><table class="backends"><thead><tr>'
            "<th>Backend</th><th>Address</th><th>State</th><th>Weight</th><th>Sessions</th>"
            f"<th>In flight</th><th>Last probe</th></tr></thead><tbody>{rows}</tbody></table></section>"
        )

    def _backend_row(self, backend: Backend, now: float) -> str:
        state = backend.state
        return (
            f'<tr data-backend="{_e(backend.name)}" data-state="{_e(state)}">'
            f"<td>{_e(backend.name)}</td><td>{_e(_address(backend))}</td>"
            f'<td><span class="state {_e(state)}">{_e(state)}</span></td><td>{backend.weight}</td>'
            f"<td>{backend.sessions}</td><td>{backend.in_flight}</td>"
            f"<td>{_e(self._probe(backend, now))}</td></tr>"
        )

    def _probe(self, backend: Backend, now: float) -> str:
        name = backend.name
        # A backend that is down says what took it down, as /admin/backends and the log do.
        down = self._down_reasons.get(name) if not backend.up else None
        checked = self._last_check.get(name)
        if self._interval() <= 0 or checked is None:
            if down is not None:
                return down
            return "no active checks" if self._interval() <= 0 else "not probed yet"
        ago = f"{max(now - checked, 0):.0f} s ago"
        reason = down or self._reasons.get(name)
        return f"ok, {ago}" if reason is None else f"{reason} ({ago})"


def _minute_cards(minute: LastMinute) -> list[tuple[str, str]]:
    span = f"last {min(minute.seconds, WINDOW):.0f} s"
    ratio = "-" if minute.error_ratio is None else f"{minute.error_ratio:.1%}"
    mean = "-" if minute.mean is None else _duration(minute.mean)
    p95 = "-" if minute.p95 is None else f"≤ {_duration(minute.p95)}"
    return [
        (f"Requests/s, {span}", f"{minute.requests_per_second:.1f}"),
        (f"5xx, {span}", ratio),
        (f"Mean time to head, {span}", mean),
        (f"p95 time to head, {span}", p95),
    ]


def _process_rows(process: ProcessInfo, store_state: str, now: float) -> str:
    reload = process.last_reload
    rows = [
        ("Version", process.version),
        ("Uptime", _uptime(now - process.started)),
        ("Worker", "-" if process.worker is None else str(process.worker)),
        ("Config", process.source),
        (
            "Last reload",
            "none since start" if reload is None else f"{_ago(now - reload.at)}: {reload.outcome}",
        ),
        ("Session store", f"{process.store} ({store_state})"),
    ]
    return "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)


def _address(backend: Backend) -> str:
    if backend.port == 0:
        return "starting"
    host = f"[{backend.host}]" if ":" in backend.host else backend.host
    scheme = "https" if backend.tls else "http"
    return f"{scheme}://{host}:{backend.port}{backend.endpoint.decode('latin-1')}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return f"{REQUEST_BUCKETS[-1]:g} s+"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {secs}s"


def _ago(seconds: float) -> str:
    return f"{_uptime(max(seconds, 0))} ago"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mcpbalancer status</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}}
h1{{font-size:20px;margin:0 0 .8em}} h1 small,h2 small{{font-weight:normal;color:#667}}
h2{{font-size:16px;margin:1.2em 0 .4em}}
.cards{{display:flex;flex-wrap:wrap;gap:.6em}}
.card{{background:#fff;border:1px solid #dde;border-radius:6px;padding:.5em .9em;min-width:9em}}
.card b{{display:block;font-size:20px}} .card span{{color:#667;font-size:12px}}
table{{border-collapse:collapse;background:#fff;border:1px solid #dde}}
th,td{{padding:.35em .8em;border-bottom:1px solid #eef;text-align:left}}
thead th{{background:#eef0f4}} table.process th{{color:#667;font-weight:normal}}
.state{{padding:.1em .5em;border-radius:4px;font-weight:600}}
.up{{background:#d8f3dc;color:#1b5e20}} .down{{background:#fde0e0;color:#9b1c1c}}
.draining{{background:#fff1c2;color:#7a5b00}} .drained{{background:#e4e6eb;color:#444}}
footer{{margin-top:1.5em;color:#889;font-size:12px}}
</style></head>
<body>
<h1>mcpbalancer <small>{readiness}</small></h1>
<div class="cards">{cards}</div>
{services}
<h2>Process</h2>
<table class="process">{process}</table>
<footer>Read-only; reloads every {refresh} s. Generated {generated}.</footer>
</body></html>
"""


V = TypeVar("V")


class MergedMapping(Mapping[str, V]):
    """The union of the mappings `parts` returns now (keys are unique across them: backend names)."""

    def __init__(self, parts: Callable[[], Iterable[Mapping[str, V]]]) -> None:
        self._parts = parts

    def __getitem__(self, key: str) -> V:
        for part in self._parts():
            if key in part:
                return part[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for part in self._parts():
            yield from part

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())
