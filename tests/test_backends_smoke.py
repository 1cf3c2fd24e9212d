"""The real-backend test infrastructure, exercised against backends directly (no proxy).

Also pins down the wire facts the proxy relies on (see the comment block in tests/fixtures/backends.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator

import aiohttp
import mcp_types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext, IncomingMessage

from tests.fixtures.backends import BackendFactory, BackendProcess
from tests.mcp_helpers import (
    DEADLINE,
    INIT_BODY,
    INIT_HEADERS,
    LEGACY_VERSION,
    MODERN_META,
    MODERN_VERSION,
    call_body,
    read_sse_event,
    session_headers,
    sse_messages,
    text_of,
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


@pytest.fixture
def backend(backends: list[BackendProcess]) -> BackendProcess:
    return backends[0]


async def open_session(http: aiohttp.ClientSession, mcp_url: str) -> str:
    """Raw legacy handshake (initialize + notifications/initialized); returns the session id."""
    async with http.post(mcp_url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        session_id = resp.headers["Mcp-Session-Id"]
        [init] = sse_messages(await resp.text())
        assert init["result"]["protocolVersion"] == LEGACY_VERSION
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(mcp_url, json=initialized, headers=session_headers(session_id)) as resp:
        assert resp.status == 202
    return session_id


async def test_backends_fixture_gives_three_named_instances(backends: list[BackendProcess]) -> None:
    assert [b.name for b in backends] == ["a", "b", "c"]
    assert len({b.port for b in backends}) == 3
    for b in backends:
        assert b.mcp_url == f"http://127.0.0.1:{b.port}/mcp"
        assert b.startup_seconds is not None
        assert b.startup_seconds < 30
        async with Client(b.mcp_url, mode="legacy") as client:
            assert text_of(await client.call_tool("whoami")) == b.name


async def test_legacy_count_is_per_session(backend: BackendProcess) -> None:
    async with Client(backend.mcp_url, mode="legacy") as client:
        assert client.protocol_version == LEGACY_VERSION
        assert [text_of(await client.call_tool("count")) for _ in range(3)] == ["1", "2", "3"]
    async with Client(backend.mcp_url, mode="legacy") as client:
        assert text_of(await client.call_tool("count")) == "1"


async def test_progress_is_streamed_before_the_tool_finishes(backend: BackendProcess) -> None:
    key = uuid.uuid4().hex
    progressed = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        assert (progress, total, message) == (0.5, 1.0, f"waiting for {key}")
        progressed.set()

    async with (
        Client(backend.mcp_url, mode="legacy") as waiter,
        Client(backend.mcp_url, mode="legacy") as other,
    ):
        call = asyncio.create_task(
            waiter.call_tool("progress_and_wait", {"key": key}, progress_callback=on_progress)
        )
        await asyncio.wait_for(progressed.wait(), DEADLINE)
        assert not call.done()
        assert text_of(await other.call_tool("release", {"key": key})) == f"released {key}"
        assert text_of(await asyncio.wait_for(call, DEADLINE)) == "released"


async def test_legacy_elicitation_round_trip(backend: BackendProcess) -> None:
    asked: list[str] = []

    async def answer(
        context: ClientRequestContext, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult:
        asked.append(params.message)
        return mcp_types.ElicitResult(action="accept", content={"value": "forty-two"})

    async with Client(backend.mcp_url, mode="legacy", elicitation_callback=answer) as client:
        assert text_of(await client.call_tool("ask_user")) == "accepted:forty-two"
    assert asked == ["What is your answer?"]


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


async def test_legacy_sampling_round_trip(backend: BackendProcess) -> None:
    async with Client(backend.mcp_url, mode="legacy", sampling_callback=sample) as client:
        assert text_of(await client.call_tool("ask_llm", {"prompt": "hi"})) == "echo: hi"


async def test_notify_stream_arrives_on_the_standalone_get_stream(backend: BackendProcess) -> None:
    changed = asyncio.Event()

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            changed.set()

    async with Client(backend.mcp_url, mode="legacy", message_handler=on_message) as client:
        # The client opens its GET stream in the background after initialize; a notification sent
        # before that stream is registered is dropped (no event store), so re-send until one arrives.
        async with asyncio.timeout(DEADLINE):
            while not changed.is_set():
                assert text_of(await client.call_tool("notify_stream")) == "sent"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.2)


# --- real mcp clients, modern era ------------------------------------------------------------------


async def test_modern_client_is_stateless(backend: BackendProcess) -> None:
    async with Client(backend.mcp_url, mode=MODERN_VERSION) as client:
        assert client.protocol_version == MODERN_VERSION
        assert text_of(await client.call_tool("whoami")) == backend.name
        # No session: every request is its own connection, so the counter never passes 1.
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "1"]


async def test_modern_progress_is_streamed(backend: BackendProcess) -> None:
    key = uuid.uuid4().hex
    progressed = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async with Client(backend.mcp_url, mode=MODERN_VERSION) as client:
        call = asyncio.create_task(
            client.call_tool("progress_and_wait", {"key": key}, progress_callback=on_progress)
        )
        await asyncio.wait_for(progressed.wait(), DEADLINE)
        assert not call.done()
        assert text_of(await client.call_tool("release", {"key": key})) == f"released {key}"
        assert text_of(await asyncio.wait_for(call, DEADLINE)) == "released"


async def test_modern_elicitation_and_sampling_via_input_required(backend: BackendProcess) -> None:
    async def answer(
        context: ClientRequestContext, params: mcp_types.ElicitRequestParams
    ) -> mcp_types.ElicitResult:
        return mcp_types.ElicitResult(action="accept", content={"value": "modern"})

    async with Client(
        backend.mcp_url, mode=MODERN_VERSION, elicitation_callback=answer, sampling_callback=sample
    ) as client:
        assert text_of(await client.call_tool("ask_user")) == "accepted:modern"
        assert text_of(await client.call_tool("ask_llm", {"prompt": "yo"})) == "echo: yo"


async def test_modern_request_state_is_sealed_per_instance(
    backends: list[BackendProcess], http: aiohttp.ClientSession
) -> None:
    """An MRTR retry that reaches another instance fails: the proxy needs affinity for it."""
    a, b = backends[0], backends[1]
    headers = {
        **INIT_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "ask_user",
    }
    first = call_body("ask_user", request_id=1)
    first["params"]["_meta"] = MODERN_META
    async with http.post(a.mcp_url, json=first, headers=headers) as resp:
        assert resp.status == 200
        result = (await resp.json())["result"]
    assert result["resultType"] == "input_required"
    [key] = result["inputRequests"]
    retry = call_body("ask_user", request_id=2)
    retry["params"].update(
        _meta=MODERN_META,
        requestState=result["requestState"],
        inputResponses={key: {"action": "accept", "content": {"value": "x"}}},
    )
    async with http.post(a.mcp_url, json=retry, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["result"]["content"][0]["text"] == "accepted:x"
    async with http.post(b.mcp_url, json=retry, headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == -32602
    assert error["message"] == "Invalid or expired requestState"


# --- raw HTTP ------------------------------------------------------------------------------------


async def test_raw_legacy_session_lifecycle(backend: BackendProcess, http: aiohttp.ClientSession) -> None:
    session_id = await open_session(http, backend.mcp_url)
    assert len(session_id) == 32
    assert all(c in "0123456789abcdef" for c in session_id)
    headers = session_headers(session_id)

    async with http.post(backend.mcp_url, json=call_body("whoami"), headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Mcp-Session-Id"] == session_id
        [reply] = sse_messages(await resp.text())
        assert reply["result"]["content"][0]["text"] == backend.name

    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    async with http.get(backend.mcp_url, headers=get_headers) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        assert stream.headers["Mcp-Session-Id"] == session_id
        async with http.get(backend.mcp_url, headers=get_headers) as second:
            assert second.status == 409  # one standalone stream per session

    async with http.delete(backend.mcp_url, headers={"Mcp-Session-Id": session_id}) as resp:
        assert resp.status == 200
    async with http.post(backend.mcp_url, json=call_body("whoami"), headers=headers) as resp:
        assert resp.status == 404


async def test_raw_unknown_session_is_404(backend: BackendProcess, http: aiohttp.ClientSession) -> None:
    async with http.post(backend.mcp_url, json=call_body("whoami"), headers=session_headers("nope")) as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/json"
        assert "Mcp-Session-Id" not in resp.headers
        body = await resp.json()
    assert body == {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


async def test_raw_missing_session_is_400_with_an_unusable_fresh_id(
    backend: BackendProcess, http: aiohttp.ClientSession
) -> None:
    async with http.post(backend.mcp_url, json=call_body("whoami"), headers=INIT_HEADERS) as resp:
        assert resp.status == 400
        poisoned = resp.headers["Mcp-Session-Id"]
        body = await resp.json()
    assert body["error"] == {"code": -32600, "message": "Bad Request: Missing session ID"}
    async with http.post(
        backend.mcp_url, json=call_body("whoami"), headers=session_headers(poisoned)
    ) as resp:
        assert resp.status == 404


async def test_raw_get_without_session_is_400(backend: BackendProcess, http: aiohttp.ClientSession) -> None:
    for headers in ({"Accept": "text/event-stream"}, {}):
        async with http.get(backend.mcp_url, headers=headers) as resp:
            assert resp.status == 400
            assert "Mcp-Session-Id" in resp.headers
            assert (await resp.json())["error"]["message"] == "Bad Request: Missing session ID"


async def test_raw_accept_header_is_required(backend: BackendProcess, http: aiohttp.ClientSession) -> None:
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    async with http.post(backend.mcp_url, json=INIT_BODY, headers=headers) as resp:
        assert resp.status == 406
        # Like every refused opening request, it carries a fresh session id that is already discarded.
        refused = resp.headers["Mcp-Session-Id"]
    async with http.post(backend.mcp_url, json=call_body("whoami"), headers=session_headers(refused)) as resp:
        assert resp.status == 404


async def test_raw_foreign_host_is_accepted_by_default(
    backend: BackendProcess, http: aiohttp.ClientSession
) -> None:
    headers = {**INIT_HEADERS, "Host": "example.com"}
    async with http.post(backend.mcp_url, json=INIT_BODY, headers=headers) as resp:
        assert resp.status == 200
        assert "Mcp-Session-Id" in resp.headers


async def test_raw_modern_discover_is_a_stateless_probe(
    backend: BackendProcess, http: aiohttp.ClientSession
) -> None:
    headers = {**INIT_HEADERS, "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "server/discover"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": MODERN_META}}
    async with http.post(backend.mcp_url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert "Mcp-Session-Id" not in resp.headers
        assert MODERN_VERSION in (await resp.json())["result"]["supportedVersions"]
    async with http.post(backend.mcp_url, json=body, headers={**headers, "Mcp-Method": "tools/list"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32020  # header/body mismatch
    async with http.get(backend.mcp_url, headers={"MCP-Protocol-Version": MODERN_VERSION}) as resp:
        assert resp.status == 405


# --- options and process control (fresh backends) --------------------------------------------------


async def test_host_origin_protection_answers_421(
    backend_factory: BackendFactory, http: aiohttp.ClientSession
) -> None:
    [guarded] = await asyncio.to_thread(
        backend_factory, ["g"], extra_args=["--host-origin-protection", "auto"]
    )
    for host, status in (("example.com", 421), ("localhost:1", 200), (f"127.0.0.1:{guarded.port}", 200)):
        async with http.post(guarded.mcp_url, json=INIT_BODY, headers={**INIT_HEADERS, "Host": host}) as resp:
            assert resp.status == status, host
    origin = {**INIT_HEADERS, "Origin": "http://evil.example"}
    async with http.post(guarded.mcp_url, json=INIT_BODY, headers=origin) as resp:
        assert resp.status == 403


async def test_event_store_priming_and_resumption(
    backend_factory: BackendFactory, http: aiohttp.ClientSession
) -> None:
    [es] = await asyncio.to_thread(
        backend_factory, ["e"], extra_args=["--event-store", "--retry-interval", "500"]
    )
    session_id = await open_session(http, es.mcp_url)
    headers = session_headers(session_id)

    # A 2025-11-25 POST stream starts with a priming event: an id, retry, and empty data.
    async with http.post(es.mcp_url, json=call_body("whoami"), headers=headers) as resp:
        priming = await read_sse_event(resp)
        reply = await read_sse_event(resp)
    assert priming.keys() == {"id", "retry", "data"}
    assert priming["data"] == ""
    assert priming["retry"] == "500"
    assert "id" in reply
    assert json.loads(reply["data"])["result"]["content"][0]["text"] == "e"

    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": session_id}
    async with http.get(es.mcp_url, headers=get_headers) as stream:
        assert stream.status == 200
        first = await _notify_until_event(http, es, headers, stream)
        async with http.post(es.mcp_url, json=call_body("notify_stream", 4), headers=headers) as resp:
            await resp.read()
        second = await read_sse_event(stream)
    assert json.loads(second["data"])["method"] == "notifications/tools/list_changed"

    # Resume after the first event: the second is replayed.
    async with http.get(es.mcp_url, headers={**get_headers, "Last-Event-ID": first["id"]}) as resumed:
        assert resumed.status == 200
        replayed = await read_sse_event(resumed)
    # Same id and message; the replayed data is re-serialized (it gains "params": null), not byte-equal.
    assert replayed["id"] == second["id"]
    assert json.loads(replayed["data"])["method"] == "notifications/tools/list_changed"


async def _notify_until_event(
    http: aiohttp.ClientSession,
    backend: BackendProcess,
    headers: dict[str, str],
    stream: aiohttp.ClientResponse,
) -> dict[str, str]:
    """Call notify_stream until its notification shows up on ``stream`` (registration races the 200)."""
    pending = asyncio.ensure_future(read_sse_event(stream))
    try:
        async with asyncio.timeout(DEADLINE):
            request_id = 100
            while True:
                request_id += 1
                async with http.post(
                    backend.mcp_url, json=call_body("notify_stream", request_id), headers=headers
                ) as resp:
                    await resp.read()
                done, _ = await asyncio.wait({pending}, timeout=0.2)
                if done:
                    return pending.result()
    finally:
        pending.cancel()


async def test_json_response_mode(backend_factory: BackendFactory, http: aiohttp.ClientSession) -> None:
    [js] = await asyncio.to_thread(backend_factory, ["j"], extra_args=["--json-response"])
    async with http.post(js.mcp_url, json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/json"
        assert "Mcp-Session-Id" in resp.headers
        assert (await resp.json())["result"]["serverInfo"]["name"] == "backend-j"
    async with Client(js.mcp_url, mode="legacy") as client:
        assert [text_of(await client.call_tool("count")) for _ in range(2)] == ["1", "2"]


async def test_process_control(backend_factory: BackendFactory, http: aiohttp.ClientSession) -> None:
    [x] = await asyncio.to_thread(backend_factory, ["x"])
    assert x.is_running()

    x.pause()
    with pytest.raises(TimeoutError):
        async with http.post(
            x.mcp_url, json=INIT_BODY, headers=INIT_HEADERS, timeout=aiohttp.ClientTimeout(total=0.5)
        ):
            pass
    x.resume()
    async with Client(x.mcp_url, mode="legacy") as client:
        assert text_of(await client.call_tool("whoami")) == "x"

    old = x.process
    await x.arestart()
    assert old is not None
    assert old.returncode == 0
    assert x.process is not old
    assert x.is_running()
    async with Client(x.mcp_url, mode="legacy") as client:
        assert text_of(await client.call_tool("slow", {"seconds": 0})) == "x"

    port = x.port
    await x.akill()
    assert not x.is_running()
    assert x.process is not None
    assert x.process.returncode == -signal.SIGKILL
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.post(f"http://127.0.0.1:{port}/mcp", json=INIT_BODY, headers=INIT_HEADERS):
            pass
