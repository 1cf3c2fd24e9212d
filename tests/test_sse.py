"""EventBoundary: a heartbeat may go only where a blank line has just ended an event."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable

import pytest

from mcpbalancer.protocol.sse import PING, EventBoundary

_TERMINATOR = re.compile(rb"\r\n|\r|\n")


def reference_at_boundary(stream: bytes) -> bool:
    """Straight from the SSE line grammar: the stream ends with a terminated empty line.

    The start of the stream counts as a boundary. A trailing "\\r" after "\\n" (or at the start) is
    not yet a boundary: it may be the first half of a "\\r\\n"; after "\\r" it is, since either way
    it ends an empty line.
    """
    if not stream:
        return True
    if stream.endswith(b"\r") and (len(stream) == 1 or stream[-2:-1] == b"\n"):
        return False
    ends = [m for m in _TERMINATOR.finditer(stream)]
    if not ends or ends[-1].end() != len(stream):
        return False
    line_start = ends[-2].end() if len(ends) > 1 else 0
    return ends[-1].start() == line_start


def fed(chunks: Iterable[bytes]) -> EventBoundary:
    boundary = EventBoundary()
    for chunk in chunks:
        boundary.feed(chunk)
    return boundary


def test_initial_state_is_a_boundary() -> None:
    assert EventBoundary().at_boundary


def test_ping_is_a_complete_comment_event() -> None:
    assert PING.startswith(b":")
    assert fed([b"data: x\n", PING]).at_boundary


@pytest.mark.parametrize(
    "stream",
    [
        b"data: x\n\n",
        b"data: x\r\n\r\n",
        b"data: x\r\r",
        b"data: x\r\n\n",
        b"data: x\n\r\n",
        b"data: x\r\r\n",
        b"id: 1\nretry: 500\ndata:\n\n",
        b"event: ping\ndata:\n\n: comment\n\n",
        b"\n",
        b"\r\n",
    ],
)
def test_boundary_after_blank_line(stream: bytes) -> None:
    assert fed([stream]).at_boundary


@pytest.mark.parametrize(
    "stream",
    [
        b"data: x\n",
        b"data: x\r\n",
        b"data: x\r",
        b"data: x\n\r",  # the "\r" may be the start of "\r\n"
        b"data: x\r\n\r",
        b"data: x",
        b"data: x\n\ndata: y",
        b"data: x\n\nid: 2\n",
        b"\r",
    ],
)
def test_no_boundary_inside_an_event(stream: bytes) -> None:
    assert not fed([stream]).at_boundary


@pytest.mark.parametrize(
    "stream",
    [b"data: x\n\n", b"data: x\r\n\r\n", b"data: x\r\r", b"data: x\n", b"data: x\n\r", b"a\r\r\n"],
)
def test_byte_by_byte_matches_one_chunk(stream: bytes) -> None:
    one_chunk = fed([stream])
    bytewise = EventBoundary()
    for i in range(len(stream)):
        bytewise.feed(stream[i : i + 1])
        assert bytewise.at_boundary is reference_at_boundary(stream[: i + 1]), stream[: i + 1]
    assert bytewise.at_boundary is one_chunk.at_boundary


def test_empty_chunk_changes_nothing() -> None:
    for stream in (b"data: x\n\n", b"data: x\n"):
        boundary = fed([stream])
        before = boundary.at_boundary
        boundary.feed(b"")
        assert boundary.at_boundary is before


def test_every_short_stream_fed_byte_by_byte_matches_reference() -> None:
    # Exhaustive over an alphabet of one field byte and both terminator bytes.
    for length in range(1, 8):
        for stream in map(bytes, itertools.product(b"a\r\n", repeat=length)):
            boundary = EventBoundary()
            for byte in stream:
                boundary.feed(bytes([byte]))
            assert boundary.at_boundary is reference_at_boundary(stream), stream


def random_stream(rng: random.Random) -> bytes:
    eol = [b"\n", b"\r\n", b"\r"]
    parts: list[bytes] = []
    for _ in range(rng.randrange(1, 6)):
        for field in rng.sample([b"id: 7", b"event: message", b"retry: 100", b"data:", b'data: {"a":1}'], 2):
            parts.append(field + rng.choice(eol))
        parts.append(rng.choice(eol))  # the blank line
    stream = b"".join(parts)
    return stream[: rng.randrange(len(stream) + 1)]


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_agree_with_one_chunk_and_reference(seed: int) -> None:
    # Stand-in for a hypothesis property (hypothesis is not a test dependency yet).
    rng = random.Random(seed)
    for _ in range(50):
        stream = random_stream(rng)
        cuts = sorted(rng.sample(range(len(stream) + 1), rng.randrange(min(len(stream), 6) + 1)))
        boundary = EventBoundary()
        for start, end in itertools.pairwise([0, *cuts, len(stream)]):
            boundary.feed(stream[start:end])
            assert boundary.at_boundary is reference_at_boundary(stream[:end]), (stream, end)
        assert boundary.at_boundary is fed([stream]).at_boundary


# --- was the last event the answer? (read only when a client leaves mid-stream) -------------------

RESPONSE = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"method"}]}}'
PROGRESS = b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}}'


@pytest.mark.parametrize(
    "chunks",
    [
        [b"event: message\ndata: " + RESPONSE + b"\n\n"],
        [b"event: message\r\ndata: " + RESPONSE + b"\r\n\r\n"],  # CRLF line endings
        [b"data: " + PROGRESS + b"\n\nevent: message\ndata:" + RESPONSE + b"\n\n"],  # in one read
        [b"data: " + PROGRESS + b"\n\n", b"id: 3\ndata: " + RESPONSE + b"\n\n"],
        [b'data: {"jsonrpc":"2.0",\ndata: "id":1,"error":{"code":-1,"message":"x"}}\n\n'],  # two lines
        [b"data: [" + RESPONSE + b"," + RESPONSE + b"]\n\n"],  # a batch of responses
        [b"data: " + RESPONSE + b"\n\n: a comment\n\n"],  # events without data do not count
    ],
)
def test_a_stream_that_ended_with_its_answer(chunks: list[bytes]) -> None:
    assert fed(chunks).answered()


@pytest.mark.parametrize(
    "chunks",
    [
        [],  # nothing relayed
        [b"id: 1\nretry: 500\ndata:\n\n"],  # a priming event (empty data)
        [b"data: " + PROGRESS + b"\n\n"],  # a notification: the answer is still to come
        [b"data: " + RESPONSE + b"\n\n", b"data: " + PROGRESS + b"\n\n"],
        [b'data: {"jsonrpc":"2.0","id":2,"method":"sampling/createMessage","params":{}}\n\n'],
        [b"data: " + RESPONSE + b"\n"],  # the event has not ended
        [b"data: " + RESPONSE[:30], RESPONSE[30:] + b"\n\n"],  # begun in an earlier chunk
        [b"data: [" + RESPONSE + b"," + PROGRESS + b"]\n\n"],
        [b"data: not json\n\n"],
        [b"datum: " + RESPONSE + b"\n\n"],  # another field
    ],
)
def test_a_stream_left_before_its_answer(chunks: list[bytes]) -> None:
    assert not fed(chunks).answered()
