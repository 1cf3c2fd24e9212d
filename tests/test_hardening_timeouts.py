"""Backend timeouts (issue 7, item 3): a backend that accepts but never answers costs its own
requests a 504 after `timeouts.response_headers`, counts as a timeout against it, keeps its sessions,
and leaves other backends' sessions alone."""

from __future__ import annotations

import time

from mcpbalancer.routing.binding import backend_of
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, initialize, request, rpc_error
from tests.fixtures.stub import Handler, StubFactory, StubRequest, response


async def test_silent_backend_times_out_alone_and_keeps_its_sessions(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    silent = {"a": False, "b": False}

    def handler(name: str) -> Handler:
        async def handle(req: StubRequest) -> None:
            await req.complete.wait()
            if req.header("mcp-session-id") is None:
                req.conn.write(response(200, [("Mcp-Session-Id", f"sid-{name}")], b"{}"))
            elif not silent[name]:
                req.conn.write(response(200, [], name.encode()))

        return handle

    a = await make_stub(handler("a"), name="a")
    b = await make_stub(handler("b"), name="b")
    proxy = await make_proxy([a, b], timeouts={"response_headers": 0.5})
    client = await open_client(proxy)
    sids = {await initialize(client) for _ in range(2)}
    assert sids == {b"sid-a", b"sid-b"}  # one session on each backend

    def call(sid: bytes) -> bytes:
        headers = [("Mcp-Session-Id", sid.decode()), ("MCP-Protocol-Version", "2025-11-25")]
        return request("POST", "/mcp", headers, b"{}")

    silent["a"] = True
    client.send(call(b"sid-a"))
    started = time.monotonic()
    resp = await client.response()
    assert resp.status == 504
    assert time.monotonic() - started >= 0.45
    rpc_error(resp)
    registry = proxy.metrics.registry
    labels = {"backend": "a", "kind": "timeout"}
    assert registry.get_sample_value("mcpbalancer_upstream_errors_total", labels) == 1
    assert registry.get_sample_value("mcpbalancer_upstream_errors_total", {**labels, "backend": "b"}) is None
    # The other backend's session is untouched and answers at once, while `a` stays silent.
    client.send(call(b"sid-b"))
    resp = await client.response(deadline=2)
    assert (resp.status, bytes(resp.body)) == (200, b"b")
    # The silent backend's session was not moved nor forgotten: it is served there once it answers.
    assert backend_of(str(proxy.store.peek("sid-a"))) == "a"
    silent["a"] = False
    client.send(call(b"sid-a"))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"a")
    assert [r.header("mcp-session-id") for r in b.requests] == [None, b"sid-b"]
