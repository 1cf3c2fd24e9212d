"""What the session map records of a session, and credential-bound sessions.

A session's value in the store is `<owner>|<tag>|<bound>[|<alias>]`:
- the owner id of its backend (its name; `name~token` for a managed process);
- the binding tag, empty when the session is not bound to a credential (`bind_sessions`): an
  HMAC-SHA256 of that header's value (absent header: no tag) under `session_binding_key` (or a
  per-process random key with the memory store);
- when it was bound, in milliseconds since the epoch: a session bound before its backend last went
  away (fleet/generations.py) is gone, whatever the new process would answer for it;
- for a session replay failover moved, the session id its new backend knows it by.
Values written before bind times were recorded (`<owner>` or `<owner>|<tag>`) still read, as bound
at time 0. The format lives here and only here; backend names cannot contain `|` (config).

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import NamedTuple

SEPARATOR = "|"
_TAG_HEX = 32  # 128 bits of the HMAC: ample against forgery, short in Redis


class Binding(NamedTuple):
    owner: str
    tag: str | None
    bound: float  # seconds since the epoch; 0 for a value written without a bind time
    alias: bytes | None = None  # the moved session's id at its new backend


def encode_owner(owner: str, tag: str | None, bound: float, alias: bytes | None = None) -> str:
    value = f"{owner}{SEPARATOR}{tag or ''}{SEPARATOR}{round(bound * 1000)}"
    return value if alias is None else f"{value}{SEPARATOR}{alias.decode('ascii')}"


def decode_owner(value: str) -> Binding:
    owner, _, rest = value.partition(SEPARATOR)
    return decode_rest(owner, rest)


def decode_rest(owner: str, rest: str) -> Binding:
    """The binding of `owner` from what follows its separator (decode_owner's second half, for the
    router, which splits the owner off itself)."""
    tag, _, rest = rest.partition(SEPARATOR)
    bound, sep, alias = rest.partition(SEPARATOR)
    millis = int(bound) if bound.isdigit() else 0
    return Binding(owner, tag or None, millis / 1000, alias.encode("ascii") if sep else None)


def backend_of(value: str) -> str:
    return value.partition(SEPARATOR)[0]


class SessionBinder:
    """Tags credentials of the header `header` (lower-case bytes) with a keyed hash."""

    def __init__(self, header: str, key: bytes | None = None) -> None:
        self.header = header.lower().encode("ascii")
        self._key = key if key is not None else secrets.token_bytes(32)

    def tag(self, value: bytes | None) -> str | None:
        if value is None:
            return None
        return hmac.new(self._key, value.strip(), hashlib.sha256).hexdigest()[:_TAG_HEX]

    def credential(self, headers: list[tuple[bytes, bytes, bytes]]) -> str | None:
        """The tag of the bound header in a request's (lower-case name, name, value) list."""
        return self.tag(self.value(headers))

    def value(self, headers: list[tuple[bytes, bytes, bytes]]) -> bytes | None:
        """The bound header's raw value in a request's (lower-case name, name, value) list."""
        name = self.header
        for lname, _, value in headers:
            if lname == name:
                return value
        return None
