"""DNS discovery end to end: a real dnsmasq (tests/fixtures/dns.py) names real FastMCP instances on
127.0.0.x loopback addresses, the proxy discovers them, and real mcp SDK sessions run calls while
the answer changes (scaling 2 -> 3 -> 1), the DNS server dies or stops answering, and a reload
changes the entry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config
from tests.fixtures.backends import BackendProcess, start_all, stop_all
from tests.fixtures.dns import DnsServer, shared_port
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import (
    DEADLINE,
    SESSION_NOT_FOUND,
    call_tool,
    from_proxy,
    mcp_url,
    open_session,
    recorded_client,
    session_ledger,
    text_of,
    wait_until,
)

NAME = "tools.test"
HEALTH = {"interval": 0.2, "timeout": 1, "fall": 2, "rise": 1}
PACE = 0.3  # seconds between two calls of one session: ~100 requests/s for 30 sessions


def discover(dns: DnsServer, **extra: Any) -> dict[str, Any]:
    return {"nameservers": [dns.nameserver], "interval": 0.2, "timeout": 1, **extra}


def names(proxy: Proxy, *, available: bool = False) -> set[str]:
    return {b.name for b in proxy.backends if b.available or not available}


def backend_of(proxy: Proxy, process: BackendProcess) -> str:
    return f"tools@{process.host}:{process.port}"


async def holds(proxy: Proxy, expected: set[str], *, available: bool = False) -> None:
    async def check() -> bool:
        return names(proxy, available=available) == expected

    await wait_until(check, f"the proxy's backends to be {sorted(expected)}", 15)


# --- SDK sessions that keep calling ----------------------------------------------------------------


@dataclass
class Run:
    """One mcp SDK session calling `whoami` and `count` in turns until told to stop."""

    instance: str | None = None  # who answered its first call
    sid: str | None = None
    ok: list[float] = field(default_factory=list)  # monotonic time of each successful call
    errors: list[tuple[float, str]] = field(default_factory=list)
    misroutes: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def ok_after(self, moment: float) -> int:
        return sum(t > moment for t in self.ok)


async def run_session(url: str, run: Run, stop: asyncio.Event) -> None:
    try:
        async with recorded_client(url) as (client, wire):
            run.instance = text_of(await client.call_tool("whoami"))
            run.sid = wire.session_id
            run.ok.append(time.monotonic())
            run.ready.set()
            count = 0
            while not stop.is_set():
                async with asyncio.timeout(DEADLINE):
                    if count % 2 == 0:
                        count += 1
                        answer = text_of(await client.call_tool("count"))
                        expected = str((count + 1) // 2)
                    else:
                        count += 1
                        answer = text_of(await client.call_tool("whoami"))
                        expected = run.instance
                if answer != expected:
                    run.misroutes.append(f"call {count}: {answer!r}, expected {expected!r}")
                run.ok.append(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PACE):
                        await stop.wait()
    except Exception as exc:  # the instance stopped: its session ends (what the test checks)
        run.errors.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
    finally:
        run.ready.set()


class Sessions:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = asyncio.Event()
        self.runs: list[Run] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self, n: int, *, one_by_one: bool = False) -> list[Run]:
        """`n` more sessions, each once its first call answered."""
        runs = []
        for _ in range(n):
            run = Run()
            runs.append(run)
            self.runs.append(run)
            self.tasks.append(asyncio.create_task(run_session(self.url, run, self.stop)))
            if one_by_one:
                await asyncio.wait_for(run.ready.wait(), DEADLINE)
        await asyncio.wait_for(asyncio.gather(*(r.ready.wait() for r in runs)), 30)
        assert [r.errors for r in runs] == [[] for _ in runs]
        return runs

    def on(self, instance: BackendProcess) -> list[Run]:
        return [r for r in self.runs if r.instance == instance.name]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 60)


@pytest.fixture
async def sessions() -> AsyncIterator[Any]:
    opened: list[Sessions] = []

    def make(url: str) -> Sessions:
        opened.append(Sessions(url))
        return opened[-1]

    yield make
    for s in opened:
        await s.close()


async def calls_after(runs: Sequence[Run], moment: float) -> None:
    async def served() -> bool:
        return all(r.ok_after(moment) >= 2 for r in runs)

    await wait_until(served, "every session to have calls answered", 30)


# --- scaling ---------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_scaling_2_3_1_with_20_sessions_loses_no_call_of_an_instance_that_stays(
    dns_server: DnsServer, fleet_of: Any, dict_proxy: DictProxy, sessions: Any
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = shared_port(hosts)
    i2, i3 = await fleet_of(hosts[:2], port)
    await dns_server.aset_hosts({NAME: hosts[:2]})
    proxy = await dict_proxy(
        {
            "listen": "127.0.0.1:0",
            "backends": [{"name": "tools", "discover": {"dns": NAME, "port": port, **discover(dns_server)}}],
            "health": HEALTH,
        }
    )
    assert names(proxy) == {backend_of(proxy, i2), backend_of(proxy, i3)}  # found before serving
    live = sessions(mcp_url(proxy))
    await live.open(20)
    assert min(len(live.on(i2)), len(live.on(i3))) >= 7  # least_sessions, 20 opened at once

    # 2 -> 3: the new instance takes the new sessions at once.
    [i4] = await fleet_of(hosts[2:], port)
    await dns_server.aset_hosts({NAME: hosts})
    await holds(proxy, {backend_of(proxy, b) for b in (i2, i3, i4)}, available=True)
    newer = await live.open(4, one_by_one=True)
    assert {r.instance for r in newer} == {"i4"}

    # 3 -> 1: i3 and i4 are drained; their sessions go on being served while they answer.
    await dns_server.aset_hosts({NAME: hosts[:1]})
    await holds(proxy, {backend_of(proxy, i2)}, available=True)
    drained_at = time.monotonic()
    assert names(proxy) == {backend_of(proxy, b) for b in (i2, i3, i4)}  # still routable
    issued = {b.name: (await session_ledger(b)).issued for b in (i3, i4)}
    latest = await live.open(3, one_by_one=True)
    assert {r.instance for r in latest} == {"i2"}
    leaving = live.on(i3) + live.on(i4)
    await calls_after(leaving, drained_at)

    # They stop: their sessions end (404), and the proxy lets them go.
    ledgers = {b.name: await session_ledger(b) for b in (i3, i4)}
    stopped_at = time.monotonic()
    await asyncio.gather(i3.astop(), i4.astop())
    await holds(proxy, {backend_of(proxy, i2)})

    async def ended() -> bool:
        return all(r.errors for r in leaving)

    await wait_until(ended, "the sessions of the stopped instances to end", 30)
    async with aiohttp.ClientSession() as http:
        for run in leaving:
            assert run.sid is not None
            answer = await call_tool(http, mcp_url(proxy), run.sid, "whoami")
            assert answer.status == 404
            assert from_proxy(answer.headers)
            assert answer.json() == SESSION_NOT_FOUND
    await live.close()

    staying = live.on(i2)
    assert len(staying) >= 10
    assert [r.errors for r in staying] == [[] for _ in staying]  # 0 failed calls
    assert all(len(r.ok) > 3 for r in staying)
    assert [r.misroutes for r in live.runs] == [[] for _ in live.runs]  # 0 misroutes
    for run in leaving:  # served until their instance stopped, never failed before
        assert run.ok_after(drained_at) >= 2
        assert all(t >= stopped_at for t, _ in run.errors), run.errors
    # No session was placed on a drained instance, and no instance saw another's session id.
    for b in (i3, i4):
        assert ledgers[b.name].issued == issued[b.name]
        assert ledgers[b.name].stray_total == 0
    assert (await session_ledger(i2)).stray_total == 0


# --- SRV -------------------------------------------------------------------------------------------


async def test_srv_records_give_each_instance_its_port_and_weight(
    dns_server: DnsServer, dict_proxy: DictProxy
) -> None:
    # Each instance on a port of its own, which only the SRV record says.
    a = BackendProcess("a", host="127.0.0.2")
    b = BackendProcess("b", host="127.0.0.3")
    await asyncio.to_thread(start_all, [a, b])
    try:
        await dns_server.aset_hosts({"a.tools.test": [a.host], "b.tools.test": [b.host]})
        srv = "_mcp._tcp.tools.test"
        records = [(srv, "a.tools.test", a.port, 0, 10), (srv, "b.tools.test", b.port, 0, 30)]
        await dns_server.aset_srv(records)
        entry = {"name": "tools", "discover": {"srv": srv, "path": "/mcp", **discover(dns_server)}}
        proxy = await dict_proxy({"listen": "127.0.0.1:0", "backends": [entry], "health": HEALTH})
        weights = {backend.name: backend.weight for backend in proxy.backends}
        assert weights == {f"tools@{a.host}:{a.port}": 10, f"tools@{b.host}:{b.port}": 30}
        async with aiohttp.ClientSession() as http:
            sid = await open_session(http, mcp_url(proxy))
            assert (await call_tool(http, mcp_url(proxy), sid, "whoami")).text in {"a", "b"}

        # b leaves the SRV set: it is drained, a takes the new sessions.
        await dns_server.aset_srv([(srv, "a.tools.test", a.port, 0, 10)])
        await holds(proxy, {f"tools@{a.host}:{a.port}"}, available=True)
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                sid = await open_session(http, mcp_url(proxy))
                assert (await call_tool(http, mcp_url(proxy), sid, "whoami")).text == "a"
    finally:
        await asyncio.to_thread(stop_all, [a, b])


# --- faults ----------------------------------------------------------------------------------------


async def ready_body(http: aiohttp.ClientSession, proxy: Proxy) -> tuple[int, dict[str, Any]]:
    async with http.get(proxy.url + "/readyz") as resp:
        return resp.status, await resp.json()


def lookups(proxy: Proxy, result: str) -> float:
    value = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_discovery_lookups_total", {"entry": "tools", "result": result}
    )
    return value or 0.0


@pytest.mark.timeout(180)
async def test_a_killed_dns_server_keeps_the_backends_and_says_so(
    dns_server: DnsServer, fleet_of: Any, dict_proxy: DictProxy, sessions: Any
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = shared_port(hosts)
    i2, i3 = await fleet_of(hosts, port)
    await dns_server.aset_hosts({NAME: hosts})
    entry = {"name": "tools", "discover": {"dns": NAME, "port": port, **discover(dns_server, timeout=0.5)}}
    proxy = await dict_proxy({"listen": "127.0.0.1:0", "backends": [entry], "health": HEALTH})
    everyone = {backend_of(proxy, b) for b in (i2, i3)}
    live = sessions(mcp_url(proxy))
    runs = await live.open(6)
    async with aiohttp.ClientSession() as http:
        assert (await ready_body(http, proxy))[1]["status"] == "ready"

        dns_server.stop()  # killed mid-run
        killed_at = time.monotonic()
        failed = lookups(proxy, "error")

        async def failing() -> bool:
            return lookups(proxy, "error") >= failed + 3

        await wait_until(failing, "three failed lookups", 20)
        assert names(proxy, available=True) == everyone  # the pool is kept whole
        status, body = await ready_body(http, proxy)
        assert status == 200
        assert body["status"] == "degraded"
        assert body["reason"].startswith("discovery tools: ")
        [state] = body["discovery"]
        assert (state["entry"], state["state"], state["backends"]) == ("tools", "stale", 2)
        sample = proxy.metrics.registry.get_sample_value
        assert sample("mcpbalancer_discovery_stale", {"entry": "tools"}) == 1
        await calls_after(runs, killed_at)
        more = await live.open(2)  # new sessions are placed on the kept backends
        assert {r.instance for r in more} <= {"i2", "i3"}

        dns_server.start()  # back: the entry answers again
        await dns_server.aset_hosts({NAME: hosts})

        async def fresh() -> bool:
            return (await ready_body(http, proxy))[1]["status"] == "ready"

        await wait_until(fresh, "/readyz to be ready again", 20)
        assert sample("mcpbalancer_discovery_stale", {"entry": "tools"}) == 0
    await live.close()
    assert [r.errors for r in live.runs] == [[] for _ in live.runs]
    assert [r.misroutes for r in live.runs] == [[] for _ in live.runs]


@pytest.mark.timeout(180)
async def test_a_resolver_timeout_does_not_slow_the_requests(
    dns_server: DnsServer, fleet_of: Any, dict_proxy: DictProxy
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = shared_port(hosts)
    await fleet_of(hosts, port)
    await dns_server.aset_hosts({NAME: hosts})
    # Lookups that each wait their whole timeout, back to back.
    slow = discover(dns_server, timeout=2, interval=0.1)
    entry = {"name": "tools", "discover": {"dns": NAME, "port": port, **slow}}
    proxy = await dict_proxy({"listen": "127.0.0.1:0", "backends": [entry], "health": HEALTH})
    async with aiohttp.ClientSession() as http:
        sid = await open_session(http, mcp_url(proxy))
        dns_server.pause()  # queries arrive and are never answered
        try:
            failed = lookups(proxy, "error")
            durations = []
            deadline = time.monotonic() + 30
            # Calls go on while at least two lookups time out (4 s of lookups).
            while lookups(proxy, "error") < failed + 2:
                assert time.monotonic() < deadline, "the lookups never timed out"
                started = time.monotonic()
                answer = await call_tool(http, mcp_url(proxy), sid, "whoami")
                durations.append(time.monotonic() - started)
                assert answer.status == 200
            assert len(durations) > 10
            # A call that waited for a lookup would take about its 2 s timeout.
            assert max(durations) < 1.0, sorted(durations)[-5:]
            assert len(proxy.backends) == 2
        finally:
            dns_server.resume()


# --- reload ----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_a_reload_changes_the_discovery_entry(
    dns_server: DnsServer, fleet_of: Any, tmp_path: Path
) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]
    port = shared_port(hosts)
    i2, i3 = await fleet_of(hosts, port)
    await dns_server.aset_hosts({"old.test": hosts[:1], "new.test": hosts[1:]})
    path = tmp_path / "mcpbalancer.yaml"

    def write(name: str, **entry: Any) -> None:
        found = {"dns": name, "port": port, **discover(dns_server)}
        backends = [{"name": "tools", "discover": found, **entry}]
        data = {"listen": "127.0.0.1:0", "backends": backends, "health": HEALTH}
        path.write_text(yaml.safe_dump(data), encoding="utf-8")

    write("old.test")
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        old, new = backend_of(proxy, i2), backend_of(proxy, i3)
        assert names(proxy) == {old}
        async with aiohttp.ClientSession() as http:
            sid = await open_session(http, mcp_url(proxy))
            assert (await call_tool(http, mcp_url(proxy), sid, "whoami")).text == "i2"

            write("old.test", weight=5)  # the settings: applied to the backends found at once
            proxy.reload()
            assert [b.weight for b in proxy.backends] == [5]

            write("new.test", weight=5)  # the lookup: asked again at once, the old one drained
            proxy.reload()
            await holds(proxy, {new}, available=True)
            assert names(proxy) == {old, new}
            assert (await call_tool(http, mcp_url(proxy), sid, "whoami")).text == "i2"  # still served
            other = await open_session(http, mcp_url(proxy))
            assert (await call_tool(http, mcp_url(proxy), other, "whoami")).text == "i3"

            # The entry leaves the file: its backends leave with it, as a removed `url` backend's.
            path.write_text(
                yaml.safe_dump(
                    {
                        "listen": "127.0.0.1:0",
                        "backends": [{"name": "fixed", "url": i2.url}],
                        "health": HEALTH,
                    }
                ),
                encoding="utf-8",
            )
            changes = proxy.reload()
            assert sorted(changes.removed) == sorted([old, new])
            assert names(proxy) == {"fixed"}
            answer = await call_tool(http, mcp_url(proxy), other, "whoami")
            assert answer.status == 404
    finally:
        await proxy.stop()
