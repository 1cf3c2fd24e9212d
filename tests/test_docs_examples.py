"""Every example in README.md and docs/*.md is tested by parsing it, and every link between the pages
leads somewhere. What a fenced block is decides how it is read:

- ```yaml: a whole configuration file, loaded by the config loader as `--config` loads one (a key
  given twice is an error too), and valid against the committed config/schema.json, as an editor
  checks it. Each `${NAME}` it names is set, for the load, to a placeholder.
- ```yaml with `<!-- fragment -->` on the line before the fence: some keys of a configuration, laid
  over MINIMAL (one backend) key by key, then loaded.
- ```yaml with `<!-- prometheus: scrape -->`: a Prometheus scrape configuration, with the shape
  Prometheus reads. (Alert rules are not written in the pages: they ship as
  deploy/prometheus/alerts.yaml, whose every `mcpbalancer_*` series, like the dashboard's, is one the
  proxy exports, with labels it has.)
- ```sh: `bash -n` parses it, and every command that runs mcpbalancer (`mcpbalancer`,
  `.venv/bin/mcpbalancer`, `python -m mcpbalancer`, `docker run ... mcpbalancer`) is accepted by the
  CLI's own argument parser. A `--check` of a file of this repository passes, printing what the
  comment after it says when the comment is that output (`# config/x.yaml: OK (...)`).
- ```json: parses as JSON.
- ```text: output as a terminal shows it; not parsed.

A fence of any other kind fails the test, so that a new example picks one of these. The metrics table
of docs/monitoring.md is checked against the metrics a proxy exports, as the Prometheus rules are."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import subprocess
import unicodedata
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from mcpbalancer import cli
from mcpbalancer.config import Config, parse_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics
from tests.fixtures.yamlkeys import UniqueKeyLoader

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MINIMAL: dict[str, Any] = {"backends": [{"name": "a", "url": "http://127.0.0.1:8001"}]}
SCHEMA: dict[str, Any] = json.loads((ROOT / "config" / "schema.json").read_text(encoding="utf-8"))
KINDS = {"yaml", "sh", "json", "text"}
MARKS = {"fragment", "prometheus: scrape"}
FENCE = re.compile(r"^```(?P<kind>\S*)\s*$")
MARK = re.compile(r"^<!-- (?P<mark>.*?) -->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    kind: str
    mark: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, number = [], 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if fence is None:
            number += 1
            continue
        end = next(i for i in range(number + 1, len(lines)) if lines[i] == "```")
        before = next((lines[i] for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        mark = MARK.match(before)
        text = "\n".join(lines[number + 1 : end]) + "\n"
        found.append(Block(page, number + 1, fence["kind"], mark["mark"] if mark else None, text))
        number = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def of(kind: str, mark: str | None = None, *, any_mark: bool = False) -> list[Any]:
    chosen = [b for b in ALL if b.kind == kind and (any_mark or b.mark == mark)]
    return [pytest.param(b, id=b.where) for b in chosen]


def test_every_block_is_of_a_known_kind() -> None:
    assert sorted(b.where for b in ALL if b.kind not in KINDS) == []
    assert sorted(b.where for b in ALL if b.mark is not None and b.mark not in MARKS) == []
    assert sorted(b.where for b in ALL if b.mark is not None and b.kind != "yaml") == []
    assert len(ALL) > 20


# --- YAML: configurations --------------------------------------------------------------------------


def load_yaml(block: Block) -> Any:
    return yaml.load(block.text, Loader=UniqueKeyLoader)  # a SafeLoader subclass


def placeholder(name: str) -> str:
    """A value for ${NAME}: long enough for a binding key, and the base64 of 32 bytes or more, as a
    session key is."""
    return base64.b64encode(f"placeholder-for-{name}".ljust(32, ".").encode()).decode()


def environ(block: Block) -> dict[str, str]:
    """Every ${NAME} of the block, set to a placeholder."""
    return {name: placeholder(name) for name in re.findall(r"\$\{(\w+)\}", block.text)}


def load_configuration(data: dict[str, Any], block: Block) -> Config:
    jsonschema.Draft202012Validator(SCHEMA).validate(data)
    return parse_config(data, block.where, environ(block))


@pytest.mark.parametrize("block", of("yaml"))
def test_a_configuration_example_loads(block: Block) -> None:
    data = load_yaml(block)
    assert isinstance(data, dict), "a whole file is a mapping"
    assert "backends" in data, "a whole file lists its backends; mark a part of one <!-- fragment -->"
    load_configuration(data, block)


@pytest.mark.parametrize("block", of("yaml", "fragment"))
def test_a_configuration_fragment_loads_over_a_minimal_file(block: Block) -> None:
    data = load_yaml(block)
    assert isinstance(data, dict), "a fragment is some top-level keys of a configuration"
    config = load_configuration({**MINIMAL, **data}, block)
    assert config != parse_config(MINIMAL), "the fragment changed nothing"


def test_a_fragment_that_is_wrong_is_refused() -> None:
    # The loader is strict enough for these tests to catch a mistyped example.
    for wrong in ({"helth": {"fall": 2}}, {"workers": 4}, {"routes": [{"pool": "nope"}]}):
        with pytest.raises(ConfigError):
            parse_config({**MINIMAL, **wrong})
    with pytest.raises(jsonschema.ValidationError):  # and the schema, as an editor reads it
        jsonschema.Draft202012Validator(SCHEMA).validate({**MINIMAL, "helth": {"fall": 2}})
    block = Block(ROOT / "README.md", 1, "yaml", "fragment", 'session_binding_key: "${MCPB_TEST_KEY}"\n')
    assert load_configuration({**MINIMAL, **load_yaml(block)}, block).session_binding_key == (
        placeholder("MCPB_TEST_KEY")
    )


# --- YAML: Prometheus ------------------------------------------------------------------------------


def registry() -> CollectorRegistry:
    """A proxy's metrics, each labelled family with one child so that its labels show."""
    registry = CollectorRegistry()
    backend = Backend("a", "127.0.0.1", 8001)
    metrics = Metrics(registry, lambda: [backend])
    for family in vars(metrics).values():
        names = getattr(family, "labelnames", None)
        if names:
            family.labels(*("x" for _ in names))
    return registry


