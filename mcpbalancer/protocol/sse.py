"""SSE framing awareness: where a heartbeat comment may be written without splitting an event, and
whether the last event relayed was the answer to the request.

An event ends with a blank line: two line terminators in a row (`\\n\\n`, `\\r\\n\\r\\n`, `\\r\\r`, or
mixes). Only the last few bytes relayed are kept, so tracking costs a slice of each chunk's tail,
never a copy of the chunk, and a reference to the last chunk.
"""

from __future__ import annotations

import json

PING = b": ping\n\n"

# Tails that end a blank line. A lone trailing "\r" may be the first half of "\r\n", so a tail of
# "\n\r" is not a boundary yet; "\r\r" is (a following "\n" would only add an empty line), and
# stays one when that "\n" arrives: "\r\r\n" is a CR-ended line, then a CRLF blank line.
_BOUNDARY_TAILS = (b"\n\n", b"\n\r\n", b"\r\r", b"\r\r\n")


START_TAIL = b"\n\n"  # nothing relayed yet: a boundary


class EventBoundary:
    __slots__ = ("_tail", "last")

    def __init__(self) -> None:
        self._tail = START_TAIL
        self.last = b""  # the last chunk relayed, read only when the client leaves mid-stream

    def feed(self, chunk: bytes) -> None:
        self.last = chunk
        if len(chunk) >= 3:
            self._tail = chunk[-3:]
        else:
            self._tail = (self._tail + chunk)[-3:]

    @property
    def at_boundary(self) -> bool:
        return self._tail.endswith(_BOUNDARY_TAILS)

    def answered(self) -> bool:
        """The stream is at an event boundary and its last event with data, in the last chunk, is a
        JSON-RPC response (or a batch of them): the answer a POST's stream ends with.

        Read only when a client closes during a stream (never per chunk): a client that closes as
        soon as it has its answer, as the mcp SDK does, before the backend has ended the stream, got
        the response whole. An event begun in an earlier chunk is not reassembled; it reads as no
        answer.
        """
        return self.at_boundary and is_response(last_event_data(self.last))


def last_event_data(chunk: bytes) -> bytes | None:
    """The data of the last event in `chunk` that has any, its lines joined by LF; None if none."""
    text = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for event in reversed(text.split(b"\n\n")):
        data = [_field_value(line) for line in event.split(b"\n") if line.startswith(b"data")]
        values = [value for value in data if value is not None]
        if values:
            return b"\n".join(values)
    return None


def _field_value(line: bytes) -> bytes | None:
    """The value of a `data` field line (`data:value`, `data: value`, or a bare `data`)."""
    if line == b"data":
        return b""
    if not line.startswith(b"data:"):
        return None  # another field whose name begins with "data"
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


def is_response(data: bytes | None) -> bool:
    """JSON-RPC response(s): an object with `id` and `result` or `error` and no `method`."""
    if not data:
        return False
    try:
        message = json.loads(data)
    except ValueError:  # not JSON (or not UTF-8): a partial event
        return False
    messages = message if isinstance(message, list) and message else [message]
    return all(
        isinstance(m, dict) and "id" in m and ("result" in m or "error" in m) and "method" not in m
        for m in messages
    )
