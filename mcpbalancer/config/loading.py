"""Reading a configuration: the YAML file, ${NAME} references, the models, and the one place where
pydantic's errors become ours, `FILE: key.path: what is wrong`, one line per problem."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Collection, Mapping
from typing import Any, Final

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from mcpbalancer.config.build import build, check_workers
from mcpbalancer.config.checks import describe
from mcpbalancer.config.file import ConfigFile
from mcpbalancer.config.runtime import Config
from mcpbalancer.config.services import build_services, check_backend_names
from mcpbalancer.errors import ConfigError
from mcpbalancer.fileaccess import unreadable

FILE: Final = TypeAdapter(ConfigFile)

# `$${` is a literal `${`; any other `$` is itself. A reference is ${NAME}, nothing more (no defaults,
# no nesting): a secret either is in the environment or the file is refused.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)(?P<end>\}?)")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)

Loc = tuple[str | int, ...]


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except PermissionError:
        raise ConfigError(f"{source}: {unreadable(source)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_problem(exc)}") from None
    return parse_config(data, source, environ)


def parse_config(data: object, source: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """`data` as YAML loads it → Config. ${NAME} in string values is replaced from `environ`
    (os.environ by default)."""
    if data is None:
        raise ConfigError(f"{source}: the configuration is empty; at least `backends` is required")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {describe(data)}")
    problems: list[str] = []
    data = _substitute(data, (), os.environ if environ is None else environ, problems)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
    try:
        file = FILE.validate_python(data)
    except ValidationError as exc:
        lines = [f"{source}: {_problem(data, error)}" for error in _own(exc.errors(include_url=False))]
        raise ConfigError("\n".join(lines)) from None
    config = check_workers(build(file, source))
    if not file.services:
        return config
    assert isinstance(data, Mapping)
    services = build_services(data, file, source, FILE.validate_python, _problem)
    config = dataclasses.replace(config, services=services)
    check_backend_names(config, source)
    return config


# --- ${NAME} ---------------------------------------------------------------------------------------


def _substitute(node: Any, at: Loc, environ: Mapping[str, str], problems: list[str]) -> Any:
    """`node` with references in its string values replaced. Keys are left alone, and a value from the
    environment is never parsed as YAML: it cannot add structure to the file."""
    if isinstance(node, str):
        return _REFERENCE.sub(lambda m: _value(m, at, environ, problems), node) if "${" in node else node
    if isinstance(node, Mapping):
        return {key: _substitute(value, (*at, key), environ, problems) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(item, (*at, i), environ, problems) for i, item in enumerate(node)]
    return node


def _value(match: re.Match[str], at: Loc, environ: Mapping[str, str], problems: list[str]) -> str:
    name = match["name"]
    if name is None:
        return "${"
    where = _path(None, at)
    if not match["end"]:
        problems.append(f"{where}: an unclosed ${{ (write $${{ for a literal ${{)")
    elif not _VARIABLE.fullmatch(name):
        problems.append(f"{where}: ${{{name}}} is not a variable name (letters, digits and _)")
    elif name not in environ:
        problems.append(f"{where}: environment variable {name} is not set")
    else:
        return environ[name]
    return match[0]


# --- pydantic's errors → ours ----------------------------------------------------------------------

_TYPES: Final = {
    "float_type": "must be a number",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
    "dataclass_exact_type": "must be a mapping",
    "model_type": "must be a mapping",
}
_BOUNDS: Final = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than_equal": ("le", "<="),
}


def _own(errors: list[ErrorDetails]) -> list[ErrorDetails]:
    """The errors less those that only follow from another: a list of one bad entry is also "too
    short" to pydantic, as its length is counted after validation."""
    locs = [error["loc"] for error in errors]
    return [
        error
        for error in errors
        if error["type"] != "too_short"
        or not any(loc[: len(error["loc"])] == error["loc"] != loc for loc in locs)
    ]


def _problem(data: object, error: ErrorDetails) -> str:
    ctx = error.get("ctx", {})
    at = error["loc"] + tuple(ctx.get("at", ()))
    problem = _describe_error(error, ctx)
    return f"{_path(data, at)}: {problem}" if at else problem


def _describe_error(error: ErrorDetails, ctx: Mapping[str, Any]) -> str:
    kind, raw = error["type"], error["input"]
    if kind in _TYPES:
        return f"{_TYPES[kind]}, got {describe(raw)}"
    if kind in _BOUNDS:
        name, sign = _BOUNDS[kind]
        return f"must be {sign} {_number(ctx[name])}, got {raw!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {raw}"
    if kind == "missing":
        return "is required"
    if kind == "string_too_short":
        n = ctx["min_length"]
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "too_short":
        n = ctx["min_length"]
        return "must have at least one entry" if n == 1 else f"must have at least {n} entries"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx["expected"])
        return f"must be one of {', '.join(choices)}; got {describe(raw)}"
    if kind == "unknown_key":
        allowed = ctx["allowed"]
        return f"unknown key; allowed: {', '.join(allowed)}{_did_you_mean(ctx['at'][-1], allowed)}"
    if kind == "config":
        return str(ctx["problem"])
    if kind == "value_error":
        return str(ctx["error"])
    return error["msg"]


def _did_you_mean(key: object, allowed: Collection[str]) -> str:
    """`; did you mean `health`?` when an allowed key is close to `key` (a typo, another casing)."""
    by_folded = {name.lower(): name for name in allowed}
    close = difflib.get_close_matches(str(key).lower(), by_folded, n=1, cutoff=0.75)
    return f"; did you mean `{by_folded[close[0]]}`?" if close else ""


def _number(value: object) -> object:
    """A bound as the user would write it: 0, not 0.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _path(data: object, at: Loc) -> str:
    """`backends[1].url`: list positions in brackets, mapping keys after dots. pydantic's locations
    do not say which is which, so `data` (the validated input) does; without it, ints are positions."""
    text = ""
    node = data
    for part in at:
        if part == "[key]":  # pydantic's marker for an error in a mapping's key
            continue
        if isinstance(part, int) and isinstance(node, str):
            break  # a string standing for a list of one (`token: "..."`): its own key names it
        is_position = isinstance(part, int) and (node is None or isinstance(node, list))
        text += f"[{part}]" if is_position else f".{part}" if text else str(part)
        node = _child(node, part)
    return text


def _child(node: object, part: str | int) -> object:
    if isinstance(node, Mapping):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
