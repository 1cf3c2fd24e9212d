"""The configuration keys of issue 7: limits, allowed_origins, bind_sessions, on_store_error."""

from __future__ import annotations

from typing import Any

import pytest

from mcpbalancer.config import LimitsConfig, parse_config
from mcpbalancer.errors import ConfigError


def minimal(**top: Any) -> dict[str, Any]:
    return {"backends": [{"name": "a", "url": "http://127.0.0.1:8001"}], **top}


def test_defaults() -> None:
    config = parse_config(minimal())
    assert config.limits == LimitsConfig(connections=10_000, head_timeout=10.0, keepalive_timeout=60.0)
    assert config.limits.head_timeout <= 15
    assert (config.allowed_origins, config.bind_sessions, config.on_store_error) == ((), None, "degrade")


def test_values() -> None:
    config = parse_config(
        minimal(
            limits={"connections": 50, "head_timeout": 2.5, "keepalive_timeout": 5},
            allowed_origins=["https://App.example:8443", "http://[::1]:3000", "*"],
            on_store_error="fail",
        )
    )
    assert (config.limits.connections, config.limits.head_timeout, config.limits.keepalive_timeout) == (
        50,
        2.5,
        5,
    )
    assert config.allowed_origins == ("https://app.example:8443", "http://[::1]:3000", "*")
    assert config.on_store_error == "fail"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (minimal(limits={"connections": 0}), "limits.connections: must be >= 1, got 0"),
        (minimal(limits={"head_timeout": 0}), "limits.head_timeout: must be > 0, got 0"),
        (minimal(limits={"keepalive_timeout": -1}), "limits.keepalive_timeout: must be > 0, got -1"),
        (minimal(allowed_origins="*"), "allowed_origins: must be a list of origins, got '*'"),
        (
            minimal(allowed_origins=["https://a.example/path"]),
            "allowed_origins[0]: must be '*' or an origin like 'https://app.example:8443' (no path), "
            "got 'https://a.example/path'",
        ),
        (minimal(allowed_origins=["*", "a.example"]), "allowed_origins[1]: must be '*' or an origin"),
        (minimal(allowed_origins=[""]), "allowed_origins[0]: must not be empty"),
        (minimal(on_store_error="ignore"), "on_store_error: must be one of degrade, fail; got 'ignore'"),
    ],
)
def test_invalid(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as failure:
        parse_config(data, "cfg.yaml")
    assert str(failure.value).startswith(f"cfg.yaml: {message}"), str(failure.value)
