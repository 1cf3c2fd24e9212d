"""End to end: real mcp clients -> mcpbalancer -> real FastMCP backends (issue 2, behaviours 1-5, 8-10).

Each test runs on both stores (the embedded memory store and Redis) where the behaviour does not
depend on the store. "Reached no backend" is read off the answer's headers: uvicorn stamps
`Server`/`Date` on everything it sends, the proxy's own error answers carry neither.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import uuid

import aiohttp
import mcp_types
import pytest
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError

from mcpbalancer.app import Proxy
from mcpbalancer.routing.binding import backend_of
from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    LEGACY_VERSION,
    MODERN_META,
    MODERN_VERSION,
    SESSION_NOT_FOUND,
    call_body,
    call_tool,
    from_backend,
    from_proxy,
    mcp_url,
    open_session,
    read_sse_event,
    recorded_client,
    redis_keys,
    session_headers,
    sse_messages,
    text_of,
    wait_until,
)


async def owner_of(proxy: Proxy, session_id: str) -> str | None:
    """The backend the store names for `session_id` (its value also holds the bind time)."""
    value = await proxy.store.get(session_id)
    return None if value is None else backend_of(value)


def session_counts(proxy: Proxy) -> dict[str, int]:
    return {b.name: b.sessions for b in proxy.backends}


# --- 1. many sessions ----------------------------------------------------------------------------


async def test_thirty_concurrent_sessions_are_never_misrouted(
    backends: list[BackendProcess], make_proxy: ProxyFactory, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    session_ids: list[str] = []

    async def one_session() -> str:
        async with recorded_client(mcp_url(proxy)) as (client, wire):
            name = text_of(await client.call_tool("whoami"))
            session_ids.append(wire.session_id)
            assert await owner_of(proxy, wire.session_id) == name
            # A request routed to another instance would get 404; one routed to the wrong session
            # on the right instance would count from elsewhere.
            assert [text_of(await client.call_tool("count")) for _ in range(3)] == ["1", "2", "3"]
            assert text_of(await client.call_tool("whoami")) == name
            return name

    names = await asyncio.gather(*(one_session() for _ in range(30)))

    spread = collections.Counter(names)
    assert set(spread) == {"a", "b", "c"}, spread
    assert min(spread.values()) >= 5, f"least_sessions should spread 30 sessions evenly: {spread}"
    assert len(set(session_ids)) == 30

    # Every client ended with DELETE: every mapping is gone and the counts are back to zero.
    async def all_gone() -> bool:
        return all([await _gone(proxy, sid) for sid in session_ids])

    await wait_until(all_gone, "every session to be forgotten")
    assert session_counts(proxy) == {"a": 0, "b": 0, "c": 0}


async def _gone(proxy: Proxy, session_id: str) -> bool:
    return await owner_of(proxy, session_id) is None


# --- 2. server-to-client requests ------------------------------------------------------------------


async def test_sampling_and_elicitation_round_trips(
    backends: list[BackendProcess], make_proxy: ProxyFactory, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    asked: list[str] = []

    async def answer(
        context: ClientRequestContext, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult:
        asked.append(params.message)
        return mcp_types.ElicitResult(action="accept", content={"value": "forty-two"})

    async def sample(
        context: ClientRequestContext, params: mcp_types.CreateMessageRequestParams
    ) -> mcp_types.CreateMessageResult:
        [message] = params.messages
        assert isinstance(message.content, mcp_types.TextContent)
        return mcp_types.CreateMessageResult(
            role="assistant",
            content=mcp_types.TextContent(type="text", text=f"echo: {message.content.text}"),
            model="test-model",
        )

    async with recorded_client(mcp_url(proxy), elicitation_callback=answer, sampling_callback=sample) as (
        client,
        wire,
    ):
        assert text_of(await client.call_tool("ask_user")) == "accepted:forty-two"
        assert text_of(await client.call_tool("ask_llm", {"prompt": "hi"})) == "echo: hi"
        assert text_of(await client.call_tool("count")) == "1"
    assert asked == ["What is your answer?"]
    # The client's answers went back as POSTs carrying the session id, and the proxy accepted them.
    answered = [s for s, h in wire.responses if s == 202]
    assert len(answered) >= 3  # notifications/initialized + the elicitation and sampling results


# --- 3. streaming ----------------------------------------------------------------------------------


async def test_progress_arrives_before_the_tool_finishes(
    backends: list[BackendProcess], make_proxy: ProxyFactory, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    key = uuid.uuid4().hex
    progressed = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert (progress, total, message) == (0.5, 1.0, f"waiting for {key}")
        progressed.set()

    async with recorded_client(mcp_url(proxy)) as (waiter, _):
        owner = text_of(await waiter.call_tool("whoami"))
        [backend] = [b for b in backends if b.name == owner]
        call = asyncio.create_task(
            waiter.call_tool("progress_and_wait", {"key": key}, progress_callback=on_progress)
        )
        try:
            await asyncio.wait_for(progressed.wait(), DEADLINE)
            assert not call.done()
            # The waiting tool lives in the owner's process: release it there, from a second client.
            async with recorded_client(backend.mcp_url) as (other, _):
                assert text_of(await other.call_tool("release", {"key": key})) == f"released {key}"
            assert text_of(await asyncio.wait_for(call, DEADLINE)) == "released"
        finally:
            call.cancel()


# --- 4. the owner goes away --------------------------------------------------------------------


async def test_owner_killed_gives_404_then_new_sessions_land_on_live_backends(
    backends: list[BackendProcess],
    backend_factory: BackendFactory,
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    store: str,
) -> None:
    [doomed] = await asyncio.to_thread(backend_factory, ["k"])
    live = {"a", "b"}
    proxy = await make_proxy(
        [doomed, backends[0], backends[1]], store=store, timeouts={"response_headers": 0.5}
    )
    url = mcp_url(proxy)

    # A raw session and an mcp client session, both owned by the backend about to die.
    session_id = await _session_on(proxy, web, "k")
    async with contextlib.AsyncExitStack() as stack:
        while True:
            client, wire = await stack.enter_async_context(recorded_client(url))
            if text_of(await client.call_tool("whoami")) == "k":
                break
        assert (await call_tool(web, url, session_id, "count")).text == "1"

        # Slow is not gone: a stopped owner times out (504) and keeps its sessions.
        doomed.pause()
        try:
            slow = await call_tool(web, url, session_id, "whoami")
        finally:
            doomed.resume()
        assert slow.status == 504
        assert from_proxy(slow.headers)
        assert await owner_of(proxy, session_id) == "k"
        assert (await call_tool(web, url, session_id, "count")).text == "2"

        await doomed.akill()

        # The very next request of the session: the proxy's 404, and the mapping is gone.
        gone = await call_tool(web, url, session_id, "count")
        assert gone.status == 404
        assert from_proxy(gone.headers)
        assert gone.headers["Content-Type"] == "application/json"
        assert gone.json() == SESSION_NOT_FOUND
        # The store delete runs in the background: on a loaded machine it has been seen to take
        # longer than the default deadline.
        await wait_until(lambda: _gone(proxy, session_id), "the dead owner's session to be forgotten", 30.0)
        again = await call_tool(web, url, session_id, "count")
        assert (again.status, again.json()) == (404, SESSION_NOT_FOUND)

        # mcp 2.3.0 surfaces the 404 as an MCPError carrying the body's JSON-RPC error, and does
        # not re-initialize by itself: the session stays dead until the application reconnects.
        for _ in range(2):
            with pytest.raises(MCPError) as raised:
                await client.call_tool("count")
            assert (raised.value.error.code, raised.value.error.message) == (-32600, "Session not found")
        assert sum("mcp-session-id" not in h for h in wire.requests) == 1  # its one initialize

    # New sessions work and land on live backends, even though the dead one is still configured
    # (a connect refused on initialize moves the new session to another backend).
    for _ in range(4):
        async with recorded_client(url) as (fresh, wire):
            name = text_of(await fresh.call_tool("whoami"))
            assert name in live
            assert await owner_of(proxy, wire.session_id) == name
            assert [text_of(await fresh.call_tool("count")) for _ in range(2)] == ["1", "2"]
    assert session_counts(proxy)["k"] == 0


async def _session_on(proxy: Proxy, web: aiohttp.ClientSession, name: str) -> str:
    """Open raw sessions through the proxy until one is owned by `name` (others are left open)."""
    for _ in range(3 * len(proxy.backends)):
        session_id = await open_session(web, mcp_url(proxy))
        if await owner_of(proxy, session_id) == name:
            return session_id
    pytest.fail(f"no session landed on {name}: {session_counts(proxy)}")


# --- 5. unknown and malformed ids --------------------------------------------------------------


async def test_unknown_session_is_404_and_reaches_no_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    url = mcp_url(proxy)
    unknown = uuid.uuid4().hex
    exactly_256 = "!" + "x" * 254 + "~"  # the whole visible range's ends, 256 bytes
    for session_id in (unknown, exactly_256):
        answer = await call_tool(web, url, session_id, "whoami")
        assert answer.status == 404, session_id
        assert from_proxy(answer.headers)
        assert answer.json() == SESSION_NOT_FOUND
        for method in ("GET", "DELETE"):
            headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
            async with web.request(method, url, headers=headers) as resp:
                assert resp.status == 404, method
                assert from_proxy(resp.headers)
                assert await resp.json() == SESSION_NOT_FOUND
    # Control: a known session does reach a backend, and the header name is case-insensitive.
    session_id = await open_session(web, url)
    body = call_body("whoami")
    headers = {**INIT_HEADERS, "mcp-session-ID": session_id, "MCP-Protocol-Version": LEGACY_VERSION}
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert from_backend(resp.headers)


@pytest.mark.parametrize(
    "raw_id",
    [
        pytest.param(b"has space", id="space"),
        pytest.param(b"ctl\x01byte", id="control-byte"),
        pytest.param(b"del\x7f", id="del"),
        pytest.param("caf\u00e9".encode(), id="non-ascii"),
        pytest.param(b"x" * 257, id="257-bytes"),
    ],
)
async def test_malformed_session_id_is_400(
    backends: list[BackendProcess], make_proxy: ProxyFactory, raw_id: bytes
) -> None:
    proxy = await make_proxy(backends)
    body = b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}'
    request = (
        b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
        b"Mcp-Session-Id: " + raw_id + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, headers, answer = await _raw_exchange(proxy, request)
    assert status == 400
    assert "server" not in headers
    assert headers["content-type"] == "application/json"
    error = json.loads(answer)["error"]
    assert error["code"] == -32600
    assert error["message"].lower().startswith("bad request")


async def _raw_exchange(proxy: Proxy, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` byte for byte on a new connection; the answer's status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(request)
        async with asyncio.timeout(DEADLINE):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
        return status, headers, body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# --- 6. the end of a session -----------------------------------------------------------------------


async def test_delete_and_backend_404_remove_the_mapping(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    url = mcp_url(proxy)

    # DELETE answered 2xx by the owner.
    session_id = await open_session(web, url)
    owner = await owner_of(proxy, session_id)
    assert owner is not None
    assert session_counts(proxy)[owner] == 1
    async with web.delete(url, headers=session_headers(session_id)) as resp:
        assert resp.status == 200
        assert from_backend(resp.headers)
    assert await owner_of(proxy, session_id) is None
    answer = await call_tool(web, url, session_id, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    assert from_proxy(answer.headers)
    assert session_counts(proxy)[owner] == 0

    # The owner forgets the session behind the proxy's back: its 404 is relayed, and ends the mapping.
    session_id = await open_session(web, url)
    owner = await owner_of(proxy, session_id)
    [backend] = [b for b in backends if b.name == owner]
    async with web.delete(backend.mcp_url, headers=session_headers(session_id)) as resp:
        assert resp.status == 200
    answer = await call_tool(web, url, session_id, "whoami")
    assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
    assert from_backend(answer.headers)
    await wait_until(lambda: _gone(proxy, session_id), "the backend's 404 to end the mapping")
    answer = await call_tool(web, url, session_id, "whoami")
    assert answer.status == 404
    assert from_proxy(answer.headers)
    assert session_counts(proxy) == {"a": 0, "b": 0, "c": 0}


# --- 7. never bind from a non-2xx ------------------------------------------------------------------


async def test_ids_on_error_answers_are_never_bound(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    url = mcp_url(proxy)
    refusals = [
        # A POST that is not initialize, without a session id: 400 "Missing session ID".
        web.post(url, json=call_body("whoami"), headers=INIT_HEADERS),
        # A GET without a session id: the same 400.
        web.get(url, headers={"Accept": "text/event-stream"}),
        # An initialize with a bad Accept: 406.
        web.post(url, json=INIT_BODY, headers={**INIT_HEADERS, "Accept": "application/json"}),
    ]
    for request, status in zip(refusals, (400, 400, 406), strict=True):
        async with request as resp:
            assert resp.status == status
            assert from_backend(resp.headers)
            poisoned = resp.headers["Mcp-Session-Id"]  # the backend's fresh, already discarded id
        assert await owner_of(proxy, poisoned) is None
        answer = await call_tool(web, url, poisoned, "whoami")
        assert (answer.status, answer.json()) == (404, SESSION_NOT_FOUND)
        assert from_proxy(answer.headers)
    assert session_counts(proxy) == {"a": 0, "b": 0, "c": 0}


# --- 8. the GET stream -----------------------------------------------------------------------------


async def test_get_stream_follows_the_session(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    url = mcp_url(proxy)
    session_id = await open_session(web, url)
    get_headers = {
        "Accept": "text/event-stream",
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": LEGACY_VERSION,
    }
    async with web.get(url, headers=get_headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Mcp-Session-Id"] == session_id
        assert from_backend(stream.headers)
        # Only the instance holding this session's stream answers 409; any other would say 404.
        async with web.get(url, headers=get_headers) as second:
            assert second.status == 409
            assert from_backend(second.headers)
        event = await _notify_until_event(web, url, session_id, stream)
    assert sse_messages(f"data: {event['data']}\n\n")[0]["method"] == "notifications/tools/list_changed"


async def test_a_dropped_get_stream_is_ended_at_the_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    """A client that drops its GET stream can open a new one: a backend holds one stream per session
    (409 for another), so the proxy must end the old one upstream as soon as the client closes."""
    proxy = await make_proxy(backends, heartbeat=0)  # no heartbeat write to discover the close
    url = mcp_url(proxy)
    session_id = await open_session(web, url)
    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    async with aiohttp.ClientSession() as dropping, dropping.get(url, headers=get_headers) as stream:
        assert stream.status == 200
    # The connection is closed now (FIN, as mcp clients and browsers close an event source).

    async def reopened() -> bool:
        async with web.get(url, headers=get_headers) as again:
            if again.status == 409:
                return False
            assert again.status == 200
            assert from_backend(again.headers)
            return True

    await wait_until(reopened, "the backend to release the dropped stream")


async def _notify_until_event(
    web: aiohttp.ClientSession, url: str, session_id: str, stream: aiohttp.ClientResponse
) -> dict[str, str]:
    """Call notify_stream until its notification shows up on `stream` (registration races the 200)."""
    pending = asyncio.ensure_future(read_sse_event(stream))
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                answer = await call_tool(web, url, session_id, "notify_stream")
                assert answer.text == "sent"
                done, _ = await asyncio.wait({pending}, timeout=0.2)
                if done:
                    return pending.result()
    finally:
        pending.cancel()


async def test_last_event_id_resumption_reaches_the_owner(
    backends: list[BackendProcess],
    backend_factory: BackendFactory,
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
) -> None:
    [resumable] = await asyncio.to_thread(backend_factory, ["e"], extra_args=["--event-store"])
    proxy = await make_proxy([resumable, backends[0], backends[1]])
    url = mcp_url(proxy)
    session_id = await _session_on(proxy, web, "e")
    get_headers = {
        "Accept": "text/event-stream",
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": LEGACY_VERSION,
    }
    async with web.get(url, headers=get_headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        first = await _notify_until_event(web, url, session_id, stream)
        assert (await call_tool(web, url, session_id, "notify_stream")).text == "sent"
        second = await read_sse_event(stream)
    assert first["id"]
    assert second["id"]
    assert first["id"] != second["id"]

    # Only the owner's event store knows these ids: it replays what followed the first one.
    async with web.get(url, headers={**get_headers, "Last-Event-ID": first["id"]}) as resumed:
        assert resumed.status == 200
        assert from_backend(resumed.headers)
        replayed = await read_sse_event(resumed)
    assert replayed["id"] == second["id"]
    assert sse_messages(f"data: {replayed['data']}\n\n")[0]["method"] == "notifications/tools/list_changed"


async def test_silent_stream_gets_heartbeats(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    heartbeat = 0.3
    proxy = await make_proxy(backends, heartbeat=heartbeat)
    url = mcp_url(proxy)
    session_id = await open_session(web, url)
    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    loop = asyncio.get_running_loop()
    async with web.get(url, headers=get_headers, timeout=aiohttp.ClientTimeout()) as stream:
        assert stream.status == 200
        opened = loop.time()
        pings: list[float] = []
        async with asyncio.timeout(DEADLINE):
            while len(pings) < 2:
                line = await stream.content.readline()
                assert line, "the stream ended"
                if line == b": ping\n":
                    pings.append(loop.time())
                    assert await stream.content.readline() == b"\n"  # a whole comment event
    # Nothing else is said on this stream, so each ping comes after a heartbeat of silence.
    assert pings[0] - opened >= heartbeat * 0.9
    assert pings[1] - pings[0] >= heartbeat * 0.9
    # The stream is still the session's: the proxy did not break it by writing.
    answer = await call_tool(web, url, session_id, "whoami")
    assert answer.status == 200


# --- 9. the modern era -----------------------------------------------------------------------------


async def test_modern_requests_are_balanced_and_never_bound(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, store: str
) -> None:
    proxy = await make_proxy(backends, store=store)
    url = mcp_url(proxy)
    async with recorded_client(url, mode=MODERN_VERSION) as (client, wire):
        assert client.protocol_version == MODERN_VERSION
        names = [text_of(await client.call_tool("whoami")) for _ in range(12)]
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "1"]
    assert len(set(names)) >= 2, names
    # What the client sent carries the routing headers; the backend checks them against the body,
    # so every call that worked proves they were forwarded.
    calls = [h for h in wire.requests if h.get("mcp-method") == "tools/call"]
    assert len(calls) == 14
    assert all(h["mcp-protocol-version"] == MODERN_VERSION for h in wire.requests)
    assert {h["mcp-name"] for h in calls} == {"whoami", "count"}
    assert all(status == 200 and "mcp-session-id" not in h for status, h in wire.responses)
    assert session_counts(proxy) == {"a": 0, "b": 0, "c": 0}
    if store == "memory":
        assert len(proxy.store) == 0  # type: ignore[arg-type]
    else:
        assert await redis_keys(store) == []

    # A header that disagrees with the body: the backend's 400 (-32020) is relayed untouched.
    body = call_body("whoami")
    body["params"]["_meta"] = MODERN_META
    headers = {
        **INIT_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "whoami",
    }
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert from_backend(resp.headers)
        assert (await resp.json())["result"]["content"][0]["text"] in {"a", "b", "c"}
    for mismatch in ({"Mcp-Name": "count"}, {"Mcp-Method": "tools/list"}):
        async with web.post(url, json=body, headers={**headers, **mismatch}) as resp:
            assert resp.status == 400, mismatch
            assert from_backend(resp.headers)
            assert (await resp.json())["error"]["code"] == -32020


async def test_modern_progress_streams_through(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy(backends)
    key = uuid.uuid4().hex
    progressed = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async with recorded_client(mcp_url(proxy), mode=MODERN_VERSION) as (client, _):
        call = asyncio.create_task(
            client.call_tool("progress_and_wait", {"key": key}, progress_callback=on_progress)
        )
        try:
            await asyncio.wait_for(progressed.wait(), DEADLINE)
            assert not call.done()
            # Stateless requests may land anywhere: release on every instance.
            for backend in backends:
                async with recorded_client(backend.mcp_url, mode=MODERN_VERSION) as (other, _):
                    await other.call_tool("release", {"key": key})
            assert text_of(await asyncio.wait_for(call, DEADLINE)) == "released"
        finally:
            call.cancel()
