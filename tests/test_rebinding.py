"""DNS rebinding (issue 11, item 11): the proxy checks `Host` against `allowed_hosts`, and the default
`Origin` rule checks the origin's host against that list, not against the request's own `Host`.

A rebinding page sends `Host: evil.example.com` and `Origin: http://evil.example.com`; the backend
never sees that Host (the proxy sends the backend its own), so the proxy is the only place to refuse
it. The official conformance scenario runs in tests/test_conformance.py; these tests need no node.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config, parse_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.filters.front_door import FrontDoor
from mcpbalancer.filters.hosts import SEEN_LIMIT, HostPolicy, for_listen, hostname, is_loopback
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.rawhttp import ClientFactory, request, rpc_error, until_eof
from tests.fixtures.stub import StubFactory
from tests.mcp_helpers import INIT_BODY, INIT_HEADERS, mcp_url, recorded_client, text_of

EVIL = "evil.example.com"


def rejected(proxy: Proxy, reason: str) -> float:
    registry = proxy.metrics.registry
    return registry.get_sample_value("mcpbalancer_rejected_requests_total", {"reason": reason}) or 0.0


# --- the policy, without sockets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"localhost", True),
        (b"localhost:8080", True),  # any port
        (b"LOCALHOST:1", True),
        (b"127.0.0.1:8080", True),
        (b"[::1]:8080", True),
        (b"[::1]", True),
        (b"evil.example.com", False),
        (b"evil.example.com:8080", False),
        (b"localhost.evil.example.com", False),
        (b"127.0.0.1.nip.io", False),
        (b"127.0.0.2", False),  # an IP literal, but not one of the names
        (b"[::2]:80", False),
        (b"", False),
    ],
)
def test_loopback_default_allows_the_loopback_names_only(host: bytes, allowed: bool) -> None:
    policy = for_listen(None, "127.0.0.1")
    assert policy.allows(host) is allowed
    assert policy.allows(host) is allowed  # the cached answer is the same


@pytest.mark.parametrize(
    ("patterns", "host", "allowed"),
    [
        (["mcp.example.com"], b"mcp.example.com:443", True),
        (["mcp.example.com"], b"MCP.Example.com", True),
        (["mcp.example.com"], b"localhost", False),  # a list is the whole list
        (["*.example.com"], b"a.b.example.com", True),
        (["*.example.com"], b"example.com", False),
        (["*.example.com"], b"evilexample.com", False),
        (["mcp-?.internal"], b"mcp-1.internal:8080", True),
        (["mcp-?.internal"], b"mcp-12.internal", False),
        (["a.test", "*.b.test", "c.test"], b"x.b.test", True),
        (["a.test", "*.b.test", "c.test"], b"c.test", True),
        (["a.test", "*.b.test", "c.test"], b"x.a.test", False),
        (["[::1]"], b"[::1]:80", True),
        (["*"], b"anything.at.all:1", True),
    ],
)
def test_explicit_lists_match_names_and_globs(patterns: list[str], host: bytes, allowed: bool) -> None:
    assert HostPolicy(patterns).allows(host) is allowed


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"10.0.0.5:8080", True),  # an IP literal cannot come from a rebinding page
        (b"[2001:db8::1]:8080", True),
        (b"localhost:8080", True),
        (b"mcpbalancer.default.svc:8080", False),  # a name: the operator lists it
        (b"evil.example.com", False),
        (b"10.0.0.5.evil.example.com", False),
    ],
)
def test_default_on_a_wildcard_listen_allows_ip_literals_and_loopback_names(
    host: bytes, allowed: bool
) -> None:
    policy = for_listen(None, "0.0.0.0")
    assert policy.ip_literals
    assert policy.allows(host) is allowed


def test_default_on_a_named_listen_allows_that_name() -> None:
    policy = for_listen(None, "mcp.internal")
    assert policy.allows(b"mcp.internal:8080")
    assert not policy.allows(b"other.internal:8080")
    assert for_listen(["only.example"], "mcp.internal").allows(b"mcp.internal") is False
    # An address is no name to add (any IP-address Host passes anyway), nor is a name Hosts cannot carry.
    assert for_listen(None, "2001:db8::5").patterns == for_listen(None, "10.0.0.5").patterns
    assert for_listen(None, "2001:db8::5").allows(b"[2001:db8::5]:8080")
    assert for_listen(None, "mcp.intérieur").patterns == for_listen(None, "0.0.0.0").patterns


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("mcp.internal", False),
    ],
)
def test_loopback_listen_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_hostname_strips_the_port_and_keeps_ipv6_brackets() -> None:
    assert [hostname(h) for h in (b"A.Example:80", b"a.example", b"[::1]:8080", b"[::1]", b" x:1 ")] == [
        b"a.example",
        b"a.example",
        b"[::1]",
        b"[::1]",
        b"x",
    ]


def test_the_decision_cache_is_bounded() -> None:
    policy = for_listen(None, "127.0.0.1")
    for i in range(SEEN_LIMIT * 3):
        assert not policy.allows(b"n%d.evil.example.com" % i)
        assert policy.allows(b"localhost:%d" % i)
    assert len(policy._refused) <= SEEN_LIMIT
    assert len(policy.known) <= SEEN_LIMIT
    assert b"localhost:1" not in policy.known
    assert policy.allows(b"localhost:1")
    assert not policy.allows(b"n1.evil.example.com")


# --- config ---------------------------------------------------------------------------------------


def minimal(**top: Any) -> dict[str, Any]:
    return {"backends": [{"name": "a", "url": "http://127.0.0.1:8001"}], **top}


def test_allowed_hosts_config() -> None:
    assert parse_config(minimal()).allowed_hosts is None
    assert parse_config(minimal(allowed_hosts=[])).allowed_hosts is None  # empty: the default
    config = parse_config(minimal(allowed_hosts=["MCP.example.com", "*.internal", "[::1]", "my_svc", "*"]))
    assert config.allowed_hosts == ("mcp.example.com", "*.internal", "[::1]", "my_svc", "*")


def test_allowed_hosts_is_documented_in_the_example_and_the_docs() -> None:
    root = Path(__file__).resolve().parents[1]
    example = root / "config" / "example.yaml"
    assert "\nallowed_hosts: []\n" in example.read_text(encoding="utf-8")
    assert load_config(example).allowed_hosts is None  # the example shows the default
    table = (root / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "\n| `allowed_hosts` | loopback names |" in table
    for page in ("monitoring.md", "security.md"):  # the metric's reason, and what it means
        assert "host_not_allowed" in (root / "docs" / page).read_text(encoding="utf-8"), page


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("*", "allowed_hosts: must be a list of host names, got '*'"),
        (
            ["mcp.example.com:8443"],
            "allowed_hosts[0]: must be '*', a host name, a glob like '*.example.com' or an IPv6 address in "
            "brackets, without a port (any port matches), got 'mcp.example.com:8443'",
        ),
        (["*", "http://mcp.example.com"], "allowed_hosts[1]: must be '*', a host name"),
        (["::1"], "allowed_hosts[0]: must be '*', a host name"),
        ([""], "allowed_hosts[0]: must not be empty"),
        ([1], "allowed_hosts[0]: must be a string"),
    ],
)
def test_allowed_hosts_invalid(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as failure:
        parse_config(minimal(allowed_hosts=value), "cfg.yaml")
    assert str(failure.value).startswith(f"cfg.yaml: {message}"), str(failure.value)


# --- through the proxy ----------------------------------------------------------------------------


async def test_a_rebinding_request_is_refused_with_421_before_any_backend(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])  # default config, loopback listener
    client = await open_client(proxy)
    client.send(request("POST", "/mcp", [("Origin", f"http://{EVIL}")], b"{}", host=EVIL))
    resp = await until_eof(client)
    assert resp.status == 421
    assert rpc_error(resp) == {
        "code": -32600,
        "message": f"Misdirected Request: Host '{EVIL}' is not in allowed_hosts",
    }
    assert stub.requests == []
    assert rejected(proxy, "host_not_allowed") == 1
    # Without Origin too: a rebinding page's GET has none, and the answer would leak to it.
    client = await open_client(proxy)
    client.send(request("GET", "/healthz", host=f"{EVIL}:{proxy.port}"))
    assert (await until_eof(client)).status == 421
    assert rejected(proxy, "host_not_allowed") == 2


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
async def test_loopback_names_pass_with_any_port_and_a_matching_origin(
    host: str, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub])
    client = await open_client(proxy)
    authority = f"{host}:{proxy.port}"
    client.send(request("GET", "/mcp", [("Origin", f"http://{authority}")], host=authority))
    resp = await client.response()
    assert (resp.status, bytes(resp.body)) == (200, b"/mcp")
    # The backend gets its own Host; the client's is passed on as X-Forwarded-Host.
    [seen] = stub.requests
    assert seen.header_all("host") == [f"127.0.0.1:{stub.port}".encode()]
    assert seen.header_all("x-forwarded-host") == [authority.encode()]
    assert rejected(proxy, "host_not_allowed") == 0


async def test_the_default_origin_rule_checks_allowed_hosts_not_the_request_host(
    make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_hosts=["mcp.example.com", "*.corp.example"])
    cases = [
        ("mcp.example.com", "https://mcp.example.com", 200),
        ("mcp.example.com", "https://app.corp.example:8443", 200),  # another allowed host
        ("mcp.example.com", "http://localhost", 403),  # not on the list any more
        ("app.corp.example", f"http://{EVIL}", 403),
        (EVIL, f"http://{EVIL}", 421),  # the rebinding pair: same host, but not an allowed one
        ("localhost", "http://localhost", 421),
    ]
    for host, origin, status in cases:
        client = await open_client(proxy)
        client.send(request("GET", "/mcp", [("Origin", origin)], host=host))
        resp = await client.response()
        assert resp.status == status, (host, origin)
        if status != 200:
            rpc_error(resp)
    assert len(stub.requests) == 2
    assert (rejected(proxy, "origin"), rejected(proxy, "host_not_allowed")) == (2, 2)


async def test_star_allows_every_host_and_warns(
    make_proxy: ProxyFactory,
    make_stub: StubFactory,
    open_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = await make_stub()
    with caplog.at_level(logging.WARNING, logger="mcpbalancer"):
        proxy = await make_proxy([stub], allowed_hosts=["*"])
    assert any("DNS-rebinding protection is off" in r.getMessage() for r in caplog.records)
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", host=EVIL))
    assert (await client.response()).status == 200
    assert proxy._plane is not None
    (front,) = [f for f in proxy._plane.phases.filters if isinstance(f, FrontDoor)]
    assert not front.checks_host  # no Host check on the request path at all


@pytest.mark.parametrize(
    ("origin", "passes"),
    [
        ("http://proxy.test", True),
        ("http://proxy.test:80", True),
        ("http://proxy.test:8080", False),
        (f"http://{EVIL}", False),
    ],
)
async def test_with_every_host_allowed_the_origin_must_name_the_request_host(
    origin: str, passes: bool, make_proxy: ProxyFactory, make_stub: StubFactory, open_client: ClientFactory
) -> None:
    stub = await make_stub()
    proxy = await make_proxy([stub], allowed_hosts=["*"])
    client = await open_client(proxy)
    client.send(request("GET", "/mcp", [("Origin", origin)], host="proxy.test"))
    resp = await client.response()
    assert resp.status == (200 if passes else 403)


async def test_a_wildcard_listen_without_allowed_hosts_warns_and_accepts_ip_hosts_only(
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    web: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="mcpbalancer"):
        proxy = await make_proxy(backends[:1], listen="0.0.0.0:0")
    [warning] = [r.getMessage() for r in caplog.records if "allowed_hosts is not set" in r.getMessage()]
    assert "0.0.0.0" in warning
    url = f"http://127.0.0.1:{proxy.port}/mcp"
    for host, status in [(f"10.1.2.3:{proxy.port}", 200), (f"mcp.svc:{proxy.port}", 421), (EVIL, 421)]:
        async with web.post(url, json=INIT_BODY, headers={**INIT_HEADERS, "Host": host}) as resp:
            assert resp.status == status, host


async def test_the_mcp_client_on_the_default_loopback_listener_is_unaffected(
    backends: list[BackendProcess], make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mcpbalancer"):
        proxy = await make_proxy(backends)
    assert not [r for r in caplog.records if "allowed_hosts" in r.getMessage()]  # nothing to warn about
    async with recorded_client(mcp_url(proxy)) as (client, _):
        assert text_of(await client.call_tool("count")) == "1"
        assert text_of(await client.call_tool("count")) == "2"
    assert rejected(proxy, "host_not_allowed") == 0
