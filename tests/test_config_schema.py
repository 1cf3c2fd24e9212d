"""The JSON Schema of the configuration file: committed, complete, and in agreement with the models,
the example files and the configuration table of docs/configuration.md."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mcpbalancer.config import load_config, parse_config
from mcpbalancer.config.schema import json_schema, schema_text
from mcpbalancer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "config" / "schema.json"
EXAMPLES = [ROOT / "config" / "example.yaml", ROOT / "config" / "demo.yaml"]  # name the schema
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
REGENERATE = "mcpbalancer schema > config/schema.json"
CONFIGURATION = ROOT / "docs" / "configuration.md"
# Under `services[]` the settings have the shape of the top-level keys of their names (documented
# there); only a service's own sections are walked.
SERVICE_KEYS = "services[]."
SERVICE_SECTIONS = ("services[].match",)


def committed() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(COMMITTED.read_text(encoding="utf-8"))
    return schema


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(committed())


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """`node` without its $ref, its `| None`, and its short form (`failover: replay` for a mapping)."""
    if "$ref" in node:
        return resolve(schema, schema["$defs"][node["$ref"].rpartition("/")[2]])
    alternatives = [n for n in node.get("anyOf", ()) if n.get("type") != "null"]
    if len(alternatives) == 1:
        return resolve(schema, alternatives[0])
    # A shorthand or a mapping (`admin: "host:port"` or `{listen, token}`): the mapping has the keys.
    mappings = [m for m in (resolve(schema, n) for n in alternatives) if "properties" in m]
    if len(mappings) == 1:
        return mappings[0]
    # A shorthand or a list of mappings (`listen: "host:port"` or `[{address, tls}]`): the list.
    lists = [n for n in alternatives if n.get("type") == "array"]
    return lists[0] if len(lists) == 1 and "properties" in resolve(schema, lists[0]["items"]) else node


def keys(
    schema: dict[str, Any], node: dict[str, Any], prefix: str = ""
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key path, its schema) for every key of the file: `timeouts.connect`, `backends[].url`."""
    node = resolve(schema, node)
    for name, child in node.get("properties", {}).items():
        path = f"{prefix}{name}"
        yield path, child
        if path.startswith(SERVICE_KEYS) and path not in SERVICE_SECTIONS:
            continue  # a service's setting: the shape of the top-level key of its name
        inner = resolve(schema, child)
        if inner.get("type") == "array" and "properties" in resolve(schema, inner["items"]):
            yield from keys(schema, inner["items"], f"{path}[].")
        elif "properties" in inner:
            yield from keys(schema, inner, f"{path}.")


def test_the_committed_schema_is_the_models_schema() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(), (
        f"config/schema.json differs from the models; regenerate it: {REGENERATE}"
    )


def test_the_schema_command_prints_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mcpbalancer", "schema"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert json.loads(done.stdout) == json_schema()


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(committed())


def test_every_key_has_a_description_and_every_optional_key_a_default() -> None:
    schema = committed()
    undescribed = [path for path, node in keys(schema, schema) if not node.get("description")]
    assert undescribed == []
    required = {"backends", "backends[].name", "admin.listen"}  # admin.listen: when admin is a mapping
    required |= {"services[].name", "services[].match"}
    required |= {"auth.api_keys[].name", "auth.api_keys[].sha256", "rate_limits[].key", "rate_limits[].rate"}
    required |= {"listen[].address", "listen[].tls.cert"}
    no_default = [
        path for path, node in keys(schema, schema) if "default" not in node and path not in required
    ]
    assert no_default == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_example_files_validate_against_the_schema_and_the_models(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(data)]
    assert errors == []
    load_config(path)


def test_the_example_files_name_the_schema_for_editors() -> None:
    for path in EXAMPLES:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=schema.json", path
        assert (path.parent / "schema.json").is_file()


