"""Replay failover (issue 3, item 8): `failover: replay` keeps a client's session when its owner dies.

Real FastMCP backends (killed with SIGKILL), the real mcp legacy client, and raw aiohttp where
concurrency or headers must be controlled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import mcp_types
import pytest
import redis.asyncio
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcpbalancer.app import Proxy
from mcpbalancer.dataplane.framing import request_head
from mcpbalancer.dataplane.head import RequestHead
from mcpbalancer.filters.failover import ReplayAlias
from mcpbalancer.routing.binding import decode_owner
from mcpbalancer.routing.router import classify
from mcpbalancer.store import UNKNOWN
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import (
    DEADLINE,
    call_tool,
    from_backend,
    mcp_url,
    open_session,
    recorded_client,
    redis_keys,
    text_of,
    wait_until,
)


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def pair(backends: list[BackendProcess], name: str) -> tuple[BackendProcess, BackendProcess]:
    """(the backend called `name`, the other one)."""
    [doomed] = [b for b in backends if b.name == name]
    [other] = [b for b in backends if b.name != name]
    return doomed, other


async def test_replay_keeps_the_mcp_client_session_when_its_owner_is_killed(
    backend_factory: BackendFactory, make_proxy: ProxyFactory, store: str
) -> None:
    started = await asyncio.to_thread(backend_factory, ["r1", "r2"])
    proxy = await make_proxy(started, failover="replay", store=store)
    failover = proxy.router.failover
    assert failover is not None
    async with recorded_client(mcp_url(proxy)) as (client, wire):
        first = text_of(await client.call_tool("whoami"))
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "2"]
        doomed, other = pair(started, first)

        await doomed.akill()

        # The same client object goes on: the proxy re-ran its initialize on the other backend.
        assert text_of(await client.call_tool("count")) == "1"  # the old process's state is lost
        assert text_of(await client.call_tool("whoami")) == other.name
        assert text_of(await client.call_tool("count")) == "2"
        assert failover.replays == 1
        assert (
            proxy.metrics.registry.get_sample_value(
                "mcpbalancer_session_failovers_total", {"result": "moved"}
            )
            == 1
        )
        # The client initialized once, and only ever saw its own session id.
        assert sum("mcp-session-id" not in h for h in wire.requests) == 1
        ids = {h["mcp-session-id"] for status, h in wire.responses if "mcp-session-id" in h}
        assert ids == {wire.session_id}
        assert {h["mcp-session-id"] for h in wire.requests if "mcp-session-id" in h} == {wire.session_id}
        sid = wire.session_id
        binding = decode_owner(str(proxy.store.peek(sid)))
        assert binding.owner == other.name
        assert binding.alias not in (None, sid.encode())  # the new backend's own id
        if store != "memory":  # the shared store names the new owner too, and keeps the record
            # (The proxy's own liveness marker, mcpb:m:<random>, appears a second after start; mcpb:g
            # holds when r1 or r2 was seen to go away.)
            keys = [key for key in await redis_keys(store, "*") if not key.startswith(("mcpb:m:", "mcpb:g"))]
            assert sorted(keys) == [f"mcpb:s:{sid}", "{mcpb:s:" + sid + "}:i"]
            client = redis.asyncio.Redis.from_url(store, decode_responses=True)
            try:
                assert decode_owner(await client.get(f"mcpb:s:{sid}")) == binding
            finally:
                await client.aclose()
    # Its DELETE reached the new owner under the new id (2xx), which ended the mapping.
    await wait_until(lambda: _forgotten(proxy, sid), "the moved session's DELETE to end it")
    assert not failover.can_replay(sid) or store != "memory"
    if store != "memory":  # the shared record went with it
        await wait_until(lambda: _no_keys(store), "the moved session's keys to go")


async def _no_keys(url: str) -> bool:
    return not [key for key in await redis_keys(url, "*") if not key.startswith(("mcpb:m:", "mcpb:g"))]


async def _forgotten(proxy: Proxy, sid: str) -> bool:
    owner = proxy.store.peek(sid)
    return owner is None or (owner is UNKNOWN and await proxy.store.get(sid) is None)


async def test_without_replay_the_same_scenario_gives_404(
    backend_factory: BackendFactory, make_proxy: ProxyFactory
) -> None:
    started = await asyncio.to_thread(backend_factory, ["n1", "n2"])
    proxy = await make_proxy(started)  # failover: reinitialize, the default
    assert proxy.router.failover is None
    async with recorded_client(mcp_url(proxy)) as (client, _):
        first = text_of(await client.call_tool("whoami"))
        assert text_of(await client.call_tool("count")) == "1"
        doomed, _ = pair(started, first)
        await doomed.akill()
        with pytest.raises(MCPError) as raised:
            await client.call_tool("count")
        assert (raised.value.error.code, raised.value.error.message) == (-32600, "Session not found")


async def test_concurrent_requests_of_a_moved_session_replay_once(
    backend_factory: BackendFactory, make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    started = await asyncio.to_thread(backend_factory, ["c1", "c2"])
    proxy = await make_proxy(started, failover="replay")
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    first = (await call_tool(web, url, sid, "whoami")).text
    doomed, other = pair(started, first)
    await doomed.akill()

    answers = await asyncio.gather(*(call_tool(web, url, sid, "count") for _ in range(4)))
    assert [a.status for a in answers] == [200] * 4
    assert all(from_backend(a.headers) for a in answers)
    assert sorted(a.text for a in answers) == ["1", "2", "3", "4"]  # one new session, shared
    assert proxy.router.failover is not None
    assert proxy.router.failover.replays == 1
    assert (await call_tool(web, url, sid, "whoami")).text == other.name


async def test_replay_with_no_backend_left_is_404(
    backend_factory: BackendFactory, make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    [only] = await asyncio.to_thread(backend_factory, ["solo"])
    proxy = await make_proxy([only], failover="replay")
    url = mcp_url(proxy)
    sid = await open_session(web, url)
    await only.akill()
    answer = await call_tool(web, url, sid, "count")
    assert answer.status == 404
    assert answer.json()["error"]["message"] == "Session not found"
    samples = {
        r: proxy.metrics.registry.get_sample_value("mcpbalancer_session_failovers_total", {"result": r})
        for r in ("moved", "failed")
    }
    assert samples == {"moved": 0, "failed": 1}


async def test_a_moved_session_hears_notifications_on_its_resumed_get_stream(
    backend_factory: BackendFactory, make_proxy: ProxyFactory
) -> None:
    # With an event store every event carries an id, so the client resumes its GET stream with the
    # dead process's Last-Event-ID. The new backend never issued it: this FastMCP's EventStore opens a
    # replay stream for it that never carries anything (other servers answer 400, and the mcp client
    # gives up after two tries). Either way the moved session would not hear from its backend again.
    started = await asyncio.to_thread(
        backend_factory, ["e1", "e2"], extra_args=["--event-store", "--retry-interval", "200"]
    )
    proxy = await make_proxy(started, failover="replay")
    heard: asyncio.Queue[None] = asyncio.Queue()

    async def on_message(message: object) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            heard.put_nowait(None)

    async def hear_one(client: Client) -> None:
        """notify_stream until a notification arrives on the GET stream (the client opens it in the
        background, and a notification sent before it is open is not delivered)."""
        async with asyncio.timeout(DEADLINE):
            while True:
                assert text_of(await client.call_tool("notify_stream")) == "sent"
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(heard.get(), 0.3)

    async def streaming_from(backend: BackendProcess) -> bool:
        labels = {"backend": backend.name}
        return bool(proxy.metrics.registry.get_sample_value("mcpbalancer_sse_streams_active", labels))

    async with recorded_client(mcp_url(proxy), message_handler=on_message) as (client, wire):
        first = text_of(await client.call_tool("whoami"))
        doomed, other = pair(started, first)
        await hear_one(client)  # the stream works, and the client holds an event id of `doomed`

        await doomed.akill()
        assert text_of(await client.call_tool("whoami")) == other.name  # moved

        # The client reconnects its GET stream with the dead process's event id; it must open.
        await wait_until(lambda: streaming_from(other), "the moved session's GET stream")
        while not heard.empty():  # anything `doomed` sent before it died
            heard.get_nowait()
        await hear_one(client)  # a notification the new backend sent after the move
        resumed = [h["last-event-id"] for h in wire.requests if "last-event-id" in h]
        assert resumed, "the client never resumed with a Last-Event-ID: the test proves nothing"
        assert decode_owner(str(proxy.store.peek(wire.session_id))).alias is not None  # moved


def test_the_head_sent_for_a_moved_session_has_its_backend_id_and_no_last_event_id() -> None:
    head = RequestHead()
    head.method, head.target, head.session_id = b"GET", b"/mcp", b"client-id"
    head.headers = [
        (b"mcp-session-id", b"Mcp-Session-Id", b"client-id"),
        (b"last-event-id", b"Last-Event-ID", b"issued-by-the-dead-one"),
        (b"accept", b"Accept", b"text/event-stream"),
    ]
    facts = classify(b"GET", b"client-id", None)
    facts.upstream_sid, facts.moved = b"backend-id", True  # what routing sets for a moved session
    alias = ReplayAlias()
    edits = alias.upstream_edits(facts)
    assert edits is alias.upstream_edits(facts)  # one object per session, not one per request
    moved = request_head(head, b"", b"127.0.0.1:9", b"10.0.0.1", edits)
    assert b"Mcp-Session-Id: backend-id\r\n" in moved
    assert b"last-event-id" not in moved.lower()
    assert b"Accept: text/event-stream\r\n" in moved
    # A session that was not moved resumes as the client asks.
    kept = request_head(head, b"", b"127.0.0.1:9", b"10.0.0.1", None)
    assert b"Last-Event-ID: issued-by-the-dead-one\r\n" in kept
