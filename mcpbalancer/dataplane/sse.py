"""SSE framing awareness: where a heartbeat comment may be written without splitting an event.

An event ends with a blank line: two line terminators in a row (`\\n\\n`, `\\r\\n\\r\\n`, `\\r\\r`, or
mixes). Only the last few bytes relayed are kept, so tracking costs a slice of each chunk's tail,
never a copy of the chunk.
"""

from __future__ import annotations

PING = b": ping\n\n"

# Tails that end a blank line. A lone trailing "\r" may be the first half of "\r\n", so a tail of
# "\n\r" is not a boundary yet; "\r\r" is (a following "\n" would only add an empty line), and
# stays one when that "\n" arrives: "\r\r\n" is a CR-ended line, then a CRLF blank line.
_BOUNDARY_TAILS = (b"\n\n", b"\n\r\n", b"\r\r", b"\r\r\n")


class EventBoundary:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\n\n"  # nothing relayed yet: a boundary

    def feed(self, chunk: bytes) -> None:
        if len(chunk) >= 3:
            self._tail = chunk[-3:]
        else:
            self._tail = (self._tail + chunk)[-3:]

    @property
    def at_boundary(self) -> bool:
        return self._tail.endswith(_BOUNDARY_TAILS)
