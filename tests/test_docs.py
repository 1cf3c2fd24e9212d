"""The documentation says what the code does: the configuration table of docs/configuration.md, its
keys and defaults, the shutdown wait, every commented-out example in config/*.yaml, and pages that
stand on their own."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.app import LIVE, RESTART_ONLY
from mcpbalancer.config import DEFAULT_SHUTDOWN_TIMEOUT, Config, host_port, parse_config
from mcpbalancer.errors import ConfigError
from tests.fixtures.yamlkeys import UniqueKeyLoader

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
# A commented-out setting is `#` directly followed by YAML (`#admin: ...`, `  #- name: ...`); the
# lines after it that continue it have `#` and two spaces or more at the same column (`  #  url: ...`).
EXAMPLE_START = re.compile(r"(?P<indent> *)#(?=[^\s#])")
TABLE_HEADER = "| key | default | meaning |"
TABLE_ROW = re.compile(r"\| `(?P<key>[^`]+)` \| (?P<default>[^|]*) \|")
# Rows whose default is not one attribute of the loaded Config.
NOT_AN_ATTRIBUTE = {
    "services[].strip_prefix": "a key of each services entry (Config.services[].strip_prefix)",
    "backends[].replicas": "expanded into <name>-1 ... <name>-N backends",
    "auth.mode": "the section's default; without an `auth` section authentication is off",
    "failover.mode": "Config.failover",
    "failover.replay_on": "Config.replay_on",
    "listen[].tls.min_version": "a listener has no `tls` by default",
}
# Keys under a restart-only key that are a Config field of their own (key -> field).
LIVE_KEYS = {
    "admin.token": "admin_tokens",
    # The TLS files of a listener are re-read on reload (Config.listeners; its shape is restart only).
    **{
        f"listen[].tls.{key}": "listeners"
        for key in ("cert", "key", "client_ca", "require_client_cert", "min_version")
    },
}


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def config_table() -> list[tuple[str, str]]:
    """The rows of every key table of docs/configuration.md, in page order."""
    rows = []
    for table in CONFIGURATION.split(TABLE_HEADER)[1:]:
        lines = table.split("\n\n", 1)[0].splitlines()
        rows += [(m["key"], m["default"].strip()) for row in lines if (m := TABLE_ROW.match(row))]
    return rows


def test_config_table_lists_each_key_once() -> None:
    keys = [key for key, _ in config_table()]
    assert len(keys) > 40
    assert sorted({key for key in keys if keys.count(key) > 1}) == []


# --- the keys the loader knows ---------------------------------------------------------------------

PROBE = "zz_not_a_key"
# A valid file whose lists have one item each, so that a probe can be put into an item.
SEED: dict[str, Any] = {
    "backends": [{"name": "a", "url": "https://127.0.0.1:8001"}],
    "routes": [{"deny": 403}],
    "services": [
        {"name": "s", "match": {"path_prefix": "/s"}, "backends": [{"name": "b", "url": "http://h"}]}
    ],
}
UNKNOWN = re.compile(r": (?P<path>\S+): unknown key; allowed: (?P<allowed>.*?)(?:; did you mean .*)?$")


def allowed_keys(data: dict[str, Any], path: str) -> list[str] | None:
    """The keys the loader allows in the mapping at `path`, read from its unknown-key error for the
    probe put there; None if the loader does not complain of the probe as an unknown key there."""
    try:
        parse_config(data)
    except ConfigError as exc:
        found = UNKNOWN.search(str(exc))
        if found is not None and found["path"] == path:
            return [key.strip() for key in found["allowed"].split(",")]
    return None


Step = str | int  # a key, or the index of a list item


def dotted(steps: tuple[Step, ...]) -> str:
    """A key path as the loader's errors spell it: `backends[0].tls.ca`."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in steps).lstrip(".")


def documented(steps: tuple[Step, ...]) -> str:
    """A key path as the table spells it: `backends[].tls.ca`."""
    return re.sub(r"\[\d+\]", "[]", dotted(steps))


