"""Pure protocol facts: era test, session-id validation, Connection tokens, header-value decoding."""

from __future__ import annotations

import base64
import random

import pytest

from mcpbalancer import protocol
from mcpbalancer.protocol import Era, HeaderEncodingError

# --- era --------------------------------------------------------------------------------------------


def test_absent_version_is_legacy() -> None:
    assert protocol.era_of(None, None) is Era.LEGACY


@pytest.mark.parametrize("version", sorted(protocol.LEGACY_VERSIONS))
def test_each_legacy_revision_is_legacy(version: bytes) -> None:
    assert protocol.era_of(None, version) is Era.LEGACY


@pytest.mark.parametrize("version", [b"2026-07-28", b"2027-01-01", b"2099-12-31", b"draft"])
def test_modern_and_future_versions_are_modern(version: bytes) -> None:
    assert protocol.era_of(None, version) is Era.MODERN


@pytest.mark.parametrize(
    "version", [None, b"2025-11-25", b"2026-07-28", b"1999-01-01", b"\x00\xff garbage", b""]
)
@pytest.mark.parametrize("session_id", [b"7f3a9c1e0d2b4c6a", b"bad id", b""])
def test_a_session_id_makes_any_request_legacy(session_id: bytes, version: bytes | None) -> None:
    # A 2026-07-28 client never sends Mcp-Session-Id: a request carrying one is routed by it.
    assert protocol.era_of(session_id, version) is Era.LEGACY


@pytest.mark.parametrize(
    ("version", "era"),
    [
        (b" 2025-06-18", Era.LEGACY),
        (b"2025-11-25 ", Era.LEGACY),
        (b"\t2025-03-26\t", Era.LEGACY),
        (b" 2026-07-28 ", Era.MODERN),
        (b"\t2026-07-28", Era.MODERN),
    ],
)
def test_surrounding_whitespace_is_ignored(version: bytes, era: Era) -> None:
    assert protocol.era_of(None, version) is era


# --- session ids ------------------------------------------------------------------------------------


def reference_valid(value: bytes) -> bool:
    return 1 <= len(value) <= 256 and all(0x21 <= b <= 0x7E for b in value)


@pytest.mark.parametrize(
    "value",
    [b"a", b"!", b"~", bytes(range(0x21, 0x7F)), b"x" * 256, b"7f3a9c1e-0d2b-4c6a-9e8f-1a2b3c4d5e6f"],
)
def test_valid_session_ids(value: bytes) -> None:
    assert protocol.valid_session_id(value)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"ab cd",
        b" abc",
        b"abc\t",
        b"abc\n",
        b"abc\r\n",
        b"ab\x00c",
        b"ab\x7fc",
        b"ab\x80c",
        b"ab\xffc",
        "café".encode(),
        b"x" * 257,
    ],
)
def test_invalid_session_ids(value: bytes) -> None:
    assert not protocol.valid_session_id(value)


def test_every_byte_alone_and_embedded_agrees_with_reference() -> None:
    for byte in range(256):
        for value in (bytes([byte]), b"ab" + bytes([byte]) + b"cd", b"x" * 255 + bytes([byte])):
            assert protocol.valid_session_id(value) is reference_valid(value), value


@pytest.mark.parametrize("seed", range(8))
def test_random_ids_agree_with_reference(seed: int) -> None:
    # Stand-in for a hypothesis property (hypothesis is not a test dependency yet): mostly visible
    # ASCII with an occasional other byte, lengths around the 256 limit and near zero.
    rng = random.Random(seed)
    for _ in range(300):
        length = rng.choice([0, 1, 2, rng.randrange(3, 255), 255, 256, 257, 300])
        value = bytes(
            rng.randrange(0x21, 0x7F) if rng.random() < 0.97 else rng.randrange(256) for _ in range(length)
        )
        assert protocol.valid_session_id(value) is reference_valid(value), value


# --- Connection tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        (b"close", {b"close"}),
        (b"Keep-Alive", {b"keep-alive"}),
        (b"keep-alive, Upgrade", {b"keep-alive", b"upgrade"}),
        (b" X-Foo ,\tTE ,, ", {b"x-foo", b"te"}),
        (b"", set()),
        (b" , ,", set()),
    ],
)
def test_connection_tokens(value: bytes, tokens: set[bytes]) -> None:
    assert protocol.connection_tokens(value) == frozenset(tokens)


# --- header-value decoding --------------------------------------------------------------------------


def encoded(text: str, marker: str = "base64") -> bytes:
    return b"=?" + marker.encode() + b"?" + base64.b64encode(text.encode()) + b"?="


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (b"tools/call", "tools/call"),
        (b"  get_weather \t", "get_weather"),
        (b"", ""),
        (encoded("météo"), "météo"),
        (encoded("天気 🌦"), "天気 🌦"),
        (encoded("plain"), "plain"),
        (encoded(""), ""),
        (b"  " + encoded("naïve") + b" ", "naïve"),
        (encoded("naïve", "BASE64"), "naïve"),
        (encoded("naïve", "Base64"), "naïve"),
        (b"=?base64?abc", "=?base64?abc"),  # no closing marker: a plain value
    ],
)
def test_decode_header_value(value: bytes, text: str) -> None:
    assert protocol.decode_header_value(value) == text


@pytest.mark.parametrize(
    "value",
    [
        b"=?base64?!!!!?=",  # not the base64 alphabet
        b"=?base64?SGk?=",  # missing padding
        b"=?base64?SG k=?=",  # embedded space
        b"=?base64?A?=",  # truncated quantum
        b"=?base64?" + base64.b64encode(b"\xff\xfe") + b"?=",  # invalid UTF-8
        b"=?base64?" + base64.b64encode(b"caf\xe9") + b"?=",  # latin-1, not UTF-8
    ],
)
def test_malformed_encoded_value_raises(value: bytes) -> None:
    with pytest.raises(HeaderEncodingError):
        protocol.decode_header_value(value)


def test_header_encoding_error_is_a_value_error() -> None:
    assert issubclass(HeaderEncodingError, ValueError)
