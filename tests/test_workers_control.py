"""`workers: 2` with Redis: the `admin` address answers for the whole proxy.

The real CLI as a subprocess (tests/fixtures/cluster.py) in front of FastMCP backends a and b; the
MCP traffic on a fresh connection per request, so that the kernel spreads it over both workers
(each access line names the worker that wrote it, and every test checks both served). The admin
requests go to the supervisor, which asks each worker through its private control channel.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from tests.fixtures.backends import BackendProcess
from tests.fixtures.cluster import DEADLINE, Cluster, StartCluster, config_text, fresh_connections
from tests.fixtures.redis import RedisServer
from tests.mcp_helpers import call_tool, open_session, wait_until

TOKEN = "cluster-admin-token-0123456789abcdef"


async def new_session(cluster: Cluster) -> str:
    """A legacy session opened and used on fresh connections: its backend."""
    async with fresh_connections() as http:
        sid = await open_session(http, cluster.mcp_url)
        return (await call_tool(http, cluster.mcp_url, sid, "whoami")).text


async def sessions_on_both_workers(cluster: Cluster, *, at_least: int = 12) -> list[str]:
    """Open sessions (each one's requests on fresh connections) until at least `at_least` are open
    and both workers have written access lines for them: their backends."""
    first = len(cluster.access)
    owners: list[str] = []

    async def enough() -> bool:
        served = {json.loads(line)["worker"] for line in cluster.access[first:] if line.startswith("{")}
        if len(owners) >= at_least and served == {0, 1}:
            return True
        owners.extend(await asyncio.gather(*(new_session(cluster) for _ in range(4))))
        return False

    await wait_until(enough, "sessions served by both workers", DEADLINE * 2)
    return owners


def audit_events(cluster: Cluster) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in cluster.log if line.startswith("{")]
    return [event for event in events if event["logger"] == "mcpbalancer.audit"]


def metric(page: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for match in re.finditer(rf"^{name}(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$", page, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match["value"])
    return total


async def test_a_drain_posted_once_keeps_every_new_session_off_that_backend(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(token=TOKEN)
    status, body = await cluster.admin_call("POST", "/admin/backends/b/drain", TOKEN)
    assert status == 200, body
    assert body["applied"] is True
    assert [(w["worker"], w["applied"], w["state"]) for w in body["workers"]] == [
        (0, True, "drained"),
        (1, True, "drained"),
    ]
    owners = await sessions_on_both_workers(cluster, at_least=16)
    assert set(owners) == {"a"}, owners
    # Undrained the same way: b takes new sessions again, on both workers.
    status, body = await cluster.admin_call("POST", "/admin/backends/b/undrain", TOKEN)
    assert (status, body["state"]) == (200, "up")
    assert "b" in set(await sessions_on_both_workers(cluster))


async def test_a_reload_that_removes_a_backend_reaches_both_workers(
    start_cluster: StartCluster, redis_server: RedisServer, backends: list[BackendProcess]
) -> None:
    cluster = await start_cluster(token=TOKEN)
    cluster.config.write_text(
        config_text(cluster.port, cluster.admin, redis_server.url, backends[:1], token=TOKEN)
    )
    status, body = await cluster.admin_call("POST", "/admin/reload", TOKEN)
    assert status == 200, body
    assert (body["reloaded"], body["removed"]) == (True, ["b"])
    assert [(w["worker"], w["applied"]) for w in body["workers"]] == [(0, True), (1, True)]
    await cluster.wait_logged("reloaded", count=2)
    status, body = await cluster.admin_call("GET", "/admin/backends", TOKEN)
    assert [(b["name"], b["states"]) for b in body["backends"]] == [("a", {"up": 2})]
    assert set(await sessions_on_both_workers(cluster)) == {"a"}
    [line] = [e for e in audit_events(cluster) if e["audit"]["action"] == "reload"]
    assert line["audit"] == {
        "action": "reload",
        "target": str(cluster.config),
        "client": "127.0.0.1",
        "outcome": "ok",
    }
    assert "applied by worker(s) 0, 1" in line["msg"]


async def test_metrics_on_the_admin_address_count_every_request_sent(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    owners = await sessions_on_both_workers(cluster)
    status, page = await cluster.admin_call("GET", "/metrics")
    assert status == 200
    # Each session: initialize, notifications/initialized, one tools/call.
    assert metric(page, "mcpbalancer_requests_total") == 3 * len(owners)
    assert metric(page, "mcpbalancer_requests_total", method="POST", code="2xx") == 3 * len(owners)
    assert metric(page, "mcpbalancer_sessions_created_total") == len(owners)
    assert metric(page, "mcpbalancer_request_duration_seconds_count") == 3 * len(owners)
    assert metric(page, "mcpbalancer_backend_up", backend="a") == 1  # a state: maxed, not 2
    assert metric(page, "mcpbalancer_build_info") == 1
    assert page.count("# TYPE mcpbalancer_requests_total counter") == 1  # one family, summed


async def test_admin_backends_counts_every_session(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    owners = await sessions_on_both_workers(cluster)
    status, body = await cluster.admin_call("GET", "/admin/backends")
    assert status == 200, body
    assert sum(b["sessions"] for b in body["backends"]) == len(owners)
    for backend in body["backends"]:
        assert backend["sessions"] == owners.count(backend["name"])
        assert backend["states"] == {"up": 2}
        assert [w["worker"] for w in backend["workers"]] == [0, 1]
        assert sum(w["sessions"] for w in backend["workers"]) == backend["sessions"]
    per_worker = [sum(b["workers"][k]["sessions"] for b in body["backends"]) for k in (0, 1)]
    assert min(per_worker) > 0  # both bound sessions: the sum is over the workers
    assert body["workers"] == [{"worker": k, "serving": True, "answered": True} for k in (0, 1)]


async def test_the_token_guards_the_supervisor_and_it_audits(
    start_cluster: StartCluster,
) -> None:
    other = "second-cluster-token-0123456789"
    cluster = await start_cluster(token=f"['${{ADMIN_TOKEN}}', '{other}']", env={"ADMIN_TOKEN": TOKEN})
    for path, method in (("/admin/backends", "GET"), ("/admin/backends/b/drain", "POST"), ("/", "GET")):
        assert (await cluster.admin_call(method, path))[0] == 401
        assert (await cluster.admin_call(method, path, "not-the-token-0123456789"))[0] == 401
    status, body = await cluster.admin_call("GET", "/admin/backends", TOKEN)  # from ${ADMIN_TOKEN}
    assert [b["state"] for b in body["backends"]] == ["up", "up"]  # the refused drain changed nothing
    assert (await cluster.admin_call("GET", "/admin/backends", other))[0] == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await cluster.admin_call("GET", path))[0] == 200
    status, ready = await cluster.admin_call("GET", "/readyz")
    assert (status, ready["status"]) == (200, "ready")
    assert [w["status"] for w in ready["workers"]] == ["ready", "ready"]
    # One audit line per refusal, written by the supervisor (no worker index), counted once.
    refused = [e for e in audit_events(cluster) if e["audit"]["outcome"] == "unauthorized"]
    assert len(refused) == 6
    assert {e["audit"]["action"] for e in refused} == {"backends", "drain", "other"}
    assert not [e for e in audit_events(cluster) if "worker" in e]
    page = (await cluster.admin_call("GET", "/metrics"))[1]
    assert metric(page, "mcpbalancer_admin_requests_total", outcome="unauthorized") == 6
    assert metric(page, "mcpbalancer_admin_requests_total", action="backends", outcome="ok") == 2


async def test_a_restarted_worker_keeps_the_drain_and_the_counts(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    owners = await sessions_on_both_workers(cluster)
    assert (await cluster.admin_call("POST", "/admin/backends/b/drain"))[0] == 200
    before = metric((await cluster.admin_call("GET", "/metrics"))[1], "mcpbalancer_requests_total")
    assert before == 3 * len(owners)
    old = cluster.workers()[1]
    os.kill(old, signal.SIGKILL)
    await cluster.wait_logged("worker 1 serving", count=2)
    status, body = await cluster.admin_call("GET", "/admin/backends")
    [b] = [entry for entry in body["backends"] if entry["name"] == "b"]
    # The new worker 1 was started with the drain posted before it: no new session goes to b.
    assert [w["state"] for w in b["workers"]][1] in ("draining", "drained")
    assert body["workers"][1] == {"worker": 1, "serving": True, "answered": True}
    # Its counters restart from 0; the sum keeps what the old process had counted.
    after = metric((await cluster.admin_call("GET", "/metrics"))[1], "mcpbalancer_requests_total")
    assert after >= before
    assert set(await sessions_on_both_workers(cluster)) == {"a"}
    # A reload: the file is the source of truth again, on both workers.
    assert (await cluster.admin_call("POST", "/admin/reload"))[0] == 200
    status, body = await cluster.admin_call("GET", "/admin/backends")
    assert status == 200
    assert [entry["states"] for entry in body["backends"]] == [{"up": 2}, {"up": 2}]


async def test_the_control_channels_are_private_sockets(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    [directory] = {str(Path(m).parent) for m in re.findall(r"control channel on (\S+\.sock)", cluster.text())}
    mode = stat.S_IMODE(os.stat(directory).st_mode)
    assert mode == 0o700  # only this user reaches the sockets
    assert sorted(os.listdir(directory)) == ["worker-0.sock", "worker-1.sock"]
    cluster.process.send_signal(signal.SIGTERM)
    assert await cluster.exit_status() == 0
    assert Path(directory).name not in os.listdir(Path(directory).parent)  # removed at exit


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mcpbalancer",
        "admin",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE * 2):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_reaches_every_worker(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(token=TOKEN)
    config = str(cluster.config)
    assert await cli("drain", "b", "--config", config) == (0, "b: drained (workers 0, 1)\n", "")
    code, out, _ = await cli("backends", "--config", config)
    assert code == 0
    assert out.splitlines()[2].split() == ["b", "drained", "0", "0"]
    code, out, _ = await cli("--json", "reload", "--config", config)
    assert code == 0
    assert [w["applied"] for w in json.loads(out)["workers"]] == [True, True]
