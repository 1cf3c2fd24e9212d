"""The health keys and `session_mode`: what `--check` refuses (naming the key), the merge of a
backend's own `health:` keys over the global block, and what reaches the running backends."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.config import HealthConfig, parse_config
from mcpbalancer.config.health import BackendHealth, merged
from mcpbalancer.fleet.backends import STATEFUL, STATELESS, Backend
from mcpbalancer.fleet.session_modes import SessionModes, mode_of_answer

SCRIPT = Path(sys.executable).parent / "mcpbalancer"
URL = "http://127.0.0.1:8001/mcp"


async def check(tmp_path: Path, data: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "mcpbalancer.yaml"
    path.write_text(yaml.safe_dump(data))
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), "--config", str(path), "--check", stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode()


def backend(**extra: Any) -> dict[str, Any]:
    return {"name": "a", "url": URL, **extra}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"health": {"probe": "tcp"}}, "health.probe: must be one of discover, http; got 'tcp'"),
        ({"health": {"method": "POST"}}, "health.method: must be one of GET, HEAD; got 'POST'"),
        ({"health": {"expect_status": []}}, "health.expect_status: must have at least one entry"),
        (
            {"health": {"expect_status": 200}},
            "health.expect_status: must be a list of HTTP status codes such as [200, 204], got 200",
        ),
        ({"health": {"expect_status": [200, 600]}}, "health.expect_status[1]: must be <= 599, got 600"),
        ({"health": {"expect_status": [99]}}, "health.expect_status[0]: must be >= 100, got 99"),
        ({"health": {"expect_status": ["200"]}}, "health.expect_status[0]: must be an integer, got '200'"),
        (
            {"health": {"headers": ["Authorization: x"]}},
            "health.headers: must be a mapping of header names to strings, got a list",
        ),
        (
            {"health": {"headers": {"X-Port": 8080}}},
            "health.headers: X-Port: the value must be a string, got 8080 (quote it)",
        ),
        ({"health": {"headers": {"bad name": "x"}}}, "health.headers.bad name: must be an HTTP header name"),
        (
            {"backends": [backend(health={"intervall": 1})]},
            "backends[0].health.intervall: unknown key; allowed: interval, timeout, path, fall, rise, probe, "
            "method, expect_status, headers; did you mean `interval`?",
        ),
        (
            {"backends": [backend(health={"method": "PUT"})]},
            "backends[0].health.method: must be one of GET, HEAD; got 'PUT'",
        ),
        (
            {"backends": [backend(session_mode="sticky")]},
            "backends[0].session_mode: must be one of auto, stateful, stateless; got 'sticky'",
        ),
    ],
)
async def test_check_refuses_naming_the_key(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    status, err = await check(tmp_path, {"backends": [backend()], **data})
    assert status != 0
    assert message in err
    assert "Traceback" not in err


async def test_check_accepts_every_health_key_globally_and_per_backend(tmp_path: Path) -> None:
    health = {"probe": "http", "method": "HEAD", "path": "/ready", "expect_status": [200, 204]}
    own = {**health, "interval": 5, "timeout": 2, "fall": 3, "rise": 1, "headers": {"X-Token": "t"}}
    data = {"health": {**health, "headers": {"Authorization": "Bearer x"}}, "backends": [backend(health=own)]}
    assert await check(tmp_path, data) == (0, "")


def test_a_backends_keys_are_merged_over_the_global_block() -> None:
    base = HealthConfig(interval=2.0, probe="http", path="/ready", headers={"Authorization": "Bearer g"})
    assert merged(base, None) is base
    assert merged(base, BackendHealth()) is base
    own = merged(base, BackendHealth(method="HEAD", fall=5, headers={"X-Token": "t"}))
    assert own == HealthConfig(
        interval=2.0, probe="http", path="/ready", method="HEAD", fall=5, headers={"X-Token": "t"}
    )


def test_each_backend_runs_with_its_merged_settings_and_declared_mode() -> None:
    config = parse_config(
        {
            "mcp_path": "/rpc",
            "health": {"interval": 3, "headers": {"Authorization": "Bearer ${TOKEN}"}},
            "backends": [
                backend(health={"probe": "http", "path": "/ready"}, session_mode="stateless"),
                {"name": "b", "url": "http://127.0.0.1:8002", "health": {"timeout": 0.25}},
            ],
        },
        environ={"TOKEN": "s3cret"},
    )
    a, b = config.backends
    assert (a.health.probe, a.health.path, a.health.interval) == ("http", "/ready", 3.0)
    assert a.health.headers == {"Authorization": "Bearer s3cret"}
    assert (b.health.probe, b.health.path, b.health.timeout) == ("discover", "/rpc", 0.25)
    assert (a.session_mode, b.session_mode) == ("stateless", "auto")


@pytest.mark.parametrize(
    ("status", "body", "session_id", "mode"),
    [
        (200, b"", None, STATELESS),
        (202, b"", None, STATELESS),
        (400, b'{"error":{"message":"Bad Request: Missing session ID"}}', "abc", STATEFUL),
        (400, b'{"error":{"message":"Bad Request: No valid session ID provided"}}', None, STATEFUL),
        (400, b'{"error":{"message":"Unsupported protocol version"}}', None, None),
        (401, b"", None, None),
        (404, b"Not Found", None, None),
        (503, b"", None, None),
    ],
)
def test_what_the_answer_to_the_session_less_ping_says(
    status: int, body: bytes, session_id: str | None, mode: str | None
) -> None:
    assert mode_of_answer(status, body, session_id) == mode


async def test_an_unknown_kind_is_asked_once_at_a_time_and_again_after_the_retry() -> None:
    answers: list[str | None] = [None, STATELESS]
    asked = asyncio.Event()
    calls = 0

    async def probe(backend: Backend) -> str | None:
        nonlocal calls
        calls += 1
        await asyncio.wait_for(asked.wait(), 5)
        return answers.pop(0)

    now = [100.0]
    modes = SessionModes(probe, clock=lambda: now[0], retry=1.0)
    a = Backend("a", "h", 1)
    first, second = modes.learn([a]), modes.learn([a])
    assert first == second
    assert len(first) == 1  # one probe, shared
    asked.set()
    await asyncio.wait(first)
    assert a.session_mode == "unknown"
    assert modes.learn([a]) == []  # told nothing: not asked again before the retry
    now[0] += 1.0
    await asyncio.wait(modes.learn([a]))
    assert (a.session_mode, calls) == (STATELESS, 2)
    assert modes.learn([a]) == []  # known
    declared = Backend("d", "h", 2, declared_mode=STATEFUL)
    assert modes.learn([declared]) == []
    declared.learned_mode(STATELESS)
    assert declared.session_mode == STATEFUL
    await modes.close()


def test_a_reload_gives_running_backends_their_new_health_keys_and_session_mode() -> None:
    from mcpbalancer.dataplane.upstream import UpstreamPool
    from mcpbalancer.fleet.lifecycle import Fleet

    def backends(interval: float, **entry: Any) -> Any:
        return parse_config({"health": {"interval": interval}, "backends": [backend(**entry)]}).backends

    fleet = Fleet(backends(1), pool=lambda b: UpstreamPool(b, connect_timeout=1.0))
    running = fleet.backends.get("a")
    assert running is not None
    assert (running.health, running.session_mode) == (HealthConfig(interval=1.0), "unknown")
    running.learned_mode(STATELESS)
    changes = fleet.apply(backends(1, health={"probe": "http", "method": "HEAD"}))
    assert changes.updated == []  # new probe settings, nothing a client sees
    assert running.health == HealthConfig(interval=1.0, probe="http", method="HEAD")
    assert running.session_mode == STATELESS  # still what was learned
    changes = fleet.apply(backends(2, session_mode="stateful"))
    assert changes.updated == ["a"]
    assert (running.health.interval, running.session_mode) == (2.0, STATEFUL)
    fleet.apply(backends(2))  # back to auto: learned again
    assert running.session_mode == "unknown"
    fleet.close()


def test_endpoints_found_by_discovery_take_their_groups_health_keys_and_session_mode() -> None:
    from mcpbalancer.fleet.discovery import endpoints
    from mcpbalancer.fleet.resolver import Record

    config = parse_config(
        {
            "health": {"interval": 3, "headers": {"Authorization": "Bearer g"}},
            "backends": [
                {
                    "name": "tools",
                    "discover": {"dns": "tools.example", "port": 8000, "path": "/mcp"},
                    "health": {"probe": "http", "path": "/ready"},
                    "session_mode": "stateless",
                }
            ],
        }
    )
    [entry] = config.discovery
    found = endpoints(entry, [Record("10.0.0.1", 8000), Record("10.0.0.2", 8000)])
    assert [b.name for b in found] == ["tools@10.0.0.1:8000", "tools@10.0.0.2:8000"]
    for backend in found:
        assert (backend.health.probe, backend.health.path, backend.health.interval) == ("http", "/ready", 3.0)
        assert backend.health.headers == {"Authorization": "Bearer g"}
        assert backend.session_mode == "stateless"