def replaced(data: dict[str, Any], steps: tuple[Step, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node: Any = out
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = value
    return out


def known_keys(data: dict[str, Any] = SEED, at: tuple[Step, ...] = ()) -> list[str]:
    """Every key the loader knows, found by asking the loader itself: a probe key put in a mapping
    gets the unknown-key error that lists the keys allowed there. A key whose value takes a probe
    too is a section (a mapping, or a list of mappings) and is walked in turn."""
    here = allowed_keys(replaced(data, (*at, PROBE), 1), dotted((*at, PROBE)))
    assert here is not None, f"no unknown-key error at {dotted(at) or 'the top level'}"
    keys = []
    for key in here:
        steps = (*at, key)
        keys.append(documented(steps))
        node: Any = data
        for step in at:
            node = node[step]
        if documented(steps).startswith("services[].") and documented(steps) != "services[].match":
            continue  # a service's setting: the shape of the top-level key of its name
        seeded = node.get(key)
        item = dict(seeded[0]) if isinstance(seeded, list) and seeded and isinstance(seeded[0], dict) else {}
        if allowed_keys(replaced(data, steps, {PROBE: 1}), dotted((*steps, PROBE))) is not None:
            keys += known_keys(replaced(data, steps, {}), steps)  # a mapping
        elif allowed_keys(replaced(data, steps, [{**item, PROBE: 1}]), dotted((*steps, 0, PROBE))):
            keys += known_keys(replaced(data, steps, [item]), (*steps, 0))  # a list of mappings
    return keys


def sections(keys: list[str]) -> set[str]:
    """The keys that hold other keys (`health`, `backends`, `backends[].tls`)."""
    return {key for key in keys for other in keys if other.startswith((key + ".", key + "[]."))}


def test_every_key_the_loader_knows_is_documented_and_no_other() -> None:
    known = known_keys()
    assert {"listen", "health.fall", "backends[].tls.ca", "routes[].deny"} <= set(known)
    documented = {key for key, _ in config_table()}
    leaves = set(known) - sections(known)
    assert sorted(leaves - documented) == []  # known to the loader, missing from the table
    assert sorted(documented - set(known)) == []  # in the table, unknown to the loader


def test_the_probe_finds_the_keys_of_a_section_and_of_list_items() -> None:
    assert allowed_keys({**SEED, "health": {PROBE: 1}}, f"health.{PROBE}") is not None
    assert allowed_keys({**SEED, "health": {"fall": 2}}, f"health.{PROBE}") is None
    assert dotted(("backends", 0, "tls", "ca")) == "backends[0].tls.ca"
    assert documented(("backends", 0, "tls", "ca")) == "backends[].tls.ca"
    assert sections(["a", "a.b", "c", "c[].d", "c[].e", "c[].e.f"]) == {"a", "c", "c[].e"}


# The sections the proxy reads in one record of its own (Config.access).
IN_ACCESS = ("auth", "tool_policy", "rate_limits")
# A file with a `discover` entry: its keys are read from the entry's DiscoveryConfig.
DISCOVERED = parse_config({"backends": [{"name": "t", "discover": {"dns": "t.test", "port": 1}}]})
DISCOVER_KEY = "backends[].discover."


def loaded_value(config: Config, key: str) -> Any:
    if key == "listen":
        return host_port(config.listen_host, config.listen_port)
    if key.split(".")[0].removesuffix("[]") in IN_ACCESS:
        key = f"access.{key}"
    value: Any = config
    if key.startswith(DISCOVER_KEY):
        value, key = DISCOVERED.discovery[0], key.removeprefix(DISCOVER_KEY)
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
    assert "backends[].discover.interval" in compared
    assert len(compared) > 30
    assert wrong == []


def test_docs_state_the_shutdown_wait_of_the_code() -> None:
    operations = " ".join((ROOT / "docs" / "operations.md").read_text(encoding="utf-8").split())
    assert f"for up to `shutdown_timeout` seconds (default {DEFAULT_SHUTDOWN_TIMEOUT:g})" in operations
    for page in PAGES:
        prose = " ".join(page.read_text(encoding="utf-8").split())
        # No sentence about SIGTERM gives the wait as another fixed number of seconds.
        for sentence in re.findall(r"[^.]*SIGTERM[^.]*requests[^.]*\.", prose):
            assert not re.search(r"up to \d+ ?s\b", sentence), (page_id(page), sentence)


def test_the_table_marks_the_restart_only_keys_of_the_code() -> None:
    """Each key a reload refuses to change says "restart only", and no other: the row is where an
    operator looks before sending SIGHUP."""
    meanings = {}
    for table in CONFIGURATION.split(TABLE_HEADER)[1:]:
        for row in table.split("\n\n", 1)[0].splitlines():
            if m := re.match(r"\| `([^`]+)` \|[^|]*\| (.*) \|$", row):
                meanings[m[1]] = m[2]
    marked = {key for key, meaning in meanings.items() if meaning.startswith("restart only")}
    restart_only = {"listen" if field.startswith("listen_") else field for field in RESTART_ONLY}
    # Keys of a restart-only section that are Config fields of their own, which reload.
    live = {key for key, field in LIVE_KEYS.items() if field in LIVE}
    under = {key for key in meanings if key.split(".")[0].removesuffix("[]") in restart_only} - live
    assert sorted(marked ^ under) == []
    assert {key.split(".")[0].removesuffix("[]") for key in marked} == restart_only


# --- the commented-out examples of config/*.yaml -----------------------------------------------


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
    data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
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


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_a_page_stands_on_its_own(page: Path) -> None:
    """No page names a file the repository does not have, nor an issue or item number (the pages
    are read by people who never saw the tracker)."""
    text = page.read_text(encoding="utf-8")
    assert re.findall(r"\b(?:issue|item)s? \d+|#\d+\b", text, re.IGNORECASE) == []
    # Shell blocks and code spans holding a command or a message name the reader's own files
    # (`--config prod.yaml`, `config.yaml: backends[1].url: ...`); links are checked on their own,
    # relative to their page (test_docs_examples.py); /etc/... and ~/... are not ours.
    fence = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
    blocks = [body for kind, body in fence.findall(text) if kind != "sh"]
    prose = fence.sub("", text)
    prose = re.sub(r"`(?:[^`\n]|\n(?!\n))*`", lambda span: "" if " " in span[0] else span[0], prose)
    text = re.sub(r"\]\([^)]*\)", "]", "\n".join([prose, *blocks]))
    named = set(re.findall(r"(?<![\w./~-])[\w.-][\w./-]*\.(?:md|py|yaml|json)\b", text))
    files = repository_files()
    missing = sorted(name for name in named if not any(f == name or f.endswith("/" + name) for f in files))
    assert missing == []


# --- the README ------------------------------------------------------------------------------------

QUICK_START = '.venv/bin/pip install -q ".[demo]" && .venv/bin/mcpbalancer --config config/demo.yaml'
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/pytest'


def test_readme_gives_the_two_commands_of_a_fresh_machine() -> None:
    readme = README.read_text(encoding="utf-8")
    assert f"python3 -m venv .venv && {QUICK_START}" in readme
    assert TEST_COMMAND in readme  # .ci/run greps for it too


def test_readme_stays_an_introduction() -> None:
    """What the project is, the two commands, a minimal configuration and links: the reference
    lives in docs/, so that one subject has one page and the README does not grow into a manual."""
    readme = README.read_text(encoding="utf-8")
    assert TABLE_HEADER not in readme  # the configuration table is in docs/configuration.md
    assert "| metric |" not in readme  # the metrics table is in docs/monitoring.md
    assert len(readme.splitlines()) <= 150
