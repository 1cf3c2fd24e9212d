"""Several MCP services behind one listener, with real parts: two servers of different tool sets
(FastMCP subprocesses, two instances each), the real mcp client, the backends' own ledgers (which
count every request and every session id they were sent)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config
from tests.fixtures.backends import LEDGER_PATH, BackendProcess, start_all, stop_all
from tests.fixtures.proxy import DictProxy
from tests.mcp_helpers import (
    INIT_BODY,
    INIT_HEADERS,
    call_tool,
    open_session,
    recorded_client,
    redis_keys,
    text_of,
    wait_until,
)

SESSIONS = 20  # concurrent SDK sessions per service
SEALED: dict[str, Any] = {
    "session_ids": "sealed",
    "session_keys": ["A" * 43 + "="],
}  # sealed for each service


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, list[BackendProcess]]]:
    """Two servers of different tool sets, two instances each: `gh_search` on gh-1 and gh-2,
    `docs_search` on docs-1 and docs-2."""
    servers = {
        "gh": [
            BackendProcess(f"gh-{i}", extra_args=["--tool", "gh_search", "--ledger-path", LEDGER_PATH])
            for i in (1, 2)
        ],
        "docs": [
            BackendProcess(f"docs-{i}", extra_args=["--tool", "docs_search", "--ledger-path", LEDGER_PATH])
            for i in (1, 2)
        ],
    }
    every = [b for group in servers.values() for b in group]
    try:
        start_all(every)
        yield servers
    finally:
        stop_all(every)


def entries(group: list[BackendProcess]) -> list[dict[str, str]]:
    return [{"name": b.name, "url": b.mcp_url} for b in group]


def two_services(fleet: dict[str, list[BackendProcess]], **top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "health": {"interval": 0},
        "services": [
            {"name": "github", "match": {"path_prefix": "/github"}, "backends": entries(fleet["gh"])},
            {"name": "docs", "match": {"path_prefix": "/docs"}, "backends": entries(fleet["docs"])},
        ],
        **top,
    }


async def ledger(backend: BackendProcess) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(backend.url + LEDGER_PATH) as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def ledgers(fleet: dict[str, list[BackendProcess]]) -> dict[str, dict[str, Any]]:
    return {b.name: await ledger(b) for group in fleet.values() for b in group}


async def reached(
    fleet: dict[str, list[BackendProcess]], web: aiohttp.ClientSession, url: str
) -> dict[str, dict[str, int]]:
    """GET `url`: which backends saw which paths for it (by their ledgers), as {name: {path: n}}."""
    before = await ledgers(fleet)
    async with web.get(url) as resp:
        await resp.read()
    after = await ledgers(fleet)
    seen: dict[str, dict[str, int]] = {}
    for name, now in after.items():
        then = before[name]["paths"]
        paths = {p: n - then.get(p, 0) for p, n in now["paths"].items() if n != then.get(p, 0)}
        if paths:
            seen[name] = paths
    return seen


async def one_session(url: str, tool: str) -> tuple[str, str, str, set[str]]:
    """An SDK session: (the session id, whoami's answer, `tool`'s answer, the tools listed)."""
    async with recorded_client(url, mode="legacy") as (client, wire):
        tools = {t.name for t in (await client.list_tools()).tools}
        whoami = text_of(await client.call_tool("whoami"))
        answer = text_of(await client.call_tool(tool))
        return wire.session_id, whoami, answer, tools


@pytest.mark.parametrize("session_ids", ["plain", "sealed"])
async def test_twenty_sessions_on_each_service_stay_on_their_servers(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, session_ids: str
) -> None:
    proxy = await dict_proxy(two_services(fleet, **(SEALED if session_ids == "sealed" else {})))
    before = await ledgers(fleet)
    runs = [one_session(f"{proxy.url}/github/mcp", "gh_search") for _ in range(SESSIONS)]
    runs += [one_session(f"{proxy.url}/docs/mcp", "docs_search") for _ in range(SESSIONS)]
    results = await asyncio.gather(*runs)
    github, docs = results[:SESSIONS], results[SESSIONS:]
    for group, prefix, tool in ((github, "gh", "gh_search"), (docs, "docs", "docs_search")):
        for _, whoami, answer, tools in group:
            assert whoami.startswith(f"{prefix}-"), (prefix, whoami)  # 0 misroutes
            assert answer == f"{tool}@{whoami}"  # every call of the session at the same instance
            assert tool in tools
            assert {"gh_search", "docs_search"} - tools == {"docs_search" if prefix == "gh" else "gh_search"}
        assert len({sid for sid, *_ in group}) == SESSIONS
    assert {w for _, w, _, _ in github} == {"gh-1", "gh-2"}  # balanced within the service
    after = await ledgers(fleet)
    for name, now in after.items():
        # 0 cross-service requests: no backend was sent a session id it does not own.
        assert now["stray_total"] == before[name]["stray_total"], (name, now["stray"])
    issued_gh = {s for b in fleet["gh"] for s in set(after[b.name]["issued"]) - set(before[b.name]["issued"])}
    issued_docs = {
        s for b in fleet["docs"] for s in set(after[b.name]["issued"]) - set(before[b.name]["issued"])
    }
    assert len(issued_gh) == len(issued_docs) == SESSIONS  # one session per SDK client, on its servers


@pytest.mark.parametrize("session_ids", ["plain", "sealed"])
async def test_a_session_of_one_service_is_unknown_at_another(
    fleet: dict[str, list[BackendProcess]],
    dict_proxy: DictProxy,
    web: aiohttp.ClientSession,
    session_ids: str,
) -> None:
    proxy = await dict_proxy(two_services(fleet, **(SEALED if session_ids == "sealed" else {})))
    github, docs = f"{proxy.url}/github/mcp", f"{proxy.url}/docs/mcp"
    sid = await open_session(web, github)
    before = await ledgers(fleet)
    answer = await call_tool(web, docs, sid, "whoami")
    assert answer.status == 404
    assert answer.json()["error"]["code"] == -32600
    after = await ledgers(fleet)
    assert [after[b.name]["paths"] for b in fleet["docs"]] == [before[b.name]["paths"] for b in fleet["docs"]]
    if session_ids == "sealed":  # a token sealed for github does not open at docs
        invalid = proxy.metrics.registry.get_sample_value(
            "mcpbalancer_sealed_ids_total", {"result": "invalid"}
        )
        assert invalid == 1
    assert (await call_tool(web, github, sid, "whoami")).text.startswith("gh-")  # still fine at home


async def test_the_prefix_is_stripped_unless_the_service_says_not_to(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    data = two_services(fleet)
    data["services"][1]["strip_prefix"] = False
    proxy = await dict_proxy(data)
    async with web.get(f"{proxy.url}/github/whoami?x=1") as resp:  # the backends' echo route
        echo = await resp.json()
    assert echo["name"].startswith("gh-")
    assert (echo["path"], echo["query"]) == ("/whoami", "x=1")
    seen = await reached(fleet, web, f"{proxy.url}/docs/whoami")
    [(name, paths)] = seen.items()
    assert name.startswith("docs-")
    assert paths == {"/docs/whoami": 1}  # sent as it came: the docs servers have no /docs/whoami


async def test_a_service_by_host_and_the_longest_prefix(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    gh1, gh2 = fleet["gh"]
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "health": {"interval": 0},
        "backends": entries(fleet["docs"][:1]),  # the default service: docs-1
        "services": [
            {"name": "docs", "match": {"host": "docs.localhost"}, "backends": entries(fleet["docs"][1:])},
            {"name": "github", "match": {"path_prefix": "/github"}, "backends": [entries(fleet["gh"])[0]]},
            {
                "name": "enterprise",
                "match": {"path_prefix": "/github/enterprise"},
                "backends": [entries(fleet["gh"])[1]],
            },
        ],
    }
    proxy = await dict_proxy(data)

    async def echo(path: str, host: str | None = None) -> tuple[str, str]:
        headers = {"Host": f"{host}:{proxy.port}"} if host else {}
        async with web.get(proxy.url + path, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            return body["name"], body["path"]

    assert await echo("/whoami") == ("docs-1", "/whoami")  # no service matches: the default
    assert await echo("/whoami", host="docs.localhost") == ("docs-2", "/whoami")  # same path, other Host
    # allowed_hosts unset: the services' hosts are allowed besides the loopback names, no other.
    async with web.get(f"{proxy.url}/whoami", headers={"Host": "evil.localhost"}) as resp:
        assert resp.status == 421
    assert await echo("/github/whoami") == (gh1.name, "/whoami")
    assert await echo("/github/enterprise/whoami") == (gh2.name, "/whoami")  # the longest prefix
    segments = await reached(fleet, web, f"{proxy.url}/github/enterprisex/whoami")
    assert segments == {gh1.name: {"/enterprisex/whoami": 1}}  # whole segments, not characters
    assert await reached(fleet, web, f"{proxy.url}/githubx/whoami") == {"docs-1": {"/githubx/whoami": 1}}


async def test_a_request_no_service_matches_gets_a_json_rpc_404_and_is_counted(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    proxy = await dict_proxy(two_services(fleet))
    before = await ledgers(fleet)
    async with web.post(f"{proxy.url}/mcp", json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["jsonrpc"] == "2.0"
    assert body["error"]["code"] == -32600
    assert "no service" in body["error"]["message"]
    rejected = proxy.metrics.registry.get_sample_value(
        "mcpbalancer_rejected_requests_total", {"reason": "no_service"}
    )
    assert rejected == 1
    after = await ledgers(fleet)
    assert all(after[n]["paths"] == before[n]["paths"] for n in after)  # no backend saw it
    async with web.get(f"{proxy.url}/healthz") as resp:  # the proxy's own paths before any service
        assert resp.status == 200
    async with web.get(f"{proxy.url}/nowhere", headers={"Host": "evil.example"}) as resp:
        assert resp.status == 421  # the Host check first, matched or not


async def test_discovery_documents_reach_the_service_their_path_names(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    data = two_services(fleet)
    data["backends"] = [{"name": "root", "url": fleet["docs"][0].mcp_url.replace("/mcp", "")}]
    data["services"][1]["backends"] = entries(fleet["docs"][1:])
    proxy = await dict_proxy(data)
    asked = {
        "/.well-known/oauth-protected-resource/github/mcp": (
            "gh",
            "/.well-known/oauth-protected-resource/mcp",
        ),
        "/.well-known/oauth-authorization-server/github": ("gh", "/.well-known/oauth-authorization-server"),
        "/.well-known/openid-configuration/docs": ("docs-2", "/.well-known/openid-configuration"),
        "/.well-known/oauth-protected-resource": ("docs-1", "/.well-known/oauth-protected-resource"),
        "/github/authorize": ("gh", "/authorize"),
        "/github/token": ("gh", "/token"),
        "/github/register": ("gh", "/register"),
        "/github/auth/callback": ("gh", "/auth/callback"),
    }
    for target, (where, path) in asked.items():
        seen = await reached(fleet, web, proxy.url + target)
        assert len(seen) == 1, (target, seen)
        [(name, paths)] = seen.items()
        assert name.startswith(where), (target, name)
        assert paths == {path: 1}, (target, paths)


async def test_a_reload_removes_a_service_and_adds_one(
    fleet: dict[str, list[BackendProcess]], tmp_path: Path, web: aiohttp.ClientSession
) -> None:
    path = tmp_path / "services.yaml"
    data = two_services(fleet)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        github, docs = f"{proxy.url}/github/mcp", f"{proxy.url}/docs/mcp"
        gh_sid, docs_sid = await open_session(web, github), await open_session(web, docs)
        removed = {**data, "services": data["services"][:1]}
        path.write_text(yaml.safe_dump(removed), encoding="utf-8")
        changes = proxy.reload()
        assert sorted(changes.removed) == ["docs-1", "docs-2"]
        assert (await call_tool(web, docs, docs_sid, "whoami")).status == 404  # its sessions end
        assert set(proxy.services) == {"github"}
        assert (await call_tool(web, github, gh_sid, "whoami")).text.startswith("gh-")  # unaffected
        async with web.post(docs, json=INIT_BODY, headers=INIT_HEADERS) as resp:
            assert resp.status == 404  # nothing serves /docs now

        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        changes = proxy.reload()
        assert sorted(changes.added) == ["docs-1", "docs-2"]

        async def docs_serves() -> bool:
            async with web.post(docs, json=INIT_BODY, headers=INIT_HEADERS) as resp:
                return resp.status == 200

        await wait_until(docs_serves, "the added service to serve")
        new_sid = await open_session(web, docs)
        assert (await call_tool(web, docs, new_sid, "docs_search")).text.startswith("docs_search@docs-")
        assert (await call_tool(web, github, gh_sid, "whoami")).text.startswith("gh-")
    finally:
        await proxy.stop()


async def test_a_reload_changes_a_services_settings_and_match(
    fleet: dict[str, list[BackendProcess]],
    tmp_path: Path,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "services.yaml"
    data = two_services(fleet)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        data["services"][0]["match"] = {"path_prefix": "/gh"}
        data["services"][0]["balance"] = "round_robin"
        data["services"][0]["backends"] = entries(fleet["gh"][:1])
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        with caplog.at_level(logging.INFO, logger="mcpbalancer.app"):
            changes = proxy.reload()
        assert changes.removed == ["gh-2"]
        assert any(
            "service github now matches" in r.getMessage() and "/gh'" in r.getMessage()
            for r in caplog.records
        )
        assert proxy.services["github"].config.balance == "round_robin"
        async with web.post(f"{proxy.url}/github/mcp", json=INIT_BODY, headers=INIT_HEADERS) as resp:
            assert resp.status == 404
        sid = await open_session(web, f"{proxy.url}/gh/mcp")
        assert (await call_tool(web, f"{proxy.url}/gh/mcp", sid, "whoami")).text == "gh-1"
    finally:
        await proxy.stop()


async def test_the_admin_api_lists_and_drains_services(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    proxy = await dict_proxy(two_services(fleet, admin="127.0.0.1:0"))
    assert proxy.control is not None
    admin = f"http://127.0.0.1:{proxy.control.port}"
    async with web.get(f"{admin}/admin/services") as resp:
        assert resp.status == 200
        listed = (await resp.json())["services"]
    assert [s["name"] for s in listed] == ["github", "docs"]
    assert listed[0]["match"] == {
        "host": None,
        "path_prefix": "/github",
        "strip_prefix": True,
        "default": False,
    }
    assert [b["name"] for b in listed[0]["backends"]] == ["gh-1", "gh-2"]
    async with web.get(f"{admin}/admin/backends") as resp:  # every service's backends
        assert [b["name"] for b in (await resp.json())["backends"]] == ["gh-1", "gh-2", "docs-1", "docs-2"]

    async with web.post(f"{admin}/admin/services/github/drain") as resp:
        assert resp.status == 200
        drained = await resp.json()
    assert drained == {
        "service": "github",
        "backends": [{"name": "gh-1", "state": "drained"}, {"name": "gh-2", "state": "drained"}],
    }
    async with web.post(f"{proxy.url}/github/mcp", json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 503  # no new session on a drained service
    assert (await one_session(f"{proxy.url}/docs/mcp", "docs_search"))[1].startswith(
        "docs-"
    )  # the other serves

    async with web.post(f"{admin}/admin/services/github/undrain") as resp:
        assert resp.status == 200
    assert (await one_session(f"{proxy.url}/github/mcp", "gh_search"))[1].startswith("gh-")
    async with web.post(f"{admin}/admin/services/nope/drain") as resp:
        assert resp.status == 404
        assert json.loads(await resp.text()) == {"error": "unknown service 'nope'"}
    async with web.post(f"{admin}/admin/backends/docs-1/drain") as resp:  # by backend, in any service
        assert (await resp.json()) == {"backend": "docs-1", "state": "drained"}
    async with web.get(f"{admin}/") as resp:  # the status page: one section per service
        page = await resp.text()
    assert '<section class="service" data-service="github">' in page
    assert '<section class="service" data-service="docs">' in page
    assert 'data-service="default"' not in page  # no top-level backends: no default service


async def test_the_access_log_names_the_service(
    fleet: dict[str, list[BackendProcess]], web: aiohttp.ClientSession, tmp_path: Path
) -> None:
    import io

    from mcpbalancer.config import parse_config

    stream = io.StringIO()
    proxy = Proxy(parse_config(two_services(fleet, log={"format": "json"})), access_stream=stream)
    await proxy.start()
    try:
        await open_session(web, f"{proxy.url}/docs/mcp")
        async with web.get(f"{proxy.url}/nowhere") as resp:
            assert resp.status == 404
    finally:
        await proxy.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    services = [(line["service"], line.get("status")) for line in lines]
    assert ("docs", 200) in services
    assert ("default", 404) in services


async def test_the_request_metrics_carry_the_service(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    proxy = await dict_proxy(two_services(fleet))
    await open_session(web, f"{proxy.url}/docs/mcp")
    async with web.get(f"{proxy.url}/nowhere") as resp:
        assert resp.status == 404
    sid = await open_session(web, f"{proxy.url}/github/mcp")
    assert (await call_tool(web, f"{proxy.url}/docs/mcp", sid, "whoami")).status == 404  # the proxy's own

    def total(**labels: str) -> float:
        samples = [
            s
            for metric in proxy.metrics.registry.collect()
            if metric.name == "mcpbalancer_requests"
            for s in metric.samples
            if s.name == "mcpbalancer_requests_total" and labels.items() <= s.labels.items()
        ]
        return sum(s.value for s in samples)

    assert total(service="docs", code="2xx") == 2  # initialize, notifications/initialized
    assert total(service="github", code="2xx") == 2
    assert total(service="docs", backend="none", code="4xx") == 1  # github's session at docs
    assert total(service="default", backend="none", code="4xx") == 1  # matched no service
    assert all(
        s.labels["service"] == ("github" if s.labels["backend"].startswith("gh-") else "docs")
        for metric in proxy.metrics.registry.collect()
        if metric.name == "mcpbalancer_request_duration_seconds"
        for s in metric.samples
        if s.name.endswith("_count")
    )


async def test_the_admin_command_lists_the_services(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    from mcpbalancer.cli import main

    proxy = await dict_proxy(two_services(fleet, admin="127.0.0.1:0"))
    assert proxy.control is not None
    capsys.readouterr()
    url = f"http://127.0.0.1:{proxy.control.port}"
    code = await asyncio.to_thread(main, ["admin", "services", "--url", url])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "service github: /github"
    assert lines[1].split()[:2] == ["NAME", "STATE"]
    assert [line.split()[0] for line in lines[2:4]] == ["gh-1", "gh-2"]
    assert "service docs: /docs" in lines


async def test_the_supervisor_lists_and_drains_a_service_on_every_worker(
    start_cluster: Any, backends: list[BackendProcess]
) -> None:
    c = backends[2]
    service = {"name": "other", "match": {"path_prefix": "/other"}, "backends": [{"name": "c", "url": c.url}]}
    extra = yaml.safe_dump({"services": [service]})
    cluster = await start_cluster(extra=extra)
    status, body = await cluster.admin_call("GET", "/admin/services")
    assert status == 200, body
    assert [s["name"] for s in body["services"]] == ["default", "other"]
    assert [b["name"] for b in body["services"][1]["backends"]] == ["c"]
    assert body["services"][1]["backends"][0]["states"] == {"up": 2}  # both workers answered
    status, body = await cluster.admin_call("POST", "/admin/services/other/drain")
    assert status == 200, body
    assert body["applied"] is True
    assert [(b["name"], b["state"]) for b in body["backends"]] == [("c", "drained")]
    status, body = await cluster.admin_call("GET", "/admin/services")
    assert body["services"][1]["backends"][0]["states"] == {"drained": 2}
    assert body["services"][0]["backends"][0]["state"] == "up"  # the other service is untouched
    status, _ = await cluster.admin_call("POST", "/admin/services/nope/drain")
    assert status == 404


async def test_a_service_with_auth_tells_the_client_its_own_urls(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    import hashlib

    key = "services-key-0001"
    data = two_services(fleet)
    data["services"][0]["auth"] = {
        "api_keys": [{"name": "ci", "sha256": hashlib.sha256(key.encode()).hexdigest()}],
        "authorization_servers": ["https://idp.example"],
    }
    proxy = await dict_proxy(data)
    base = f"http://127.0.0.1:{proxy.port}"
    async with web.post(f"{proxy.url}/github/mcp", json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 401
        challenge = resp.headers["WWW-Authenticate"]
    assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/github/mcp"' in challenge
    async with web.get(f"{proxy.url}/.well-known/oauth-protected-resource/github/mcp") as resp:
        assert resp.status == 200
        document = await resp.json()
    assert document["resource"] == f"{base}/github/mcp"
    assert document["authorization_servers"] == ["https://idp.example"]
    headers = {**INIT_HEADERS, "Authorization": f"Bearer {key}"}
    async with web.post(f"{proxy.url}/github/mcp", json=INIT_BODY, headers=headers) as resp:
        assert resp.status == 200
    async with web.post(f"{proxy.url}/docs/mcp", json=INIT_BODY, headers=INIT_HEADERS) as resp:
        assert resp.status == 200  # the other service has no auth


async def test_a_listener_that_cannot_bind_leaves_no_service_running(
    fleet: dict[str, list[BackendProcess]],
) -> None:
    import socket

    from mcpbalancer.config import parse_config
    from mcpbalancer.errors import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = Proxy(parse_config(two_services(fleet, listen=f"127.0.0.1:{port}")))
        with pytest.raises(ListenError):
            await proxy.start()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert pending == []  # no health checker, sweeper or store listener of any service was left


async def test_with_redis_each_service_keeps_its_sessions_under_its_own_prefix(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession, redis_url: str
) -> None:
    data = two_services(fleet, store=redis_url)
    data["backends"] = entries(fleet["docs"][:1])  # the default service
    data["services"] = data["services"][:1]  # and github
    proxy = await dict_proxy(data)
    default_sid = await open_session(web, f"{proxy.url}/mcp")
    github_sid = await open_session(web, f"{proxy.url}/github/mcp")
    # The default service keeps the keys a proxy without services writes; github has its own.
    assert await redis_keys(redis_url, "mcpb:s:*") == [f"mcpb:s:{default_sid}"]
    assert await redis_keys(redis_url, "mcpb:svc:github:s:*") == [f"mcpb:svc:github:s:{github_sid}"]
    assert (await call_tool(web, f"{proxy.url}/mcp", github_sid, "whoami")).status == 404
    assert (await call_tool(web, f"{proxy.url}/github/mcp", default_sid, "whoami")).status == 404
    assert (await call_tool(web, f"{proxy.url}/github/mcp", github_sid, "whoami")).text.startswith("gh-")


async def test_a_services_own_stream_settings_hold_for_its_requests_only(
    fleet: dict[str, list[BackendProcess]], dict_proxy: DictProxy, web: aiohttp.ClientSession
) -> None:
    data = two_services(fleet)
    data["services"][0].update(heartbeat=0, timeouts={"stream_idle": 0.5})  # github cuts quiet streams
    proxy = await dict_proxy(data)
    github, docs = f"{proxy.url}/github/mcp", f"{proxy.url}/docs/mcp"
    gh_sid, docs_sid = await open_session(web, github), await open_session(web, docs)

    async def slow(url: str, sid: str) -> str | None:
        """The slow tool's answer, or None when the proxy ended the stream before it."""
        try:
            return (await call_tool(web, url, sid, "slow", seconds=1.5)).text
        except aiohttp.ClientPayloadError:
            return None

    cut, answered = await asyncio.gather(slow(github, gh_sid), slow(docs, docs_sid))
    assert cut is None
    assert answered is not None
    assert answered.startswith("docs-")  # the top-level timeouts: no idle cut
    assert proxy.services["github"].config.timeouts.stream_idle == 0.5
    assert proxy.config.timeouts.stream_idle == 0
