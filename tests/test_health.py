"""The health state machine, the checker and the fleet, without sockets: fake probes, a fake clock."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import CollectorRegistry

from mcpbalancer.config import BackendConfig, HealthConfig, parse_config
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.errors import ConfigError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.health import FAIL, OK, REFUSED, TIMEOUT, HealthChecker, HealthState
from mcpbalancer.fleet.lifecycle import Fleet
from mcpbalancer.observability.metrics import Metrics
from tests.mcp_helpers import wait_until

# --- HealthState -----------------------------------------------------------------------------------


def test_fall_failures_in_a_row_mark_down() -> None:
    state = HealthState(fall=3, rise=2)
    assert [state.record(False), state.record(False)] == [False, False]
    assert state.up
    assert state.record(False) is True
    assert not state.up
    assert state.record(False) is False  # already down: no new report


def test_a_success_resets_the_failure_count() -> None:
    state = HealthState(fall=2, rise=2)
    state.record(False)
    state.record(True)
    state.record(False)
    assert state.up


def test_rise_successes_in_a_row_bring_it_back() -> None:
    state = HealthState(fall=1, rise=3)
    state.record(False)
    assert not state.up
    assert [state.record(True), state.record(True)] == [False, False]
    state.record(False)  # breaks the run
    assert [state.record(True), state.record(True)] == [False, False]
    assert state.record(True) is True
    assert state.up


def test_eject_is_down_at_once_and_needs_rise_to_return() -> None:
    state = HealthState(fall=5, rise=2)
    assert state.eject() is True
    assert not state.up
    assert state.eject() is False
    assert state.record(True) is False
    assert state.record(True) is True


# --- HealthChecker ---------------------------------------------------------------------------------


class FakeProbe:
    def __init__(self) -> None:
        self.results: dict[str, str] = {}
        self.calls: list[str] = []

    async def __call__(self, backend: Backend) -> str:
        self.calls.append(backend.name)
        result = self.results.get(backend.name, OK)
        if result == "hang":
            await asyncio.Event().wait()
        return result


def checker(
    probe: FakeProbe, *, fall: int = 2, rise: int = 2, timeout: float = 1.0
) -> tuple[HealthChecker, dict[str, bool], Metrics]:
    statuses: dict[str, bool] = {}
    metrics = Metrics(CollectorRegistry())
    config = HealthConfig(interval=1.0, timeout=timeout, fall=fall, rise=rise)
    now = iter(range(1000, 2000))
    check = HealthChecker(
        config, statuses.__setitem__, probe, metrics=metrics, clock=lambda: float(next(now))
    )
    return check, statuses, metrics


def sample(metrics: Metrics, backend: str, result: str) -> float | None:
    labels = {"backend": backend, "result": result}
    return metrics.registry.get_sample_value("mcpbalancer_health_checks_total", labels)


async def test_rounds_report_status_changes_only() -> None:
    probe = FakeProbe()
    check, statuses, metrics = checker(probe)
    a, b = Backend("a", "h", 1), Backend("b", "h", 2)
    probe.results["b"] = FAIL
    await check.check_once([a, b])
    assert statuses == {}
    await check.check_once([a, b])
    assert statuses == {"b": False}
    probe.results["b"] = OK
    await check.check_once([a, b])
    await check.check_once([a, b])
    assert statuses == {"b": True}
    assert sample(metrics, "a", "ok") == 4
    assert sample(metrics, "b", "fail") == 2
    assert check.last_check == {"a": 1006.0, "b": 1007.0}


async def test_refused_probe_ejects_at_once() -> None:
    probe = FakeProbe()
    check, statuses, metrics = checker(probe, fall=5)
    probe.results["a"] = REFUSED
    await check.check_once([Backend("a", "h", 1)])
    assert statuses == {"a": False}
    assert sample(metrics, "a", "refused") == 1


async def test_a_hanging_probe_is_a_timeout() -> None:
    probe = FakeProbe()
    check, statuses, metrics = checker(probe, fall=1, timeout=0.01)
    probe.results["a"] = "hang"
    await check.check_once([Backend("a", "h", 1)])
    assert statuses == {"a": False}
    assert sample(metrics, "a", TIMEOUT) == 1


def test_passive_refused_and_reset_eject_timeouts_and_5xx_count_toward_fall() -> None:
    check, statuses, _ = checker(FakeProbe(), fall=3)
    check.passive("a", "refused")
    check.passive("b", "reset")
    assert statuses == {"a": False, "b": False}
    check.passive("c", "timeout")
    check.passive("c", "5xx")
    assert "c" not in statuses
    check.passive("c", "timeout")
    assert statuses["c"] is False


def test_forget_drops_removed_backends() -> None:
    check, _, _ = checker(FakeProbe(), fall=2)
    check.observe("a", FAIL)
    check.forget(["b"])
    check.observe("a", FAIL)  # a fresh state: one failure only
    assert check.last_check.keys() == {"a"}


def test_reconfigure_applies_new_fall_to_known_backends() -> None:
    check, statuses, _ = checker(FakeProbe(), fall=3)
    check.observe("a", FAIL)
    check.reconfigure(HealthConfig(fall=2))
    check.observe("a", FAIL)
    assert statuses == {"a": False}


# --- Fleet -----------------------------------------------------------------------------------------


def config(*backends: dict[str, object]) -> tuple[BackendConfig, ...]:
    return parse_config({"backends": list(backends)}).backends


def test_state_of_a_backend() -> None:
    backend = Backend("a", "h", 1)
    assert backend.state == "up"
    backend.up = False
    assert backend.state == "down"
    backend.draining = True
    backend.sessions = 1
    assert backend.state == "draining"
    backend.sessions = 0
    backend.in_flight = 1
    assert backend.state == "draining"
    backend.in_flight = 0
    assert backend.state == "drained"


def pool(backend: Backend) -> UpstreamPool:
    return UpstreamPool(backend, connect_timeout=1.0)


async def test_apply_adds_removes_reweights_and_follows_the_file_on_drain() -> None:
    fleet = Fleet(
        parse_config(
            {
                "backends": [
                    {"name": "a", "url": "http://127.0.0.1:1"},
                    {"name": "b", "url": "http://127.0.0.1:2", "drain": True},
                ]
            }
        ).backends,
        pool=pool,
    )
    backends = fleet.backends
    a = backends.get("a")
    assert a is not None
    assert not a.draining
    old_pool = fleet.pools["a"]
    new = parse_config(
        {
            "backends": [
                {"name": "a", "url": "http://127.0.0.1:11", "weight": 5, "drain": True},
                {"name": "c", "url": "http://127.0.0.1:3"},
            ]
        }
    ).backends
    changes = fleet.apply(new)
    assert (changes.added, changes.removed, changes.updated) == (["c"], ["b"], ["a"])
    assert fleet.backends is backends  # updated in place
    assert [b.name for b in backends] == ["a", "c"]
    assert backends.get("a") is a
    assert (a.weight, a.port, a.host_header, a.draining) == (5, 11, b"127.0.0.1:11", True)
    assert fleet.pools["a"] is not old_pool  # a new address: a new pool
    assert "b" in fleet.pools  # kept for exchanges in flight
    fleet.apply(parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:11"}]}).backends)
    assert not a.draining  # no longer marked in the file: undrained
    fleet.close()


async def test_drain_timeout_evicts_the_remaining_sessions() -> None:
    fleet = Fleet(config({"name": "a", "url": "http://127.0.0.1:1"}), pool=pool)
    evicted = asyncio.Event()
    fleet.on_evict = lambda backend: evicted.set()
    a = fleet.backends.get("a")
    assert a is not None
    a.sessions = 2
    assert fleet.drain("a", timeout=0.01)
    assert a.state == "draining"
    async with asyncio.timeout(5):
        await evicted.wait()
    assert a.evicted
    assert a.state == "drained"
    assert fleet.undrain("a")
    assert (a.draining, a.evicted, a.state) == (False, False, "up")
    assert not fleet.drain("nope")
    fleet.close()


async def test_undrain_cancels_the_drain_timeout() -> None:
    fleet = Fleet(config({"name": "a", "url": "http://127.0.0.1:1"}), pool=pool)
    fleet.on_evict = lambda backend: pytest.fail("evicted after undrain")
    fleet.drain("a", timeout=0.05)
    fleet.undrain("a")
    await asyncio.sleep(0.1)  # past the cancelled timeout: nothing may fire
    fleet.close()


# --- configuration ---------------------------------------------------------------------------------


def test_lifecycle_defaults() -> None:
    parsed = parse_config({"backends": [{"name": "a", "url": "http://h:1"}]})
    assert parsed.health == HealthConfig(interval=1.0, timeout=1.0, path="/mcp", fall=2, rise=2)
    assert parsed.shutdown_timeout == 10.0
    assert (parsed.backends[0].drain, parsed.backends[0].drain_timeout) == (False, 0.0)


def test_lifecycle_keys_are_read() -> None:
    parsed = parse_config(
        {
            "health": {"interval": 0.25, "timeout": 0.5, "path": "/x/mcp", "fall": 3, "rise": 1},
            "shutdown_timeout": 2.5,
            "backends": [{"name": "a", "url": "http://h:1", "drain": True, "drain_timeout": 30}],
        }
    )
    assert parsed.health == HealthConfig(interval=0.25, timeout=0.5, path="/x/mcp", fall=3, rise=1)
    assert parsed.shutdown_timeout == 2.5
    assert (parsed.backends[0].drain, parsed.backends[0].drain_timeout) == (True, 30.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"health": {"interval": -1}}, "health.interval: must be >= 0"),
        ({"health": {"timeout": 0}}, "health.timeout: must be > 0"),
        ({"health": {"fall": 0}}, "health.fall: must be >= 1"),
        ({"health": {"rise": 1.5}}, "health.rise: must be an integer"),
        ({"health": {"path": "mcp"}}, "health.path: must be a path"),
        ({"health": {"every": 1}}, "health.every: unknown key"),
        ({"shutdown_timeout": -1}, "shutdown_timeout: must be >= 0"),
    ],
)
def test_lifecycle_keys_are_validated(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"backends": [{"name": "a", "url": "http://h:1"}], **extra})


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"drain": "yes"}, "backends[0].drain: must be true or false"),
        ({"drain_timeout": -5}, "backends[0].drain_timeout: must be >= 0"),
    ],
)
def test_backend_drain_keys_are_validated(backend: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"backends": [{"name": "a", "url": "http://h:1", **backend}]})


async def test_a_reload_giving_a_drain_a_timeout_arms_it() -> None:
    fleet = Fleet(config({"name": "a", "url": "http://127.0.0.1:1", "drain": True}), pool=pool)
    fleet.start()
    evicted = asyncio.Event()
    fleet.on_evict = lambda backend: evicted.set()
    fleet.apply(config({"name": "a", "url": "http://127.0.0.1:1", "drain": True, "drain_timeout": 0.01}))
    async with asyncio.timeout(5):
        await evicted.wait()
    fleet.close()


async def test_each_backend_counts_with_its_own_fall_from_its_first_probe() -> None:
    probe = FakeProbe()
    check, statuses, _ = checker(probe, fall=5)
    own = Backend("own", "h", 1, health=HealthConfig(fall=1, timeout=0.01))
    probe.results = {"own": FAIL, "global": FAIL}
    await check.check_once([own, Backend("global", "h", 2)])
    assert statuses == {"own": False}  # one failure was enough for it; the other needs 5
    assert check.down_reasons == {"own": "health check: fail"}
    probe.results["own"] = "hang"
    check.passive("own", "timeout")
    await check.check_once([own])  # bounded by its own timeout, not the checker's 1 s
    assert check.last_probe["own"].error == "timeout"


async def test_run_probes_each_backend_on_its_own_interval_and_stops_when_cancelled() -> None:
    probe = FakeProbe()
    check, _, _ = checker(probe)
    fast = Backend("fast", "h", 1, health=HealthConfig(interval=0.01))
    slow = Backend("slow", "h", 2, health=HealthConfig(interval=0.2))
    off = Backend("off", "h", 3, health=HealthConfig(interval=0))
    for attempt in range(20):  # cancelled at many moments: while waiting, while probing
        probe.calls.clear()
        task = asyncio.get_running_loop().create_task(check.run(lambda: [fast, slow, off]))
        wanted = 3 + attempt % 4

        async def probed(wanted: int = wanted) -> bool:
            return probe.calls.count("fast") >= wanted

        await wait_until(probed, "probes of the fast backend", deadline=5)
        task.cancel()
        async with asyncio.timeout(2):  # a cancel is never lost, whatever it meets
            with pytest.raises(asyncio.CancelledError):
                await task
        assert "off" not in probe.calls
        assert probe.calls.count("slow") <= 1 < probe.calls.count("fast")
