"""OpenTelemetry tracing, end to end: real FastMCP backends, a real OTLP/HTTP receiver.

The receiver decodes what the proxy's exporter sends with `opentelemetry-proto`; the backend's
`request_headers` tool says which traceparent it received, so a test can see that the backend's
parent is the proxy's span, and the proxy's parent the client's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from mcpbalancer.app import Proxy
from mcpbalancer.observability import tracing
from mcpbalancer.observability.logs import SessionHasher
from mcpbalancer.observability.otlp import scan_body
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import (
    INIT_BODY,
    INIT_HEADERS,
    MODERN_META,
    MODERN_VERSION,
    mcp_url,
    session_headers,
    sse_messages,
    wait_until,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACESTATE = "vendor=opaque,other=x1"


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, with its resource's attributes."""

    url: str = ""
    spans: list[tuple[dict[str, Any], ProtoSpan]] = field(default_factory=list)
    requests: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        self.requests += 1
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                assert scope_spans.scope.name == "mcpbalancer"
                self.spans.extend((resource, span) for span in scope_spans.spans)
        self.headers = dict(request.headers)
        return web.Response(body=b"", content_type="application/x-protobuf")

    def find(self, **expected: Any) -> list[ProtoSpan]:
        return [
            s for _, s in self.spans if all(attributes(s.attributes).get(k) == v for k, v in expected.items())
        ]


def attributes(values: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for kv in values:
        kind = kv.value.WhichOneof("value")
        found[kv.key] = getattr(kv.value, kind)
    return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.url = f"http://127.0.0.1:{port}/v1/traces"
    yield found
    await runner.cleanup()


def traced(receiver_url: str, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": receiver_url, "headers": {"Authorization": "Bearer t0ken"}, **extra}


async def call(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], tool: str, request_id: int = 5
) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {}},
    }
    if headers.get("MCP-Protocol-Version") == MODERN_VERSION:
        body["params"]["_meta"] = MODERN_META
    async with http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    message = sse_messages(text)[-1] if resp.content_type == "text/event-stream" else json.loads(text)
    return dict(json.loads(message["result"]["content"][0]["text"]))


async def legacy_session(http: aiohttp.ClientSession, url: str, traceparent: str | None = None) -> str:
    headers = dict(INIT_HEADERS)
    if traceparent is not None:
        headers["traceparent"] = traceparent
    async with http.post(url, json=INIT_BODY, headers=headers) as resp:
        assert resp.status == 200
        sid = resp.headers["Mcp-Session-Id"]
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=initialized, headers=session_headers(sid)) as resp:
        assert resp.status == 202
    return sid


async def spans_arrive(receiver: Receiver, count: int, **expected: Any) -> list[ProtoSpan]:
    async def arrived() -> bool:
        return len(receiver.find(**expected)) >= count

    await wait_until(arrived, f"{count} spans with {expected}", deadline=15.0)
    return receiver.find(**expected)


async def test_a_span_per_request_child_of_the_client_and_parent_of_the_backend(
    backends: list[BackendProcess], make_proxy: ProxyFactory, receiver: Receiver, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], tracing=traced(receiver.url, service_name="edge-proxy"))
    url = mcp_url(proxy)
    sid = await legacy_session(web, url)
    incoming = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    headers = {**session_headers(sid), "traceparent": incoming, "tracestate": TRACESTATE}
    seen = await call(web, url, headers, "request_headers")
    # The backend's parent is the proxy's span, in the client's trace; tracestate as it was sent.
    version, trace_id, parent_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert parent_id != CLIENT_SPAN
    assert seen["tracestate"] == TRACESTATE

    [span] = await spans_arrive(receiver, 1, **{"gen_ai.tool.name": "request_headers"})
    assert span.trace_id.hex() == CLIENT_TRACE
    assert span.parent_span_id.hex() == CLIENT_SPAN  # a child of the incoming context
    assert span.span_id.hex() == parent_id  # and the parent of the backend's
    assert span.kind == ProtoSpan.SPAN_KIND_SERVER
    assert span.name == "tools/call request_headers"
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    got = attributes(span.attributes)
    assert got["mcp.method.name"] == "tools/call"  # a legacy request: from the body
    assert got["gen_ai.operation.name"] == "execute_tool"
    assert got["jsonrpc.request.id"] == "5"
    assert got["mcp.protocol.version"] == "2025-11-25"
    assert got["mcp.session.id"] == SessionHasher(proxy._session_tag_key)(sid.encode())
    assert sid not in json.dumps({k: str(v) for k, v in got.items()})  # never the raw id
    assert (got["http.request.method"], got["url.path"], got["http.response.status_code"]) == (
        "POST",
        "/mcp",
        200,
    )
    assert (got["mcpbalancer.backend"], got["mcpbalancer.service"]) == ("a", "default")
    assert got["mcpbalancer.route.decision"] == "cache_hit"
    assert got["mcpbalancer.era"] == "legacy"
    resource = next(r for r, s in receiver.spans if s.span_id == span.span_id)
    assert resource["service.name"] == "edge-proxy"
    assert receiver.headers["Authorization"] == "Bearer t0ken"
    # The initialize that made the session: a root span (no traceparent came), a new session.
    [init] = await spans_arrive(receiver, 1, **{"mcp.method.name": "initialize"})
    assert init.parent_span_id == b""
    init_got = attributes(init.attributes)
    assert init_got["mcpbalancer.route.decision"] == "new_session"
    assert init_got["mcp.session.id"] == got["mcp.session.id"]


