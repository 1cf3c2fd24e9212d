"""`--workers 2` end to end: the real CLI as a subprocess, in front of real FastMCP backends, with a
real Redis store, driven by the real mcp client and by raw HTTP on a fresh connection per request
(so that a session's requests land on either worker).

Worker processes are found in /proc (children of the supervisor whose command line has
`--worker-index`); which worker served a request, in its access line. The admin address is the
supervisor's and answers for both workers (tests/test_workers_control.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mcpbalancer.cli import main
from tests.fixtures.backends import BackendProcess
from tests.fixtures.cluster import (
    DEADLINE,
    EXIT_DEADLINE,
    Cluster,
    StartCluster,
    config_text,
    free_ports,
    fresh_connections,
    gone,
)
from tests.fixtures.redis import RedisServer
from tests.mcp_helpers import call_tool, open_session, recorded_client, text_of, wait_until


async def raw_client(url: str, calls: int) -> tuple[str, str]:
    """A legacy session whose every request is on a fresh connection: (its backend, its id)."""
    async with fresh_connections() as http:
        sid = await open_session(http, url)
        owner = (await call_tool(http, url, sid, "whoami")).text
        counts = [(await call_tool(http, url, sid, "count")).text for _ in range(calls)]
        assert counts == [str(n) for n in range(1, calls + 1)]  # one backend kept the session's state
        assert (await call_tool(http, url, sid, "whoami")).text == owner
    return owner, sid


async def sdk_client(url: str, calls: int) -> tuple[str, str]:
    async with recorded_client(url) as (client, wire):
        owner = text_of(await client.call_tool("whoami"))
        counts = [text_of(await client.call_tool("count")) for _ in range(calls)]
        assert counts == [str(n) for n in range(1, calls + 1)]
    return owner, wire.session_id


async def until_both_workers_served(cluster: Cluster, sessions: list[str] | None = None) -> None:
    """SO_REUSEPORT hashes each connection to a worker: keep opening connections until each worker
    wrote access lines (20 clients have done so already but for a 2**-19 chance)."""

    async def both() -> bool:
        if cluster.served_by() == {0, 1}:
            return True
        _, sid = await raw_client(cluster.mcp_url, 1)
        if sessions is not None:
            sessions.append(sid)
        return False

    await wait_until(both, "both workers to serve requests", DEADLINE)


# --- serving ----------------------------------------------------------------------------------------


async def test_sessions_keep_affinity_across_workers_and_sigterm_stops_all(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster()
    workers = cluster.workers()
    assert sorted(workers) == [0, 1]
    clients = [raw_client(cluster.mcp_url, 3) for _ in range(12)]
    clients += [sdk_client(cluster.mcp_url, 3) for _ in range(8)]
    answers = await asyncio.gather(*clients)
    assert {owner for owner, _ in answers} == {"a", "b"}
    sessions = [sid for _, sid in answers]
    await until_both_workers_served(cluster, sessions)
    log = cluster.text()
    assert f"admin on 127.0.0.1:{cluster.admin} for every worker" in log
    assert f"admin on 127.0.0.1:{cluster.admin} answers for 2 workers" in log

    started = time.monotonic()
    cluster.process.send_signal(signal.SIGTERM)
    assert await cluster.exit_status() == 0, cluster.text()
    assert time.monotonic() - started < EXIT_DEADLINE
    assert all(gone(pid) for pid in workers.values())
    assert cluster.text().count("shutting down") == 2
    assert "Traceback" not in cluster.text()
    # The access log: whole lines from both workers (none spliced), and one tag per session, the
    # same whichever worker wrote the line (the workers share the tag key).
    access = [json.loads(line) for line in cluster.access]
    assert len(access) > 20 * 5
    assert len({line["session"] for line in access} - {None}) == len(set(sessions))
    # Every line says which worker wrote it: the access lines, and the event lines of the workers
    # (the supervisor's own have no index).
    assert {line["worker"] for line in access} == {0, 1}
    events = [json.loads(line) for line in cluster.log if line.startswith("{")]
    stops = [event.get("worker") for event in events if event["msg"] == "shutting down"]
    assert sorted(stops) == [0, 1]
    own = [event for event in events if event["logger"] == "mcpbalancer.process.supervisor"]
    assert own
    assert not [event for event in own if "worker" in event]


async def test_a_killed_worker_is_restarted_and_sessions_survive(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    url = cluster.mcp_url
    async with fresh_connections() as http:
        sessions = [await open_session(http, url) for _ in range(6)]
        for sid in sessions:
            assert (await call_tool(http, url, sid, "count")).text == "1"
        before = cluster.workers()
        os.kill(before[1], signal.SIGKILL)
        await cluster.wait_logged("worker 1 exited unexpectedly (signal SIGKILL)")
        await cluster.wait_logged("worker 1 serving", count=2)
        after = cluster.workers()
        assert after[0] == before[0]
        assert after[1] != before[1]
        async with aiohttp.ClientSession() as admin, admin.get(cluster.admin_url + "/admin/backends") as resp:
            workers = (await resp.json())["workers"]
        assert workers == [{"worker": k, "serving": True, "answered": True} for k in (0, 1)]  # the new 1 too
        # Every session keeps its backend and its state, whichever worker each connection reaches.
        for sid in sessions:
            assert (await call_tool(http, url, sid, "count")).text == "2"
    await until_both_workers_served(cluster)


async def test_sealed_ids_let_workers_share_sessions_with_the_memory_store(
    start_cluster: StartCluster,
) -> None:
    # No Redis at all: the token a worker gives the client names the backend, any worker routes it.
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    cluster = await start_cluster(store="memory", extra=f"session_ids: sealed\nsession_keys: ['{key}']\n")
    url = cluster.mcp_url
    answers = await asyncio.gather(*[raw_client(url, 3) for _ in range(10)], sdk_client(url, 3))
    assert {owner for owner, _ in answers} == {"a", "b"}
    await until_both_workers_served(cluster)
    async with fresh_connections() as http:
        sessions = [await open_session(http, url) for _ in range(6)]
        before = cluster.workers()
        os.kill(before[0], signal.SIGKILL)  # the worker that may have minted them, and its memory
        await cluster.wait_logged("worker 0 serving", count=2)
        for sid in sessions:
            assert (await call_tool(http, url, sid, "count")).text == "1"
    assert "need a Redis" not in cluster.text()


async def test_sighup_to_the_supervisor_reloads_every_worker(
    start_cluster: StartCluster, redis_server: RedisServer, backends: list[BackendProcess]
) -> None:
    cluster = await start_cluster()
    cluster.config.write_text(
        config_text(cluster.port, cluster.admin, redis_server.url, backends[:2], weight=7)
    )
    cluster.process.send_signal(signal.SIGHUP)
    await cluster.wait_logged("reloaded", count=2)
    async with aiohttp.ClientSession() as http, http.get(cluster.admin_url + "/admin/backends") as resp:
        merged = (await resp.json())["backends"]
    assert [b["weight"] for b in merged] == [7, 7]
    assert [[w["weight"] for w in b["workers"]] for b in merged] == [[7, 7], [7, 7]]  # each worker's own
    assert "changed; it takes effect after a restart" not in cluster.text()  # no override is lost


async def test_workers_exit_when_the_supervisor_is_killed(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    workers = cluster.workers()
    cluster.process.kill()
    await cluster.process.wait()

    async def all_gone() -> bool:
        return all(gone(pid) for pid in workers.values())

    await wait_until(all_gone, "the workers of a killed supervisor to exit", EXIT_DEADLINE)


# --- start-up failures -----------------------------------------------------------------------------------


async def test_a_worker_failing_at_start_up_stops_everything(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    # The supervisor reads the file but not the TLS files it names: the workers fail on them.
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("not a certificate\n")
    https = f"  - name: tls\n    url: https://127.0.0.1:9\n    tls: {{ca: {bad_ca}}}\n"
    cluster = await start_cluster(wait=False, extra=https)
    assert await cluster.exit_status() == 1
    await cluster.wait_logged("failed at start-up (status 2)")
    assert re.search(r"worker [01] failed at start-up \(status 2\)", cluster.text())
    assert "invalid configuration" in cluster.text()
    assert cluster.workers() == {}


async def test_a_taken_admin_port_stops_the_supervisor_before_any_worker(
    start_cluster: StartCluster,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = await start_cluster(wait=False, admin=taken.getsockname()[1])
        assert await cluster.exit_status() == 1
    assert f"cannot listen on 127.0.0.1:{cluster.admin} (admin)" in cluster.text()
    assert "starting 2 workers" not in cluster.text()


async def test_a_busy_port_is_refused_before_any_worker_starts(
    tmp_path: Path, redis_server: RedisServer, backends: list[BackendProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(config_text(port, free_ports(1), redis_server.url, backends[:2]))
        argv = [sys.executable, "-m", "mcpbalancer", "--config", str(config), "--workers", "2"]
        process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(DEADLINE):
            _, err = await process.communicate()
    assert process.returncode == 1
    assert f"mcpbalancer: cannot listen on 127.0.0.1:{port}: " in err.decode()
    assert "starting 2 workers" not in err.decode()


# --- configuration -----------------------------------------------------------------------------------------

BACKENDS = "backends:\n  - name: a\n    url: http://127.0.0.1:9001\n"
REDIS = "store: redis://127.0.0.1:6379/0\n"


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        pytest.param("workers: 0\n", [], "workers: must be >= 1, got 0", id="zero"),
        pytest.param("workers: x\n", [], "workers: must be an integer, got 'x'", id="not-a-number"),
        pytest.param(
            "workers: 2\n",
            [],
            "workers: 2 workers need a Redis `store` or `session_ids: sealed`: the memory store is per",
            id="memory",
        ),
        pytest.param(
            "listen: 127.0.0.1:0\n" + REDIS,
            ["--workers", "2"],
            "--workers: 2 workers need a fixed `listen` port",
            id="port-0",
        ),
        pytest.param("", ["--workers", "2"], "--workers: 2 workers need a Redis `store`", id="flag-memory"),
        pytest.param(REDIS, ["--workers", "0"], "--workers: must be 1-1024, got 0", id="flag-zero"),
    ],
)
def test_worker_count_errors_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[str], message: str
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(text + BACKENDS)
    assert main(["--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mcpbalancer: invalid configuration: {config}: {message}"), err


def test_a_flag_that_is_not_a_number_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(REDIS + BACKENDS)
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config), "--workers", "x"])
    assert info.value.code == 2
    assert "--workers: invalid int value: 'x'" in capsys.readouterr().err


@pytest.fixture
def root_logging() -> Iterator[None]:
    """main() configures the root logger (on the captured stderr): put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize(
    ("text", "flags", "count"),
    [
        pytest.param("", [], "1 worker", id="default"),
        pytest.param(REDIS, ["--workers", "3"], "3 workers", id="flag"),
    ],
)
def test_check_reports_the_worker_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, flags: list[str], count: str
) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("listen: 127.0.0.1:8080\n" + text + BACKENDS)
    assert main(["--config", str(config), "--check", *flags]) == 0
    assert capsys.readouterr().out == f"{config}: OK (1 backend, {count})\n"