def exported() -> dict[str, set[str]]:
    """Every mcpbalancer_* series a proxy exports -> its label names (histograms with their
    _bucket/_sum/_count series, counters as _total)."""
    series: dict[str, set[str]] = {}
    for family in registry().collect():
        for sample in family.samples:
            if sample.name.startswith("mcpbalancer_"):
                series.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return series


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """(series, label names matched) of every mcpbalancer_* selector in a PromQL expression."""
    for found in re.finditer(r"\b(mcpbalancer_\w+)(?:\{([^}]*)\})?", expr):
        matchers = found[2] or ""
        yield found[1], set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))


# Labels Prometheus gives every series of a scrape target.
TARGET_LABELS = {"instance", "job"}


def check_expr(expr: str, where: str) -> None:
    series = exported()
    named = list(selectors(expr))
    assert named, f"{where}: no mcpbalancer_* series in {expr!r}"
    for name, labels in named:
        assert name in series, f"{where}: {name} is not exported"
        labels -= TARGET_LABELS
        assert labels <= series[name], f"{where}: {name} has no label {labels - series[name]}"
    # Labels it groups by exist on the series it groups.
    for by in re.findall(r"\bby \(([^)]*)\)", expr):
        for label in (label.strip() for label in by.split(",")):
            known = label in TARGET_LABELS or label == "le"  # `le`: the buckets of a histogram
            assert known or any(label in series[name] for name, _ in named), (where, label)
    assert expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses"


@pytest.mark.parametrize("block", of("yaml", "prometheus: scrape"))
def test_a_prometheus_scrape_configuration_has_the_shape_prometheus_reads(block: Block) -> None:
    jobs = load_yaml(block)["scrape_configs"]
    assert jobs
    for job in jobs:
        assert isinstance(job["job_name"], str)
        assert job.get("metrics_path", "/metrics") == parse_config(MINIMAL).metrics.path
        for static in job["static_configs"]:
            assert all(re.fullmatch(r"[\w.-]+:\d+", target) for target in static["targets"])


