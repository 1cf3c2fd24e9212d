"""`services`: the config errors (each one named by its key path), what a service takes from the
top level, and the matching rule (the ServiceMap, pure: no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from mcpbalancer.app import LIVE
from mcpbalancer.config import ConfigError, parse_config
from mcpbalancer.dataplane.services import Route, ServiceMap


def backend(name: str, port: int = 8001) -> dict[str, Any]:
    return {"name": name, "url": f"http://127.0.0.1:{port}/mcp"}


def service(name: str, *backends: str, **match: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": match or {"path_prefix": f"/{name}"},
        "backends": [backend(b) for b in backends],
    }


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    return str(info.value)


GH = service("github", "gh-1")
ERRORS = [
    pytest.param(
        {"services": [GH, service("github", "gh-2", path_prefix="/other")]},
        "services[1].name: duplicate service name 'github' (services[0])",
        id="duplicate-name",
    ),
    pytest.param(
        {"backends": [backend("d")], "services": [service("default", "x")]},
        "services[0].name: duplicate service name 'default' (the top-level backends)",
        id="default-is-taken",
    ),
    pytest.param({"services": [service("bad name", "x")]}, "services[0].name: must be", id="invalid-name"),
    pytest.param(
        {"services": [GH, service("git2", "gh-2", path_prefix="/github")]},
        "services[1].match: the same host and path_prefix as services[0] (github)",
        id="same-prefix",
    ),
    pytest.param(
        {
            "services": [
                service("a", "a1", host="a.example.com", path_prefix="/x"),
                service("b", "b1", host="a.example.com", path_prefix="/x"),
            ]
        },
        "services[1].match: the same host and path_prefix",
        id="same-host-and-prefix",
    ),
    pytest.param(
        {"services": [service("a", "a1", host="api.*"), service("b", "b1", host="*.example.com")]},
        "services[1].match: two host globs one name can match both of",
        id="overlapping-globs",
    ),
    pytest.param(
        {"services": [service("a", "a1", path_prefix="github")]},
        "services[0].match.path_prefix: must start with '/'",
        id="prefix-without-slash",
    ),
    pytest.param(
        {"services": [service("a", "a1", path_prefix="/github/")]},
        "services[0].match.path_prefix: must not end with '/'",
        id="prefix-ending-in-slash",
    ),
    pytest.param(
        {"services": [service("a", "a1", path_prefix="/")]},
        "leave path_prefix out to match every path",
        id="prefix-slash-alone",
    ),
    pytest.param(
        {"services": [GH, service("docs", "gh-1")]},
        "services.docs: backend name 'gh-1' is also in services.github",
        id="backend-in-two-services",
    ),
    pytest.param(
        {"backends": [backend("gh-1")], "services": [GH]},
        "services.github: backend name 'gh-1' is also in backends",
        id="backend-also-top-level",
    ),
    pytest.param(
        {"services": [{"name": "a", "match": {"path_prefix": "/a"}}]},
        "services[0].backends: is required",
        id="no-backends",
    ),
    pytest.param(
        {"services": [{"name": "a", "match": {"path_prefix": "/a"}, "backends": []}]},
        "services[0].backends: is required",
        id="empty-backends",
    ),
    pytest.param(
        {"services": [{"name": "a", "backends": [backend("a1")]}]},
        "services[0].match: is required",
        id="no-match",
    ),
    pytest.param(
        {"services": [{"name": "a", "match": {}, "backends": [backend("a1")]}]},
        "services[0].match: needs `host`, `path_prefix` or both",
        id="empty-match",
    ),
    *(
        pytest.param(
            {"services": [{**GH, key: value}]},
            f"services[0].{key}: unknown key",
            id=f"global-{key}",
        )
        for key, value in (
            ("listen", "127.0.0.1:1"),
            ("store", "memory"),
            ("workers", 2),
            ("admin", "127.0.0.1:9100"),
            ("session_ids", "sealed"),
            ("limits", {}),
            ("allowed_hosts", ["x"]),
        )
    ),
    pytest.param(
        {"services": [{**GH, "routes": [{"pool": "nope"}]}]},
        "services[0].routes[0].pool: unknown pool 'nope'",
        id="a-check-across-keys-per-service",
    ),
    pytest.param(
        {"services": [{**GH, "pools": {"p": ["elsewhere"]}}]},
        "services[0].pools.p[0]: unknown backend 'elsewhere'; backends: gh-1",
        id="pools-name-own-backends",
    ),
    pytest.param(
        {"services": [{**GH, "balance": "random"}]}, "services[0].balance: must be one of", id="bad-value"
    ),
    pytest.param({}, "backends: is required (or `services`)", id="neither-backends-nor-services"),
    pytest.param(
        {"services": [service("d", "d1", host="*")]},
        "services[0].match.host: must name hosts; leave `host` out to match any Host",
        id="host-star",
    ),
    pytest.param(
        {
            "allowed_hosts": ["localhost", "*.example.com"],
            "services": [service("d", "d1", host="docs.localhost")],
        },
        "services[0].match.host: 'docs.localhost' is not in allowed_hosts, so every request for it would get",
        id="host-not-allowed",
    ),
]


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_a_bad_services_entry_is_refused_naming_its_key(data: dict[str, Any], message: str) -> None:
    text = config_error(data)
    assert text.startswith("cfg.yaml: ")
    assert message in text, text


def test_a_service_takes_the_top_level_settings_it_does_not_set() -> None:
    config = parse_config(
        {
            "balance": "p2c",
            "session_ttl": 60,
            "pools": {"top": ["d"]},
            "backends": [backend("d")],
            "services": [
                {**service("github", "gh-1"), "balance": "round_robin"},
                {**service("docs", "docs-1"), "failover": "replay", "strip_prefix": False},
            ],
        }
    )
    github, docs = config.services
    assert (github.config.balance, github.config.session_ttl) == ("round_robin", 60)
    assert (docs.config.balance, docs.config.failover) == ("p2c", "replay")
    assert github.config.pools == {}
    assert github.config.routes == ()
    assert [b.name for b in github.config.backends] == ["gh-1"]
    assert (github.path_prefix, github.strip_prefix, docs.strip_prefix) == ("/github", True, False)
    assert github.config.services == ()
    assert config.balance == "p2c"
    assert [b.name for b in config.backends] == ["d"]


def test_services_alone_make_a_file_with_no_default_service() -> None:
    config = parse_config({"services": [GH]})
    assert config.backends == ()
    assert [s.name for s in config.services] == ["github"]


def test_a_reload_applies_services() -> None:
    assert "services" in LIVE


def test_a_host_allowed_by_a_glob_of_allowed_hosts_is_fine() -> None:
    config = parse_config(
        {"allowed_hosts": ["*.example.com"], "services": [service("d", "d1", host="docs.example.com")]}
    )
    assert config.services[0].host == "docs.example.com"


def test_an_exact_host_and_a_glob_at_one_prefix_are_not_ambiguous() -> None:
    config = parse_config(
        {
            "services": [
                service("a", "a1", host="api.example.com"),
                service("b", "b1", host="*.example.com"),
                service("c", "c1", host="*.other.org"),
                service("d", "d1", path_prefix="/d"),
            ]
        }
    )
    assert [s.host for s in config.services] == ["api.example.com", "*.example.com", "*.other.org", None]


# --- the matching rule ----------------------------------------------------------------------------

MAP = ServiceMap(
    [
        Route(None, b"/github", True, "github"),
        Route(None, b"/github/enterprise", True, "enterprise"),
        Route("docs.example.com", None, True, "docs"),
        Route("*.example.com", None, True, "any-example"),
        Route("docs.example.com", b"/github", True, "docs-github"),
        Route(None, b"/keep", False, "keep"),
        Route(None, None, True, "default", default=True),
    ]
)


@pytest.mark.parametrize(
    ("host", "target", "picked"),
    [
        (b"localhost:8080", b"/github/mcp", ("github", b"/mcp")),
        (b"localhost", b"/github", ("github", b"/")),
        (b"localhost", b"/github?x=1", ("github", b"/?x=1")),
        (b"localhost", b"/githubx/mcp", ("default", b"/githubx/mcp")),  # segments, not characters
        (b"localhost", b"/github/enterprise/mcp", ("enterprise", b"/mcp")),  # the longest prefix
        (b"localhost", b"/github/enterprisex", ("github", b"/enterprisex")),
        (b"DOCS.example.com:443", b"/mcp", ("docs", b"/mcp")),  # exact host over the glob
        (b"a.example.com", b"/mcp", ("any-example", b"/mcp")),
        (b"docs.example.com", b"/github/mcp", ("docs-github", b"/mcp")),  # the longer prefix first
        (b"localhost", b"/keep/mcp", ("keep", b"/keep/mcp")),  # strip_prefix: false
        (
            b"localhost",
            b"/.well-known/oauth-protected-resource/github/mcp",
            ("github", b"/.well-known/oauth-protected-resource/mcp"),
        ),
        (
            b"localhost",
            b"/.well-known/oauth-authorization-server/github",
            ("github", b"/.well-known/oauth-authorization-server"),
        ),
        (
            b"localhost",
            b"/.well-known/openid-configuration/github/enterprise",
            ("enterprise", b"/.well-known/openid-configuration"),
        ),
        (
            b"localhost",
            b"/.well-known/oauth-protected-resource",
            ("default", b"/.well-known/oauth-protected-resource"),
        ),
        (
            b"localhost",
            b"/.well-known/oauth-protected-resource/keep/mcp",
            ("keep", b"/.well-known/oauth-protected-resource/keep/mcp"),
        ),
        (b"localhost", b"/github/authorize?state=x", ("github", b"/authorize?state=x")),
        (None, b"/github/mcp", ("github", b"/mcp")),  # HTTP/1.0 without Host
    ],
)
def test_the_longest_prefix_among_the_matching_hosts_wins(
    host: bytes | None, target: bytes, picked: tuple[str, bytes]
) -> None:
    assert MAP.pick(host, target) == picked


def test_without_a_default_an_unmatched_request_has_no_service() -> None:
    routes = ServiceMap(
        [Route(None, b"/github", True, "github"), Route("docs.example.com", None, True, "docs")]
    )
    assert routes.pick(b"localhost", b"/mcp") is None
    assert routes.pick(b"localhost", b"/.well-known/oauth-protected-resource") is None
    assert routes.pick(b"docs.example.com.evil", b"/mcp") is None  # a glob-free host is exact


def test_a_services_mcp_path_is_its_health_path_unless_it_says_otherwise() -> None:
    config = parse_config(
        {
            "health": {"interval": 3},
            "services": [
                {**service("a", "a1"), "mcp_path": "/api"},
                {**service("b", "b1"), "mcp_path": "/api", "health": {"path": "/ready"}},
                service("c", "c1"),
            ],
        }
    )
    a, b, c = (s.config for s in config.services)
    assert (a.mcp_path, a.health.path, a.health.interval) == ("/api", "/api", 3)
    assert (b.health.path, b.health.interval) == (
        "/ready",
        1,
    )  # its own section, whole (the default interval)
    assert (c.mcp_path, c.health.path) == ("/mcp", "/mcp")


def test_a_service_may_discover_its_backends_and_their_names_stay_its_own() -> None:
    discovered = {"name": "gh", "discover": {"dns": "gh.test", "port": 8000}}
    config = parse_config({"services": [{**service("github", "gh-1"), "backends": [discovered]}]})
    [github] = config.services
    assert [d.name for d in github.config.discovery] == ["gh"]
    text = config_error(
        {
            "backends": [{"name": "gh", "discover": {"dns": "x.test", "port": 1}}],
            "services": [{**GH, "backends": [discovered]}],
        }
    )
    assert "backend name 'gh' is also in backends" in text
