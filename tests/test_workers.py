"""`--workers 2` end to end: the real CLI as a subprocess, in front of real FastMCP backends, with a
real Redis store, driven by the real mcp client and by raw HTTP on a fresh connection per request
(so that a session's requests land on either worker).

Worker processes are found in /proc (children of the supervisor whose command line has
`--worker-index`); each worker's admin listener is on the admin port + its index.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from mcpbalancer.cli import main
from tests.fixtures.backends import BackendProcess
from tests.fixtures.redis import RedisServer
from tests.mcp_helpers import call_tool, open_session, recorded_client, text_of, wait_until

DEADLINE = 15.0
EXIT_DEADLINE = 20.0  # the supervisor and its workers exit; slow only on a loaded machine
REQUESTS = re.compile(r"^mcpbalancer_requests_total\{[^}]*\} (\S+)$", re.MULTILINE)


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free right now (the admin port + worker index)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65536:
            continue
        socks = [socket.socket() for _ in range(count)]
        try:
            for k, sock in enumerate(socks):
                sock.bind(("127.0.0.1", first + k))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return first
    raise RuntimeError("no run of free ports")


def worker_pids(supervisor: int) -> dict[int, int]:
    """Worker index -> pid, of the live children of `supervisor`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            state, ppid = _stat(int(entry))
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if ppid == supervisor and state != "Z" and b"--worker-index" in argv:
                found[int(argv[argv.index(b"--worker-index") + 1])] = int(entry)
    return found


def _stat(pid: int) -> tuple[str, int]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: whoever adopted it may not reap it at once)."""
    try:
        return _stat(pid)[0] == "Z"
    except OSError:
        return True


@dataclass
class Cluster:
    process: asyncio.subprocess.Process
    port: int
    admin: int
    config: Path
    log: list[str] = field(default_factory=list)
    access: list[str] = field(default_factory=list)  # stdout: the access log of both workers
    drain: asyncio.Task[None] | None = None  # reads stderr and stdout until every process closed them

    @property
    def mcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def admin_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.admin + index}"

    def workers(self) -> dict[int, int]:
        return worker_pids(self.process.pid)

    def text(self) -> str:
        return "\n".join(self.log)

    async def requests_served(self, index: int) -> float:
        """What worker `index` counted in mcpbalancer_requests_total (its own metrics only)."""
        async with aiohttp.ClientSession() as http, http.get(self.admin_url(index) + "/metrics") as resp:
            return sum(float(v) for v in REQUESTS.findall(await resp.text()))

    async def wait_logged(self, text: str, count: int = 1) -> None:
        async def logged() -> bool:
            return sum(text in line for line in self.log) >= count

        await wait_until(logged, f"{count} log line(s) with {text!r}:\n{self.text()}", DEADLINE)

    async def exit_status(self) -> int:
        """The supervisor's, once it and every worker have exited (their stderr is at its end)."""
        assert self.drain is not None
        async with asyncio.timeout(EXIT_DEADLINE):
            status = await self.process.wait()
            await asyncio.shield(self.drain)
        return status


StartCluster = Callable[..., Awaitable[Cluster]]


def config_text(
    port: int, admin: int, redis_url: str, backends: list[BackendProcess], weight: int = 1, extra: str = ""
) -> str:
    lines = [
        f"listen: 127.0.0.1:{port}",
        f"admin: 127.0.0.1:{admin}",
        f"store: {redis_url}",
        *extra.splitlines(),
    ]
    lines += ["health: {interval: 0}", "backends:"]  # logs: JSON, the access log on
    for b in backends:
        lines += [f"  - name: {b.name}", f"    url: {b.url}", f"    weight: {weight}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def start_cluster(
    tmp_path: Path, redis_server: RedisServer, backends: list[BackendProcess]
) -> AsyncIterator[StartCluster]:
    """`await start_cluster(wait=True)` -> `mcpbalancer --workers 2` on free ports, in front of
    backends a and b; every process it started is killed after the test."""
    started: list[Cluster] = []

    async def start(
        *, wait: bool = True, admin: int | None = None, store: str | None = None, extra: str = ""
    ) -> Cluster:
        port, admin = free_ports(1), admin or free_ports(2)
        config = tmp_path / f"workers{len(started)}.yaml"
        config.write_text(config_text(port, admin, store or redis_server.url, backends[:2], extra=extra))
        argv = [sys.executable, "-m", "mcpbalancer", "--config", str(config), "--workers", "2"]
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        cluster = Cluster(process, port, admin, config)
        cluster.drain = asyncio.create_task(_drain(cluster))
        started.append(cluster)
        if wait:
            await cluster.wait_logged("2 workers serving")
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            await _kill_all(cluster)
            assert cluster.drain is not None
            cluster.drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cluster.drain


async def _drain(cluster: Cluster) -> None:
    process = cluster.process
    assert process.stderr is not None
    assert process.stdout is not None
    await asyncio.gather(_lines(process.stderr, cluster.log), _lines(process.stdout, cluster.access))


async def _lines(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for raw in stream:
        into.append(raw.decode(errors="replace").rstrip("\n"))


async def _kill_all(cluster: Cluster) -> None:
    workers = cluster.workers() if cluster.process.returncode is None else {}
    if cluster.process.returncode is None:
        cluster.process.kill()
        await cluster.process.wait()
    for pid in workers.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def fresh_connections() -> aiohttp.ClientSession:
    """Every request on a new TCP connection: SO_REUSEPORT picks a worker per connection."""
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout)


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
    counted requests (20 clients have done so already but for a 2**-19 chance)."""

    async def both() -> bool:
        if min([await cluster.requests_served(k) for k in (0, 1)]) > 0:
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
    admin = f"admin: worker 0 on 127.0.0.1:{cluster.admin}, worker 1 on 127.0.0.1:{cluster.admin + 1}"
    assert admin in log

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
        async with aiohttp.ClientSession() as admin, admin.get(cluster.admin_url(1) + "/healthz") as resp:
            assert resp.status == 200  # the new worker 1 took its admin port again
        # Every session keeps its backend and its state, whichever worker each connection reaches.
        for sid in sessions:
            assert (await call_tool(http, url, sid, "count")).text == "2"
    await until_both_workers_served(cluster)


async def test_sealed_ids_let_workers_share_sessions_with_the_memory_store(
    start_cluster: StartCluster,
) -> None:
    # No Redis at all: the token a worker gives the client names the backend, any worker routes it.
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    cluster = await start_cluster(store="memory", extra=f"session_ids: sealed\nsession_keys: ['{key}']")
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
    async with aiohttp.ClientSession() as http:
        for index in (0, 1):
            async with http.get(cluster.admin_url(index) + "/admin/backends") as resp:
                assert [b["weight"] for b in (await resp.json())["backends"]] == [7, 7]
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


async def test_a_worker_failing_at_start_up_stops_everything(start_cluster: StartCluster) -> None:
    admin = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", admin + 1))  # worker 1's admin port
        taken.listen()
        cluster = await start_cluster(wait=False, admin=admin)
        assert await cluster.exit_status() == 1
    await cluster.wait_logged("worker 1 failed at start-up (status 1)")
    assert "cannot listen" in cluster.text()
    assert cluster.workers() == {}


async def test_a_busy_port_is_refused_before_any_worker_starts(
    tmp_path: Path, redis_server: RedisServer, backends: list[BackendProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(config_text(port, free_ports(2), redis_server.url, backends[:2]))
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
