"""Sealed session ids (`session_ids: sealed`): the session's route travels in the id its client holds.

The client never sees a backend's own session id. The proxy hands it a token sealed with
AES-256-GCM instead, and on every request opens the token and sends the backend its own id. Any
proxy, or worker, with the keys routes any session, without a shared store, and a restart keeps
every session. A token that does not open is an unknown session: 404, and no backend sees it.

Token layout, version 1: base64url without padding, at most 256 characters (192 bytes).

    offset  bytes  field
    0       1      format version (1)
    1       4      key id: SHA-256("mcpbalancer session key id" 0x00 key)[:4]
    5       12     nonce, random for every token
    17      n      the payload below, encrypted
    17+n    16     GCM authentication tag
    associated data (authenticated, not carried): bytes 0-4, then the service name
    payload:
      6            issued: milliseconds since the Unix epoch, big-endian
      1 + 0|16     the binding tag (bind_sessions): its length, then its bytes
      1 + n        the backend's owner id (its name; `name~token` for a managed one), ASCII
      rest         the backend's own session id

The AES key is HKDF-SHA256 of a configured key, so a key is never used as it is. The first key
seals, every key opens (rotation). The service is authenticated, not carried: a token sealed for
one service does not open for another. Nonces are random (96 bits): far below the 2^32 tokens per
key after which GCM's random nonces would become a concern; rotate keys long before that.

A backend id too long to fit is refused with 502 (`SessionIdTooLong`): the session would not be
routable, and a store-backed fallback would bring back the store this mode exists to remove.

The opened tokens are kept in a bounded map, so a known session costs one dict lookup; the map is
first in, first out (no per-request reordering): a session pushed out is opened again, a few
microseconds. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry

from mcpbalancer import protocol
from mcpbalancer.errors import SessionIdTooLong, SessionNotFound
from mcpbalancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

VERSION: Final = 1
DEFAULT_SERVICE: Final = "default"  # the top-level backends; each of `services` seals under its name
_KEY_ID_BYTES: Final = 4
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_HEADER: Final = 1 + _KEY_ID_BYTES
_OVERHEAD: Final = _HEADER + _NONCE_BYTES + _TAG_BYTES
_MAX_BINARY: Final = protocol.MAX_SESSION_ID_BYTES * 3 // 4  # 192 bytes make 256 base64 characters
_ISSUED: Final = struct.Struct(">Q")  # written as 6 bytes: the low 48 bits, good until the year 10889
_HKDF_INFO: Final = b"mcpbalancer sealed session id v1"
_KEY_ID_LABEL: Final = b"mcpbalancer session key id\x00"


class Opened:
    """What an opened token says; the backend's id as bytes, ready for the request head."""

    __slots__ = ("backend_sid", "issued", "owner", "tag")

    def __init__(self, owner: str, backend_sid: bytes, tag: str | None, issued: float) -> None:
        self.owner = owner  # the owner id, as the store would record it
        self.backend_sid = backend_sid
        self.tag = tag  # hex, as SessionBinder makes it; None when the session is not bound
        self.issued = issued  # seconds since the epoch (wall clock: tokens cross machines)


_ENDED: Final = Opened("", b"", None, 0.0)  # a token whose session ended here


def key_id(material: bytes) -> bytes:
    """The 4 bytes naming a key in its tokens (a hash: it tells nothing of the key)."""
    return hashlib.sha256(_KEY_ID_LABEL + material).digest()[:_KEY_ID_BYTES]


def _cipher(material: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(material))


