"""The configuration of `auth`, `tool_policy`, `rate_limits`, `trusted_proxies` and
`backends[].max_in_flight`: what is refused, and the message that names the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mcpbalancer import cli
from mcpbalancer.config import AccessConfig, AuthConfig, load_config, parse_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.filters.jwks import configured_keys

BACKENDS = [{"name": "a", "url": "http://127.0.0.1:8001"}]
JWT = {"issuer": "https://idp", "audience": "https://mcp/mcp", "jwks_url": "https://idp/jwks"}
KEY = {"name": "ci", "sha256": "a" * 64}


def error(**top: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({"backends": BACKENDS, **top}, "cfg.yaml")
    return str(info.value)


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"auth": {}}, "auth: enforce needs a way to authenticate: `jwks_url`, `jwks_file` or `api_keys`"),
        ({"auth": {**JWT, "algorithms": ["HS256"]}}, "auth.algorithms[0]: 'HS256' is never accepted"),
        ({"auth": {**JWT, "algorithms": ["none"]}}, "auth.algorithms[0]: 'none' is never accepted"),
        ({"auth": {**JWT, "algorithms": ["RS1"]}}, "auth.algorithms[0]: must be one of RS256"),
        ({"auth": {**JWT, "algorithms": []}}, "auth.algorithms: must have at least one entry"),
        ({"auth": {**JWT, "jwks_url": "http://idp/jwks"}}, "auth.jwks_url: must be an https:// URL"),
        ({"auth": {**JWT, "jwks_file": "k.json"}}, "auth.jwks_file: give either `jwks_url` or `jwks_file`"),
        ({"auth": {**JWT, "issuer": None}}, "auth.issuer: is required with `jwks_url`"),
        ({"auth": {**JWT, "audience": []}}, "auth.audience: is required with `jwks_url`"),
        (
            {"auth": {"issuer": "x", "api_keys": [KEY]}},
            "auth.jwks_url: is required for `issuer` and `audience`",
        ),
        ({"auth": {"api_keys": [KEY, {**KEY, "sha256": "b" * 64}]}}, "auth.api_keys[1].name: duplicate name"),
        ({"auth": {"api_keys": [KEY, {**KEY, "name": "x"}]}}, "auth.api_keys[1].sha256: the same key as"),
        (
            {"auth": {"api_keys": [{**KEY, "sha256": "xyz"}]}},
            "auth.api_keys[0].sha256: must be 64 hex digits",
        ),
        ({"auth": {"api_keys": [KEY], "required_scopes": "mcp"}}, "auth.required_scopes: must be a list"),
        ({"auth": {"api_keys": [KEY], "mode": "maybe"}}, "auth.mode: must be one of enforce, off"),
        ({"auth": {"api_keys": [KEY], "leeway": 3600}}, "auth.leeway: must be <= 600"),
        ({"auth": {"api_keys": [KEY], "jwks_url2": 1}}, "auth.jwks_url2: unknown key; allowed: mode"),
        ({"tool_policy": [{"deny": ["x"]}]}, "tool_policy: denies every tool"),
        ({"tool_policy": [{"allow": ["x"], "deny": ["y"]}]}, "tool_policy[0]: needs exactly one of `allow`"),
        ({"tool_policy": [{"allow": []}]}, "tool_policy[0].allow: must have at least one entry"),
        (
            {"tool_policy": [{"allow": ["*"], "when": {"principal": "ci"}}]},
            "tool_policy[0].when: needs `auth` (mode: enforce)",
        ),
        ({"rate_limits": [{"key": "principal", "rate": "1/s"}]}, "rate_limits[0]: counts principals"),
        ({"rate_limits": [{"key": "ip", "rate": "1/s"}]}, "rate_limits[0].key: must be one of principal"),
        ({"rate_limits": [{"key": "tool", "rate": "5"}]}, "rate_limits[0].rate: must be '<count>/<unit>'"),
        ({"rate_limits": [{"key": "tool", "rate": "0/s"}]}, "rate_limits[0].rate: must be '<count>/<unit>'"),
        ({"rate_limits": [{"key": "tool", "rate": "1/s", "burst": 0}]}, "rate_limits[0].burst: must be >= 1"),
        ({"rate_limits": [{"rate": "1/s"}]}, "rate_limits[0].key: is required"),
        ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies[0]: must be an IP address or a network"),
        ({"backends": [{**BACKENDS[0], "max_in_flight": 0}]}, "backends[0].max_in_flight: must be >= 1"),
        ({"backends": [{**BACKENDS[0], "queue_timeout": -1}]}, "backends[0].queue_timeout: must be >= 0"),
        ({"limits": {"policy_body_bytes": 10}}, "limits.policy_body_bytes: must be >= 1024"),
        (
            {"auth": {"api_keys": [KEY]}, "store": "redis://127.0.0.1:6379/0"},
            "session_binding_key: is required with auth and a Redis store",
        ),
    ],
)
def test_refused(top: dict[str, Any], message: str) -> None:
    problem = error(**top)
    assert f"cfg.yaml: {message}" in problem


def test_defaults_and_shapes() -> None:
    config = parse_config({"backends": BACKENDS})
    assert config.access == AccessConfig()
    assert not config.access.auth.enforced
    assert config.backends[0].max_in_flight is None
    config = parse_config(
        {
            "backends": [{**BACKENDS[0], "max_in_flight": 3, "queue_timeout": 2}],
            "auth": {**JWT, "audience": "https://mcp/mcp"},  # one string is a list of one
            "tool_policy": [{"deny": "admin_*"}, {"allow": ["*"]}],
            "rate_limits": [
                {"key": "tool", "rate": "100/minute"},
                {"key": "session", "rate": "5/s", "burst": 9},
            ],
            "trusted_proxies": ["10.0.0.0/8", "127.0.0.1"],
        }
    )
    assert config.access.auth.enforced
    assert config.access.auth.audience == ("https://mcp/mcp",)
    assert config.access.tool_policy[0].deny == ("admin_*",)
    assert [(r.per, r.size) for r in config.access.rate_limits] == [((100, 60.0), 100), ((5, 1.0), 9)]
    assert config.access.reads_calls  # a tool policy: legacy bodies are read
    assert (config.backends[0].max_in_flight, config.backends[0].queue_timeout) == (3, 2.0)
    assert config.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    off = parse_config({"backends": BACKENDS, "auth": {"mode": "off"}}).access.auth
    assert off == AuthConfig(mode="off")
    keyed_by_session = parse_config(
        {"backends": BACKENDS, "rate_limits": [{"key": "session", "rate": "1/h"}]}
    )
    assert not keyed_by_session.access.reads_calls  # no body read for it


def test_a_jwks_file_is_read_with_check_and_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    cfg = tmp_path / "proxy.yaml"
    auth = {"issuer": "https://idp", "audience": "https://mcp/mcp", "jwks_file": "keys.json"}
    cfg.write_text(json.dumps({"backends": BACKENDS, "auth": auth}))
    with pytest.raises(ConfigError, match=r"auth\.jwks_file: .*keys\.json: no signature key in the set"):
        configured_keys(load_config(cfg))  # a symmetric key is never a verification key
    assert cli.main(["--config", str(cfg), "--check"]) == 2
    (tmp_path / "keys.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"keys\.json: "):
        configured_keys(load_config(cfg))
    (tmp_path / "keys.json").unlink()
    with pytest.raises(ConfigError, match=r"auth\.jwks_file: cannot read"):
        configured_keys(load_config(cfg))
