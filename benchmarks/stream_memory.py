"""Memory per idle SSE stream, without sockets: what the proxy's Python keeps for each one.

    python benchmarks/stream_memory.py [--streams N] [--top K]

N client connections (in-memory transports, as in micro.py) each open a GET stream of a known
session; each has its own pooled backend connection, which answers with an event-stream head and
one event, then nothing: the stream is idle, its heartbeat timer armed. What is measured is the
memory Python allocated for them (tracemalloc, after a collection), divided by N: the proxy's
objects (connections, parsers, exchange, stream relay, timers), not the kernel's socket buffers
nor uvloop's transports, which run.py's RSS figure adds. `--top` lists the allocation sites that
hold the most, to see what to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tracemalloc
from typing import Any

import uvloop

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.dataplane.plane import DataPlane
from mcpbalancer.dataplane.upstream import UpstreamConnection

SID = b"sess-1"
INIT = b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}'
EVENT = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n'


class MemoryTransport:
    """Just enough of an asyncio transport; writes are dropped (what is kept is the proxy's)."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, data: list[bytes]) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise RuntimeError("the proxy closed a connection: the streams are not idle")

    abort = close


def stream_request() -> bytes:
    return (
        b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: text/event-stream\r\n"
        b"MCP-Protocol-Version: 2025-06-18\r\nMcp-Session-Id: " + SID + b"\r\n\r\n"
    )


def stream_response() -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    return head + b"%x\r\n%b\r\n" % (len(EVENT), EVENT)


def initialize() -> tuple[bytes, bytes]:
    ask = (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%b" % (len(INIT), INIT)
    )
    body = b'{"jsonrpc":"2.0","id":0,"result":{}}'
    answer = b"HTTP/1.1 200 OK\r\nMcp-Session-Id: %b\r\nContent-Type: application/json\r\n" % SID
    return ask, answer + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


async def measure(streams: int, top: int) -> None:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "backends": [{"name": "s1", "url": "http://127.0.0.1:9"}],
            "health": {"interval": 0},
            "log": {"level": "warning", "access": False},
        },
        source="<stream_memory>",
    )
    proxy = Proxy(config)
    plane = DataPlane(
        proxy.router,
        proxy.fleet.pools,
        heartbeat=config.heartbeat,
        timeouts=config.timeouts,
        limits=config.limits,
        loop=asyncio.get_running_loop(),
        metrics=proxy.metrics,
        phases=proxy.compose_phases(config),
    )
    pool = proxy.fleet.pools["s1"]
    pool._max_idle = streams + 1  # every stream has its own backend connection, taken from the pool

    def backend() -> UpstreamConnection:
        upstream = UpstreamConnection(pool)
        upstream.connection_made(MemoryTransport())  # type: ignore[arg-type]
        pool.release(upstream)
        return upstream

    def client() -> Any:
        conn = plane.protocol_factory()
        conn.connection_made(MemoryTransport())  # type: ignore[arg-type]
        return conn

    # The session, and one stream opened and closed before measuring: the caches and metric cells
    # every stream shares exist already.
    upstream, ask, answer = backend(), *initialize()
    first = client()
    first.data_received(ask)
    upstream.data_received(answer)
    await asyncio.sleep(0.01)  # the session's binding is stored in a task
    warm = client()
    upstream = backend()
    warm.data_received(stream_request())
    upstream.data_received(stream_response())
    await asyncio.sleep(0)

    gc.collect()
    tracemalloc.start(25 if top else 1)
    before = tracemalloc.take_snapshot() if top else None
    base = tracemalloc.get_traced_memory()[0]
    kept = []
    for _ in range(streams):
        upstream, conn = backend(), client()
        conn.data_received(stream_request())
        upstream.data_received(stream_response())
        kept.append((conn, upstream))
    await asyncio.sleep(0)  # the heartbeat timers are armed after each upstream read
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    active = sum(1 for conn, _ in kept if conn.exchanges and conn.exchanges[0].streaming)
    if active != streams:
        raise RuntimeError(f"{active} of {streams} streams open: the setup is not what it should be")
    print(f"idle SSE streams: {streams}; {used / streams / 1024:.2f} KiB of Python memory per stream")
    if before is not None:
        after = tracemalloc.take_snapshot()
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / streams:8.0f} B  {stat.count_diff / streams:5.1f} blocks  {frame}")
    tracemalloc.stop()


if __name__ == "__main__":
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--top", type=int, default=0, help="list the K allocation sites holding the most")
    args = parser.parse_args()
    uvloop.run(measure(args.streams, args.top))
