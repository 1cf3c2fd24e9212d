"""Bounded resources (issue 7, item 7): after thousands of connections and hundreds of abandoned
event streams, open file descriptors and RSS return to where they were."""

from __future__ import annotations

import asyncio
import gc
import os
import resource

from mcpbalancer.app import Proxy
from mcpbalancer.store.cache import CachedStore
from mcpbalancer.store.memory import MemoryStore
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, request
from tests.fixtures.stub import Stub, StubFactory, StubRequest, chunk
from tests.mcp_helpers import wait_until

CONNECTIONS = 2000
STREAMS = 300
BATCH = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fds(*proxies: Proxy) -> int:
    """Open fds, not counting idle pooled backend connections (both of whose ends are in this
    process, the stub backends running here): the pool keeps up to 64 per backend by design."""
    idle = 0
    for proxy in proxies:
        assert proxy._plane is not None
        idle += sum(len(pool._idle) for pool in proxy._plane.pools.values())
    return open_fds() - 2 * idle


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


async def endless_events(req: StubRequest) -> None:
    """An SSE answer that never ends: an event every 50 ms until the proxy goes away."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    req.conn.write(head)
    while not req.conn.closed.is_set():
        req.conn.write(chunk(b"data: tick\n\n"))
        await asyncio.sleep(0.05)
    req.conn.close()  # the stub's own side: only the proxy's sockets are under test


async def short_exchanges(proxy: Proxy, open_client: ClientFactory, count: int) -> None:
    async def one(i: int) -> None:
        client = await open_client(proxy)
        client.send(request("GET", f"/short/{i}", [("Connection", "close")]))
        resp = await client.response()
        assert resp.status == 200
        assert await client.read_to_eof() == b""
        client.close()

    for start in range(0, count, BATCH):
        await asyncio.gather(*(one(i) for i in range(start, min(start + BATCH, count))))


async def abandoned_streams(proxy: Proxy, open_client: ClientFactory, count: int) -> None:
    async def one() -> None:
        client = await open_client(proxy)
        client.send(request("GET", "/sse", [("Accept", "text/event-stream")]))
        resp = await client.read_head()
        assert resp.status == 200
        assert b"tick" in await client.read_chunk(resp)
        client.reset()  # gone without a word, as a crashed browser tab

    for _ in range(0, count, BATCH):
        await asyncio.gather(*(one() for _ in range(BATCH)))


async def quiesced(proxy: Proxy, sse: Stub) -> None:
    plane = proxy._plane
    assert plane is not None

    async def idle() -> bool:
        streams = [c for c in sse.connections if not c.closed.is_set()]
        return not plane.connections and not streams

    await wait_until(idle, "every client and event-stream connection to close", deadline=30)


async def test_fds_and_rss_return_to_baseline(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    short = await make_stub(name="short")
    sse = await make_stub(endless_events, name="sse")
    proxy = await make_proxy([short])
    # Event streams go to their own backend: a second proxy, so each stream gets a fresh upstream.
    streams = await make_proxy([sse])
    # Warm up: pools, metric children, allocator arenas.
    await short_exchanges(proxy, open_client, 200)
    await abandoned_streams(streams, open_client, BATCH)
    await quiesced(streams, sse)
    gc.collect()
    fds, rss = settled_fds(proxy, streams), rss_bytes()

    await short_exchanges(proxy, open_client, CONNECTIONS)
    await abandoned_streams(streams, open_client, STREAMS)
    await quiesced(streams, sse)
    gc.collect()

    async def back_to_baseline() -> bool:
        return settled_fds(proxy, streams) <= fds + 10

    await wait_until(back_to_baseline, f"open fds back to the baseline of {fds} (+10)")
    assert rss_bytes() <= rss + 32 * 1024 * 1024, (rss, rss_bytes())
    for plane in (proxy._plane, streams._plane):
        assert plane is not None
        assert not plane.connections
    registry = streams.metrics.registry
    assert registry.get_sample_value("mcpbalancer_sse_streams_active", {"backend": "sse"}) == 0


async def test_local_cache_is_bounded() -> None:
    class Shared(MemoryStore):
        async def mark(self, ttl: float) -> bool:
            return False

    cache = CachedStore(Shared(), capacity=100)
    for i in range(1000):
        await cache.bind(f"s{i}", "b", 60)
    assert len(cache) == 100
    assert cache.peek("s999") == "b"
