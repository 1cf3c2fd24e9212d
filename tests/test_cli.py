"""The command line, as a subprocess: `--check`, serving, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from mcpbalancer.cli import with_log_level
from mcpbalancer.config import parse_config
from mcpbalancer.observability.logs import access_enabled
from tests.fixtures.backends import BackendProcess
from tests.mcp_helpers import (
    DEADLINE,
    call_body,
    call_tool,
    open_session,
    read_sse_event,
    recorded_client,
    session_headers,
    sse_messages,
    text_of,
    wait_until,
)

SCRIPT = Path(sys.executable).parent / "mcpbalancer"
LISTENING = re.compile(r"listening on (http://\S+)")
EXIT_DEADLINE = 5.0


def backends_yaml(backends: list[BackendProcess]) -> str:
    return "".join(f"  - name: {b.name}\n    url: {b.url}\n" for b in backends)


async def run(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# --- --check -------------------------------------------------------------------------------------


async def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    config = tmp_path / "good.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nstore: memory\nsession_ttl: 60\nbalance: p2c\nheartbeat: 5\n"
        "backends:\n  - name: a\n    url: http://127.0.0.1:9001\n    weight: 2\n"
        "  - name: b\n    url: http://127.0.0.1:9002\n"
    )
    status, out, err = await run(sys.executable, "-m", "mcpbalancer", "--config", str(config), "--check")
    assert (status, err) == (0, "")
    assert "OK" in out
    assert "2 backends" in out


@pytest.mark.parametrize("which", ["listen", "admin"])
async def test_a_taken_port_exits_1_naming_the_listener(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        listen, admin = (port, 0) if which == "listen" else (0, port)
        config = tmp_path / "busy.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nhealth:\n  interval: 0\n"
            "backends:\n  - name: a\n    url: http://127.0.0.1:9001\n"
        )
        status, _, err = await run(sys.executable, "-m", "mcpbalancer", "--config", str(config))
    assert status == 1
    suffix = " (admin)" if which == "admin" else ""
    assert f"mcpbalancer: cannot listen on 127.0.0.1:{port}{suffix}: " in err
    assert "Traceback" not in err


BACKENDS_OK = "backends:\n  - name: a\n    url: http://127.0.0.1:9001\n"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        pytest.param("colour: blue\n" + BACKENDS_OK, ["colour", "unknown key"], id="unknown-key"),
        pytest.param(
            BACKENDS_OK + "    colour: blue\n",
            ["backends[0].colour", "unknown key"],
            id="unknown-backend-key",
        ),
        pytest.param(
            BACKENDS_OK + "  - name: a\n    url: http://127.0.0.1:9002\n",
            ["backends[1].name", "duplicate"],
            id="duplicate-name",
        ),
        pytest.param(
            "backends:\n  - name: a\n    url: ftp://127.0.0.1:9001\n", ["backends[0].url"], id="bad-scheme"
        ),
        pytest.param(
            "backends:\n  - name: a\n    url: http://127.0.0.1:99999\n", ["backends[0].url"], id="bad-port"
        ),
        pytest.param("backends: []\n", ["backends", "at least one"], id="empty-backends"),
        pytest.param("listen: 127.0.0.1:0\n", ["backends", "required"], id="no-backends"),
    ],
)
async def test_check_refuses_a_bad_file_naming_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    status, out, err = await run(sys.executable, "-m", "mcpbalancer", "--config", str(config), "--check")
    assert status != 0
    assert out == ""
    assert str(config) in err
    for name in names:
        assert name in err, err
    assert "Traceback" not in err


VARIABLE = "MCPB_TEST_STORE_PREFIX"


async def test_check_resolves_references_from_the_process_environment(tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text(f"store_prefix: '${{{VARIABLE}}}'\n" + BACKENDS_OK)
    check = (sys.executable, "-m", "mcpbalancer", "--config", str(config), "--check")
    without = {name: value for name, value in os.environ.items() if name != VARIABLE}
    status, out, err = await run(*check, env={**without, VARIABLE: "app:"})
    assert (status, err) == (0, "")
    status, out, err = await run(*check, env=without)
    assert (status, out) == (2, "")
    problem = f"store_prefix: environment variable {VARIABLE} is not set"
    assert err == f"mcpbalancer: invalid configuration: {config}: {problem}\n"


async def test_without_config_or_a_command_it_exits_2_with_usage() -> None:
    status, out, err = await run(sys.executable, "-m", "mcpbalancer")
    assert (status, out) == (2, "")
    assert "usage: mcpbalancer" in err
    assert "required: --config" in err


# --- serving -------------------------------------------------------------------------------------


@dataclass
class Served:
    process: asyncio.subprocess.Process
    url: str
    log: list[str] = field(default_factory=list)
    config: Path | None = None

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"

    async def terminate(self) -> float:
        """SIGTERM; wait for the exit (with a deadline); the seconds it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(EXIT_DEADLINE):
            await self.process.wait()
        return time.monotonic() - started


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """`await serve(backends, extra="top: level\n")` -> the `mcpbalancer` console script serving on a
    free port."""
    started: list[tuple[Served, asyncio.Task[None]]] = []

    async def start(backends: list[BackendProcess], extra: str = "") -> Served:
        config = tmp_path / f"serve{len(started)}.yaml"
        config.write_text("listen: 127.0.0.1:0\n" + extra + "backends:\n" + backends_yaml(backends))
        process = await asyncio.create_subprocess_exec(
            str(SCRIPT), "--config", str(config), stderr=asyncio.subprocess.PIPE
        )
        log: list[str] = []
        listening = asyncio.get_running_loop().create_future()
        drain = asyncio.create_task(_drain(process, log, listening))
        try:
            async with asyncio.timeout(DEADLINE):
                url = await listening
        except BaseException:
            process.kill()
            await process.wait()
            drain.cancel()
            raise
        served = Served(process, url, log, config)
        started.append((served, drain))
        return served

    yield start
    for served, drain in started:
        if served.process.returncode is None:
            served.process.kill()
            await served.process.wait()
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain


