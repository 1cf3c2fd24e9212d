"""Managed local backends (issue 3, item 10): the proxy runs examples/server.py itself.

Real processes throughout: the proxy in the test's event loop starts real FastMCP instances from
`command`, and real mcp clients (or raw aiohttp where a status must be read) talk to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.errors import BackendStartError, ListenError
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.fleet.managed import ManagedBackends, command_line, uses_port
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import (
    DEADLINE,
    SESSION_NOT_FOUND,
    call_tool,
    from_backend,
    from_proxy,
    mcp_url,
    open_session,
    recorded_client,
    text_of,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = f"python {ROOT / 'examples' / 'server.py'} --name {{name}}"
RESTART_DEADLINE = 30.0  # the first restart waits 0.5 s, then a FastMCP start (~2 s, more under load)

ManagedFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def managed_proxy(dict_proxy: DictProxy) -> ManagedFactory:
    """`await managed_proxy(command, replicas)` -> a started Proxy running its own backends."""

    async def make(command: str, replicas: int = 3, **overrides: Any) -> Proxy:
        data = {
            "listen": "127.0.0.1:0",
            "backends": [{"name": "m", "command": command, "replicas": replicas}],
            **overrides,
        }
        return await dict_proxy(data)

    return make


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def instance_of(whoami: str) -> str:
    """`m-2 (pid 123, port 4567)` -> `m-2`."""
    return whoami.split(" ", 1)[0]


async def session_on(web: aiohttp.ClientSession, url: str, name: str) -> str:
    """Open raw sessions until one lands on `name` (the others stay open)."""
    for _ in range(9):
        session_id = await open_session(web, url)
        if instance_of((await call_tool(web, url, session_id, "whoami")).text) == name:
            return session_id
    pytest.fail(f"no session landed on {name}")


# --- serving ---------------------------------------------------------------------------------------


async def test_sessions_spread_over_the_replicas_and_stop_leaves_no_children(
    managed_proxy: ManagedFactory,
) -> None:
    proxy = await managed_proxy(EXAMPLE + " --port {port}", replicas=3)
    assert [b.name for b in proxy.backends] == ["m-1", "m-2", "m-3"]
    pids = proxy.managed.pids()
    assert len(set(pids)) == 3
    assert all(alive(pid) for pid in pids)
    seen: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for i in range(6):
            client, wire = await stack.enter_async_context(recorded_client(mcp_url(proxy)))
            name = instance_of(text_of(await client.call_tool("whoami")))
            seen[wire.session_id] = name
            # Per-session state lives in one process: the counter only counts up if every call of the
            # session reaches the instance that minted it.
            counts = [text_of(await client.call_tool("count")) for _ in range(i % 3 + 2)]
            assert counts == [str(n) for n in range(1, i % 3 + 3)]
    # least_sessions over three equal instances: two sessions each.
    assert sorted(seen.values()) == ["m-1", "m-1", "m-2", "m-2", "m-3", "m-3"]

    await proxy.stop()
    assert [pid for pid in pids if alive(pid)] == []
    for pid in pids:  # reaped, not merely dead
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_killed_instance_is_restarted_and_its_sessions_answer_404(
    managed_proxy: ManagedFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await managed_proxy(EXAMPLE + " --port {port}", replicas=2)
    url = mcp_url(proxy)
    doomed = proxy.managed.instances[0]
    survivor = proxy.managed.instances[1]
    victim = await session_on(web, url, "m-1")
    other = await session_on(web, url, "m-2")
    assert (await call_tool(web, url, victim, "count")).text == "1"
    old_pid, old_owner = doomed.pid, doomed.backend.owner_id
    assert old_pid is not None

    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return doomed.restarts == 1 and doomed.backend.up

    await wait_until(restarted, "the killed instance to be serving again", RESTART_DEADLINE)
    exits = {
        name: proxy.metrics.registry.get_sample_value("mcpbalancer_managed_exits_total", {"backend": name})
        for name in ("m-1", "m-2")
    }
    assert exits == {"m-1": 1, "m-2": None}
    assert doomed.pid != old_pid
    assert not alive(old_pid)
    assert doomed.backend.owner_id != old_owner
    assert doomed.backend.port != 0

    # The old session answers 404 from the proxy itself: the new process does not know it, and the
    # proxy does not even ask it.
    gone = await call_tool(web, url, victim, "count")
    assert (gone.status, gone.json()) == (404, SESSION_NOT_FOUND)
    assert from_proxy(gone.headers)
    # The other instance's sessions were not touched.
    kept = await call_tool(web, url, other, "count")
    assert kept.status == 200
    assert from_backend(kept.headers)
    assert kept.text == "1"
    # New sessions work, on the restarted instance too, and start from scratch.
    fresh = await session_on(web, url, "m-1")
    assert (await call_tool(web, url, fresh, "count")).text == "1"
    assert instance_of((await call_tool(web, url, fresh, "whoami")).text) == "m-1"
    assert survivor.restarts == 0


async def test_child_announcing_its_port_on_stdout(managed_proxy: ManagedFactory) -> None:
    # No {port}: the child binds port 0 and prints `READY <port>`; no port is picked for it.
    proxy = await managed_proxy(EXAMPLE, replicas=1)
    [backend] = proxy.backends
    assert backend.port != 0
    async with recorded_client(mcp_url(proxy)) as (client, _):
        assert text_of(await client.call_tool("whoami")).startswith(f"m-1 (pid {proxy.managed.pids()[0]}, ")
        assert text_of(await client.call_tool("add", {"a": 2, "b": 3})) == "5.0"


# --- failing children ------------------------------------------------------------------------------


def _managed(command: str, replicas: int = 1) -> tuple[ManagedBackends, BackendSet]:
    config = parse_config({"backends": [{"name": "x", "command": command, "replicas": replicas}]})
    backends = BackendSet(Backend(b.name, b.host, b.port, up=False) for b in config.backends)
    return ManagedBackends(config.backends, backends, start_timeout=3.0, stop_timeout=2.0), backends


async def test_child_that_exits_at_start_is_a_clear_error_and_stops_the_others() -> None:
    script = "import sys; print('no database', file=sys.stderr); sys.exit(3)"
    good = _managed(EXAMPLE + " --port {port}")[0].instances[0]
    managed, backends = _managed(f"{sys.executable} -c {script!r} {{port}}", replicas=2)
    managed.instances.append(good)  # a healthy one, started alongside and stopped again
    with pytest.raises(BackendStartError) as raised:
        await managed.start()
    message = str(raised.value)
    assert "managed backend x-1" in message
    assert "exited with status 3" in message
    assert "no database" in message  # the child's own words
    assert not any(b.up for b in backends)
    assert good.pid is not None
    assert not alive(good.pid)


async def test_missing_program_is_a_clear_error() -> None:
    managed, _ = _managed("/nonexistent/server --port {port}")
    with pytest.raises(BackendStartError, match=r"x-1: cannot run '/nonexistent/server'"):
        await managed.start()


async def test_silent_child_times_out_and_is_killed() -> None:
    managed, _ = _managed(f"{sys.executable} -c 'import time; time.sleep(60)' {{port}}")
    with pytest.raises(BackendStartError, match="did not answer HTTP within 3s"):
        await managed.start()
    [pid] = managed.pids()
    assert not alive(pid)


async def test_child_ignoring_sigterm_is_killed_on_stop() -> None:
    script = (
        "import signal, socket, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "print('READY', s.getsockname()[1], flush=True); "
        "c = s.accept()[0]; c.recv(1000); c.sendall(b'HTTP/1.1 204 No Content\\r\\n\\r\\n'); time.sleep(60)"
    )
    managed, backends = _managed(f"{sys.executable} -c {script!r}")
    await managed.start()
    [backend] = backends
    assert backend.up
    [pid] = managed.pids()
    await managed.stop()  # SIGTERM ignored; SIGKILL after stop_timeout
    assert not alive(pid)
    assert not backend.up


# --- pure parts ------------------------------------------------------------------------------------


def test_command_line_placeholders() -> None:
    argv = command_line(
        "python3 app.py --port {port} --host {host} --name '{name} x' {{lit}}",
        name="m-1",
        host="127.0.0.1",
        port=8123,
    )
    assert argv == [
        sys.executable,
        "app.py",
        "--port",
        "8123",
        "--host",
        "127.0.0.1",
        "--name",
        "m-1 x",
        "{lit}",
    ]
    assert command_line("{python} -m srv", name="a", host="h", port=0) == [sys.executable, "-m", "srv"]
    assert command_line("/usr/bin/python srv", name="a", host="h", port=0)[0] == "/usr/bin/python"
    assert uses_port("srv --port={port}")
    assert not uses_port("srv --port {{port}}")
    assert not uses_port("srv")


def test_owner_ids_tell_processes_apart() -> None:
    a, b = Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)
    backends = BackendSet([a, b])
    assert backends.owner("a") is a
    b.owner_id = "b~0001"
    assert backends.owner("b~0001") is b
    assert backends.owner("b") is None  # an owner id from before the process was replaced
    assert backends.owner("b~0002") is None
    assert backends.owner("c~0001") is None
    b.relocate(8080)
    assert (b.port, b.host_header) == (8080, b"127.0.0.1:8080")


async def test_instance_failing_to_restart_stays_down_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mcpbalancer.fleet.managed")
    # Serves the first time; refuses to start while the marker file exists (a broken deploy).
    marker = tmp_path / "started-once"
    script = (
        "import os, socket, sys\n"
        "if os.path.exists(sys.argv[1]): sys.exit('refusing to start: ' + sys.argv[1])\n"
        "open(sys.argv[1], 'w').close()\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print('READY', s.getsockname()[1], flush=True)\n"
        "while True:\n"
        "    c = s.accept()[0]; c.recv(1000); c.sendall(b'HTTP/1.1 204 No Content\\r\\n\\r\\n'); c.close()\n"
    )
    child = tmp_path / "child.py"
    child.write_text(script)
    managed, backends = _managed(f"python {child} {marker}")
    [backend] = backends
    [instance] = managed.instances
    await managed.start()
    try:
        first_pid = instance.pid
        assert first_pid is not None
        first_owner = backend.owner_id
        os.kill(first_pid, signal.SIGKILL)

        async def failed_twice() -> bool:
            return instance.failed_starts >= 2

        await wait_until(failed_twice, "two failed restarts", RESTART_DEADLINE)
        assert not backend.up
        assert instance.restarts == 0
        assert backend.owner_id != first_owner
        messages = [r.getMessage() for r in caplog.records]
        exited = f"managed backend x-1 (pid {first_pid}) exited with status -9; 0 sessions lost; restarting"
        assert any(m.startswith(exited) for m in messages), messages
        # Each failed attempt says why, in the child's own words, and when it tries again.
        assert any("refusing to start" in m and "retrying in" in m for m in messages), messages

        marker.unlink()  # the deploy is fixed: the next attempt (after a longer delay) succeeds

        async def restarted() -> bool:
            return instance.restarts == 1 and backend.up

        await wait_until(restarted, "the instance to come back", RESTART_DEADLINE)
        assert instance.pid not in (None, first_pid)
    finally:
        pids = managed.pids()
        await managed.stop()
    assert not any(alive(pid) for pid in pids)


async def test_replay_failover_keeps_a_session_of_a_killed_instance(
    managed_proxy: ManagedFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await managed_proxy(EXAMPLE + " --port {port}", replicas=2, failover="replay")
    url = mcp_url(proxy)
    doomed = proxy.managed.instances[0]
    session_id = await session_on(web, url, "m-1")
    assert (await call_tool(web, url, session_id, "count")).text == "1"
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)

    async def restarted() -> bool:
        return doomed.restarts == 1 and doomed.backend.up

    await wait_until(restarted, "the killed instance to be serving again", RESTART_DEADLINE)
    # The process that knew the session is gone (its owner id with it), yet the session goes on: its
    # initialize was replayed on a live instance; the counter, kept by the dead process, restarts.
    moved = await call_tool(web, url, session_id, "count")
    assert moved.status == 200
    assert moved.text == "1"
    assert (await call_tool(web, url, session_id, "count")).text == "2"
    assert proxy.router.failover is not None
    assert proxy.router.failover.replays == 1


async def test_listen_failure_stops_the_started_children() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = {
            "listen": f"127.0.0.1:{port}",
            "backends": [{"name": "m", "command": EXAMPLE + " --port {port}"}],
        }
        proxy = Proxy(parse_config(data, source="<test>"))
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            await proxy.start()
    [pid] = proxy.managed.pids()
    assert not alive(pid)
    await proxy.stop()  # still safe to call
