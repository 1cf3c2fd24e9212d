"""DNS discovery without a DNS server: the `discover` entry in the config, the entry -> backends
expansion, the fleet's sync and retire, and the discovery loop on a scripted resolver (outages keep
the set, reloads change the entry). tests/test_discovery_dns.py runs the same on a real dnsmasq."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mcpbalancer.config import DiscoveryConfig, parse_config
from mcpbalancer.errors import ConfigError, LookupFailed
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.discovery import OK, PENDING, STALE, Discovery, endpoint_name, endpoints
from mcpbalancer.fleet.lifecycle import Fleet
from mcpbalancer.fleet.resolver import Record
from mcpbalancer.observability.metrics import Metrics
from tests.mcp_helpers import wait_until

DNS = {"dns": "tools.test", "port": 8000, "nameservers": ["127.0.0.1:5353"]}


def entry(extra: dict[str, Any] | None = None, **discover: Any) -> DiscoveryConfig:
    data = {"name": "tools", "discover": {**DNS, **discover}, **(extra or {})}
    [found] = parse_config({"backends": [data]}).discovery
    return found


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": [data]}, source="f.yaml")
    return str(info.value)


# --- the config ------------------------------------------------------------------------------------


def test_a_discover_entry_is_not_a_fixed_backend() -> None:
    config = parse_config(
        {
            "backends": [
                {"name": "fixed", "url": "http://127.0.0.1:8001"},
                {"name": "tools", "discover": {"dns": "tools.mcp.svc.cluster.local", "port": 8000}},
            ]
        }
    )
    assert [b.name for b in config.backends] == ["fixed"]
    [tools] = config.discovery
    assert (tools.dns, tools.port, tools.interval, tools.timeout, tools.family) == (
        "tools.mcp.svc.cluster.local",
        8000,
        5.0,
        2.0,
        "ipv4",
    )
    assert tools.nameservers == ()  # the system's resolv.conf


def test_the_template_carries_the_entry_settings() -> None:
    found = entry({"weight": 3, "eras": ["legacy"], "drain_timeout": 30}, path="/mcp")
    template = found.template
    assert (template.weight, template.eras, template.drain_timeout, template.path) == (
        3,
        ("legacy",),
        30,
        "/mcp",
    )
    assert found.nameservers == (("127.0.0.1", 5353),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"discover": {"dns": "x.test"}}, "backends[0].discover.port: is required with `dns`"),
        ({"discover": {"srv": "_mcp._tcp.x.test", "port": 1}}, "backends[0].discover.port: is not used"),
        ({"discover": {"port": 1}}, "backends[0].discover: needs exactly one of `dns`"),
        ({"discover": {"dns": "a", "srv": "_b._tcp.c"}}, "needs exactly one of `dns`"),
        (
            {"discover": {"srv": "_mcp._tcp.x"}, "weight": 2},
            "backends[0].weight: is not used with `discover.srv`",
        ),
        ({"discover": {**DNS}, "url": "http://h"}, "backends[0].url: is not used with `discover`"),
        ({"discover": {**DNS}, "command": "x"}, "backends[0].command: is not used with `discover`"),
        ({"discover": {**DNS}, "tls": {}}, "backends[0].tls: is only for `discover.scheme: https`"),
        ({"discover": {**DNS, "nameservers": ["ns.example"]}}, "nameservers[0]: must be an IP address"),
        ({"discover": {**DNS, "nameservers": "127.0.0.1"}}, "nameservers: must be a list of IP addresses"),
        ({"discover": {**DNS, "dns": "bad..name"}}, "backends[0].discover.dns: must be a DNS name"),
        ({"discover": {**DNS, "interval": 0}}, "backends[0].discover.interval: must be >= 0.1"),
        ({"discover": {**DNS, "family": "ipx"}}, "backends[0].discover.family: must be one of ipv4, ipv6"),
        ({"discover": {**DNS, "intervall": 1}}, "unknown key; allowed: dns, srv, port, interval"),
    ],
)
def test_a_bad_discover_entry_is_refused_naming_the_key(data: dict[str, Any], message: str) -> None:
    assert message in refused({"name": "tools", **data})


def test_a_suggestion_for_a_mistyped_discover_key() -> None:
    assert "did you mean `interval`?" in refused({"name": "t", "discover": {**DNS, "intervall": 1}})


def test_names_are_unique_across_fixed_and_discover_entries_and_pools_name_fixed_ones() -> None:
    tools = {"name": "tools", "discover": DNS}
    with pytest.raises(ConfigError, match=r"backends\[1\].name: duplicate name 'tools'"):
        parse_config({"backends": [tools, {"name": "tools", "url": "http://h"}]})
    with pytest.raises(ConfigError, match=r"pools.p\[0\]: 'tools' is a `discover` entry"):
        parse_config({"backends": [tools], "pools": {"p": ["tools"]}})


# --- entry -> backends -----------------------------------------------------------------------------


def test_each_address_is_a_backend_named_by_the_entry_and_the_address() -> None:
    found = entry({"weight": 2, "drain_timeout": 9}, path="/mcp")
    configs = endpoints(found, [Record("10.0.3.7", 8000), Record("fd00::7", 8000)])
    assert [c.name for c in configs] == ["tools@10.0.3.7:8000", "tools@[fd00::7]:8000"]
    first = configs[0]
    assert (first.url, first.host, first.port, first.path) == (
        "http://10.0.3.7:8000/mcp",
        "10.0.3.7",
        8000,
        "/mcp",
    )
    assert (first.weight, first.drain_timeout, first.eras) == (2, 9, ("legacy", "modern"))
    # Derived from the entry and the address only: the same after any re-resolution or restart.
    assert endpoints(found, [Record("10.0.3.7", 8000)])[0] == first
    assert endpoint_name("tools", "10.0.3.7", 8000) == first.name


def test_srv_weights_are_used_within_the_backend_range() -> None:
    found = entry(dns=None, port=None, srv="_mcp._tcp.tools.test")
    records = [Record("10.0.0.1", 1, 0), Record("10.0.0.2", 2, 30), Record("10.0.0.3", 3, 65535)]
    assert [c.weight for c in endpoints(found, records)] == [1, 30, 1000]


def test_https_backends_verify_the_looked_up_name_by_default() -> None:
    found = entry(scheme="https")
    [config] = endpoints(found, [Record("10.0.0.1", 8443)])
    assert config.tls is not None
    assert config.tls.server_name == "tools.test"
    srv = entry(dns=None, port=None, srv="_mcp._tcp.tools.test", scheme="https")
    assert srv.tls_name == "tools.test"  # the service's name, without _mcp._tcp.
    named = entry({"tls": {"server_name": "mcp.internal"}}, scheme="https")
    assert endpoints(named, [Record("10.0.0.1", 8443)])[0].tls.server_name == "mcp.internal"  # type: ignore[union-attr]


# --- the fleet -------------------------------------------------------------------------------------


class FakePool:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.closed = False

    def close(self) -> None:
        self.closed = True


def fleet(fixed: Sequence[dict[str, Any]] = ()) -> Fleet[FakePool]:
    config = parse_config({"backends": [*fixed, {"name": "tools", "discover": DNS}]})
    return Fleet(config.backends, pool=FakePool)


def sync(f: Fleet[FakePool], *hosts: str, found: DiscoveryConfig | None = None) -> Any:
    found = found or entry()
    return f.sync("tools", endpoints(found, [Record(h, 8000) for h in hosts]))


async def test_sync_adds_drains_brings_back_and_retires() -> None:
    f = fleet([{"name": "fixed", "url": "http://127.0.0.1:1"}])
    changes = sync(f, "10.0.0.1", "10.0.0.2")
    assert changes.added == ["tools@10.0.0.1:8000", "tools@10.0.0.2:8000"]
    one, two = (f.backends.get(n) for n in changes.added)
    assert one is not None
    assert two is not None
    assert one.available
    assert two.available
    assert [b.name for b in f.backends] == ["fixed", *changes.added]

    one.sessions, one.in_flight = 3, 1
    changes = sync(f, "10.0.0.2")
    assert changes.drained == [one.name]
    assert one.draining
    assert f.backends.get(one.name) is one
    assert f.retire() == []  # it answers: it stays
    one.up = False
    assert f.retire() == []  # down, but an exchange is in flight
    one.up, one.in_flight = True, 0

    changes = sync(f, "10.0.0.1", "10.0.0.2")  # back in DNS: takes sessions again
    assert not changes.added
    assert not one.draining
    assert not f.vanished(one.name)

    sync(f, "10.0.0.2")
    one.up = False
    pool = f.pools[one.name]
    assert f.retire() == [one.name]
    assert f.backends.get(one.name) is None
    assert one.name not in f.pools
    assert pool.closed
    assert [b.name for b in f.backends] == ["fixed", two.name]


async def test_a_vanished_backend_past_its_drain_timeout_is_evicted_then_retired() -> None:
    f = fleet()
    found = entry({"drain_timeout": 0.05})
    sync(f, "10.0.0.1", "10.0.0.2", found=found)
    gone = f.backends.get("tools@10.0.0.1:8000")
    assert gone is not None
    gone.sessions = 2
    evicted: list[str] = []
    f.on_evict = lambda backend: evicted.append(backend.name)
    removed: list[str] = []
    f.on_remove = lambda backend: removed.append(backend.name)
    sync(f, "10.0.0.2", found=found)
    await _until(lambda: gone.evicted)
    assert evicted == [gone.name]
    assert f.retire() == [gone.name]
    assert removed == [gone.name]


async def test_an_admin_drain_survives_a_dns_answer_but_not_a_reload() -> None:
    f = fleet()
    sync(f, "10.0.0.1")
    name = "tools@10.0.0.1:8000"
    assert f.drain(name)
    sync(f, "10.0.0.1")
    backend = f.backends.get(name)
    assert backend is not None
    assert backend.draining
    f.sync("tools", endpoints(entry(), [Record("10.0.0.1", 8000)]), from_file=True)
    assert not backend.draining


async def test_a_reload_keeps_the_backends_of_kept_entries_and_drops_those_of_removed_ones() -> None:
    f = fleet([{"name": "fixed", "url": "http://127.0.0.1:1"}])
    sync(f, "10.0.0.1")
    fixed = parse_config({"backends": [{"name": "fixed", "url": "http://127.0.0.1:1"}]}).backends
    changes = f.apply(fixed, discovered={"tools"})
    assert not changes
    assert [b.name for b in f.backends] == ["fixed", "tools@10.0.0.1:8000"]
    changes = f.apply(fixed, discovered=set())
    assert changes.removed == ["tools@10.0.0.1:8000"]
    assert [b.name for b in f.backends] == ["fixed"]


async def _until(condition: Callable[[], bool], what: str = "the condition") -> None:
    async def holds() -> bool:
        return condition()

    await wait_until(holds, what, 5)


# --- the discovery loop on a scripted resolver ----------------------------------------------------


class Script:
    """A resolver whose answers the test sets: records, an empty answer, or a failure."""

    def __init__(self) -> None:
        self.answer: list[Record] | LookupFailed = []
        self.asked: list[DiscoveryConfig] = []
        self.calls = asyncio.Event()

    async def __call__(self, config: DiscoveryConfig) -> list[Record]:
        self.asked.append(config)
        self.calls.set()
        if isinstance(self.answer, LookupFailed):
            raise self.answer
        return list(self.answer)

    def hosts(self, *hosts: str) -> None:
        self.answer = [Record(h, 8000) for h in hosts]


def names(f: Fleet[FakePool], *, available: bool = False) -> list[str]:
    return [b.name for b in f.backends if b.available or not available]


async def test_outages_and_empty_answers_keep_the_last_known_backends() -> None:
    f, script, registry = fleet(), Script(), CollectorRegistry()
    metrics = Metrics(registry)
    discovery = Discovery([entry()], f, script, metrics=metrics)
    assert discovery.status()[0]["state"] == PENDING
    script.hosts("10.0.0.1", "10.0.0.2")
    await discovery.refresh("tools")
    assert names(f, available=True) == ["tools@10.0.0.1:8000", "tools@10.0.0.2:8000"]
    assert discovery.status() == [{"entry": "tools", "state": OK, "backends": 2, "reason": None}]

    script.answer = LookupFailed("tools.test A: no answer within 2 s")
    await discovery.refresh("tools")
    assert names(f, available=True) == ["tools@10.0.0.1:8000", "tools@10.0.0.2:8000"]
    [status] = discovery.status()
    assert (status["state"], status["backends"]) == (STALE, 2)
    assert status["reason"] == "tools.test A: no answer within 2 s"
    sample = registry.get_sample_value
    assert sample("mcpbalancer_discovery_stale", {"entry": "tools"}) == 1
    assert sample("mcpbalancer_discovery_lookups_total", {"entry": "tools", "result": "error"}) == 1

    script.answer = []
    await discovery.refresh("tools")
    assert names(f, available=True) == ["tools@10.0.0.1:8000", "tools@10.0.0.2:8000"]
    assert discovery.status()[0]["reason"] == "the name has no addresses"
    assert sample("mcpbalancer_discovery_lookups_total", {"entry": "tools", "result": "empty"}) == 1

    script.hosts("10.0.0.2")
    await discovery.refresh("tools")
    assert discovery.status()[0]["state"] == OK
    assert sample("mcpbalancer_discovery_stale", {"entry": "tools"}) == 0
    assert sample("mcpbalancer_discovery_backends", {"entry": "tools"}) == 1
    assert names(f, available=True) == ["tools@10.0.0.2:8000"]
    assert f.vanished("tools@10.0.0.1:8000")


async def test_the_loop_looks_up_every_interval_and_a_reload_changes_the_entry() -> None:
    f, script = fleet(), Script()
    script.hosts("10.0.0.1")
    discovery = Discovery([entry(interval=0.1)], f, script)
    await discovery.start()
    try:
        assert names(f) == ["tools@10.0.0.1:8000"]
        script.hosts("10.0.0.1", "10.0.0.2")
        await _until(lambda: len(f.backends) == 2)

        # The settings change: the backends take them from the last answer at once.
        discovery.reconfigure([entry({"weight": 7}, interval=0.1)])
        assert {b.weight for b in f.backends} == {7}
        # The lookup changes: asked again at once, with the new name (the interval is long now).
        script.asked.clear()
        renamed = entry({"weight": 7}, dns="other.test", interval=60)
        script.hosts("10.0.0.9")
        discovery.reconfigure([renamed])
        await _until(lambda: any(c.dns == "other.test" for c in script.asked))
        await _until(lambda: names(f, available=True) == ["tools@10.0.0.9:8000"])
    finally:
        await discovery.close()


async def test_a_failing_first_lookup_starts_with_no_backends_and_pending_then_stale() -> None:
    f, script = fleet(), Script()
    script.answer = LookupFailed("tools.test A: every DNS server failed")
    discovery = Discovery([entry()], f, script)
    await discovery.start()
    try:
        assert len(f.backends) == 0
        assert discovery.status()[0]["state"] == STALE
    finally:
        await discovery.close()


def test_entry_equality_is_by_value() -> None:
    # A reload builds new DiscoveryConfigs; one equal to the running one is no change of lookup.
    assert entry() == entry()
    assert entry().query == dataclasses.replace(entry(), interval=9).query
