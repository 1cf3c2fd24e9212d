"""Dual-era routing end to end: real FastMCP 4.1.2 backends, real mcp 2.3.0 clients, raw HTTP.

Era-aware placement, `pools`/`routes` rules on the 2026-07-28 routing headers (base64 values
included), `deny`, strict header validation, and MRTR affinity. Backends declared legacy-only or
modern-only here still serve both eras (FastMCP does): the tests are about the proxy's choice.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import mcp_types
import pytest
import redis.asyncio
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess, start_all, stop_all
from tests.fixtures.proxy import DictProxy, ProxyFactory, proxy_config
from tests.fixtures.rawhttp import ClientFactory, request, rpc_error
from tests.fixtures.redis import RedisServer
from tests.fixtures.stub import StubFactory
from tests.mcp_helpers import (
    DEADLINE,
    INIT_HEADERS,
    MODERN_META,
    MODERN_VERSION,
    call_body,
    call_tool,
    from_proxy,
    mcp_url,
    open_session,
    recorded_client,
    text_of,
    wait_until,
)


@pytest.fixture
async def web() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def modern_headers(method: str = "tools/call", name: str | None = None) -> dict[str, str]:
    headers = {**INIT_HEADERS, "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def modern_call(tool: str, request_id: int = 2, **arguments: Any) -> dict[str, Any]:
    body = call_body(tool, request_id, **arguments)
    body["params"]["_meta"] = MODERN_META
    return body


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def sample_value(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def whoami_raw(web: aiohttp.ClientSession, proxy: Proxy, name: str = "whoami") -> str:
    async with web.post(
        mcp_url(proxy), json=modern_call("whoami"), headers=modern_headers(name=name)
    ) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["result"]["content"][0]["text"])


# --- era-aware backends ------------------------------------------------------------------------------


async def test_mixed_pool_keeps_each_era_on_capable_backends(
    backends: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    config = proxy_config(backends, balance="round_robin")
    config["backends"][0]["eras"] = ["legacy"]  # a: legacy-only
    config["backends"][1]["eras"] = ["modern"]  # b: modern-only
    proxy = await dict_proxy(config)
    async with recorded_client(mcp_url(proxy), mode=MODERN_VERSION) as (client, _):
        modern = [text_of(await client.call_tool("whoami")) for _ in range(12)]
    assert set(modern) == {"b", "c"}, modern  # never the legacy-only backend, and both others
    legacy = []
    for _ in range(8):
        session_id = await open_session(web, mcp_url(proxy))
        legacy.append((await call_tool(web, mcp_url(proxy), session_id, "whoami")).text)
    assert set(legacy) == {"a", "c"}, legacy
    assert {bk.name: bk.sessions for bk in proxy.backends}["b"] == 0


async def test_no_backend_for_the_era_is_503(
    backends: list[BackendProcess], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    config = proxy_config(backends[:1])
    config["backends"][0]["eras"] = ["legacy"]
    proxy = await dict_proxy(config)
    async with web.post(
        mcp_url(proxy), json=modern_call("whoami"), headers=modern_headers(name="whoami")
    ) as resp:
        assert resp.status == 503
        assert from_proxy(resp.headers)
        assert (await resp.json())["error"]["code"] == -32603


# --- rules -------------------------------------------------------------------------------------------


async def test_rules_route_a_tool_to_its_pool(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        backends,
        balance="round_robin",
        pools={"heavy": ["c"], "light": ["a", "b"]},
        routes=[
            {"match": {"method": "tools/call", "name": "who*"}, "pool": "heavy"},
            {"match": {"method": "tools/call"}, "pool": "light"},
        ],
    )
    async with recorded_client(mcp_url(proxy), mode=MODERN_VERSION) as (client, _):
        assert {text_of(await client.call_tool("whoami")) for _ in range(6)} == {"c"}
        assert {text_of(await client.call_tool("slow", {"seconds": 0})) for _ in range(6)} == {"a", "b"}
        tools = await client.list_tools()  # tools/list matches no rule: any backend
    assert "whoami" in {tool.name for tool in tools.tools}
    assert sample_value(proxy, "mcpbalancer_route_rule_hits_total", rule="0") == 6
    assert sample_value(proxy, "mcpbalancer_route_rule_hits_total", rule="1") == 6
    # A legacy session is placed by balance alone: rules never apply to legacy requests.
    legacy = set()
    for _ in range(4):
        session_id = await open_session(web, mcp_url(proxy))
        legacy.add((await call_tool(web, mcp_url(proxy), session_id, "whoami")).text)
    assert legacy >= {"a", "b"}, legacy
    assert sample_value(proxy, "mcpbalancer_route_rule_hits_total", rule="0") == 6


async def test_a_base64_encoded_name_and_param_match(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        backends,
        pools={"only_b": ["b"], "only_c": ["c"]},
        routes=[
            {"match": {"param": {"Region": "eü"}}, "pool": "only_c"},
            {"match": {"name": "whoami"}, "pool": "only_b"},
        ],
    )
    # The backend decodes the header too and checks it against the body, so its 200 proves both.
    assert {await whoami_raw(web, proxy, b64("whoami")) for _ in range(5)} == {"b"}
    assert {await whoami_raw(web, proxy, "whoami") for _ in range(3)} == {"b"}
    headers = {**modern_headers(name="whoami"), "Mcp-Param-Region": b64("eü")}
    for _ in range(4):
        async with web.post(mcp_url(proxy), json=modern_call("whoami"), headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["result"]["content"][0]["text"] == "c"
    # A malformed encoding is the proxy's own 400, with a JSON-RPC body.
    for bad in ({"Mcp-Name": "=?base64?not*base64?="}, {"Mcp-Param-Region": "=?base64?%%%?="}):
        async with web.post(mcp_url(proxy), json=modern_call("whoami"), headers={**headers, **bad}) as resp:
            assert resp.status == 400, bad
            assert from_proxy(resp.headers)
            error = (await resp.json())["error"]
            assert error["code"] == -32600
            assert "base64" in error["message"]


async def test_deny_answers_403_and_the_backend_sees_nothing(
    make_stub: StubFactory, make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    stub = await make_stub(name="s1")
    proxy = await make_proxy(
        [stub],
        routes=[
            {"match": {"method": "tools/call", "name": "drop_*"}, "deny": 403},
            {"match": {"name": "secret"}, "deny": 404},
        ],
    )
    url = mcp_url(proxy)
    for name in ("drop_db", b64("drop_table")):
        async with web.post(url, json=modern_call("drop_db"), headers=modern_headers(name=name)) as resp:
            assert resp.status == 403
            assert from_proxy(resp.headers)
            error = (await resp.json())["error"]
            assert error == {"code": -32600, "message": "Denied by a routing rule"}
    async with web.post(url, json=modern_call("secret"), headers=modern_headers(name="secret")) as resp:
        assert resp.status == 404
    # Legacy requests are not subject to rules, and an allowed modern request is forwarded.
    async with web.post(url, json=modern_call("drop_db"), headers=INIT_HEADERS) as resp:
        assert resp.status == 200
    async with web.post(url, json=modern_call("keep"), headers=modern_headers(name="keep")) as resp:
        assert resp.status == 200
    assert [r.header("mcp-name") for r in stub.requests] == [None, b"keep"]
    assert sample_value(proxy, "mcpbalancer_route_rule_hits_total", rule="deny") == 3
    assert (
        sample_value(
            proxy,
            "mcpbalancer_requests_total",
            backend="none",
            era="modern",
            method="POST",
            code="4xx",
            service="default",
        )
        == 3
    )


# --- strict mode -------------------------------------------------------------------------------------


async def test_strict_mode_rejects_a_mismatched_name(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(
        backends[:1],
        validate_headers=True,
        routes=[{"match": {"name": "release"}, "deny": 403}],
    )
    url = mcp_url(proxy)
    assert await whoami_raw(web, proxy) == "a"
    assert await whoami_raw(web, proxy, b64("whoami")) == "a"
    # A header that lies about the tool would dodge the deny rule: the proxy refuses it itself.
    cases = [
        (modern_call("release", key="k"), modern_headers(name="whoami")),
        (modern_call("whoami"), modern_headers(name="count")),
        (modern_call("whoami"), modern_headers(method="tools/list", name="whoami")),
        (modern_call("whoami"), modern_headers()),  # no Mcp-Name at all
    ]
    for body, headers in cases:
        async with web.post(url, json=body, headers=headers) as resp:
            assert resp.status == 400, headers
            assert from_proxy(resp.headers)
            assert (await resp.json())["error"]["code"] == -32020
    async with web.post(url, data=b"{not json", headers=modern_headers(name="whoami")) as resp:
        assert resp.status == 400
        assert from_proxy(resp.headers)
    # The real client's requests all agree with their headers.
    async with recorded_client(url, mode=MODERN_VERSION) as (client, _):
        assert text_of(await client.call_tool("whoami")) == "a"
        await client.list_tools()


# --- MRTR affinity -----------------------------------------------------------------------------------


async def answer(
    context: ClientRequestContext, params: mcp_types.ElicitRequestParams
) -> mcp_types.ElicitResult:
    return mcp_types.ElicitResult(action="accept", content={"value": "yes"})


async def sample(
    context: ClientRequestContext, params: mcp_types.CreateMessageRequestParams
) -> mcp_types.CreateMessageResult:
    return mcp_types.CreateMessageResult(
        role="assistant", content=mcp_types.TextContent(type="text", text="llm"), model="test-model"
    )


async def mrtr_calls(proxy: Proxy, rounds: int) -> list[str]:
    """Each round: an elicitation and a sampling round trip, each an input_required answer and a
    retry carrying the backend's sealed requestState. 'error' for a round trip that failed."""
    outcomes = []
    async with recorded_client(
        mcp_url(proxy), mode=MODERN_VERSION, elicitation_callback=answer, sampling_callback=sample
    ) as (client, _):
        await client.list_tools()
        for _ in range(rounds):
            for tool, args in (("ask_user", {}), ("ask_llm", {"prompt": "p"})):
                try:
                    result = await client.call_tool(tool, args)
                except MCPError:
                    outcomes.append("error")
                else:
                    outcomes.append("error" if result.is_error else text_of(result))
    return outcomes


