"""The proxy's own answers spell every status one way: the reason phrase of RFC 9110, in its Title
Case, on the status line and wherever a message names the status ("Bad Request: ...").

The source of the package is read (ast) so that an answer added anywhere later is checked too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from mcpbalancer import errors
from mcpbalancer.errors import ProxyError, denied, reason_phrase

PACKAGE = Path(errors.__file__).resolve().parent
STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3}) ([^\r\n%{]+)\r\n")
# What RFC 9110 §15 calls them; Python < 3.13 still has the RFC 7231 names for these four.
RFC9110 = {
    413: "Content Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
}
PHRASES = {int(s): RFC9110.get(int(s), s.phrase) for s in HTTPStatus}


def every_subclass(cls: type[ProxyError]) -> Iterator[type[ProxyError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from every_subclass(sub)


def sources() -> Iterator[tuple[str, ast.AST]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            yield f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}", node


def leading_text(node: ast.expr) -> str | None:
    """The literal start of a str or f-string argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def miscased(message: str) -> str | None:
    """The phrase `message` starts with in another casing, e.g. "Bad request: ..." -> "Bad Request"."""
    for phrase in PHRASES.values():
        head, rest = message[: len(phrase)], message[len(phrase) :]
        if head.lower() == phrase.lower() and rest[:1] in ("", ":") and head != phrase:
            return phrase
    return None


def test_reason_phrase_is_rfc_9110() -> None:
    assert {status: reason_phrase(status) for status in PHRASES} == PHRASES


def test_every_proxy_error_carries_its_status_reason_phrase() -> None:
    classes = [ProxyError, *every_subclass(ProxyError)]
    classes += [denied(status) for status in PHRASES if 400 <= status < 500]
    wrong = {cls.__name__: (cls.status, cls.reason) for cls in classes if cls.reason != PHRASES[cls.status]}
    assert wrong == {}


def test_default_messages_name_a_status_as_its_reason_phrase() -> None:
    classes = [ProxyError, *every_subclass(ProxyError)]
    wrong = {c.__name__: c.default_message for c in classes if miscased(c.default_message)}
    assert wrong == {}
    # The check can fail: these are the spellings this test was written against.
    assert miscased("Bad request: x") == "Bad Request"
    assert miscased("Bad gateway") == "Bad Gateway"
    assert miscased("Bad Request: x") is None
    assert miscased("Session not found") is None


def test_messages_of_proxy_errors_in_the_source_name_statuses_as_their_phrases() -> None:
    error_names = {cls.__name__ for cls in every_subclass(ProxyError)} | {"ProxyError", "denied"}
    checked, wrong = 0, []
    for where, node in sources():
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        if node.func.id not in error_names:
            continue
        text = leading_text(node.args[0])
        if text is None:
            continue
        checked += 1
        if miscased(text):
            wrong.append(f"{where}: {text!r}")
    assert checked >= 20  # the scan finds the messages (about 30 today)
    assert wrong == []


def test_status_lines_and_local_answers_in_the_source_use_the_phrases() -> None:
    seen, wrong = [], []
    for where, node in sources():
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            for status, phrase in STATUS_LINE.findall(text):
                seen.append(int(status))
                if phrase != PHRASES[int(status)]:
                    wrong.append(f"{where}: {status} {phrase!r}")
        is_local = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LocalAnswer"
        if is_local and len(node.args) >= 2:
            status, reason = node.args[0], node.args[1]
            if isinstance(status, ast.Constant) and isinstance(reason, ast.Constant):
                seen.append(status.value)
                if reason.value != PHRASES[status.value]:
                    wrong.append(f"{where}: {status.value} {reason.value!r}")
    assert {100, 200, 204, 405, 503} <= set(seen)
    assert wrong == []


@pytest.mark.parametrize("status", [413, 422, 429])
def test_a_deny_rule_status_line_uses_the_rfc_9110_phrase(status: int) -> None:
    raw = errors.render_error(denied(status)(), keep_alive=True)
    assert raw.startswith(f"HTTP/1.1 {status} {PHRASES[status]}\r\n".encode())