BACKEND = {"name": "a", "url": "http://127.0.0.1:8001"}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"backends": [BACKEND], "helth": {}}, id="unknown-key"),
        pytest.param({"backends": [{**BACKEND, "wieght": 2}]}, id="unknown-backend-key"),
        pytest.param({"backends": [{**BACKEND, "weight": 0}]}, id="weight-range"),
        pytest.param({"backends": [{**BACKEND, "name": "-a"}]}, id="name-pattern"),
        pytest.param({"backends": [{**BACKEND, "eras": ["2026"]}]}, id="era-choice"),
        pytest.param({"backends": []}, id="no-backends"),
        pytest.param({"backends": [BACKEND], "session_ttl": "3600"}, id="number-as-string"),
        pytest.param({"backends": [BACKEND], "balance": "random"}, id="balance-choice"),
        pytest.param({"backends": [BACKEND], "timeouts": {"connect": 0}}, id="connect-range"),
        pytest.param({"backends": [BACKEND], "metrics": {"path": "metrics"}}, id="path-pattern"),
        pytest.param({"backends": [BACKEND], "allowed_origins": ["a.example"]}, id="origin-pattern"),
        pytest.param({"backends": [BACKEND], "routes": [{"deny": 200}]}, id="deny-status"),
        pytest.param({"backends": [BACKEND], "session_binding_key": "short"}, id="key-length"),
        pytest.param({"backends": [BACKEND], "mcp_path": "/mcp?x=1"}, id="mcp-path-pattern"),
        pytest.param({"backends": [BACKEND], "allowed_hosts": ["mcp.example.com:8443"]}, id="host-port"),
        pytest.param({"backends": [{**BACKEND, "tls": {"server_name": "bad name"}}]}, id="server-name"),
    ],
)
def test_the_schema_refuses_what_the_models_refuse(data: dict[str, Any]) -> None:
    assert not validator().is_valid(data)
    with pytest.raises(ConfigError):
        parse_config(data)


def test_the_schema_defaults_are_the_running_defaults() -> None:
    schema = committed()
    config = parse_config({"backends": [BACKEND]})
    compared = 0
    for name, node in schema["properties"].items():
        if not hasattr(config, name) or "default" not in node:
            continue
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            value = json.loads(json.dumps(dataclasses.asdict(value)))  # type: ignore[arg-type]  # lists
        elif isinstance(value, tuple):
            value = list(value)
        assert value == node["default"], name
        compared += 1
    assert compared >= 20
    listen = schema["properties"]["listen"]["default"]
    assert listen == f"{config.listen_host}:{config.listen_port}"
    backend = resolve(schema, schema["properties"]["backends"]["items"])["properties"]
    assert [backend[k]["default"] for k in ("weight", "drain", "drain_timeout", "eras", "replicas")] == [
        config.backends[0].weight,
        config.backends[0].drain,
        config.backends[0].drain_timeout,
        list(config.backends[0].eras),
        1,
    ]


def test_every_key_is_in_the_example_file() -> None:
    text = EXAMPLES[0].read_text(encoding="utf-8")
    schema = committed()
    names = {path.rpartition(".")[2].removeprefix("[]") for path, _ in keys(schema, schema)}
    # Set, or shown in a comment: `key:`, `# key:`, `#key:` (an example to uncomment).
    missing = sorted(name for name in names if not re.search(rf"(^|[\s#]){name}:", text, re.MULTILINE))
    assert missing == []


def test_every_key_is_in_the_configuration_table() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    schema = committed()
    paths = [path for path, _ in keys(schema, schema)]
    leaves = [
        path for path in paths if not any(other.startswith((f"{path}.", f"{path}[]")) for other in paths)
    ]
    missing = [path for path in leaves if f"| `{path}` |" not in text]
    assert missing == []


TABLE_ROW = re.compile(r"\| `(?P<key>[^`]+)` \| (?P<default>[^|]*) \|")


def table() -> dict[str, str]:
    """docs/configuration.md's key tables: key path -> the default column."""
    lines = CONFIGURATION.read_text(encoding="utf-8").splitlines()
    return {m["key"]: m["default"].strip() for line in lines if (m := TABLE_ROW.match(line))}


def test_the_configuration_table_names_only_keys_of_the_schema() -> None:
    schema = committed()
    assert sorted(set(table()) - {path for path, _ in keys(schema, schema)}) == []


def test_the_configuration_table_gives_the_schemas_defaults() -> None:
    """A default written as a value (`15`, `"/mcp"`, `[legacy, modern]`) is the schema's; one written
    in words ("off", "none", "required", "random per process") is a key whose schema has no value
    to show: no default, or null, false or empty (a section: all its keys so)."""

    def empty(value: Any) -> bool:
        return not value or (isinstance(value, dict) and all(empty(v) for v in value.values()))

    schema = committed()
    nodes = dict(keys(schema, schema))
    compared, wrong = [], []
    for key, default in table().items():
        literal = re.fullmatch(r"`([^`]+)`", default)
        if literal is None:
            if not empty(nodes[key].get("default")):
                wrong.append((key, default, nodes[key]["default"]))
            continue
        compared.append(key)
        if "default" not in nodes[key] or yaml.safe_load(literal[1]) != nodes[key]["default"]:
            wrong.append((key, literal[1], nodes[key].get("default")))
    assert len(compared) > 40
    assert wrong == []