async def test_a_2026_request_is_named_by_its_headers_and_a_refusal_by_its_decision(
    backends: list[BackendProcess], make_proxy: ProxyFactory, receiver: Receiver, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], tracing=traced(receiver.url))
    url = mcp_url(proxy)
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "request_headers",
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    }
    seen = await call(web, url, headers, "request_headers")
    assert seen["traceparent"].split("-")[1] == CLIENT_TRACE
    [span] = await spans_arrive(receiver, 1, **{"mcpbalancer.era": "modern"})
    got = attributes(span.attributes)
    assert (got["mcp.method.name"], got["gen_ai.tool.name"]) == ("tools/call", "request_headers")
    assert got["mcp.protocol.version"] == MODERN_VERSION
    assert got["mcpbalancer.route.decision"] == "stateless"
    assert "mcp.session.id" not in got
    # An unknown session: the proxy answers, no backend; an error status is not a server error.
    async with web.post(url, json={}, headers=session_headers("no-such-session")) as resp:
        assert resp.status == 404
    [refused] = await spans_arrive(receiver, 1, **{"mcpbalancer.route.decision": "refused"})
    refused_got = attributes(refused.attributes)
    assert refused_got["http.response.status_code"] == 404
    assert "mcpbalancer.backend" not in refused_got
    assert refused.status.code != refused.status.STATUS_CODE_ERROR


async def test_the_store_latency_of_a_new_session_on_redis(
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    receiver: Receiver,
    web: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    proxy = await make_proxy(backends[:1], store=redis_url, tracing=traced(receiver.url))
    await legacy_session(web, mcp_url(proxy))
    [init] = await spans_arrive(receiver, 1, **{"mcp.method.name": "initialize"})
    got = attributes(init.attributes)
    assert 0 < got["mcpbalancer.store.duration"] < 5


async def test_unsampled_requests_keep_their_headers_and_get_no_span(
    backends: list[BackendProcess], make_proxy: ProxyFactory, receiver: Receiver, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1], tracing=traced(receiver.url, sample_ratio=0.0))
    url = mcp_url(proxy)
    sid = await legacy_session(web, url)
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    seen = await call(web, url, {**session_headers(sid), "traceparent": unsampled}, "request_headers")
    assert seen["traceparent"] == unsampled  # the caller said no: forwarded as it came
    seen = await call(web, url, session_headers(sid), "request_headers")
    assert seen["traceparent"] is None  # ratio 0: no root spans, nothing added
    sampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    seen = await call(web, url, {**session_headers(sid), "traceparent": sampled}, "request_headers")
    assert seen["traceparent"] != sampled  # a sampled parent is always followed
    await spans_arrive(receiver, 1, **{"gen_ai.tool.name": "request_headers"})
    assert len(receiver.spans) == 1