class SealedIds:
    """Seals and opens the session ids of one service."""

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        service: str = DEFAULT_SERVICE,
        max_age: float | None = None,
        capacity: int = 100_000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service.encode("utf-8")
        self._metrics = metrics or Metrics(CollectorRegistry())
        self._clock = clock
        self.opened: dict[str, Opened] = {}  # by token; a session that ended here is _ENDED
        self._ciphers: dict[bytes, AESGCM] = {}
        self.configure(keys, max_age=max_age, capacity=capacity)

    def configure(self, keys: Sequence[bytes], *, max_age: float | None, capacity: int) -> None:
        """New keys (a reload): tokens of a removed key stop opening at once, so the opened map
        starts afresh when the keys change."""
        if not keys:
            raise ValueError("sealed session ids need at least one key")
        ciphers = {key_id(k): _cipher(k) for k in keys}
        first = key_id(keys[0])
        if ciphers.keys() != self._ciphers.keys():
            self.opened.clear()
        self._ciphers, self._sealing = ciphers, (first, ciphers[first])
        self.max_age = max_age
        self._capacity = capacity
        while len(self.opened) > capacity:
            del self.opened[next(iter(self.opened))]

    def __len__(self) -> int:
        return len(self.opened)

    # -- the request: a token in, the session's route out -------------------------------------------

    def open(self, token: str) -> Opened:
        """The session `token` names; SessionNotFound (404) when it does not open or is too old."""
        opened = self.opened.get(token)
        if opened is None:
            opened = self._open(token)
            self._remember(token, opened)
        elif opened is _ENDED:
            raise SessionNotFound()
        if self.max_age is not None and self._clock() - opened.issued > self.max_age:
            self._refused("expired")
        return opened

    def _open(self, token: str) -> Opened:
        raw = _decoded(token)
        if raw is None or len(raw) < _OVERHEAD + 8 or raw[0] != VERSION:
            self._refused("malformed")
        cipher = self._ciphers.get(raw[1:_HEADER])
        if cipher is None:
            self._refused("unknown_key")
        nonce = raw[_HEADER : _HEADER + _NONCE_BYTES]
        try:
            payload = cipher.decrypt(nonce, raw[_HEADER + _NONCE_BYTES :], raw[:_HEADER] + self._service)
        except InvalidTag:
            self._refused("invalid")  # tampered, truncated, or sealed for another service
        opened = _unpack(payload)
        if opened is None:  # authentic but unreadable: only a bug of ours could seal that
            self._refused("malformed")
        self._metrics.sealed["opened"].value += 1
        return opened

    def _refused(self, reason: str) -> NoReturn:
        self._metrics.sealed[reason].value += 1
        log.info("a sealed session id was refused (%s); answered 404", reason)
        raise SessionNotFound()

    # -- the response: a backend's new id out as a token ---------------------------------------------

    def seal(self, owner: str, backend_sid: bytes, tag: str | None) -> str:
        """A new token for the session `backend_sid` of `owner`; SessionIdTooLong (502) when it
        does not fit in a session id."""
        issued = self._clock()
        tag_bytes = bytes.fromhex(tag) if tag is not None else b""
        owner_bytes = owner.encode("ascii")
        payload = b"".join(
            (
                _ISSUED.pack(int(issued * 1000))[2:],
                bytes((len(tag_bytes),)),
                tag_bytes,
                bytes((len(owner_bytes),)),
                owner_bytes,
                backend_sid,
            )
        )
        if _OVERHEAD + len(payload) > _MAX_BINARY:
            self._metrics.sealed["too_long"].value += 1
            room = _MAX_BINARY - (_OVERHEAD + len(payload) - len(backend_sid))
            log.warning(
                "backend %s issued a session id of %d bytes; at most %d fit in a sealed id: answered 502",
                owner,
                len(backend_sid),
                room,
            )
            raise SessionIdTooLong()
        ident, cipher = self._sealing
        header = bytes((VERSION,)) + ident
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = header + nonce + cipher.encrypt(nonce, payload, header + self._service)
        token = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
        self._metrics.sealed["issued"].value += 1
        self._remember(token, Opened(owner, backend_sid, tag, issued))
        return token

    def end(self, token: str) -> bool:
        """The session ended here (DELETE, the backend's 404): this proxy answers its token 404 from
        now on, without a backend, for as long as it remembers that. False if it had ended before."""
        if self.opened.get(token) is _ENDED:
            return False
        self._remember(token, _ENDED)
        return True

    def _remember(self, token: str, opened: Opened) -> None:
        entries = self.opened
        entries[token] = opened
        if len(entries) > self._capacity:
            del entries[next(iter(entries))]


def _decoded(token: str) -> bytes | None:
    """The bytes of a token in its one canonical spelling (the lenient decoder would also take
    stray characters and other trailing bits: many strings, one session)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == token else None


def _unpack(payload: bytes) -> Opened | None:
    if len(payload) < 8:
        return None
    issued = int.from_bytes(payload[:6], "big") / 1000
    tag_len = payload[6]
    at = 7 + tag_len
    if tag_len not in (0, 16) or len(payload) < at + 1:
        return None
    owner_len = payload[at]
    owner_end = at + 1 + owner_len
    backend_sid = payload[owner_end:]
    if not owner_len or not protocol.valid_session_id(backend_sid):
        return None
    try:
        owner = payload[at + 1 : owner_end].decode("ascii")
    except UnicodeDecodeError:
        return None
    tag = payload[7:at].hex() if tag_len else None
    return Opened(owner, backend_sid, tag, issued)
