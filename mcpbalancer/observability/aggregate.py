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

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

# Gauges whose largest value is the proxy's; every other gauge is summed over the processes.
MAXED: Final = frozenset(
    {
        "mcpbalancer_backend_up",  # 1 when any worker sees the backend up (down on all: 0)
        "mcpbalancer_backend_draining",  # a drain reaches every worker; 1 while any still drains
        "mcpbalancer_store_degraded",  # 1 when any worker finds the store failing
        "mcpbalancer_build_info",  # always 1
        "mcpbalancer_tls_certificate_expiry_timestamp_seconds",  # a date: every worker reads the same file
        "process_start_time_seconds",  # the latest start: a restarted worker shows here
        "process_max_fds",  # a limit, the same for every process
        "python_info",  # always 1
    }
)
# Families that only grow while their process lives.
_MONOTONIC: Final = frozenset({"counter", "histogram", "summary"})


@dataclass
class _Family:
    """One family of a page: its HELP line as written, its type, and its samples, keyed by the
    sample as written before its value (`name{label="v",...}`): the pages come from the same code,
    which writes the same labels in the same order and escaping, so the text is the key."""

    name: str
    help: str
    type: str = "untyped"
    samples: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        old = self.samples.get(key)
        if old is None:
            self.samples[key] = value
        elif key.partition("{")[0].endswith("_created"):
            self.samples[key] = min(old, value)
        elif self.name in MAXED:
            self.samples[key] = max(old, value)
        else:
            self.samples[key] = old + value

    def lines(self) -> list[str]:
        head = [self.help, f"# TYPE {self.name} {self.type}"]
        return head + [f"{key} {_number(value)}" for key, value in self.samples.items()]


Page = dict[str, _Family]


def parse(text: str) -> Page:
    """A page in the text format as prometheus_client writes it (HELP, TYPE, then the samples of
    that family; no timestamps). prometheus_client's own parser takes about 10 ms for a page of 25
    KB here, this a tenth of that: a scrape of N workers parses N pages."""
    page: Page = {}
    family: _Family | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line[7:].partition(" ")[0]
            family = page.setdefault(name, _Family(name, line))
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            family = page.setdefault(name, _Family(name, f"# HELP {name} "))
            family.type = kind
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if family is None:
                name = key.partition("{")[0]
                family = page.setdefault(name, _Family(name, f"# HELP {name} "))
            family.add(key, float(value))
    return page


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(value)


def render(page: Page) -> bytes:
    lines = [line for family in page.values() for line in family.lines()]
    return ("\n".join(lines) + "\n").encode()


def _merge(pages: Iterable[Page], *, monotonic_only: bool = False) -> Page:
    out: Page = {}
    for page in pages:
        for name, family in page.items():
            if monotonic_only and family.type not in _MONOTONIC:
                continue
            into = out.get(name)
            if into is None:
                into = out[name] = _Family(name, family.help, family.type)
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
        return render(_merge([*current, _merge(missed, monotonic_only=True), self._retired]))

    def _retire(self, alive: Mapping[Hashable, Hashable]) -> None:
        for source, (process, page) in list(self._last.items()):
            if alive.get(source, _GONE) != process:
                self._retired = _merge([self._retired, page], monotonic_only=True)
                del self._last[source]


_GONE: Final = object()
