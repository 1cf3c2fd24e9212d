"""Rules, affinity maps, result sniffing and strict header checks: the pure parts, no sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from mcpbalancer.config import AffinityConfig, LimitsConfig, RouteConfig, TimeoutsConfig, parse_config
from mcpbalancer.dataplane.plane import DataPlane
from mcpbalancer.errors import BadRequest, ConfigError, Denied, HeaderMismatch, render_error
from mcpbalancer.filters.affinity import RequestStateKey
from mcpbalancer.filters.headercheck import StrictHeaders, check
from mcpbalancer.filters.phases import compose
from mcpbalancer.filters.route_rules import RouteRules
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.routing.affinity import Affinity, AffinityMap, ResultSniffer, state_digest
from mcpbalancer.routing.balancer import LeastSessions
from mcpbalancer.routing.router import RequestFacts, Router, classify
from mcpbalancer.routing.rules import compile_rules, header_lookup
from mcpbalancer.store.memory import MemoryStore
from mcpbalancer.store.shared import SharedAffinity

MODERN = b"2026-07-28"


class _NoContext:
    """The request filters under test read nothing of the exchange but the facts."""

    head: Any = None
    facts: RequestFacts | None = None
    backend: Backend | None = None
    status = 0


_NO_CONTEXT = _NoContext()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def b64(text: str) -> bytes:
    return b"=?base64?" + base64.b64encode(text.encode()) + b"?="


def headers(**values: bytes) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for key, value in values.items():
        name = key.replace("_", "-").encode()
        out.append((name.lower(), name, value))
    return out


# --- rules -----------------------------------------------------------------------------------------

RULES = compile_rules(
    [
        RouteConfig(method="tools/call", name="render_*", pool="heavy"),
        RouteConfig(params=(("Region", "eu"),), pool="eu"),
        RouteConfig(method="tools/call", name="drop_db", deny=403),
        RouteConfig(name="[ab]?", pool="eu"),
    ],
    {"heavy": ["g1", "g2"], "eu": ["e1"]},
)


@pytest.mark.parametrize(
    ("method", "name", "params", "expected"),
    [
        (b"tools/call", b"render_png", {}, "0"),
        (b"tools/call", b64("render_ü"), {}, "0"),
        (b"prompts/get", b"render_png", {}, None),  # method differs
        (b"tools/call", b"Render_png", {}, None),  # globs are case-sensitive
        (b"tools/call", b"x", {"Mcp-Param-Region": b"eu"}, "1"),
        (b"tools/call", b"x", {"Mcp-Param-Region": b64("eu")}, "1"),
        (b"tools/call", b"x", {"Mcp-Param-Region": b"EU"}, None),  # values match exactly
        (b"tools/call", b"render_x", {"Mcp-Param-Region": b"eu"}, "0"),  # first match wins
        (b"tools/call", b"drop_db", {}, "deny"),
        (b"tools/list", None, {}, None),
        (b"tools/call", b"a1", {}, "3"),
        (b"tools/call", b"a12", {}, None),
    ],
)
def test_first_matching_rule(
    method: bytes, name: bytes | None, params: dict[str, bytes], expected: str | None
) -> None:
    lookup = header_lookup([(k.lower().encode(), k.encode(), v) for k, v in params.items()])
    rule = RULES.match(method, name, lookup)
    assert (rule.label if rule is not None else None) == expected


def test_rule_targets() -> None:
    heavy, _eu, drop, _ = RULES.rules
    assert heavy.pool == frozenset({"g1", "g2"})
    assert heavy.deny is None
    assert drop.pool is None
    assert drop.deny is not None
    assert issubclass(drop.deny, Denied)
    assert drop.deny().status == 403


def test_malformed_base64_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="base64"):
        RULES.match(b"tools/call", b"=?base64?@@@?=", header_lookup([]))


def test_deny_status_and_body() -> None:
    rule = compile_rules([RouteConfig(name="x", deny=429)], {}).rules[0]
    assert rule.deny is not None
    answer = render_error(rule.deny(), keep_alive=True)
    assert answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "Denied by a routing rule"},
    }


# --- config --------------------------------------------------------------------------------------------


def config(**top: object) -> dict[str, object]:
    backends = [{"name": n, "url": f"http://127.0.0.1:{8000 + i}"} for i, n in enumerate(["g1", "g2", "e1"])]
    return {"backends": backends, **top}


def test_pools_routes_affinity_parse() -> None:
    parsed = parse_config(
        config(
            pools={"heavy": ["g1", "g2"]},
            routes=[
                {"match": {"method": "tools/call", "name": "render_*"}, "pool": "heavy"},
                {"match": {"param": {"Region": "eu"}}, "deny": 403},
            ],
            affinity={"tasks": True, "request_state": True, "max_entries": 10, "task_ttl": 60},
            validate_headers=True,
        )
    )
    assert parsed.pools == {"heavy": ("g1", "g2")}
    assert parsed.routes == (
        RouteConfig(method="tools/call", name="render_*", pool="heavy"),
        RouteConfig(params=(("Region", "eu"),), deny=403),
    )
    assert parsed.affinity == AffinityConfig(tasks=True, request_state=True, max_entries=10, task_ttl=60.0)
    assert parsed.validate_headers


def test_routing_defaults() -> None:
    parsed = parse_config(config())
    assert (parsed.pools, parsed.routes, parsed.affinity, parsed.validate_headers) == (
        {},
        (),
        AffinityConfig(),
        False,
    )


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"pools": {"heavy": ["g1", "gpu9"]}}, "pools.heavy[1]: unknown backend 'gpu9'"),
        ({"pools": {"heavy": []}}, "pools.heavy: must have at least one entry"),
        ({"pools": ["g1"]}, "pools: must be a mapping"),
        ({"routes": [{"match": {}, "pool": "nope"}]}, "routes[0].pool: unknown pool 'nope'"),
        ({"routes": [{"match": {}, "deny": 200}]}, "routes[0].deny: must be an HTTP 4xx status"),
        ({"routes": [{"match": {}, "deny": 499}]}, "routes[0].deny: must be an HTTP 4xx status"),
        ({"routes": [{"match": {}, "deny": "403"}]}, "routes[0].deny: must be an integer"),
        ({"routes": [{"match": {}}]}, "routes[0]: needs exactly one of `pool`"),
        ({"pools": {"p": ["g1"]}, "routes": [{"pool": "p", "deny": 403}]}, "routes[0]: needs exactly one"),
        ({"routes": [{"match": {"tool": "x"}, "deny": 403}]}, "routes[0].match.tool: unknown key"),
        ({"routes": [{"match": {"param": {"Region": 1}}, "deny": 403}]}, "routes[0].match.param: Region"),
        (
            {"routes": [{"match": {"param": {"Re gion": "x"}}, "deny": 403}]},
            "routes[0].match.param: 'Re gion'",
        ),
        ({"affinity": {"tasks": "yes"}}, "affinity.tasks: must be true or false"),
        ({"affinity": {"sticky": True}}, "affinity.sticky: unknown key"),
        ({"validate_headers": 1}, "validate_headers: must be true or false"),
    ],
)
def test_invalid_routing_config(top: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(**top), "cfg.yaml")
    assert str(info.value).startswith(f"cfg.yaml: {message}"), str(info.value)


# --- affinity ----------------------------------------------------------------------------------------


def test_affinity_map_expires_and_is_bounded() -> None:
    clock = FakeClock()
    amap = AffinityMap(2, clock)
    amap.put("t1", "a", 10)
    amap.put("t2", "b", 10)
    assert amap.get("t1") == "a"  # t1 is now the most recently used
    amap.put("t3", "c", 10)
    assert (amap.get("t2"), amap.get("t1"), amap.get("t3")) == (None, "a", "c")
    clock.now += 10
    assert amap.get("t1") is None
    assert len(amap) == 1


def test_affinity_learns_tasks_with_their_ttl_and_states_by_digest() -> None:
    clock = FakeClock()
    aff = Affinity(AffinityConfig(tasks=True, request_state=True, task_ttl=60), clock)
    aff.learn({"result": {"resultType": "task", "taskId": "t-1", "ttlMs": 5000}}, "a")
    aff.learn({"result": {"resultType": "task", "taskId": "t-2", "ttlMs": None}}, "b")
    aff.learn({"result": {"resultType": "input_required", "requestState": "sealed"}}, "c")
    aff.learn({"result": {"resultType": "complete", "taskId": "t-3"}}, "c")
    aff.learn({"error": {"code": 1}}, "c")
    assert aff.tasks is not None
    assert aff.states is not None
    assert (aff.tasks.get("t-1"), aff.tasks.get("t-2"), aff.tasks.get("t-3")) == ("a", "b", None)
    assert aff.states.get(state_digest("sealed")) == "c"
    clock.now += 5
    assert (aff.tasks.get("t-1"), aff.tasks.get("t-2")) == (None, "b")  # ttlMs, then the cap
    clock.now += 55
    assert aff.tasks.get("t-2") is None


def test_sniffer_reads_sse_events_split_anywhere() -> None:
    message = {"jsonrpc": "2.0", "id": 1, "result": {"resultType": "task", "taskId": "x"}}
    body = (
        b": ping\r\n\r\nevent: message\r\ndata: "
        + json.dumps({"jsonrpc": "2.0", "method": "notifications/progress"}).encode()
        + b"\r\n\r\nevent: message\r\ndata: "
        + json.dumps(message).encode()
        + b"\r\n\r\n"
    )
    for cut in range(1, len(body)):
        sniffer = ResultSniffer(sse=True, expected=None)
        assert sniffer.feed(body[:cut]) + sniffer.feed(body[cut:]) == [message]


def test_sniffer_reads_json_at_its_length_or_end() -> None:
    body = json.dumps({"id": 1, "result": {"resultType": "input_required", "requestState": "s"}}).encode()
    sized = ResultSniffer(sse=False, expected=len(body))
    assert sized.feed(body[:10]) == []
    assert sized.feed(body[10:]) == [json.loads(body)]
    assert sized.finish() == []
    unsized = ResultSniffer(sse=False, expected=None)
    assert unsized.feed(body) == []
    assert unsized.finish() == [json.loads(body)]
    spaced = b'{"result": {"resultType" : "task", "taskId": "t"}}'
    assert ResultSniffer(sse=False, expected=len(spaced)).feed(spaced) == [json.loads(spaced)]
    for plain in (b'{"result": {"content": []}}', b'{"result": {"resultType": "complete", "taskId": "t"}}'):
        sniffer = ResultSniffer(sse=False, expected=None)
        assert sniffer.feed(plain) == []
        assert sniffer.finish() == []


# --- strict header check -------------------------------------------------------------------------------


def body(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def test_check_accepts_agreeing_headers() -> None:
    assert check(b"tools/call", b"echo", body("tools/call", name="echo"))["method"] == "tools/call"
    assert check(b"tools/call", b64("écho"), body("tools/call", name="écho"))
    assert check(b"resources/read", b"file:///x", body("resources/read", uri="file:///x"))
    assert check(b"tasks/get", b"t1", body("tasks/get", taskId="t1"))
    assert check(b"tools/list", None, body("tools/list"))


@pytest.mark.parametrize(
    ("method", "name", "raw"),
    [
        (b"tools/call", b"other", body("tools/call", name="echo")),
        (b"tools/call", None, body("tools/call", name="echo")),
        (b"tools/list", b"echo", body("tools/call", name="echo")),
        (None, None, body("tools/list")),
        (b"tasks/cancel", b"t2", body("tasks/cancel", taskId="t1")),
    ],
)
def test_check_refuses_disagreeing_headers(method: bytes | None, name: bytes | None, raw: bytes) -> None:
    with pytest.raises(HeaderMismatch) as info:
        check(method, name, raw)
    assert info.value.status == 400
    assert info.value.rpc_code == -32020


def test_check_refuses_a_body_that_is_not_one_json_object() -> None:
    for raw in (b"{", b"[]", b"\xff"):
        with pytest.raises(BadRequest):
            check(b"tools/call", b"x", raw)


# --- the router's modern path --------------------------------------------------------------------------


def test_router_counts_rule_hits_and_affinity_lookups() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    a, b = Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)
    affinity = Affinity(AffinityConfig(tasks=True))
    router = Router(
        BackendSet([a, b]), LeastSessions(random.Random(1)), MemoryStore(), 60.0, metrics, affinity=affinity
    )
    rules = RouteRules(
        compile_rules([RouteConfig(method="tools/call", name="w*", pool="p")], {"p": ["b"]}), metrics
    )
    for _ in range(3):
        facts = classify(b"POST", None, MODERN, b"tools/call", b"whoami", headers())
        rules.request(_NO_CONTEXT, facts)
        assert router.route(facts) is b
        assert facts.watch
    router.learn_result(a, {"result": {"resultType": "task", "taskId": "t9"}})
    assert router.route(classify(b"POST", None, MODERN, b"tasks/get", b"t9")) is a
    assert router.route(classify(b"POST", None, MODERN, b"tasks/get", b64("t9"))) is a
    router.route(classify(b"POST", None, MODERN, b"tasks/get", b"unknown"))
    a.up = False  # the owner is down: balance among the others
    assert router.route(classify(b"POST", None, MODERN, b"tasks/get", b"t9")) is b

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("mcpbalancer_route_rule_hits_total", rule="0") == 3
    assert value("mcpbalancer_affinity_lookups_total", kind="tasks", result="hit") == 2
    assert value("mcpbalancer_affinity_lookups_total", kind="tasks", result="miss") == 2
    assert value("mcpbalancer_affinity_lookups_total", kind="request_state", result="hit") == 0


@pytest.mark.parametrize("version", [MODERN, b"1999-01-01"])
async def test_no_2026_feature_applies_to_a_request_with_a_session_id(version: bytes) -> None:
    # A session id makes the request legacy: no rule denies or pools it, no affinity map or strict
    # check reads it, whatever its Mcp-* headers and its version say. It goes to its session's owner.
    a, b = Backend("a", "127.0.0.1", 1), Backend("b", "127.0.0.1", 2)
    router = Router(
        BackendSet([a, b]),
        LeastSessions(random.Random(1)),
        MemoryStore(),
        60.0,
        affinity=Affinity(AffinityConfig(tasks=True, request_state=True)),
    )
    phases = compose(
        [
            RouteRules(compile_rules([RouteConfig(deny=403)], {}), Metrics(CollectorRegistry())),
            StrictHeaders(),
            RequestStateKey(),
        ]
    )
    assert phases.request is not None
    assert phases.wants_body is not None
    bind = router.learn(classify(b"POST", None, None), b, 200, b"s1")
    assert bind is not None
    await bind
    cases = [(b"tools/call", b"drop_db"), (b"tasks/get", b"t1"), (b"tools/call", b"=?base64?%?=")]
    for method, name in cases:
        facts = classify(b"POST", b"s1", version, method, name, headers(Mcp_Method=method))
        phases.request(_NO_CONTEXT, facts)  # no deny rule applies
        assert not phases.wants_body(facts)
        assert router.route(facts) is b
        assert (facts.pool, facts.watch) == (None, False)
    await router.close()


# --- the data plane picks Mcp-Name out only when routing reads it -----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "filters", "captured"),
    [
        ({}, [], False),
        (
            {},
            [RouteRules(compile_rules([RouteConfig(name="x", deny=403)], {}), Metrics(CollectorRegistry()))],
            True,
        ),
        ({"affinity": Affinity(AffinityConfig(tasks=True))}, [], True),
        ({"affinity": Affinity(AffinityConfig(request_state=True))}, [RequestStateKey()], False),
        ({}, [StrictHeaders()], True),
    ],
)
async def test_mcp_name_is_captured_only_when_read(
    kwargs: dict[str, Any], filters: list[object], captured: bool
) -> None:
    router = Router(
        BackendSet([Backend("a", "127.0.0.1", 1)]),
        LeastSessions(random.Random(1)),
        MemoryStore(),
        60.0,
        **kwargs,
    )
    plane = DataPlane(
        router,
        {},
        heartbeat=0,
        timeouts=TimeoutsConfig(),
        limits=LimitsConfig(),
        loop=asyncio.get_running_loop(),
        phases=compose(filters),
    )
    assert (b"mcp-name" in plane.capture) is captured
    assert not any(name.startswith(b"mcp-param-") for name in plane.capture)


async def test_shared_affinity_failures_are_misses() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: connections are refused
    shared = SharedAffinity.from_url(f"redis://127.0.0.1:{port}/0", prefix="mcpb:")
    try:
        await shared.put("tasks", "t1", "a", 10)
        assert await shared.get("tasks", "t1") is None
    finally:
        await shared.close()
