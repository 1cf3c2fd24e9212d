"""Backends found in DNS: each `discover` entry is looked up every `interval` seconds, and each
address of the answer is a backend.

- **Names.** A discovered backend is named `<entry>@<address>:<port>` (`tools@10.0.3.7:8000`,
  `tools@[fd00::7]:8000`): derived from the entry and the address only, so the same instance has
  the same name after a re-resolution, a reload or a proxy restart, and the session map (which
  holds names) keeps routing its sessions. `@` cannot occur in a configured name, so a discovered
  name never takes a fixed backend's.
- **Settings.** `endpoints(entry, records)` is the one place an answer becomes BackendConfigs: each
  is the entry's template (its weight, eras, tls, drain, drain_timeout, and any per-backend setting
  an entry has) with the name, address and, from an SRV record, weight filled in. A pure function.
- **Changes.** The fleet's `sync` applies an answer: a new address takes sessions at once, one no
  longer listed is drained (its sessions are served while it answers) and removed by `retire` once
  it stopped answering or its drain_timeout passed.
- **Outages.** A failed lookup or an empty answer changes nothing: the last known backends stay, the
  entry is reported `stale` (metric, log line, /readyz body) until an answer with addresses comes.
  A DNS outage never empties a pool. Lookups run in a task per entry, never on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from mcpbalancer.config import BackendConfig, DiscoveryConfig, host_port
from mcpbalancer.errors import LookupFailed
from mcpbalancer.fleet.lifecycle import Fleet
from mcpbalancer.fleet.resolver import Record
from mcpbalancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

NAME_SEP: Final = "@"
MAX_WEIGHT: Final = 1000  # a backend's weight is 1-1000; an SRV weight is 0-65535

# The state of an entry: its last lookup answered with addresses; or did not (the last known
# backends are kept); or no lookup has answered yet.
OK, STALE, PENDING = "ok", "stale", "pending"

Resolve = Callable[[DiscoveryConfig], Awaitable[list[Record]]]


def endpoint_name(entry: str, host: str, port: int) -> str:
    return f"{entry}{NAME_SEP}{host_port(host, port)}"


def endpoints(entry: DiscoveryConfig, records: Iterable[Record]) -> list[BackendConfig]:
    """The backends an answer stands for, with the entry's settings. A record's weight (SRV) is
    kept within 1-1000: 0 (the lowest share SRV can give) counts as 1."""
    template = entry.template
    tls = template.tls
    if tls is not None and tls.server_name is None:
        tls = dataclasses.replace(tls, server_name=entry.tls_name)
    configs = {}
    for record in records:
        name = endpoint_name(entry.name, record.host, record.port)
        weight = template.weight if record.weight is None else min(max(record.weight, 1), MAX_WEIGHT)
        configs[name] = dataclasses.replace(
            template,
            name=name,
            url=f"{entry.scheme}://{host_port(record.host, record.port)}{entry.path}",
            host=record.host,
            port=record.port,
            weight=weight,
            tls=tls,
        )
    return list(configs.values())


@dataclasses.dataclass
class EntryState:
    """What /readyz and the log say of one entry."""

    config: DiscoveryConfig
    records: list[Record] | None = None  # the last answer with addresses; None before the first
    state: str = PENDING
    reason: str | None = None  # why the last lookup gave nothing
    failures: int = 0  # lookups in a row that gave nothing
    last_answer: float | None = None  # wall-clock time of the last answer with addresses
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def report(self) -> dict[str, Any]:
        found = len(self.records or ())
        return {"entry": self.config.name, "state": self.state, "backends": found, "reason": self.reason}


class Discovery:
    """Runs the lookups of the `discover` entries and applies their answers to the fleet.

    `resolve` is injected (fleet/resolver.py's DnsResolver in the proxy); `contexts` are the TLS
    client contexts by entry name, one shared by all of an entry's backends."""

    def __init__(
        self,
        entries: Sequence[DiscoveryConfig],
        fleet: Fleet[Any],
        resolve: Resolve,
        *,
        contexts: Mapping[str, ssl.SSLContext] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fleet = fleet
        self._resolve = resolve
        self._contexts = dict(contexts or {})
        self._metrics = metrics
        self._clock = clock
        self._entries: dict[str, EntryState] = {e.name: EntryState(e) for e in entries}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    async def start(self) -> None:
        """One lookup of every entry (each bounded by its timeout), so that the proxy starts with
        its backends; then a task per entry looks up again every interval."""
        await asyncio.gather(*(self.refresh(name) for name in self._entries))
        for name in self._entries:
            self._spawn(name)

    async def refresh(self, name: str) -> None:
        """Look `name` up once and apply the answer (or keep the last one), then retire what is done."""
        state = self._entries.get(name)
        if state is None:
            return
        entry = state.config
        try:
            records: list[Record] | None = await self._resolve(entry)
            reason = None
        except LookupFailed as exc:
            records, reason = None, str(exc)
        if state.config is not entry or self._entries.get(name) is not state:
            return  # a reload changed or removed the entry meanwhile; its own lookup follows
        if records:
            self._answered(state, records)
        elif records is None:
            self._gave_nothing(state, "error", reason or "no answer")
        else:
            self._gave_nothing(state, "empty", "the name has no addresses")
        self._fleet.retire()

    def _answered(self, state: EntryState, records: list[Record]) -> None:
        if state.state == STALE:
            log.info(
                "discovery %s: answered again after %d failed lookups: %d backends",
                state.config.name,
                state.failures,
                len(records),
            )
        state.state, state.reason, state.failures = OK, None, 0
        state.last_answer = self._clock()
        changed, state.records = records != state.records, records
        self._count(state, "ok")
        if changed:
            self._apply(state)

    def _gave_nothing(self, state: EntryState, result: str, reason: str) -> None:
        """A failed or empty lookup: the last known backends stay."""
        state.failures += 1
        self._count(state, result)
        if state.state != STALE or state.reason != reason:
            kept = len(state.records or ())
            log.warning(
                "discovery %s: lookup of %s gave nothing: %s; keeping the %d backends last found",
                state.config.name,
                state.config.dns or state.config.srv,
                reason,
                kept,
            )
        state.state, state.reason = STALE, reason

    def _apply(self, state: EntryState, *, from_file: bool = False) -> None:
        entry = state.config
        configs = endpoints(entry, state.records or ())
        context = self._contexts.get(entry.name)
        contexts = {c.name: context for c in configs} if context is not None else {}
        changes = self._fleet.sync(entry.name, configs, contexts, from_file=from_file)
        if changes:
            log.info(
                "discovery %s: %d backends; added %s, drained %s, updated %s",
                entry.name,
                len(configs),
                changes.added or "none",
                changes.drained or "none",
                changes.updated or "none",
            )

    def _count(self, state: EntryState, result: str) -> None:
        if self._metrics is not None:
            found = len(state.records or ())
            self._metrics.discovery_lookup(state.config.name, result, found, stale=result != "ok")

    # -- the lookup tasks --------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        self._tasks[name] = asyncio.get_running_loop().create_task(self._watch(name))

    async def _watch(self, name: str) -> None:
        state = self._entries[name]
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(state.config.interval):
                    await state.wake.wait()  # a reload that changed the lookup: at once
            state.wake.clear()
            try:
                await self.refresh(name)
            except Exception:  # a bug must not end discovery: the backends would freeze
                log.exception("discovery %s: lookup round failed", name)
            state = self._entries.get(name, state)

    # -- reload -----------------------------------------------------------------------------------

    def reconfigure(
        self, entries: Sequence[DiscoveryConfig], contexts: Mapping[str, ssl.SSLContext] | None = None
    ) -> None:
        """The entries of a reloaded file. A kept entry's backends take its new settings at once
        (from the last answer); one whose lookup changed is looked up again at once, and its last
        backends stay until that answer comes. A new entry is looked up at once; the backends of a
        removed one left with it (`Fleet.apply`)."""
        self._contexts = dict(contexts or {})
        wanted = {entry.name: entry for entry in entries}
        for name in [n for n in self._entries if n not in wanted]:
            del self._entries[name]
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            if self._metrics is not None:
                self._metrics.forget("entry", name)
        for name, entry in wanted.items():
            state = self._entries.get(name)
            if state is None:
                self._entries[name] = EntryState(entry)
                self._spawn(name)
                self._entries[name].wake.set()
                continue
            old, state.config = state.config, entry
            if state.records is not None:
                self._apply(state, from_file=True)
            if entry.query != old.query:
                state.wake.set()

    # -- report -----------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One line per entry for /readyz: its state, the addresses of its last answer, and why
        it is stale."""
        return [state.report() for state in self._entries.values()]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