@pytest.mark.parametrize("affinity", [True, False])
async def test_mrtr_retry_reaches_the_instance_that_sealed_the_state(
    backends: list[BackendProcess], make_proxy: ProxyFactory, affinity: bool
) -> None:
    # Round robin over two instances sends every retry to the other one unless affinity pins it.
    proxy = await make_proxy(backends[:2], balance="round_robin", affinity={"request_state": affinity})
    outcomes = await mrtr_calls(proxy, 3)
    if affinity:
        assert outcomes == ["accepted:yes", "llm"] * 3
        assert (
            sample_value(proxy, "mcpbalancer_affinity_lookups_total", kind="request_state", result="hit") == 6
        )
        assert proxy.router.affinity is not None
        assert proxy.router.affinity.states is not None
        assert len(proxy.router.affinity.states) == 6
    else:
        assert outcomes == ["error"] * 6  # the test can fail: per-process keys reject the retry
        assert (
            sample_value(proxy, "mcpbalancer_affinity_lookups_total", kind="request_state", result="hit") == 0
        )


# --- Tasks affinity ----------------------------------------------------------------------------------

TASKS_META = {
    **MODERN_META,
    "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}},
}


async def task_request(
    web: aiohttp.ClientSession, proxy: Proxy, method: str, name: str, params: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": TASKS_META}}
    async with web.post(mcp_url(proxy), json=body, headers=modern_headers(method, name)) as resp:
        return resp.status, await resp.json()


@pytest.fixture(scope="module")
def task_backends() -> Iterator[list[BackendProcess]]:
    """Two instances with the fastmcp-tasks extension on its in-memory Docket: per-process tasks."""
    procs = [BackendProcess(name, extra_args=["--tasks"]) for name in ("t1", "t2")]
    try:
        yield start_all(procs)
    finally:
        stop_all(procs)


@pytest.mark.parametrize("affinity", [True, False])
async def test_tasks_get_reaches_the_instance_that_created_the_task(
    task_backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession, affinity: bool
) -> None:
    # Round robin over two instances: every tasks/get right after its tools/call goes to the other
    # instance unless the proxy remembers where the task was created.
    proxy = await make_proxy(task_backends, balance="round_robin", affinity={"tasks": affinity})
    outcomes = []
    for _ in range(4):
        status, created = await task_request(
            web, proxy, "tools/call", "background", {"name": "background", "arguments": {"seconds": 0}}
        )
        assert status == 200, created
        task = created["result"]
        assert task["resultType"] == "task"
        task_id = task["taskId"]
        status, got = await task_request(web, proxy, "tasks/get", task_id, {"taskId": task_id})
        outcomes.append("ok" if status == 200 and got["result"]["taskId"] == task_id else "not found")
    if not affinity:
        assert outcomes == ["not found"] * 4  # the test can fail: tasks live in one process
        return
    assert outcomes == ["ok"] * 4
    assert sample_value(proxy, "mcpbalancer_affinity_lookups_total", kind="tasks", result="hit") == 4
    # Poll to completion: the result names the creating instance; a base64 task id routes too.
    created_on: set[str] = set()
    for _ in range(2):
        _, created = await task_request(
            web, proxy, "tools/call", "background", {"name": "background", "arguments": {"seconds": 0}}
        )
        task_id = created["result"]["taskId"]
        result: dict[str, Any] = {}

        async def completed(task_id: str = task_id) -> bool:
            nonlocal result
            status, got = await task_request(web, proxy, "tasks/get", b64(task_id), {"taskId": task_id})
            assert status == 200, got
            result = got["result"]
            return bool(result["status"] == "completed")

        await wait_until(completed, "the task to complete")
        created_on.add(result["result"]["content"][0]["text"])
        status, cancelled = await task_request(web, proxy, "tasks/cancel", task_id, {"taskId": task_id})
        assert status != 404, cancelled
    assert created_on == {"t1", "t2"}
    # An unknown task id is balanced and answered by a backend.
    status, missing = await task_request(web, proxy, "tasks/get", "nope", {"taskId": "nope"})
    assert status == 400
    assert missing["error"]["message"] == "Task nope not found"
    assert sample_value(proxy, "mcpbalancer_affinity_lookups_total", kind="tasks", result="miss") == 1


# --- strict mode: the request body on the wire -------------------------------------------------------


async def test_strict_mode_reads_chunked_expect_and_oversized_bodies(
    backends: list[BackendProcess], make_proxy: ProxyFactory, open_client: ClientFactory
) -> None:
    proxy = await make_proxy(backends[:1], validate_headers=True, limits={"body_bytes": 4096})
    body = json.dumps(modern_call("whoami")).encode()
    head = [(k, v) for k, v in modern_headers(name="whoami").items()]
    client = await open_client(proxy)
    # Chunked, in two chunks: checked once whole, then forwarded.
    client.send(request("POST", "/mcp", [*head, ("Transfer-Encoding", "chunked")]))
    client.send(b"%x\r\n%b\r\n" % (10, body[:10]))
    client.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(body) - 10, body[10:]))
    resp = await client.response()
    assert resp.status == 200, bytes(resp.body)
    assert json.loads(resp.body)["result"]["content"][0]["text"] == "a"
    # Expect: 100-continue gets its 100 before the body is read and checked.
    lying = json.dumps(modern_call("count")).encode()
    client.send(
        request("POST", "/mcp", [*head, ("Expect", "100-continue"), ("Content-Length", str(len(lying)))])
    )
    assert await client.read_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.send(lying)
    resp = await client.response()
    assert resp.status == 400
    assert rpc_error(resp)["code"] == -32020
    # Over limits.body_bytes while being read: 413, nothing forwarded.
    big = json.dumps(modern_call("whoami", pad="x" * 5000)).encode()
    client.send(request("POST", "/mcp", [*head, ("Transfer-Encoding", "chunked")]))
    client.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(big), big))
    resp = await client.response()
    assert resp.status == 413