def test_the_shipped_alert_rules_name_series_the_proxy_exports() -> None:
    """deploy/prometheus/alerts.yaml (a real Prometheus evaluates it: tests/test_prometheus.py)."""
    path = ROOT / "deploy" / "prometheus" / "alerts.yaml"
    check_rules(yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader), str(path))


def test_the_dashboard_queries_name_series_the_proxy_exports() -> None:
    board = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    targets = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", ())]
    assert targets
    for title, expr in targets:
        check_expr(expr, f"dashboard {title!r}")


def check_rules(data: dict[str, Any], where: str) -> None:
    groups = data["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert rules
    assert all(isinstance(group["name"], str) for group in groups)
    for rule in rules:
        assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert ("alert" in rule) != ("record" in rule)
        check_expr(str(rule["expr"]), f"{where} {rule.get('alert') or rule.get('record')}")


def test_the_expression_check_refuses_what_is_not_exported() -> None:
    check_expr('sum by (backend) (rate(mcpbalancer_requests_total{code="5xx"}[5m]))', "ok")
    check_expr("histogram_quantile(0.99, rate(mcpbalancer_request_duration_seconds_bucket[5m]))", "ok")
    for wrong in (
        "rate(mcpbalancer_request_total[5m])",  # a misspelt name
        'rate(mcpbalancer_requests_total{status="500"}[5m])',  # a label it does not have
        "sum by (reason) (mcpbalancer_backend_up)",
    ):
        with pytest.raises(AssertionError):
            check_expr(wrong, "wrong")


# --- the metrics table ------------------------------------------------------------------------------

METRIC_ROW = re.compile(r"\| `(?P<name>mcpbalancer_\w+)` \| (?P<type>\w+) \|(?P<labels>[^|]*)\|")


def test_the_metrics_table_is_what_the_proxy_exports() -> None:
    """docs/monitoring.md's table: every mcpbalancer_* metric once, with its type and labels."""
    page = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    rows = [m for line in page.splitlines() if (m := METRIC_ROW.match(line))]
    documented = {m["name"]: (m["type"], set(re.findall(r"`(\w+)`", m["labels"]))) for m in rows}
    assert len(documented) == len(rows), "a metric is listed twice"
    real = {}
    for family in registry().collect():
        if family.name.startswith("mcpbalancer_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = {label for sample in family.samples for label in sample.labels} - {"le"}
            real[name] = (family.type, labels)
    assert documented == real


# --- shell -----------------------------------------------------------------------------------------


def commands(script: str) -> Iterator[tuple[list[str], str]]:
    """(words, trailing comment) of every simple command of a shell block, continuation lines joined."""
    for line in script.replace("\\\n", " ").splitlines():
        code, _, comment = line.partition(" #")
        lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        tokens = iter([*lexer, ";"])
        for token in tokens:
            if token in {"&&", "||", ";", "|", "&", ";;", "(", ")"}:
                if words:
                    yield words, comment.strip()
                words = []
            elif token in {">", ">>", "<", ">&", "<&"}:
                next(tokens)  # a redirection and its file: not an argument
            else:
                words.append(token)


DOCKER_OPTIONS_WITH_VALUE = {"-p", "-v", "-e", "-u", "--name", "--user", "--env-file", "--network", "--mount"}


def mcpbalancer_args(words: list[str]) -> list[str] | None:
    """The arguments given to mcpbalancer by a command, or None if it does not run mcpbalancer."""
    while words and (words[0] == "sudo" or re.fullmatch(r"\w+=\S*", words[0])):
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program == "mcpbalancer":
        return words[1:]
    if re.fullmatch(r"python3?", program) and words[1:3] == ["-m", "mcpbalancer"]:
        return words[3:]
    if program == "docker" and words[1:2] == ["run"]:
        rest = words[2:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in DOCKER_OPTIONS_WITH_VALUE else rest[1:]
        if rest and rest[0] == "mcpbalancer" and rest[1:]:
            return rest[1:]
    return None


def accepted(args: list[str]) -> tuple[bool, str]:
    """Whether the CLI's argument parser takes `args`, and what it said."""
    said = io.StringIO()
    try:
        with redirect_stderr(said), redirect_stdout(said):
            cli.parse_args(args)
    except SystemExit as exc:
        return exc.code == 0, said.getvalue()  # --version and --help exit 0
    return True, said.getvalue()


def mcpbalancer_commands(block: Block) -> list[tuple[list[str], str]]:
    found = [(mcpbalancer_args(words), comment) for words, comment in commands(block.text)]
    return [(args, comment) for args, comment in found if args is not None]


@pytest.mark.parametrize("block", of("sh"))
def test_a_shell_block_parses(block: Block) -> None:
    result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("block", of("sh"))
def test_every_mcpbalancer_command_uses_options_the_cli_knows(block: Block) -> None:
    for args, comment in mcpbalancer_commands(block):
        ok, said = accepted(args)
        assert ok, f"{block.where}: mcpbalancer {shlex.join(args)}: {said}"
        config = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg in {"--config", "-c"}), None)
        if "--check" in args and config is not None and (ROOT / config).is_file():
            out = io.StringIO()
            with redirect_stdout(out):
                code = cli.main(_rooted(args))
            assert code == 0, out.getvalue()
            if re.fullmatch(r"\S+: OK \(.*\)", comment):
                assert out.getvalue().strip() == comment.replace(config, str(ROOT / config), 1)


def _rooted(args: list[str]) -> list[str]:
    """`args` with the file after --config made absolute (the docs run from the repository root)."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in {"--config", "-c"}:
            out[i + 1] = str(ROOT / out[i + 1])
    return out


def test_the_docs_show_mcpbalancer_commands_and_bad_ones_are_caught() -> None:
    found = [args for b in ALL if b.kind == "sh" for args, _ in mcpbalancer_commands(b)]
    assert len(found) >= 8
    assert ["--config", "config/demo.yaml"] in found  # the quick start
    assert any(args[-1:] == ["--check"] and args[0] == "--config" for args in found)  # docker run ... --check
    assert not accepted(["--config", "x.yaml", "--chek"])[0]
    assert not accepted(["--check"])[0]  # no --config
    script = (
        "sudo docker run --rm -v a:b:ro mcpbalancer \\\n  --config c.yaml --check   # prints\n"
        "x && .venv/bin/mcpbalancer -c y\nmcpbalancer schema > s.json"
    )
    assert [mcpbalancer_args(words) for words, _ in commands(script)] == [
        ["--config", "c.yaml", "--check"],
        None,
        ["-c", "y"],
        ["schema"],
    ]


# --- JSON ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("json"))
def test_a_json_block_parses(block: Block) -> None:
    assert isinstance(json.loads(block.text), dict | list)


# --- links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def prose(page: Path) -> str:
    """A page without its fenced blocks."""
    return re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to `-`."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), flags=re.MULTILINE):
        slug = "".join(
            c for c in heading.strip().lower() if c in " -_" or unicodedata.category(c)[0] in "LN"
        ).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def links() -> list[Any]:
    found = []
    for page in PAGES:
        for match in LINK.finditer(prose(page)):
            target = match["target"]
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: lead off this machine
                found.append(pytest.param(page, target, id=f"{page.relative_to(ROOT)}:{target}"))
    return found


@pytest.mark.parametrize(("page", "target"), links())
def test_a_link_leads_to_a_file_and_heading_that_exist(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{target}: no such file"
    assert ROOT in linked.parents or linked == ROOT, f"{target}: outside the repository"
    if anchor:
        assert linked.suffix == ".md", f"{target}: an anchor in a file that is not a page"
        assert anchor in anchors(linked), f"{target}: no such heading; headings: {sorted(anchors(linked))}"


def test_anchors_are_spelt_as_github_spells_them() -> None:
    page = ROOT / "docs" / "routing.md"
    assert {"replay-failover", "rules-for-2026-07-28-requests", "http-behaviour"} <= anchors(page)


def test_the_readme_links_every_page_of_the_manual() -> None:
    linked = {(ROOT / m["target"].partition("#")[0]).resolve() for m in LINK.finditer(prose(PAGES[0]))}
    assert sorted(str(p.relative_to(ROOT)) for p in PAGES[1:] if p.resolve() not in linked) == []
