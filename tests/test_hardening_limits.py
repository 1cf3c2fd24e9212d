"""Connection limits and timeouts on the client side (issue 7, item 2): `limits.connections`,
`limits.head_timeout` (slowloris), `limits.keepalive_timeout`."""

from __future__ import annotations

import asyncio
import contextlib
import time

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, RawClient, request, rpc_error
from tests.fixtures.stub import StubFactory, StubRequest, response
from tests.mcp_helpers import mcp_url, recorded_client, text_of, wait_until


def rejected(proxy: Proxy, reason: str) -> float:
    value = proxy.metrics.registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": reason})
    return value or 0.0


def open_connections(proxy: Proxy) -> int:
    assert proxy._plane is not None
    return len(proxy._plane.connections)


async def served(client: RawClient, target: str = "/mcp") -> None:
    client.send(request("GET", target))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, target.encode())


async def test_connections_over_the_limit_get_503_and_are_closed_not_queued(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"connections": 5, "head_timeout": 60, "keepalive_timeout": 60})
    held = [await open_client(proxy) for _ in range(5)]
    for client in held:
        await served(client)
    for _ in range(3):
        extra = await open_client(proxy)
        refused = await extra.response()
        assert refused.status == 503
        assert refused.header("retry-after") == b"1"
        assert refused.header("connection") == b"close"
        assert rpc_error(refused)["message"] == "Too many connections"
        assert await extra.read_to_eof() == b""
    assert rejected(proxy, "connections") == 3
    assert open_connections(proxy) == 5
    await served(held[0], "/still-served")  # the connections within the limit are untouched
    held[1].reset()

    async def freed() -> bool:
        return open_connections(proxy) == 4

    await wait_until(freed, "a connection slot to free up")
    await served(await open_client(proxy), "/after")


async def test_partial_head_gets_408_and_a_close_after_head_timeout(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"head_timeout": 0.5})
    client = await open_client(proxy)
    started = time.monotonic()
    client.send(b"GET /mcp HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    resp = await client.response()
    assert resp.status == 408
    assert rpc_error(resp)["message"] == "Request head timeout"
    assert await client.read_to_eof() == b""
    assert 0.4 <= time.monotonic() - started < 3
    assert rejected(proxy, "head_timeout") == 1
    assert stub.requests == []


async def test_silent_connection_is_closed_after_head_timeout(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"head_timeout": 0.5})
    client = await open_client(proxy)
    started = time.monotonic()
    assert await client.read_to_eof() == b""  # nothing was asked, so nothing is answered
    assert time.monotonic() - started < 3
    assert rejected(proxy, "head_timeout") == 1


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"keepalive_timeout": 0.5, "head_timeout": 30})
    client = await open_client(proxy)
    await served(client)
    started = time.monotonic()
    assert await client.read_to_eof() == b""
    assert 0.4 <= time.monotonic() - started < 3
    assert rejected(proxy, "head_timeout") == 0  # an idle close is not a refusal


async def test_partial_head_after_keepalive_rest_is_timed_by_head_timeout_not_keepalive(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    # The connection's timer is kept from request to request; a head timeout shorter than the
    # keep-alive one must still cut a head that starts on a rested connection.
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"keepalive_timeout": 30, "head_timeout": 0.5})
    client = await open_client(proxy)
    for _ in range(3):
        await served(client)
    started = time.monotonic()
    client.send(b"GET /mcp HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    resp = await client.response()
    assert resp.status == 408
    assert 0.4 <= time.monotonic() - started < 3
    assert rejected(proxy, "head_timeout") == 1


async def test_many_quick_requests_outlive_the_head_timeout_armed_at_connect(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], limits={"keepalive_timeout": 30, "head_timeout": 0.3})
    client = await open_client(proxy)
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # several head timeouts' worth of back-to-back requests
        await served(client)
    assert rejected(proxy, "head_timeout") == 0
    await served(client, "/still-open")


async def test_slow_responses_and_busy_connections_are_not_cut_by_the_client_timers(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    async def slow(req: StubRequest) -> None:
        await req.complete.wait()
        await asyncio.sleep(1.2)  # the backend's pace, not synchronisation
        req.conn.write(response(200, [], req.target))

    stub = await make_stub(slow)
    proxy = await make_proxy([stub], limits={"keepalive_timeout": 0.4, "head_timeout": 0.4})
    client = await open_client(proxy)
    for target in ("/one", "/two"):  # each answer takes three times either timeout
        client.send(request("GET", target))
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, target.encode())
    # A request pipelined behind a slow one has its head timed only once its turn comes.
    client.send(request("GET", "/three") + b"GET /four HTTP/1.1\r\nHost: localhost\r\n\r\n")
    for target in ("/three", "/four"):
        resp = await client.response()
        assert (resp.status, bytes(resp.body)) == (200, target.encode())
    assert rejected(proxy, "head_timeout") == 0


async def trickle(proxy: Proxy, results: list[str]) -> None:
    """A slowloris client: a plausible request head, one byte per second, never finished."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    head = b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 200
    try:
        for byte in head:
            writer.write(bytes([byte]))
            try:
                async with asyncio.timeout(1.0):
                    data = await reader.read(65536)
            except TimeoutError:
                continue
            # The proxy answered (408) or closed: read to the end.
            while more := await reader.read(65536):
                data += more
            results.append("408" if data.startswith(b"HTTP/1.1 408") else "closed")
            return
        results.append("never closed")
    except ConnectionError:
        results.append("closed")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slowloris_connections_do_not_slow_real_sessions_and_are_closed_within_head_timeout(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    head_timeout = 3.0
    proxy = await make_proxy(backends[:1], limits={"head_timeout": head_timeout})
    results: list[str] = []
    async with recorded_client(mcp_url(proxy)) as (client, _):
        assert text_of(await client.call_tool("count")) == "1"
        started = time.monotonic()
        trickles = [asyncio.create_task(trickle(proxy, results)) for _ in range(300)]
        latencies = []
        expected = 2
        while time.monotonic() - started < head_timeout + 1.5:
            t0 = time.monotonic()
            assert text_of(await client.call_tool("count")) == str(expected)
            latencies.append(time.monotonic() - t0)
            expected += 1
            await asyncio.sleep(0.05)  # a steady stream of calls, not a benchmark
        async with asyncio.timeout(10):
            await asyncio.gather(*trickles)
        closed_after = time.monotonic() - started
    # Every one was closed by the proxy. Most read the 408 first; a client whose next byte crossed
    # the close gets a reset instead, which may drop the 408 from its receive buffer (TCP).
    assert len(results) == 300
    assert set(results) <= {"408", "closed"}, results
    assert results.count("408") > 0
    assert closed_after < head_timeout + 5
    assert rejected(proxy, "head_timeout") == 300
    assert len(latencies) >= 10
    assert max(latencies) < 2.5, latencies