async def _drain(process: asyncio.subprocess.Process, log: list[str], listening: asyncio.Future[str]) -> None:
    """Read stderr to the end (so the pipe never fills), resolving `listening` with the URL."""
    assert process.stderr is not None
    async for raw in process.stderr:
        line = raw.decode(errors="replace").rstrip()
        log.append(line)
        match = LISTENING.search(line)
        if match and not listening.done():
            listening.set_result(match.group(1))
    if not listening.done():
        listening.set_exception(RuntimeError("mcpbalancer exited before listening:\n" + "\n".join(log)))


async def test_serves_a_session_and_exits_0_on_sigterm(
    backends: list[BackendProcess], serve: ServeFactory
) -> None:
    served = await serve(backends)
    async with recorded_client(served.mcp_url) as (client, _):
        assert text_of(await client.call_tool("whoami")) in {"a", "b", "c"}
        assert [text_of(await client.call_tool("count")) for _ in range(3)] == ["1", "2", "3"]
    took = await served.terminate()
    assert served.process.returncode == 0, "\n".join(served.log)
    assert took < 3.0
    assert not any("Traceback" in line for line in served.log)


async def test_sigterm_lets_an_in_flight_call_finish(
    backends: list[BackendProcess], serve: ServeFactory
) -> None:
    served = await serve(backends)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as web:
        session_id = await open_session(web, served.mcp_url)
        body = call_body("slow", 7, seconds=1.0)
        async with web.post(served.mcp_url, json=body, headers=session_headers(session_id)) as resp:
            # The answer's head is here (an SSE stream), its body not yet: the tool is running.
            assert resp.status == 200
            served.process.send_signal(signal.SIGTERM)
            # The listener closes at once...
            await _wait_refused(served)
            assert served.process.returncode is None
            # ...and the call in flight still completes.
            [reply] = sse_messages(await resp.text())
    assert reply["id"] == 7
    assert reply["result"]["content"][0]["text"] in {"a", "b", "c"}
    async with asyncio.timeout(EXIT_DEADLINE):
        assert await served.process.wait() == 0, "\n".join(served.log)
    assert not any("Traceback" in line for line in served.log)


