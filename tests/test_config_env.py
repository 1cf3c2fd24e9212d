"""${NAME} references in the configuration, resolved from an injected environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mcpbalancer.config import load_config, parse_config
from mcpbalancer.errors import ConfigError

BACKEND = {"name": "a", "url": "http://127.0.0.1:8001"}


def minimal(**top: Any) -> dict[str, Any]:
    return {"backends": [BACKEND], **top}


def error(data: dict[str, Any], environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml", environ)
    return str(info.value)


def test_references_in_string_values_are_replaced() -> None:
    environ = {"REDIS_PASSWORD": "s3cret", "BINDING_KEY": "k" * 32, "HOST": "mcp.internal"}
    config = parse_config(
        minimal(
            store="rediss://:${REDIS_PASSWORD}@redis:6380/0",
            bind_sessions="authorization",
            session_binding_key="${BINDING_KEY}",
            backends=[{"name": "a", "url": "http://${HOST}:8001/mcp"}],
            allowed_origins=["https://${HOST}"],
        ),
        environ=environ,
    )
    assert config.store == "rediss://:s3cret@redis:6380/0"
    assert config.session_binding_key == "k" * 32
    assert (config.backends[0].url, config.backends[0].host) == (
        "http://mcp.internal:8001/mcp",
        "mcp.internal",
    )
    assert config.allowed_origins == ("https://mcp.internal",)


def test_an_unset_variable_is_an_error_naming_it_and_the_key() -> None:
    text = error(minimal(store="redis://:${REDIS_PASSWORD}@redis:6379/0"), {})
    assert text == "cfg.yaml: store: environment variable REDIS_PASSWORD is not set"


def test_every_unset_variable_is_named() -> None:
    data = minimal(backends=[BACKEND, {"name": "b", "url": "http://${B_HOST}"}], session_binding_key="${KEY}")
    assert error(data, {"UNRELATED": "x"}).splitlines() == [
        "cfg.yaml: backends[1].url: environment variable B_HOST is not set",
        "cfg.yaml: session_binding_key: environment variable KEY is not set",
    ]


def test_an_empty_variable_is_set() -> None:
    assert parse_config(minimal(store_prefix="app${SUFFIX}:"), environ={"SUFFIX": ""}).store_prefix == "app:"


def test_dollar_dollar_brace_is_a_literal_and_a_lone_dollar_is_itself() -> None:
    config = parse_config(minimal(store_prefix="$${HOME}-$x-$-${P}$"), environ={"HOME": "/root", "P": "p"})
    assert config.store_prefix == "${HOME}-$x-$-p$"


def test_a_value_from_the_environment_is_not_parsed_as_yaml() -> None:
    # Substitution happens after parsing: a value cannot add keys or change a type.
    config = parse_config(minimal(store_prefix="${P}"), environ={"P": "{listen: '0.0.0.0:1'}\nworkers: 9"})
    assert config.store_prefix == "{listen: '0.0.0.0:1'}\nworkers: 9"
    assert (config.listen_host, config.workers) == ("127.0.0.1", 1)
    text = error(minimal(session_ttl="${TTL}"), {"TTL": "60"})
    assert text == "cfg.yaml: session_ttl: must be a number, got '60'"


def test_keys_are_not_substituted() -> None:
    text = error(minimal(**{"${KEY}": 1}), {"KEY": "workers"})
    assert text.startswith("cfg.yaml: ${KEY}: unknown key; allowed: listen, "), text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("${", "store_prefix: an unclosed ${ (write $${ for a literal ${)", id="unclosed"),
        pytest.param("a${B", "store_prefix: an unclosed ${", id="unclosed-name"),
        pytest.param("${}", "store_prefix: ${} is not a variable name", id="empty"),
        pytest.param("${1X}", "store_prefix: ${1X} is not a variable name", id="digit"),
        pytest.param("${A:-b}", "store_prefix: ${A:-b} is not a variable name", id="no-defaults"),
    ],
)
def test_a_malformed_reference_is_an_error(value: str, problem: str) -> None:
    assert error(minimal(store_prefix=value), {"A": "a", "B": "b"}).startswith(f"cfg.yaml: {problem}")


def test_load_config_takes_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("store: 'redis://:${PW}@r:6379/0'\nbackends:\n  - {name: a, url: 'http://h:1'}\n")
    assert load_config(path, environ={"PW": "pw"}).store == "redis://:pw@r:6379/0"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: store: environment variable PW is not set"
