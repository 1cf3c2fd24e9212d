"""Affinity for the state 2026-07-28 servers still keep per process: Tasks and MRTR request states.

Pure policy and parsing, no I/O. `Affinity.learn` takes a JSON-RPC response a backend sent to a
`tools/call` (or another request that may need input) and remembers
- `taskId -> backend` when the result is a task (`resultType: "task"`), for `tasks/get|update|cancel`
  carrying the id in `Mcp-Name`; it expires with the task's `ttlMs`, capped by `task_ttl`;
- `digest(requestState) -> backend` when the result is `input_required`, for the retry carrying
  that `requestState` in its body. Only a digest is kept: the state may be secret to the server.

The maps live in this process, bounded (least recently used first out) and with expiry checked on
read: an affinity is a hint, and a miss forwards by balance (the backend then answers for itself).
With a Redis store the router also shares them through Redis (store/shared.py).
`ResultSniffer` picks those responses out of a JSON or SSE body as it streams past.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, NamedTuple

from mcpbalancer.config import AffinityConfig

TASKS: Final = "tasks"
REQUEST_STATE: Final = "request_state"
# Methods whose Mcp-Name is a task id.
TASK_METHODS: Final = frozenset({b"tasks/get", b"tasks/update", b"tasks/cancel", b"tasks/result"})
# Methods that may answer input_required and be retried with requestState (2026-07-28 MRTR).
MRTR_METHODS: Final = frozenset({b"tools/call", b"prompts/get", b"resources/read"})
# Methods whose answer may create a task.
TASK_CREATING: Final = frozenset({b"tools/call"})
SNIFF_LIMIT: Final = 1024 * 1024  # response bytes kept for parsing; a larger answer is not learned from
# Only these results are parsed; every ordinary 2026-07-28 result says "resultType": "complete".
_LEARNABLE = re.compile(rb'"resultType"\s*:\s*"(?:task|input_required)"')


class Learned(NamedTuple):
    kind: str  # TASKS or REQUEST_STATE
    key: str  # the task id, or the digest of the request state
    ttl: float


class AffinityMap:
    """key -> backend name, at most `max_entries` (least recently used evicted), with expiry."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, backend: str, ttl: float) -> None:
        self._entries[key] = (backend, self._clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[0]


def state_digest(state: str) -> str:
    return hashlib.blake2b(state.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class Affinity:
    """The task and request-state maps the config turned on (None when off)."""

    def __init__(self, config: AffinityConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self.tasks = AffinityMap(config.max_entries, clock) if config.tasks else None
        self.states = AffinityMap(config.max_entries, clock) if config.request_state else None

    def learn(self, message: object, backend: str) -> Learned | None:
        """Remember what a response to a watched request created on `backend`; what, if anything."""
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict):
            return None
        kind = result.get("resultType")
        if kind == "task" and self.tasks is not None:
            task_id = result.get("taskId")
            if isinstance(task_id, str) and task_id:
                ttl = self._task_ttl(result.get("ttlMs"))
                self.tasks.put(task_id, backend, ttl)
                return Learned(TASKS, task_id, ttl)
        elif kind == "input_required" and self.states is not None:
            state = result.get("requestState")
            if isinstance(state, str) and state:
                key, ttl = state_digest(state), self._config.request_state_ttl
                self.states.put(key, backend, ttl)
                return Learned(REQUEST_STATE, key, ttl)
        return None

    def _task_ttl(self, ttl_ms: object) -> float:
        cap = self._config.task_ttl
        if isinstance(ttl_ms, int | float) and not isinstance(ttl_ms, bool) and ttl_ms > 0:
            return min(ttl_ms / 1000.0, cap)
        return cap


def request_state_of(message: object) -> str | None:
    """The `params.requestState` of a JSON-RPC request (an MRTR retry), if any."""
    params = message.get("params") if isinstance(message, dict) else None
    state = params.get("requestState") if isinstance(params, dict) else None
    return state if isinstance(state, str) and state else None


def parse_json(body: bytes) -> object:
    """A JSON document, or None when `body` is not one."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


class ResultSniffer:
    """Picks the task and input_required results out of a response body as it streams past.

    JSON bodies are parsed when `expected` (Content-Length) bytes have arrived, or at `finish`
    when unsized; SSE bodies event by event. Only a message whose text has a task or input_required
    `resultType` is parsed at all.
    """

    def __init__(self, sse: bool, expected: int | None) -> None:
        self._sse = sse
        self._expected = expected
        self._buffer = b""
        self._dead = False

    def feed(self, data: bytes) -> list[object]:
        if self._dead:
            return []
        buffer = self._buffer + data
        if len(buffer) > SNIFF_LIMIT:
            self._dead, self._buffer = True, b""
            return []
        if not self._sse:
            self._buffer = buffer
            if self._expected is not None and len(buffer) >= self._expected:
                return self.finish()
            return []
        events = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = events.pop()
        return [m for m in (_event_message(event) for event in events) if m is not None]

    def finish(self) -> list[object]:
        """The end of a JSON body: its message, when it names a resultType."""
        buffer, self._buffer = self._buffer, b""
        if self._dead or self._sse or _LEARNABLE.search(buffer) is None:
            return []
        self._dead = True
        message = parse_json(buffer)
        return [message] if message is not None else []


def _event_message(event: bytes) -> object:
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    if _LEARNABLE.search(data) is None:
        return None
    return parse_json(data)
