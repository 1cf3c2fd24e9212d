"""Sealed session ids against plain ones, in one run (issue 14).

    python benchmarks/sealed.py [--requests N] [--sessions N] [--no-redis]

1. CPU per request for a known session, plain (memory store) and sealed (no store), relayed with
   micro.py's in-memory transports; the two are run in turn, round after round, the best round of
   each kept, in CPU time (so that a busy machine slows both alike, and other processes do not count).
   Goal: sealed costs at most 1 µs more.
2. CPU per new session (initialize and its answer, the binding or the sealing included), the same
   way.
3. With a Redis store and two proxies in this process (real sockets, the fast stub backend): the
   latency of a session's first request on the proxy that did not see its initialize, with the
   binding announced to the other proxies (the default), without the announcement (the other
   proxy reads Redis first), and with sealed ids (nothing to read). Skipped without redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import uvloop
from micro import MemoryTransport, request, response
from stub_backend import Stub, StubConnection

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.dataplane.plane import DataPlane
from mcpbalancer.dataplane.upstream import UpstreamConnection
from mcpbalancer.store.cache import CachedStore

KEY = base64.b64encode(secrets.token_bytes(32)).decode()
INIT = (
    b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18",'
    b'"capabilities":{},"clientInfo":{"name":"bench","version":"0"}}}'
)


def settings(mode: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "backends": [{"name": "s1", "url": "http://127.0.0.1:9"}],
        "health": {"interval": 0},
        "log": {"level": "warning", "access": False},
        **extra,
    }
    if mode == "sealed":
        data |= {"session_ids": "sealed", "session_keys": [KEY]}
    return data


class Bench:
    """One proxy's data plane on in-memory transports, one client and one backend connection."""

    def __init__(self, mode: str) -> None:
        config = parse_config(settings(mode), source="<bench>")
        self.proxy = proxy = Proxy(config)
        self.plane = DataPlane(
            proxy.router,
            proxy.fleet.pools,
            heartbeat=config.heartbeat,
            timeouts=config.timeouts,
            limits=config.limits,
            loop=asyncio.get_running_loop(),
            metrics=proxy.metrics,
            phases=proxy.compose_phases(config),
        )
        self.upstream, self.up = UpstreamConnection(proxy.fleet.pools["s1"]), MemoryTransport()
        self.upstream.connection_made(self.up)  # type: ignore[arg-type]
        proxy.fleet.pools["s1"].release(self.upstream)
        self.client, self.down = self.plane.protocol_factory(), MemoryTransport()
        self.client.connection_made(self.down)  # type: ignore[arg-type]

    async def open(self, backend_sid: bytes) -> bytes:
        """Initialize a session the backend knows as `backend_sid`; the id the client got."""
        self.client.data_received(request(None, False))
        self.upstream.data_received(response(backend_sid, False))
        for _ in range(3):
            await asyncio.sleep(0)  # a store binding runs in a task
        head = b"".join(self.down.out)
        self.down.out.clear()
        self.up.out.clear()
        return head.split(b"Mcp-Session-Id: ", 1)[1].split(b"\r\n", 1)[0]

    def known(self, client_sid: bytes, backend_sid: bytes) -> Callable[[int], None]:
        ask, answer = request(client_sid, False), response(backend_sid, False)  # FastMCP echoes the id
        client, upstream, down, up = self.client, self.upstream, self.down, self.up

        def relay(n: int) -> None:
            for _ in range(n):
                client.data_received(ask)
                upstream.data_received(answer)
                down.out.clear()
                up.out.clear()

        return relay


async def known_sessions(requests: int, rounds: int) -> dict[str, float]:
    benches = {mode: Bench(mode) for mode in ("plain", "sealed")}
    backend_sid = b"%032x" % 0xC0FFEE  # what FastMCP issues: 32 hex characters (a token is ~126)
    relays = {mode: b.known(await b.open(backend_sid), backend_sid) for mode, b in benches.items()}
    for relay in relays.values():
        relay(2000)  # warm up; a refusal or a close would raise here
    best = dict.fromkeys(relays, float("inf"))
    for _ in range(rounds):
        for mode, relay in relays.items():
            started = time.process_time()  # CPU time: other processes on a busy machine do not count
            relay(requests)
            best[mode] = min(best[mode], (time.process_time() - started) / requests)
    return best


