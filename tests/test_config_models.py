"""The configuration models: how their errors read, and what the proxy gets from them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import ValidationError

from mcpbalancer.config import (
    AffinityConfig,
    HealthConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    TimeoutsConfig,
    parse_config,
)
from mcpbalancer.errors import ConfigError

BACKEND = {"name": "a", "url": "http://127.0.0.1:8001"}


def minimal(**top: Any) -> dict[str, Any]:
    return {"backends": [BACKEND], **top}


def error_lines(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    return str(info.value).splitlines()


def test_every_problem_is_reported_one_line_each_in_key_order() -> None:
    data = minimal(session_ttl="60", heartbeat=-1, limits={"body_bytes": 1, "header_count": 1.5})
    assert error_lines(data) == [
        "cfg.yaml: session_ttl: must be a number, got '60'",
        "cfg.yaml: heartbeat: must be >= 0, got -1",
        "cfg.yaml: limits.header_count: must be an integer, got 1.5",
        "cfg.yaml: limits.body_bytes: must be >= 1024, got 1",
    ]


def test_a_bad_entry_does_not_also_make_its_list_too_short() -> None:
    assert error_lines(minimal(backends=[{"name": "a", "url": "ftp://h"}])) == [
        "cfg.yaml: backends[0].url: must be an http:// or https:// URL, got 'ftp://h'"
    ]
    assert error_lines(minimal(backends=[{**BACKEND, "eras": ["x"]}])) == [
        "cfg.yaml: backends[0].eras[0]: must be one of legacy, modern; got 'x'"
    ]


@pytest.mark.parametrize(
    ("data", "line"),
    [
        pytest.param(
            minimal(routes=[{"match": {"naem": "x"}, "deny": 403}]),
            "routes[0].match.naem: unknown key; allowed: method, name, param; did you mean `name`?",
            id="nested-unknown-key",
        ),
        pytest.param(
            minimal(pools={"bad name": ["a"]}),
            "pools.bad name: must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "got 'bad name'",
            id="pool-name",
        ),
        pytest.param(minimal(pools={1: ["a"]}), "pools.1: must be a string, got 1", id="pool-name-int"),
        pytest.param(minimal(pools={"p": ["a", 2]}), "pools.p[1]: must be a string, got 2", id="pool-member"),
        pytest.param(
            minimal(session_binding_key="short"),
            "session_binding_key: must be at least 16 characters",
            id="binding-key-length",
        ),
        pytest.param(minimal(log={"level": ""}), "log.level: must not be empty", id="empty-choice"),
        pytest.param(minimal(log={"level": 2}), "log.level: must be a string, got 2", id="choice-int"),
        pytest.param(
            minimal(timeouts={"connect": float("nan")}),
            "timeouts.connect: must be a finite number, got nan",
            id="nan",
        ),
        pytest.param(
            minimal(backends=[{"name": "m", "command": "srv", "url": None, "replicas": None}], admin=None),
            None,
            id="null-is-absent",
        ),
    ],
)
def test_error_lines(data: dict[str, Any], line: str | None) -> None:
    if line is None:
        assert [b.name for b in parse_config(data).backends] == ["m-1"]
    else:
        assert error_lines(data) == [f"cfg.yaml: {line}"]


def test_null_sections_and_lists_mean_their_defaults() -> None:
    sections = ("timeouts", "limits", "metrics", "log", "health", "affinity", "pools", "routes")
    config = parse_config(minimal(**dict.fromkeys(sections), allowed_origins=None))
    assert (config.timeouts, config.limits, config.metrics, config.log) == (
        TimeoutsConfig(),
        LimitsConfig(),
        MetricsConfig(),
        LogConfig(),
    )
    assert (config.health, config.affinity) == (HealthConfig(), AffinityConfig())
    assert (config.pools, config.routes, config.allowed_origins) == ({}, (), ())
    (route,) = parse_config(minimal(routes=[{"match": None, "deny": 403}])).routes
    assert (route.method, route.name, route.params, route.deny) == (None, None, (), 403)


def test_the_sections_the_proxy_reads_are_frozen_dataclasses_that_check_themselves() -> None:
    log = parse_config(minimal(log={"format": "text"})).log
    with pytest.raises(dataclasses.FrozenInstanceError):
        log.level = "debug"  # type: ignore[misc]
    assert dataclasses.replace(log, level="debug") == LogConfig(format="text", level="debug")
    with pytest.raises(ValidationError):
        dataclasses.replace(log, level="trace")
    assert [f.name for f in dataclasses.fields(HealthConfig)] == [
        "interval",
        "timeout",
        "path",
        "fall",
        "rise",
        "probe",
        "method",
        "expect_status",
        "headers",
    ]


def test_values_keep_their_runtime_types() -> None:
    config = parse_config(
        minimal(
            backends=[{**BACKEND, "eras": ["modern"], "drain_timeout": 5}],
            pools={"p": ["a", "a"]},
            routes=[{"match": {"param": {"Region": "eu"}}, "pool": "p"}],
            health={"interval": 2},
            bind_sessions="Authorization",
            session_binding_key="k" * 16,
        )
    )
    backend = config.backends[0]
    assert (backend.eras, backend.drain_timeout, type(backend.drain_timeout)) == (("modern",), 5.0, float)
    assert config.pools == {"p": ("a",)}
    assert config.routes[0].params == (("Region", "eu"),)
    assert type(config.health.interval) is float
    assert config.bind_sessions == "authorization"


def test_health_path_follows_mcp_path_unless_the_file_sets_it() -> None:
    assert parse_config(minimal(mcp_path="/tools", health={"interval": 2})).health.path == "/tools"
    assert parse_config(minimal(mcp_path="/tools", health=None)).health.path == "/tools"
    assert parse_config(minimal(mcp_path="/tools", health={"path": "/mcp"})).health.path == "/mcp"
    assert parse_config(minimal(health={"path": "/probe"})).health.path == "/probe"
    # A bad mcp_path is reported once, at its own key, not again at the health.path it would give.
    assert error_lines(minimal(mcp_path="tools")) == [
        "cfg.yaml: mcp_path: must be a path starting with '/', visible ASCII without '?' or '#', at most "
        "256 bytes; got 'tools'"
    ]