async def test_without_tracing_trace_headers_are_forwarded_unchanged(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(backends[:1])
    assert proxy.tracing is None
    url = mcp_url(proxy)
    sid = await legacy_session(web, url)
    for flags in ("01", "00"):
        incoming = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"
        headers = {**session_headers(sid), "traceparent": incoming, "tracestate": TRACESTATE}
        seen = await call(web, url, headers, "request_headers")
        assert (seen["traceparent"], seen["tracestate"]) == (incoming, TRACESTATE)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_collector_that_is_down_costs_bounded_memory_and_no_latency(
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "QUEUE_LIMIT", 20)
    monkeypatch.setattr(tracing, "BATCH", 5)
    down = f"http://127.0.0.1:{_closed_port()}/v1/traces"
    proxy = await make_proxy(backends[:1], tracing=traced(down))
    assert proxy.tracing is not None
    url = mcp_url(proxy)
    sid = await legacy_session(web, url)
    slowest = 0.0
    for i in range(120):
        started = time.monotonic()
        assert (await call(web, url, session_headers(sid), "request_headers", request_id=100 + i))[
            "traceparent"
        ]
        slowest = max(slowest, time.monotonic() - started)
        assert len(proxy.tracing._pending) <= 20
    assert slowest < 2.0  # a tool call takes milliseconds; the exporter's retries never show here

    def value(result: str) -> float:
        found = proxy.metrics.registry.get_sample_value("mcpbalancer_trace_spans_total", {"result": result})
        return found or 0.0

    assert value("dropped") > 0  # the queue was full while the exporter waited on the collector

    async def failed() -> bool:
        return value("failed") > 0

    await wait_until(failed, "a failed export to be counted", deadline=30.0)
    assert value("exported") == 0
    started = time.monotonic()
    await proxy.stop()  # bounded: the last spans are given up on
    assert time.monotonic() - started < tracing.CLOSE_TIMEOUT + 5


def test_traceparent_parsing() -> None:
    parse = tracing._parse
    assert parse(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()) == (
        int(CLIENT_TRACE, 16),
        int(CLIENT_SPAN, 16),
        True,
    )
    assert parse(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00".encode()) == (
        int(CLIENT_TRACE, 16),
        int(CLIENT_SPAN, 16),
        False,
    )
    assert parse(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-more".encode()) is not None  # a later version
    for bad in (
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-more",  # version 00 has exactly four fields
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",
        f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
        "00-abc-def-01",
        "",
    ):
        assert parse(bad.encode()) is None, bad


def test_the_bounded_body_scan() -> None:
    body = b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"search","arguments":{"q":1}}}'
    assert scan_body(body) == ("tools/call", "search", "3")
    assert scan_body(body[:-12]) == ("tools/call", "search", None)  # cut: the first of each, by search
    assert scan_body(
        b'[{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}]'
    ) == (
        "resources/read",
        "file:///x",
        "a",
    )
    assert scan_body(b'{"jsonrpc":"2.0","id":1,"result":{}}') == (None, None, "1")
    assert scan_body(b"not json") == (None, None, None)
    assert scan_body(b"7") == (None, None, None)


async def test_a_reload_turns_tracing_on_and_off(
    backends: list[BackendProcess], receiver: Receiver, web: aiohttp.ClientSession, tmp_path: Any
) -> None:
    config = tmp_path / "proxy.yaml"
    base = {
        "listen": "127.0.0.1:0",
        "backends": [{"name": "a", "url": backends[0].url}],
        "health": {"interval": 0},
    }
    config.write_text(json.dumps(base))
    from mcpbalancer.config import load_config

    proxy = Proxy(load_config(str(config)))
    await proxy.start()
    try:
        url = mcp_url(proxy)
        sid = await legacy_session(web, url)
        assert (await call(web, url, session_headers(sid), "request_headers"))["traceparent"] is None
        config.write_text(json.dumps({**base, "tracing": traced(receiver.url)}))
        proxy.reload()
        seen = await call(web, url, session_headers(sid), "request_headers")
        assert seen["traceparent"] is not None
        await spans_arrive(receiver, 1, **{"gen_ai.tool.name": "request_headers"})
        config.write_text(json.dumps(base))
        proxy.reload()
        assert proxy.tracing is None
        assert (await call(web, url, session_headers(sid), "request_headers"))["traceparent"] is None
    finally:
        await proxy.stop()
    await asyncio.sleep(0)
