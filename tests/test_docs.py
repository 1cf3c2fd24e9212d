"""The documentation says what the code does: the README's configuration table and its defaults, the
shutdown wait, every commented-out example in config/*.yaml, and design notes that stand on their own."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.config import DEFAULT_SHUTDOWN_TIMEOUT, Config, host_port, parse_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
# A commented-out setting is `#` directly followed by YAML (`#admin: ...`, `  #- name: ...`); the
# lines after it that continue it have `#` and two spaces or more at the same column (`  #  url: ...`).
EXAMPLE_START = re.compile(r"(?P<indent> *)#(?=[^\s#])")
TABLE_ROW = re.compile(r"\| `(?P<key>[^`]+)` \| (?P<default>[^|]*) \|")
# Rows whose default is not one attribute of the loaded Config.
NOT_AN_ATTRIBUTE = {"backends[].replicas": "expanded into <name>-1 ... <name>-N backends"}


def config_table() -> list[tuple[str, str]]:
    section = README.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    header = "| key | default | meaning |"
    rows = section.split(header, 1)[1].split("\n\n", 1)[0].splitlines()
    return [(m["key"], m["default"].strip()) for row in rows if (m := TABLE_ROW.match(row))]


def test_config_table_lists_each_key_once() -> None:
    keys = [key for key, _ in config_table()]
    assert len(keys) > 40
    assert sorted({key for key in keys if keys.count(key) > 1}) == []


def loaded_value(config: Config, key: str) -> Any:
    if key == "listen":
        return host_port(config.listen_host, config.listen_port)
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part[:-2])[0] if part.endswith("[]") else getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def test_config_table_defaults_match_the_loader() -> None:
    config = parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:8001"}]})
    compared, wrong = [], []
    for key, default in config_table():
        literal = re.fullmatch(r"`([^`]+)`", default)
        if literal is None or key in NOT_AN_ATTRIBUTE:
            continue  # "off", "required", "random per process": prose, not a value
        compared.append(key)
        documented = yaml.safe_load(literal[1])
        if loaded_value(config, key) != documented:
            wrong.append((key, documented, loaded_value(config, key)))
    assert "shutdown_timeout" in compared
    assert len(compared) > 30
    assert wrong == []


def test_readme_states_the_shutdown_wait_of_the_code() -> None:
    prose = " ".join(README.split())
    assert f"for up to `shutdown_timeout` seconds (default {DEFAULT_SHUTDOWN_TIMEOUT:g})" in prose
    # No sentence about SIGTERM gives the wait as another fixed number of seconds.
    for sentence in re.findall(r"[^.]*SIGTERM[^.]*requests[^.]*\.", prose):
        assert not re.search(r"up to \d+ ?s\b", sentence), sentence


# --- the commented-out examples of config/*.yaml -----------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A key given twice is an error here: an example that repeats a live key would be ignored."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = {key for key in keys if keys.count(key) > 1}
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def example_blocks(lines: list[str]) -> list[list[int]]:
    """The line numbers of each commented-out example."""
    blocks: list[list[int]] = []
    continues: str | None = None  # the prefix of a continuation line of the open block
    for number, line in enumerate(lines):
        start = EXAMPLE_START.match(line)
        if continues is not None and line.startswith(continues) and line[len(continues) :].strip():
            blocks[-1].append(number)
        elif start is not None:
            blocks.append([number])
            continues = start["indent"] + "#  "
        else:
            continues = None
    return blocks


def uncommented(lines: list[str], numbers: list[int]) -> str:
    out = list(lines)
    for number in numbers:
        indent, _, rest = out[number].partition("#")
        out[number] = indent + rest
    return "\n".join(out)


def load(text: str, source: str) -> tuple[Any, Config]:
    data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    return data, parse_config(data, source)


def every_example() -> list[Any]:
    params = []
    for path in CONFIGS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for numbers in example_blocks(lines):
            params.append(pytest.param(path, numbers, id=f"{path.name}:{numbers[0] + 1}"))
    return params


@pytest.mark.parametrize(("path", "numbers"), every_example())
def test_a_commented_example_loads_once_uncommented(path: Path, numbers: list[int]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    before, _ = load("\n".join(lines), path.name)
    after, _ = load(uncommented(lines, numbers), path.name)
    assert after != before, "the example changed nothing once uncommented"


def test_every_example_of_example_yaml_together() -> None:
    path = ROOT / "config" / "example.yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = example_blocks(lines)
    assert len(blocks) >= 5  # mcp-old, the managed backend, bind_sessions, its key, admin
    _, config = load(uncommented(lines, [n for block in blocks for n in block]), path.name)
    assert {"mcp-old", "local-1", "local-2"} <= {b.name for b in config.backends}
    assert config.admin == ("127.0.0.1", 9100)
    assert config.bind_sessions == "authorization"


def test_example_blocks_are_found_and_prose_is_not() -> None:
    lines = [
        "# an explanation: with a colon",
        "#admin: x",
        "# the next explanation",
        "backends:",
        "  #- name: a",
        "  #  url: u",
        "  # prose",
        "  #          indented prose",
    ]
    assert example_blocks(lines) == [[1], [4, 5]]
    assert uncommented(lines, [4, 5]).splitlines()[4:6] == ["  - name: a", "    url: u"]


# --- design notes ----------------------------------------------------------------------------------


def repository_files() -> list[str]:
    files = []
    for top, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(top, name), ROOT) for name in names]
    return files


def test_design_notes_stand_on_their_own() -> None:
    notes = (ROOT / "docs" / "DESIGN-NOTES.md").read_text(encoding="utf-8")
    named = set(re.findall(r"[\w./-]+\.(?:md|py|yaml|json)\b", notes))
    files = repository_files()
    missing = sorted(name for name in named if not any(f == name or f.endswith("/" + name) for f in files))
    assert missing == []
    assert re.findall(r"\b(?:issue|item)s? \d+|#\d+\b", notes, re.IGNORECASE) == []
