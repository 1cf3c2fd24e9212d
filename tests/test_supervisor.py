"""The worker supervisor's policy, with tiny real worker processes instead of mcpbalancer workers.

A fake worker (FAKE below, run by the interpreter with no imports beyond the standard library)
follows a script handed to it per start: `ok` says ready and serves until SIGTERM, `fail` exits 3
before ready, `gate` says ready only once a file exists, `stubborn` ignores SIGTERM. Each one
notes what happens to it (start, hup, term) in a shared file the tests poll.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mcpbalancer.config import Config, load_config, parse_config
from mcpbalancer.process.supervisor import Supervisor, check_listen, describe_status
from tests.mcp_helpers import wait_until

FAKE = """
import os, signal, sys, time
fd, index, mode, notes, gate = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def note(what):
    with open(notes, "a") as fh:
        fh.write(f"{index} {os.getpid()} {what}\\n")
def term(*_):
    note("term")
    if mode != "stubborn":
        sys.exit(0)
if mode == "fail":
    sys.exit(3)
signal.signal(signal.SIGHUP, lambda *_: note("hup"))
signal.signal(signal.SIGTERM, term)
note("start")
note("drains=" + os.environ.get("MCPBALANCER_ADMIN_DRAINS", "none").replace(" ", ""))
note("socket=" + os.environ.get("MCPBALANCER_CONTROL_SOCKET", "none"))
while mode == "gate" and not os.path.exists(gate):
    time.sleep(0.01)
os.write(fd, b"R")
os.close(fd)
while True:
    signal.pause()