async def new_sessions(sessions: int) -> dict[str, float]:
    benches = {mode: Bench(mode) for mode in ("plain", "sealed")}
    ids = itertools.count()
    best = dict.fromkeys(benches, float("inf"))
    for _ in range(5):
        for mode, bench in benches.items():
            started = time.process_time()
            for _ in range(sessions):
                await bench.open(b"%032x" % next(ids))
            best[mode] = min(best[mode], (time.process_time() - started) / sessions)
    return best


async def first_requests(sessions: int, redis_url: str) -> dict[str, list[float]]:
    """Latency of each session's first request on the proxy that did not see its initialize."""
    stub = Stub("s1", 1.0)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StubConnection(stub), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    results: dict[str, list[float]] = {}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    try:
        for case in ("plain, announced", "plain, not announced", "sealed"):
            mode = "sealed" if case == "sealed" else "plain"
            data = settings(mode, store=redis_url if mode == "plain" else "memory")
            data["backends"] = [{"name": "s1", "url": f"http://127.0.0.1:{port}"}]
            proxies = [Proxy(parse_config(data, source="<bench>")) for _ in range(2)]
            for proxy in proxies:
                await proxy.start()
                if case == "plain, not announced" and isinstance(proxy.store, CachedStore):
                    proxy.store._events = False  # the proxies before issue 14
            timings = []
            async with aiohttp.ClientSession() as http:
                first, second = (f"{p.url}/mcp" for p in proxies)
                for _ in range(sessions):
                    async with http.post(first, data=INIT, headers=headers) as resp:
                        sid = resp.headers["Mcp-Session-Id"]
                        await resp.read()
                    known = {**headers, "Mcp-Session-Id": sid}
                    started = time.perf_counter()
                    async with http.post(second, data=INIT, headers=known) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status
                    timings.append(time.perf_counter() - started)
            for proxy in proxies:
                await proxy.stop()
            results[case] = timings
    finally:
        server.close()
    return results


def start_redis() -> tuple[subprocess.Popen[bytes], str] | None:
    executable = shutil.which("redis-server")
    if executable is None:
        return None
    directory = tempfile.mkdtemp(prefix="mcpb-bench-")
    sock = f"{directory}/redis.sock"
    process = subprocess.Popen(
        [executable, "--port", "0", "--unixsocket", sock, "--save", "", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        if os.path.exists(sock):
            return process, f"unix://{sock}"
        time.sleep(0.01)
    process.kill()
    return None


async def main(args: argparse.Namespace) -> None:
    known = await known_sessions(args.requests, args.rounds)
    print(f"known session, CPU per request (best of {args.rounds} rounds of {args.requests}, in turn):")
    for mode, seconds in known.items():
        print(f"  {mode:7} {seconds * 1e6:7.2f} µs")
    print(f"  sealed - plain: {(known['sealed'] - known['plain']) * 1e6:+.2f} µs (goal: <= +1 µs)")
    fresh = await new_sessions(args.sessions)
    print("new session, CPU per initialize and its answer (best of 5 rounds):")
    for mode, seconds in fresh.items():
        print(f"  {mode:7} {seconds * 1e6:7.2f} µs")
    print(f"  sealed - plain: {(fresh['sealed'] - fresh['plain']) * 1e6:+.2f} µs")
    redis = None if args.no_redis else start_redis()
    if redis is None:
        print("first request on another proxy: skipped (no redis-server, or --no-redis)")
        return
    process, url = redis
    try:
        latencies = await first_requests(200, url)
    finally:
        process.kill()
        process.wait()
    print("first request of a session on the proxy that did not see its initialize (200 sessions):")
    for case, values in latencies.items():
        values.sort()
        median, p90 = statistics.median(values), values[int(len(values) * 0.9)]
        print(f"  {case:22} median {median * 1e3:6.3f} ms   p90 {p90 * 1e3:6.3f} ms")


if __name__ == "__main__":
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--requests", type=int, default=5_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each, taken in turn")
    parser.add_argument("--sessions", type=int, default=2_000, help="new sessions per round")
    parser.add_argument("--no-redis", action="store_true", help="skip the measurement with Redis")
    uvloop.run(main(parser.parse_args()))
