"""A rolling update of discovered backends that loses no live session (docs/deploy.md, "Rollouts").

What Kubernetes does to a Deployment with `maxSurge: 1, maxUnavailable: 0`, played with real parts:
a new FastMCP instance starts and joins DNS (its pod is ready); then an old one leaves DNS (its pod
is terminating) but keeps running through its `preStop` sleep, and is stopped (SIGTERM) only after
it. Meanwhile real mcp SDK clients work: short jobs (a session of a few calls, opened and closed
again and again) and long sessions that outlive every old instance.

The settings under test are those the page gives: the preStop sleep covers the discovery
`interval` (the proxy drains the instance before it stops taking connections) and the proxy's
`drain_timeout`; short sessions end by themselves meanwhile; at `drain_timeout` `failover: replay`
moves the long sessions to a new instance, on the same session id, without the client noticing,
while the old one still runs. SIGTERM then reaches an instance nothing is sent to any more:
FastMCP behind uvicorn ends every open event stream at SIGTERM (sse-starlette's exit hook), so a
request still in flight then would be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.dns import DnsServer, FleetOf, shared_port
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import DEADLINE, mcp_url, recorded_client, session_ledger, text_of, wait_until

NAME = "tools.test"
PACE = 0.2


@dataclass
class Work:
    """What the clients saw: every call's answer (instance name) with its time, and every failure."""

    calls: list[tuple[float, str, str]] = field(default_factory=list)  # (time, session, instance)
    failures: list[str] = field(default_factory=list)
    sessions: dict[str, list[str]] = field(default_factory=dict)  # session -> instances, in order

    def record(self, sid: str, instance: str) -> None:
        self.calls.append((time.monotonic(), sid, instance))
        seen = self.sessions.setdefault(sid, [])
        if not seen or seen[-1] != instance:
            seen.append(instance)

    def report(self) -> str:
        now = time.monotonic()
        last = {sid: now - at for at, sid, _ in self.calls}
        lines = [f"{sid[:8]} {self.sessions[sid]} last call {last[sid]:.1f} s ago" for sid in long_ids(self)]
        return "\n".join([*lines, *self.failures])

    def placed_after(self, moment: float) -> set[str]:
        """The instances of the sessions whose first call came after `moment`."""
        firsts: dict[str, tuple[float, str]] = {}
        for at, sid, instance in self.calls:
            firsts.setdefault(sid, (at, instance))
        return {instance for at, instance in firsts.values() if at > moment}


async def long_session(url: str, work: Work, stop: asyncio.Event, ready: asyncio.Event) -> None:
    try:
        async with recorded_client(url) as (client, wire):
            while True:
                async with asyncio.timeout(DEADLINE):
                    work.record(wire.session_id, text_of(await client.call_tool("whoami")))
                ready.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PACE):
                        await stop.wait()
                if stop.is_set():
                    return
    except Exception as exc:
        work.failures.append(f"long session: {leaves(exc)}")
    finally:
        ready.set()


async def short_jobs(url: str, work: Work, stop: asyncio.Event) -> None:
    """Sessions of three calls, one after the other, until told to stop."""
    while not stop.is_set():
        try:
            async with recorded_client(url) as (client, wire):
                for _ in range(3):
                    async with asyncio.timeout(DEADLINE):
                        work.record(wire.session_id, text_of(await client.call_tool("whoami")))
        except Exception as exc:
            work.failures.append(f"short session: {leaves(exc)}")
            return


def leaves(exc: BaseException) -> str:
    """What failed, through the SDK's exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(leaves(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def name_of(proxy: Proxy, process: BackendProcess) -> str:
    return f"tools@{process.host}:{process.port}"


async def until(condition: Any, what: str, deadline: float = 30) -> None:
    async def check() -> bool:
        return bool(condition())

    await wait_until(check, what, deadline)


async def roll(
    proxy: Proxy, dns: DnsServer, work: Work, current: list[str], leaving: BackendProcess, new: BackendProcess
) -> None:
    """One step of the rollout: `new` joins, `leaving` goes through its termination."""
    # The new pod is ready: it joins the Service (DNS) and takes new sessions.
    current.append(new.host)
    await dns.aset_hosts({NAME: current})
    joined = name_of(proxy, new)
    await until(lambda: (b := proxy.backends.get(joined)) is not None and b.available, f"{new.name} to join")
    # The old pod is terminating: out of the Service at once, running through its preStop.
    current.remove(leaving.host)
    await dns.aset_hosts({NAME: current})
    gone = proxy.backends.get(name_of(proxy, leaving))
    assert gone is not None
    await until(lambda: gone.draining, f"{leaving.name} to be drained")
    drained_at = time.monotonic()
    issued = (await session_ledger(leaving)).issued

    # Its preStop sleep: the pod runs on, and the proxy serves its sessions until drain_timeout,
    # then moves those left (replay) and lets the pod go once nothing is in flight on it.
    await until(lambda: proxy.backends.get(gone.name) is None, f"{leaving.name} to leave the proxy")
    left_at = time.monotonic()

    def moved() -> bool:
        return all(work.sessions[sid][-1] != leaving.name for sid in long_ids(work))

    await until(moved, f"the long sessions of {leaving.name} to move: {work.report()}")
    assert (await session_ledger(leaving)).issued == issued  # no new session while drained
    assert leaving.name not in work.placed_after(drained_at + 0.5)
    # Drained, it went on serving its sessions until the drain timed out.
    assert any(drained_at < t < left_at for t, _, i in work.calls if i == leaving.name), work.report()
    # preStop is over: SIGTERM. Nothing is sent to it any more, so nothing is cut.
    await leaving.astop()
    assert not work.failures, work.failures


@pytest.mark.timeout(240)
async def test_a_rolling_update_loses_no_session(
    dns_server: DnsServer, fleet_of: FleetOf, dict_proxy: DictProxy
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    port = shared_port(hosts)
    old = await fleet_of(hosts[:2], port)
    await dns_server.aset_hosts({NAME: hosts[:2]})
    discover = {"dns": NAME, "port": port, "nameservers": [dns_server.nameserver], "interval": 0.2}
    proxy = await dict_proxy(
        {
            "listen": "127.0.0.1:0",
            # Shorter than the pods' preStop sleep, which must also cover the discovery interval.
            "backends": [{"name": "tools", "discover": discover, "drain_timeout": 2}],
            "failover": "replay",
            "health": {"interval": 0.2, "timeout": 1, "fall": 2, "rise": 1},
        }
    )
    url = mcp_url(proxy)
    work, stop = Work(), asyncio.Event()
    readies = [asyncio.Event() for _ in range(6)]
    tasks = [asyncio.create_task(long_session(url, work, stop, ready)) for ready in readies]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    tasks += [asyncio.create_task(short_jobs(url, work, stop)) for _ in range(4)]

    current = list(hosts[:2])
    for leaving, joining in zip(old, hosts[2:], strict=True):
        [new] = await fleet_of([joining], port)
        await roll(proxy, dns_server, work, current, leaving, new)

    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert work.failures == []  # not one failed call, long or short
    old_names = {b.name for b in old}
    for sid in long_ids(work):
        moves = work.sessions[sid]
        assert moves[-1] not in old_names  # every long session ended on a new instance
        assert len(moves) <= 3  # it moved only when its instance stopped (at most once per old one)
    assert len(work.sessions) > 20  # short sessions came and went throughout


def long_ids(work: Work) -> list[str]:
    """The long sessions: the first six session ids seen."""
    seen: list[str] = []
    for _, sid, _ in work.calls:
        if sid not in seen:
            seen.append(sid)
    return seen[:6]