async def _wait_refused(served: Served) -> None:
    host, _, port = served.url.removeprefix("http://").rpartition(":")
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            except ConnectionResetError:
                pass  # accepted into the backlog of a listener being closed: try again
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await asyncio.sleep(0.02)


# --- SIGHUP and shutdown_timeout ------------------------------------------------------------------


async def test_sighup_adds_and_removes_backends_while_a_stream_stays_open(
    backends: list[BackendProcess], serve: ServeFactory
) -> None:
    a, b, c = backends
    served = await serve([a, b])
    assert served.config is not None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE * 3)) as web:
        sessions: dict[str, str] = {}
        while len(sessions) < 2:
            sid = await open_session(web, served.mcp_url)
            sessions.setdefault((await call_tool(web, served.mcp_url, sid, "whoami")).text, sid)
        headers = {**session_headers(sessions["a"]), "Accept": "text/event-stream"}
        async with web.get(served.mcp_url, headers=headers) as stream:
            assert stream.status == 200
            served.config.write_text("listen: 127.0.0.1:0\nbackends:\n" + backends_yaml([a, c]))
            served.process.send_signal(signal.SIGHUP)
            await _wait_logged(served, "reloaded")
            gone = await call_tool(web, served.mcp_url, sessions["b"], "whoami")
            assert gone.status == 404
            assert (await call_tool(web, served.mcp_url, sessions["a"], "notify_stream")).text == "sent"
            event = await read_sse_event(stream)
            assert "notifications/tools/list_changed" in event["data"]
            sid = await open_session(web, served.mcp_url)
            assert (await call_tool(web, served.mcp_url, sid, "whoami")).text == "c"
            # An invalid file is refused with a log line; the running backends stay.
            served.config.write_text("backends: [\n")
            served.process.send_signal(signal.SIGHUP)
            await _wait_logged(served, "reload rejected")
            assert (await call_tool(web, served.mcp_url, sessions["a"], "whoami")).text == "a"
    assert await served.terminate() < EXIT_DEADLINE
    assert served.process.returncode == 0
    assert not any("Traceback" in line for line in served.log)


async def test_shutdown_timeout_bounds_an_in_flight_call(
    backends: list[BackendProcess], serve: ServeFactory
) -> None:
    served = await serve(backends, extra="shutdown_timeout: 0.5\n")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as web:
        session_id = await open_session(web, served.mcp_url)
        body = call_body("slow", 7, seconds=30.0)
        async with web.post(served.mcp_url, json=body, headers=session_headers(session_id)) as resp:
            assert resp.status == 200
            took = await served.terminate()
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # cut at the timeout: the tool did not finish
    assert served.process.returncode == 0
    assert 0.5 <= took < 3.0


async def test_standalone_get_streams_do_not_hold_shutdown(
    backends: list[BackendProcess], serve: ServeFactory
) -> None:
    served = await serve(backends, extra="shutdown_timeout: 30\n")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as web:
        session_id = await open_session(web, served.mcp_url)
        headers = {**session_headers(session_id), "Accept": "text/event-stream"}
        async with web.get(served.mcp_url, headers=headers) as stream:
            assert stream.status == 200
            took = await served.terminate()
    assert served.process.returncode == 0
    assert took < 3.0


async def _wait_logged(served: Served, text: str) -> None:
    async def logged() -> bool:
        return any(text in line for line in served.log)

    await wait_until(logged, f"a log line with {text!r}")


@pytest.mark.parametrize(("flag", "access"), [(None, True), ("info", True), ("warning", False)])
def test_log_level_flag_also_governs_the_access_log(flag: str | None, access: bool) -> None:
    config = parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:1"}]})
    assert access_enabled(with_log_level(config, flag).log) is access
