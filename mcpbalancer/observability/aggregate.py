"""Several processes' metrics pages as one: what the admin listener of a supervisor serves.

Each page (the Prometheus text exposition of a worker, or of the supervisor itself) is parsed, and
samples of the same name and labels are added up: counters, histograms (buckets, counts and sums)
and most gauges. The gauges of MAXED take the largest value instead, because their meaning is a
state, not an amount: a backend is up for the proxy when a worker sees it up, the store is degraded
when one worker finds it down, and the build info is 1, not N.

A worker that exits, or is restarted (a new process counts from 0 again), would make the sums of its
counters fall, and Prometheus reads a fall as a reset of the whole series: `rate()` would count
every other worker's total once more. So the counters and histograms of a process that ended are
kept at the last values scraped from it (the counts it made after that scrape are lost), and a
process that is alive but missed one scrape counts with its last values too. Its gauges go.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges whose largest value is the proxy's; every other gauge is summed over the processes.
MAXED: Final = frozenset(
    {
        "mcpbalancer_backend_up",  # 1 when any worker sees the backend up (down on all: 0)
        "mcpbalancer_backend_draining",  # a drain reaches every worker; 1 while any still drains
        "mcpbalancer_store_degraded",  # 1 when any worker finds the store failing
        "mcpbalancer_build_info",  # always 1
        "process_start_time_seconds",  # the latest start: a restarted worker shows here
        "process_max_fds",  # a limit, the same for every process
        "python_info",  # always 1
    }
)
# Families that only grow while their process lives.
_MONOTONIC: Final = frozenset({"counter", "histogram", "summary"})

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]  # sample name (`x_total`, `x_bucket`), its labels


@dataclass
class _Family:
    name: str
    doc: str
    type: str
    samples: dict[SampleKey, float] = field(default_factory=dict)

    def add(self, key: SampleKey, value: float) -> None:
        old = self.samples.get(key)
        if old is None:
            self.samples[key] = value
        elif key[0].endswith("_created"):
            self.samples[key] = min(old, value)
        elif self.name in MAXED:
            self.samples[key] = max(old, value)
        else:
            self.samples[key] = old + value

    def metric(self) -> Metric:
        metric = Metric(self.name, self.doc, self.type)
        for (sample, labels), value in self.samples.items():
            metric.add_sample(sample, dict(labels), value)
        return metric


Page = dict[str, _Family]


def parse(text: str) -> Page:
    page: Page = {}
    for parsed in text_string_to_metric_families(text):
        family = page.setdefault(parsed.name, _Family(parsed.name, parsed.documentation, parsed.type))
        for sample in parsed.samples:
            family.add((sample.name, tuple(sample.labels.items())), float(sample.value))
    return page


def _merge(pages: Iterable[Page], *, monotonic_only: bool = False) -> Page:
    out: Page = {}
    for page in pages:
        for name, family in page.items():
            if monotonic_only and family.type not in _MONOTONIC:
                continue
            into = out.setdefault(name, _Family(name, family.doc, family.type))
            for key, value in family.samples.items():
                into.add(key, value)
    return out


class PageSum:
    """`add(pages, alive)` -> the exposition of the sum. `pages` maps a source (a worker index, the
    supervisor) to the page it answered now; `alive` maps every source that has a running process
    to that process's identity (a worker's start count), whether it answered or not."""

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[Hashable, Page]] = {}  # source -> (process, its last page)
        self._retired: Page = {}  # the monotonic families of processes that ended

    def add(self, pages: Mapping[Hashable, str], alive: Mapping[Hashable, Hashable]) -> bytes:
        self._retire(alive)
        current: list[Page] = []
        for source, text in pages.items():
            page = parse(text)
            self._last[source] = (alive.get(source), page)
            current.append(page)
        # Alive, but no answer this time: its counters as last seen, so the sum does not dip.
        missed = [page for source, (_, page) in self._last.items() if source not in pages]
        total = _merge([*current, _merge(missed, monotonic_only=True), self._retired])
        return generate_latest(_Collected(total))

    def _retire(self, alive: Mapping[Hashable, Hashable]) -> None:
        for source, (process, page) in list(self._last.items()):
            if alive.get(source, _GONE) != process:
                self._retired = _merge([self._retired, page], monotonic_only=True)
                del self._last[source]


_GONE: Final = object()


class _Collected:
    """What generate_latest needs of a registry: `collect()`."""

    def __init__(self, families: Page) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return [family.metric() for family in self._families.values()]