# --- affinity shared by proxy replicas through Redis ------------------------------------------------


async def test_replicas_share_affinity_through_redis(
    task_backends: list[BackendProcess],
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    redis_server.start()
    url = redis_server.url
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        await client.flushall()
        settings = {
            "store": url,
            "balance": "round_robin",
            "affinity": {"tasks": True, "request_state": True},
        }
        first, second = [await make_proxy(task_backends, **settings) for _ in range(2)]
        created: dict[str, str] = {}
        for _ in range(4):
            _, answer = await task_request(
                web, first, "tools/call", "background", {"name": "background", "arguments": {"seconds": 0}}
            )
            created[answer["result"]["taskId"]] = ""

        async def shared() -> bool:
            return len([key async for key in client.scan_iter("mcpb:t:*")]) == 4

        await wait_until(shared, "the task ids written to Redis")
        for task_id in created:
            status, got = await task_request(web, second, "tasks/get", task_id, {"taskId": task_id})
            assert status == 200, got
        assert sample_value(second, "mcpbalancer_affinity_lookups_total", kind="tasks", result="hit") == 4
        # An MRTR retry sent to the other replica reaches the instance that sealed its state.
        mrtr_first, mrtr_second = [await make_proxy(backends[:2], **settings) for _ in range(2)]
        for round_ in range(2):
            async with web.post(
                mcp_url(mrtr_first), json=modern_call("ask_user", 1), headers=modern_headers(name="ask_user")
            ) as resp:
                result = (await resp.json())["result"]
            assert result["resultType"] == "input_required"
            [key] = result["inputRequests"]
            retry = modern_call("ask_user", 2)
            retry["params"].update(
                requestState=result["requestState"],
                inputResponses={key: {"action": "accept", "content": {"value": "x"}}},
            )

            async def stored(count: int = round_ + 1) -> bool:
                return len([k async for k in client.scan_iter("mcpb:r:*")]) == count

            await wait_until(stored, "the request state written to Redis")
            async with web.post(
                mcp_url(mrtr_second), json=retry, headers=modern_headers(name="ask_user")
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["result"]["content"][0]["text"] == "accepted:x"
        hits = sample_value(
            mrtr_second, "mcpbalancer_affinity_lookups_total", kind="request_state", result="hit"
        )
        assert hits == 2
    finally:
        await client.flushall()
        await client.aclose()
