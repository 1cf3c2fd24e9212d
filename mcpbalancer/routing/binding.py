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

With `auth`, the tag is the HMAC of the authenticated Principal's id instead (`by_principal`): a
session stays its principal's when a token is refreshed, and another principal's request for it is
a 404; with `bind_sessions` as well, of the principal and that header's value together. The same
store value, so it works with Redis as with the memory store.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request was authenticated as (filters/auth.py): a token's `sub` or an API key's name."""

    name: str
    kind: str  # "jwt" or "key": a key named like a token's subject is another principal
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    # What sessions are bound to and rate limits count: "<kind>:<name>".
    id: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.kind}:{self.name}")


class SessionBinder:
    """Tags credentials of the header `header` (lower-case bytes) with a keyed hash; with
    `by_principal`, the authenticated principal, and the header's value too when `header_bound`
    (else the header is only what the replay failover re-sends: Authorization)."""

    def __init__(
        self,
        header: str,
        key: bytes | None = None,
        *,
        by_principal: bool = False,
        header_bound: bool = True,
    ) -> None:
        self.header = header.lower().encode("ascii")
        self._key = key if key is not None else secrets.token_bytes(32)
        self.by_principal = by_principal
        self.header_bound = header_bound

    def principal_tag(self, principal: Principal, credential: bytes | None) -> str:
        """The tag of a session of `principal` (and of `credential`, the header's value, when the
        header is bound too). Principal ids never hold a line feed, header values neither."""
        data = principal.id.encode("utf-8", "surrogateescape")
        if self.header_bound:
            data += b"\n" + (credential or b"")
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()[:_TAG_HEX]

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
