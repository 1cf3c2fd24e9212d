"""The access line's fields, built from pieces the log keeps (observability/logs.py `_Memo`): every
line says what its own exchange says, whatever came before it, in both formats: many distinct
paths, sessions and MCP methods (past the bound at which the kept pieces are dropped), values too
long to keep, absent fields after a drop, and bytes a JSON string must escape.

Unit level: the access log is fed records shaped as the data plane's exchanges; the end-to-end
lines (real backends, real clients) are in test_observability.py.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import pytest

from mcpbalancer.observability import logs
from mcpbalancer.observability.logs import AccessLog, SessionHasher
from mcpbalancer.protocol import Era, era_of

KEY = b"k" * 16


@dataclass
class Head:
    method: bytes = b"POST"
    target: bytes = b"/mcp"
    session_id: bytes | None = None
    protocol_version: bytes | None = b"2025-06-18"
    mcp_method: bytes | None = None


@dataclass
class Peer:
    peer_ip: bytes = b"10.0.0.1"


@dataclass
class Facts:
    era: Era = Era.LEGACY


@dataclass
class Named:
    name: str


@dataclass
class Record:
    head: Head
    client: Peer = field(default_factory=Peer)
    facts: Facts | None = field(default_factory=Facts)
    backend: Named | None = None
    status: int = 200
    sent: int = 10
    outcome: str = "ok"
    received_at: float = 0.0
    created: bytes | None = None
    service: str = "default"
    request_id: bytes | None = None


def records() -> list[Record]:
    """More distinct values than the log keeps, with absent fields between them."""
    found = []
    for i in range(2600):
        head = Head(
            target=b'/mcp/%d?q="\\\x01\xe9' % i if i % 3 else b"/mcp",
            session_id=None if i % 5 == 0 else b"sess-%d" % (i % 1500),
            mcp_method=None if i % 7 == 0 else b"tools/call-%d" % (i % 1100),
            method=b"GET" if i % 11 == 0 else b"POST",
        )
        found.append(
            Record(
                head,
                client=Peer(b"10.0.%d.%d" % (i // 250, i % 250)),
                facts=None if i % 13 == 0 else Facts(Era.MODERN if i % 2 else Era.LEGACY),
                backend=None if i % 17 == 0 else Named(f"b{i % 1300}"),
                status=200 + i % 3,
                created=b"new-%d" % i if i % 5 == 0 and i % 10 else None,
                service="tools" if i % 19 == 0 else "default",
                request_id=b"rid-%d" % i if i % 23 == 0 else None,
            )
        )
    long_target = b"/" + b"p\x7f" * 1500  # longer than a kept piece, longer than the logged path
    found.append(Record(Head(target=long_target, session_id=b"s" * 256, mcp_method=b"m" * 300)))
    found.append(Record(Head(target=long_target, session_id=b"s" * 256, mcp_method=b"m" * 300)))
    return found


def written(fmt: str, items: list[Record]) -> list[str]:
    stream = io.StringIO()
    log = AccessLog(stream, fmt=fmt, hasher=SessionHasher(KEY), clock=lambda: 1_700_000_000.25)
    for record in items:
        log.write(record)
    log.close()
    return stream.getvalue().splitlines()


def expected(record: Record) -> dict[str, object]:
    head = record.head
    sid = head.session_id if head.session_id is not None else record.created
    era = record.facts.era if record.facts is not None else era_of(head.session_id, head.protocol_version)
    return {
        "ts": "2023-11-14T22:13:20.250Z",
        "type": "access",
        "client": record.client.peer_ip.decode(),
        "method": head.method.decode(),
        "path": head.target[:2048].decode("latin-1"),
        "era": era.value,
        "service": record.service,
        "session": None if sid is None else SessionHasher(KEY)(sid),
        "backend": None if record.backend is None else record.backend.name,
        "status": record.status,
        "bytes": record.sent,
        "mcp_method": None if head.mcp_method is None else head.mcp_method[:64].decode("latin-1"),
        "outcome": record.outcome,
        "request_id": None if record.request_id is None else record.request_id.decode(),
        "worker": None,
    }


async def test_each_json_line_says_what_its_own_exchange_says() -> None:
    items = records()
    lines = written("json", items)
    assert len(lines) == len(items)
    for line, record in zip(lines, items, strict=True):
        got = json.loads(line)
        assert isinstance(got.pop("duration_us"), int)
        assert got == expected(record)
        order = list(expected(record))
        assert list(json.loads(line)) == [*order[:11], "duration_us", *order[11:]]


async def test_each_text_line_says_what_its_own_exchange_says() -> None:
    items = records()
    lines = written("text", items)
    assert len(lines) == len(items)
    for line, record in zip(lines, items, strict=True):
        want = expected(record)
        dash = {k: "-" if v is None else v for k, v in want.items()}
        pattern = (
            f"{re.escape(str(want['ts']))} {re.escape(str(want['client']))} "
            f'"{re.escape(str(want["method"]))} {re.escape(str(want["path"]))}" '
            f"{want['status']} {want['bytes']} "
            rf"\d+us era={want['era']} service={want['service']} session={re.escape(str(dash['session']))} "
            f"backend={dash['backend']} mcp={re.escape(str(dash['mcp_method']))} outcome={want['outcome']} "
            f"request_id={dash['request_id']} worker=-"
        )
        assert re.fullmatch(pattern, line, re.DOTALL), line[:300]


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_what_the_log_keeps_stays_bounded(fmt: str) -> None:
    stream = io.StringIO()
    log = AccessLog(stream, fmt=fmt)
    for i in range(5000):
        log.write(Record(Head(target=b"/%d" % i, session_id=b"s%d" % i, mcp_method=b"m%d" % i)))
        log.write(Record(Head(target=b"/" + b"x" * 300 + b"%d" % i)))  # too long to keep
    log.close()
    for memo in (log._paths, log._sessions, log._mcps, log._clients, log._methods):
        assert len(memo) <= logs._MEMO_SIZE
        assert all(key is None or len(key) <= logs._MEMO_KEY_LIMIT for key in memo)
    assert len(stream.getvalue().splitlines()) == 10000
