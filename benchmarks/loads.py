"""Saturating load: wrk with `wrk_sessions.lua` where wrk is installed, else the Python driver.

Both answer the same question — how many requests per second with `connections` keep-alive
connections, spread round robin over the given sessions — and count non-2xx answers and affinity
errors. For the direct floor the sessions live on several stubs: one wrk per stub, the connections
split between them, results summed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from drivers import LoadResult, Session, by_port, closed_loop
from procs import LOAD_CPU

LUA_SCRIPT = Path(__file__).with_name("wrk_sessions.lua")


class Load(Protocol):
    name: str

    async def run(
        self, sessions: Sequence[Session], duration: float, connections: int, sse: bool
    ) -> LoadResult: ...


class PythonLoad:
    name = "python (asyncio + httptools closed loop)"

    async def run(
        self, sessions: Sequence[Session], duration: float, connections: int, sse: bool
    ) -> LoadResult:
        return await closed_loop(sessions, duration, connections, sse)


class WrkLoad:
    name = "wrk + wrk_sessions.lua"

    def __init__(self, workdir: Path, pin: bool, *, scheme: str = "http", close: bool = False) -> None:
        self._workdir = workdir
        self._pin = pin
        self._scheme = scheme  # https: wrk speaks TLS (it does not verify the certificate)
        self._close = close  # a new connection per request (Connection: close)

    async def run(
        self, sessions: Sequence[Session], duration: float, connections: int, sse: bool
    ) -> LoadResult:
        groups = by_port(sessions)
        shares = _split(connections, len(groups))
        runs = [
            self._one(port, group, duration, share, sse)
            for (port, group), share in zip(groups.items(), shares, strict=True)
        ]
        total = LoadResult()
        for result in await asyncio.gather(*runs):
            total.add(result)
        return total

    async def _one(
        self, port: int, sessions: Sequence[Session], duration: float, connections: int, sse: bool
    ) -> LoadResult:
        ids = self._workdir / f"sessions-{port}.txt"
        ids.write_text("".join(f"{s.sid} {s.owner}\n" for s in sessions))
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
        argv += ["-s", str(LUA_SCRIPT), f"{self._scheme}://127.0.0.1:{port}", "--", str(ids)]
        argv += ["sse" if sse else "json", "/mcp", *(["close"] if self._close else [])]
        if self._pin:
            argv = ["taskset", "-c", str(LOAD_CPU), *argv]
        out = await _run(argv, limit=duration + 60)
        return _parse(out)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _run(argv: Sequence[str], limit: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(limit):
            stdout, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return stdout.decode(errors="replace")


def _parse(output: str) -> LoadResult:
    for line in output.splitlines():
        if line.startswith("WRK_RESULT "):
            data = json.loads(line.removeprefix("WRK_RESULT "))
            return LoadResult(
                requests=data["responses"],
                seconds=data["duration_us"] / 1e6,
                bad_status=data["bad_status"],
                bad_affinity=data["bad_affinity"],
                socket_errors=data["socket_errors"],
            )
    raise RuntimeError(f"wrk printed no result:\n{output}")


def make_load(workdir: Path, pin: bool, prefer_wrk: bool = True) -> Load:
    if prefer_wrk and shutil.which("wrk") is not None:
        return WrkLoad(workdir, pin)
    return PythonLoad()
