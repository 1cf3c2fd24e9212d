"""Logs: the per-request access log, and the format of every other log line.

The access log is one line per exchange on stdout, JSON (the default) or text. It does not go
through `logging`: a LogRecord, a handler lock and a formatter per request cost more than the rest
of the line. The line is one f-string whose only untrusted strings (the path, the Mcp-Method value)
go through the C JSON string encoder; lines are gathered and written in one write every
FLUSH_INTERVAL seconds (or FLUSH_LINES lines). Session ids are never written: a session is shown as
the first 8 hex digits of a blake2s of its id keyed with a per-process random key, enough to follow
one session through one proxy's log and useless for taking it over. The line of the request that
created a session (an `initialize`) shows the session its answer minted. Both formats carry the
same fields in the same order, each line all of them: the service, the request id (X-Request-Id:
the client's, or the one the proxy made for an error answer), and the worker index (null or `-`
outside a worker process).

Lifecycle events (start, backend up/down, drain, reload) are ordinary `logging` records on stderr,
JSON lines in JSON mode (`JsonFormatter`). A record about a request (`extra=request_fields(...)`)
carries its service and request id; a worker process's records carry its index; the text format
ends with the same fields as `key=value`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring_ascii as _json_string
from typing import Any, Final, Protocol, TextIO

from mcpbalancer import protocol
from mcpbalancer.config import LogConfig

FLUSH_INTERVAL: Final = 0.1
FLUSH_LINES: Final = 1024
_PATH_LIMIT: Final = 2048
_HASH_CACHE_SIZE: Final = 4096
# Worker processes share stdout: a write of at most PIPE_BUF bytes to a pipe is not interleaved with
# another process's. Characters here are at most 2 bytes in UTF-8 (ASCII, or paths decoded as latin-1).
ATOMIC_CHARS: Final = select.PIPE_BUF // 2
REQUEST_ID_BYTES: Final = 8  # a request id the proxy makes: 16 hex digits


def new_request_id() -> bytes:
    """A request id for an answer whose request came without a usable X-Request-Id."""
    return os.urandom(REQUEST_ID_BYTES).hex().encode("ascii")


def request_fields(service: str, request_id: bytes | None) -> dict[str, str]:
    """`extra=` for a log record about one request: both formats then carry these fields."""
    fields = {"service": service}
    if request_id is not None:
        fields["request_id"] = request_id.decode("latin-1")
    return fields


class AccessRecord(Protocol):
    """What an access line reads of a finished exchange (dataplane/exchange.py). A protocol rather
    than the class: the data plane writes to the access log, so the log cannot import it."""

    status: int  # 0 when nothing was sent
    sent: int
    outcome: str
    received_at: float  # perf_counter
    created: bytes | None  # the session id the answer created, if any
    service: str

    @property
    def request_id(self) -> bytes | None: ...
    @property
    def client(self) -> Peer: ...
    @property
    def head(self) -> HeadView: ...
    @property
    def facts(self) -> _Facts | None: ...
    @property
    def backend(self) -> Named | None: ...


class Peer(Protocol):
    """What a log line or a span reads of the client connection."""

    @property
    def peer_ip(self) -> bytes: ...


class HeadView(Protocol):
    """What a log line or a span reads of a request head (dataplane/head.py's RequestHead)."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def session_id(self) -> bytes | None: ...
    @property
    def protocol_version(self) -> bytes | None: ...
    @property
    def mcp_method(self) -> bytes | None: ...


class _Facts(Protocol):
    @property
    def era(self) -> protocol.Era: ...


class Named(Protocol):
    @property
    def name(self) -> str: ...


class SessionHasher:
    """sid -> 8 hex digits of a keyed blake2s, with a small cache: sessions come back many times."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = os.urandom(16) if key is None else key
        self._cache: dict[bytes, str] = {}

    def __call__(self, sid: bytes) -> str:
        tag = self._cache.get(sid)
        if tag is None:
            if len(self._cache) >= _HASH_CACHE_SIZE:
                self._cache.clear()
            tag = self._cache[sid] = self.digest(sid)
        return tag

    def digest(self, sid: bytes) -> str:
        """The tag, made now (no cache): for a caller that keeps its own."""
        return hashlib.blake2s(sid, key=self._key, digest_size=4).hexdigest()


class _Memo(dict[Any, str]):
    """A raw field (bytes or a name; None when absent) -> its text in a line, made once: `memo[raw]` is one
    dict lookup in C, and only a miss (`__missing__`) calls `make`. Bounded: cleared when full; a
    value longer than _MEMO_KEY_LIMIT is made every time, not kept."""

    __slots__ = ("_make", "_none")

    def __init__(self, make: Callable[[Any], str], none: str) -> None:
        super().__init__()
        self._make = make
        self._none = none
        self[None] = none

    def __missing__(self, key: Any) -> str:
        if key is None:  # only after a clear
            text = self[None] = self._none
            return text
        text = self._make(key)
        if len(key) <= _MEMO_KEY_LIMIT:
            if len(self) >= _MEMO_SIZE:
                self.clear()
                self[None] = self._none
            self[key] = text
        return text


_MEMO_SIZE: Final = 1024
_MEMO_KEY_LIMIT: Final = 256


class AccessLog:
    """Writes one line per finished exchange to `stream`; `close()` flushes what is buffered.

    The line is one f-string over pieces made once and looked up per request (`_Memo`): the
    client's address, the method, the path (JSON-escaped), the MCP method, the session's tag, the
    backend's name; the timestamp is formatted once per millisecond, its date once per second."""

    def __init__(
        self,
        stream: TextIO,
        *,
        fmt: str = "json",
        hasher: SessionHasher | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
        worker: int | None = None,
    ) -> None:
        self._stream = stream
        # `shared`: other processes write to the same stream, so write whole lines in atomic pieces.
        self._shared = shared
        # Every line ends with the worker index (none outside a worker process); made once.
        self._json_worker = f',"worker":{"null" if worker is None else f"{worker:d}"}}}\n'
        self._text_worker = f" worker={'-' if worker is None else f'{worker:d}'}\n"
        self._line = self._json_line if fmt == "json" else self._text_line
        self._hash = hasher or SessionHasher()
        self._clock = clock
        self._milli = -1
        self._second = -1
        self._second_text = ""
        self._ts = ""
        tag = self._hash.digest
        if fmt == "json":
            self._clients = _Memo(_ascii, "")
            self._methods = _Memo(_ascii, "")
            self._paths = _Memo(lambda raw: _json_string(_path(raw)), "null")
            self._mcps = _Memo(lambda raw: _json_string(raw[:64].decode("latin-1")), "null")
            self._sessions = _Memo(lambda sid: f'"{tag(sid)}"', "null")
            self._backends = _Memo(_quoted, "null")
        else:
            self._clients = _Memo(_ascii, "")
            self._methods = _Memo(_ascii, "")
            self._paths = _Memo(_path, "")
            self._mcps = _Memo(lambda raw: _path(raw[:64]), "-")
            self._sessions = _Memo(tag, "-")
        self._pending: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._broken = False

    def write(self, exchange: AccessRecord) -> None:
        if self._broken:
            return
        pending = self._pending
        pending.append(self._line(exchange))
        if len(pending) == 1:
            self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
        elif len(pending) >= FLUSH_LINES:
            self.flush()

    logging = write  # the logging phase's filter (filters/phases.py)

    def flush(self) -> None:
        """Write the lines gathered since the last flush, in one write."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        lines, self._pending = self._pending, []
        if not lines or self._broken:
            return
        try:
            for chunk in _atomic_chunks(lines) if self._shared else ("".join(lines),):
                self._stream.write(chunk)
                self._stream.flush()
        except (OSError, ValueError) as exc:  # stdout closed, a broken pipe: stop, don't fail requests
            self._broken = True
            logging.getLogger(__name__).warning("access log disabled: %s", exc)

    def close(self) -> None:
        self.flush()

    # -- the two formats ----------------------------------------------------------------------------
    # Both read the same fields: the session is the request's, or the one its answer created.

    def _json_line(self, ex: AccessRecord) -> str:
        milli = int(self._clock() * 1000)
        if milli != self._milli:
            self._stamp(milli)
        head = ex.head
        sid = head.session_id
        facts = ex.facts
        backend = ex.backend
        rid = ex.request_id  # visible ASCII only (protocol.valid_request_id): no escaping needed
        return (
            f'{{"ts":"{self._ts}","type":"access","client":"{self._clients[ex.client.peer_ip]}",'
            f'"method":"{self._methods[head.method]}","path":{self._paths[head.target]},'
            f'"era":"{_ERA_TEXT[_era_of(head) if facts is None else facts.era]}","service":"{ex.service}",'
            f'"session":{self._sessions[ex.created if sid is None else sid]},'
            f'"backend":{"null" if backend is None else self._backends[backend.name]},'
            f'"status":{ex.status},"bytes":{ex.sent},'
            f'"duration_us":{int((_perf_counter() - ex.received_at) * 1_000_000)},'
            f'"mcp_method":{self._mcps[head.mcp_method]},"outcome":"{ex.outcome}",'
            f'"request_id":{"null" if rid is None else _quoted(rid.decode("latin-1"))}{self._json_worker}'
        )

    def _text_line(self, ex: AccessRecord) -> str:
        milli = int(self._clock() * 1000)
        if milli != self._milli:
            self._stamp(milli)
        head = ex.head
        sid = head.session_id
        facts = ex.facts
        backend = ex.backend
        rid = ex.request_id
        return (
            f"{self._ts} {self._clients[ex.client.peer_ip]} "
            f'"{self._methods[head.method]} {self._paths[head.target]}" {ex.status} {ex.sent} '
            f"{int((_perf_counter() - ex.received_at) * 1_000_000)}us "
            f"era={_ERA_TEXT[_era_of(head) if facts is None else facts.era]} service={ex.service} "
            f"session={self._sessions[ex.created if sid is None else sid]} "
            f"backend={'-' if backend is None else backend.name} "
            f"mcp={self._mcps[head.mcp_method]} outcome={ex.outcome} "
            f"request_id={'-' if rid is None else rid.decode('latin-1')}{self._text_worker}"
        )

    def _stamp(self, milli: int) -> None:
        """UTC, ISO 8601, milliseconds; formatted once per millisecond, the date once per second."""
        self._milli = milli
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._ts = self._second_text + _FRACTIONS[milli - second * 1000]


def _atomic_chunks(lines: list[str]) -> Iterator[str]:
    """`lines` joined into pieces of at most ATOMIC_CHARS (a longer line is a piece of its own)."""
    start, size = 0, 0
    for i, line in enumerate(lines):
        if size and size + len(line) > ATOMIC_CHARS:
            yield "".join(lines[start:i])
            start, size = i, 0
        size += len(line)
    yield "".join(lines[start:])


def _era_of(head: HeadView) -> protocol.Era:
    """The era of a request routing did not classify (refused before it), from its head alone."""
    return protocol.era_of(head.session_id, head.protocol_version)


def _ascii(raw: bytes) -> str:
    return raw.decode()


def _path(raw: bytes) -> str:
    return raw[:_PATH_LIMIT].decode("latin-1")


def _quoted(text: str) -> str:
    return f'"{text}"'  # only for values that need no escaping: hex digits, backend names


_perf_counter: Final = time.perf_counter
_ERA_TEXT: Final = {era: era.value for era in protocol.Era}  # a StrEnum formats through __format__: slower
_FRACTIONS: Final = tuple(f".{milli:03d}Z" for milli in range(1000))


# --- every other log line ----------------------------------------------------------------------------


# The fields a record may carry beyond its message, in the order both formats write them.
_RECORD_FIELDS: Final = ("service", "request_id")


def _extras(record: logging.LogRecord, worker: int | None) -> list[tuple[str, object]]:
    """(field, value) of a record's request fields (request_fields) and the worker index."""
    found: list[tuple[str, object]] = [
        (name, value) for name in _RECORD_FIELDS if (value := getattr(record, name, None)) is not None
    ]
    if worker is not None:
        found.append(("worker", worker))
    return found


class JsonFormatter(logging.Formatter):
    """A LogRecord as one JSON line: ts, type "event", level, logger, msg; then the request's
    `service` and `request_id` when it is about one, `worker` in a worker process, `exc` when
    present."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "type": "event",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record, self._worker))
        audit = getattr(record, "audit", None)  # the admin API's audit lines: their facts as fields
        if audit is not None:
            entry["audit"] = audit
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then the fields JsonFormatter adds, as ` key=value`."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = "".join(f" {name}={value}" for name, value in _extras(record, self._worker))
        if not extras:
            return line
        message, newline, rest = line.partition("\n")  # a traceback follows the first line
        return message + extras + newline + rest


TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# The handler configure_logging put on the root logger: a reload changes its format in place.
_installed: list[logging.Handler] = []


def configure_logging(
    config: LogConfig, *, level: str | None = None, stream: TextIO | None = None, worker: int | None = None
) -> None:
    """Root logging on `stream` (stderr; the access log has stdout), in the configured format;
    `level` overrides the config's. A worker process (`worker`: its index) says so in every line:
    the workers share the supervisor's stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(config.format, worker))
    logging.basicConfig(level=(level or config.level).upper(), handlers=[handler], force=True)
    _installed[:] = [handler]


def reconfigure_logging(config: LogConfig, *, worker: int | None = None) -> None:
    """A reload: the new level, and the new format on the handler configure_logging installed."""
    logging.getLogger().setLevel(config.level.upper())
    for handler in _installed:
        handler.setFormatter(_formatter(config.format, worker))


def _formatter(fmt: str, worker: int | None) -> logging.Formatter:
    return JsonFormatter(worker) if fmt == "json" else TextFormatter(worker)


def access_enabled(config: LogConfig) -> bool:
    """Access lines are info-level: written when `access` is on and the level is debug or info."""
    return config.access and config.level in ("debug", "info")