"""

FAST = {"restart_delay": (0.01, 0.05), "stable_after": 30.0, "start_timeout": 10.0}


def config(workers: int = 2, shutdown_timeout: float = 5.0) -> Config:
    data = {
        "listen": "127.0.0.1:18080",
        "store": "redis://127.0.0.1:1/0",  # never contacted: the supervisor serves nothing itself
        "workers": workers,
        "shutdown_timeout": shutdown_timeout,
        "backends": [{"name": "a", "url": "http://127.0.0.1:1"}],
    }
    return parse_config(data, "<test>")


@dataclass
class Fakes:
    """Scripts for the fake workers, and what they noted."""

    dir: Path
    plans: dict[int, collections.deque[str]] = field(default_factory=dict)
    default: str = "ok"

    @property
    def notes_file(self) -> Path:
        return self.dir / "notes"

    @property
    def gate(self) -> Path:
        return self.dir / "gate"

    def command(self, index: int, ready_fd: int) -> list[str]:
        plan = self.plans.get(index)
        mode = plan.popleft() if plan else self.default
        return [
            sys.executable,
            "-c",
            FAKE,
            str(ready_fd),
            str(index),
            mode,
            str(self.notes_file),
            str(self.gate),
        ]

    def notes(self) -> list[tuple[int, int, str]]:
        if not self.notes_file.exists():
            return []
        lines = self.notes_file.read_text().splitlines()
        return [(int(i), int(pid), what) for i, pid, what in (line.split() for line in lines)]

    def noted(self, index: int, what: str) -> list[int]:
        """Pids of worker `index` that noted `what`."""
        return [pid for i, pid, w in self.notes() if i == index and w == what]

    async def wait(self, index: int, what: str, count: int = 1) -> list[int]:
        async def seen() -> bool:
            return len(self.noted(index, what)) >= count

        await wait_until(seen, f"worker {index} to note {what!r} {count} time(s)")
        return self.noted(index, what)

    def kill_leftovers(self) -> None:
        for _, pid, _ in self.notes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Fakes]:
    fakes = Fakes(tmp_path)
    try:
        yield fakes
    finally:
        fakes.kill_leftovers()


@contextlib.asynccontextmanager
async def running(supervisor: Supervisor) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(supervisor.run())
    try:
        yield task
    finally:
        if not task.done():
            supervisor.stop()
            async with asyncio.timeout(10):
                await task


async def exit_status(task: asyncio.Task[int]) -> int:
    async with asyncio.timeout(10):
        return await task


async def test_stop_forwards_sigterm_and_exits_0(fakes: Fakes) -> None:
    async with running(Supervisor(config(3), fakes.command, **FAST)) as task:
        for index in range(3):
            await fakes.wait(index, "start")
        os.kill(os.getpid(), signal.SIGTERM)  # as an operator would: the supervisor's own handler
        assert await exit_status(task) == 0
    assert all(fakes.noted(index, "term") for index in range(3))


async def test_a_worker_failing_its_first_start_stops_the_others(fakes: Fakes) -> None:
    fakes.plans[1] = collections.deque(["fail"])
    async with running(Supervisor(config(2), fakes.command, **FAST)) as task:
        assert await exit_status(task) == 1
    # Worker 0 may have been stopped before or after it noted its start; it never outlives the failure.
    assert set(fakes.noted(0, "start")) <= set(fakes.noted(0, "term"))


async def test_an_exited_worker_is_started_again(fakes: Fakes) -> None:
    supervisor = Supervisor(config(2), fakes.command, **FAST)
    async with running(supervisor) as task:
        [first] = await fakes.wait(0, "start")
        os.kill(first, signal.SIGKILL)
        [_, second] = await fakes.wait(0, "start", 2)
        assert second != first
        assert len(fakes.noted(1, "start")) == 1  # the other worker is not touched
        supervisor.stop()
        assert await exit_status(task) == 0


async def test_gives_up_when_no_worker_can_start_again(fakes: Fakes) -> None:
    for index in range(2):
        fakes.plans[index] = collections.deque(["ok"])
    fakes.default = "fail"  # every later start fails
    async with running(Supervisor(config(2), fakes.command, give_up_after=2, **FAST)) as task:
        pids = [(await fakes.wait(index, "start"))[0] for index in range(2)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert await exit_status(task) == 1


async def test_keeps_restarting_while_another_worker_serves(fakes: Fakes) -> None:
    fakes.plans[1] = collections.deque(["ok", "fail", "fail", "fail", "ok"])
    supervisor = Supervisor(config(2), fakes.command, give_up_after=2, **FAST)
    async with running(supervisor) as task:
        [first] = await fakes.wait(1, "start")
        os.kill(first, signal.SIGKILL)
        await fakes.wait(1, "start", 2)  # three failed starts later, the fourth one serves
        assert not task.done()
        supervisor.stop()
        assert await exit_status(task) == 0


async def test_sighup_reaches_serving_workers_and_a_starting_one_once_ready(fakes: Fakes) -> None:
    fakes.plans[1] = collections.deque(["gate"])
    supervisor = Supervisor(config(2), fakes.command, **FAST)
    async with running(supervisor):
        await fakes.wait(1, "start")  # started, not ready: it waits for the gate file

        async def ready() -> bool:
            return 0 in supervisor.serving

        await wait_until(ready, "worker 0 to be ready")
        os.kill(os.getpid(), signal.SIGHUP)
        await fakes.wait(0, "hup")
        assert fakes.noted(1, "hup") == []  # not before its handlers are in place
        fakes.gate.touch()
        await fakes.wait(1, "hup")
    assert len(fakes.noted(0, "hup")) == 1


async def test_a_worker_ignoring_sigterm_is_killed_after_the_grace(fakes: Fakes) -> None:
    fakes.plans[0] = collections.deque(["stubborn"])
    supervisor = Supervisor(config(2, shutdown_timeout=0.1), fakes.command, kill_grace=0.1, **FAST)
    async with running(supervisor) as task:
        for index in range(2):
            await fakes.wait(index, "start")
        supervisor.stop()
        assert await exit_status(task) == 1  # a worker had to be killed: not a clean stop
    assert fakes.noted(0, "term")


async def test_admin_drains_reach_a_worker_that_was_starting_and_every_later_start(
    fakes: Fakes,
) -> None:
    fakes.plans[1] = collections.deque(["gate", "ok"])
    # A file, so that the reload below reads one.
    path = fakes.dir / "admin.yaml"
    path.write_text(
        "listen: 127.0.0.1:18080\nstore: redis://127.0.0.1:1/0\nworkers: 2\nadmin: 127.0.0.1:0\n"
        "backends: [{name: a, url: 'http://127.0.0.1:1'}]\n"
    )
    supervisor = Supervisor(load_config(path), fakes.command, **FAST)
    behind: list[int] = []
    supervisor.on_behind = behind.append
    async with running(supervisor):

        async def serving(index: int) -> bool:
            return index in supervisor.serving

        await wait_until(lambda: serving(0), "worker 0 to be ready")
        await fakes.wait(1, "start")  # starting: held at the gate
        reached = supervisor.begin_drain("a", True)
        assert [c.index for c in reached] == [0]  # the admin listener sends it to worker 0
        assert behind == []
        fakes.gate.touch()
        await wait_until(lambda: serving(1), "worker 1 to be ready")
        assert behind == [1]  # ready with older drains: the admin listener sends them
        # Each worker has a control socket of its own, in one directory.
        sockets = {what for i, _, what in fakes.notes() if what.startswith("socket=")}
        assert len(sockets) == 2
        assert {s.rsplit("/", 1)[1] for s in sockets} == {"worker-0.sock", "worker-1.sock"}
        # A later start is given them in its environment; a reload ends them.
        [first] = fakes.noted(1, "start")
        os.kill(first, signal.SIGKILL)
        await fakes.wait(1, "start", 2)
        assert fakes.noted(1, 'drains={"a":true}')
        assert 0 in [c.index for c in supervisor.begin_reload()]
        assert supervisor.admin_drains == {}  # the file is the source of truth again
    assert fakes.noted(0, "drains=none")


def test_check_listen_refuses_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match="in use"):
            check_listen("127.0.0.1", port)
    check_listen("127.0.0.1", port)  # free again


def test_describe_status() -> None:
    assert describe_status(3) == "status 3"
    assert describe_status(-signal.SIGKILL) == "signal SIGKILL"
