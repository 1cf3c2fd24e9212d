"""The command line with managed backends: config/demo.yaml as the README runs it, a child that cannot
start, and no child left behind however the proxy ends (SIGTERM, or SIGKILL of the proxy itself)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mcp_helpers import recorded_client, text_of, wait_until
from tests.test_managed import alive, instance_of

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "demo.yaml"
LISTENING = re.compile(r"listening on (http://\S+)")
CHILD = re.compile(r"managed backend (\S+) serving on port \d+ \(pid (\d+),")
START_DEADLINE = 60.0  # three FastMCP imports in parallel on a loaded machine
EXIT_DEADLINE = 15.0


class Running:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log: list[str] = []
        self.listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            match = LISTENING.search(line)
            if match and not self.listening.done():
                self.listening.set_result(match.group(1))
        if not self.listening.done():
            self.listening.set_exception(RuntimeError("exited before listening:\n" + "\n".join(self.log)))

    @property
    def children(self) -> dict[str, int]:
        return {m[1]: int(m[2]) for line in self.log if (m := CHILD.search(line))}

    async def wait(self) -> int:
        async with asyncio.timeout(EXIT_DEADLINE):
            code = await self.process.wait()
            await self.drain
        return code


@pytest.fixture
async def running() -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for run in started:
        if run.process.returncode is None:
            run.process.kill()
            await run.process.wait()
        run.drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run.drain
        for pid in run.children.values():  # belt and braces: never leave a child behind
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


async def start(config: Path, running: list[Running]) -> Running:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcpbalancer", "--config", str(config), cwd=ROOT, stderr=asyncio.subprocess.PIPE
    )
    run = Running(process)
    running.append(run)
    return run


def demo_copy(tmp_path: Path) -> Path:
    """config/demo.yaml on a free port (the demo's 8080 may be taken on a shared machine)."""
    text = DEMO.read_text()
    assert 'listen: "127.0.0.1:8080"' in text
    path = tmp_path / "demo.yaml"
    path.write_text(text.replace('listen: "127.0.0.1:8080"', 'listen: "127.0.0.1:0"'))
    return path


async def test_demo_config_serves_three_local_instances_and_sigterm_stops_them(
    tmp_path: Path, running: list[Running]
) -> None:
    run = await start(demo_copy(tmp_path), running)
    async with asyncio.timeout(START_DEADLINE):
        url = await run.listening
    children = run.children
    assert sorted(children) == ["demo-1", "demo-2", "demo-3"]
    names = set()
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            client, _ = await stack.enter_async_context(recorded_client(url + "/mcp"))
            whoami = text_of(await client.call_tool("whoami"))
            names.add(instance_of(whoami))
            assert f"pid {children[instance_of(whoami)]}," in whoami
            assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "2"]
    assert names == {"demo-1", "demo-2", "demo-3"}

    run.process.send_signal(signal.SIGTERM)
    assert await run.wait() == 0, "\n".join(run.log)
    assert [pid for pid in children.values() if alive(pid)] == []
    assert not any("Traceback" in line for line in run.log)


async def test_children_die_with_a_killed_proxy(tmp_path: Path, running: list[Running]) -> None:
    config = tmp_path / "two.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nbackends:\n  - name: k\n"
        "    command: python examples/server.py --name {name} --port {port}\n    replicas: 2\n"
    )
    run = await start(config, running)
    async with asyncio.timeout(START_DEADLINE):
        await run.listening
    pids = list(run.children.values())
    assert len(pids) == 2
    assert all(alive(pid) for pid in pids)

    run.process.kill()  # no chance to stop anything: the kernel's parent-death signal does it
    assert await run.wait() == -signal.SIGKILL

    async def all_gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await wait_until(all_gone, "the children of the killed proxy to die", EXIT_DEADLINE)


async def test_child_that_cannot_start_is_a_clear_error_and_exit_1(
    tmp_path: Path, running: list[Running]
) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nbackends:\n  - name: bad\n"
        "    command: python -c \"import sys; sys.exit('cannot open model.bin')\" {port}\n"
    )
    run = await start(config, running)
    assert await run.wait() == 1
    text = "\n".join(run.log)
    assert "mcpbalancer: managed backend bad-1" in text
    assert "exited with status 1 before serving" in text
    assert "cannot open model.bin" in text
    assert "Traceback" not in text
    assert not run.listening.done() or run.listening.exception() is not None


def client_sections(output: str) -> dict[str, list[tuple[str, str]]]:
    """examples/client.py's output: title line -> [(whoami, count), ...]."""
    sections: dict[str, list[str]] = {}
    for line in output.splitlines():
        if not line.startswith(" "):
            sections[line] = []
        else:
            sections[list(sections)[-1]].append(line.split(" -> ", 1)[1])
    return {title: list(zip(answers[::2], answers[1::2], strict=True)) for title, answers in sections.items()}


async def test_quick_start_client_shows_both_eras(tmp_path: Path, running: list[Running]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ".venv/bin/python examples/client.py http://127.0.0.1:8080/mcp" in readme
    run = await start(demo_copy(tmp_path), running)
    async with asyncio.timeout(START_DEADLINE):
        url = await run.listening
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "examples/client.py",
        url + "/mcp",
        "--calls",
        "4",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(START_DEADLINE):
        out, err = await client.communicate()
    assert client.returncode == 0, err.decode()
    [(default_title, default), (legacy_title, legacy)] = client_sections(out.decode()).items()

    # The SDK's default: 2026-07-28, no session, every request placed on its own.
    assert default_title.endswith("negotiated 2026-07-28")
    assert all(whoami.endswith("): stateless 2026-07-28 request") for whoami, _ in default)
    assert [count for _, count in default] == ["1"] * 4
    assert len({instance_of(whoami) for whoami, _ in default}) > 1

    # mode="legacy": one session, one instance, the count going up.
    assert legacy_title.endswith("negotiated 2025-11-25")
    assert [count for _, count in legacy] == ["1", "2", "3", "4"]
    [whoami] = {whoami for whoami, _ in legacy}
    assert whoami.endswith("): legacy session, protocol 2025-11-25")
    assert f"(pid {run.children[instance_of(whoami)]}," in whoami
