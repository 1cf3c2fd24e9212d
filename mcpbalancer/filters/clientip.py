"""Who the client is when proxies stand in front: `trusted_proxies`.

The peer address of a connection is the client's, unless the peer is a proxy listed in
`trusted_proxies`: then `X-Forwarded-For` is read from its right end, past every trusted address,
and the first address no trusted proxy vouches for is the client's. Anything further left was
written by the client itself and proves nothing. With an empty list (the default) the header is
never believed. The same trust decides whether `X-Forwarded-Proto` says the request came over TLS.

Pure: addresses in, an address out. Decisions about peers are kept in a small bounded dict, since a
proxy connects from the same few addresses all day.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

SEEN_LIMIT: Final = 1024

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TrustedProxies:
    def __init__(self, networks: Iterable[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self._seen: dict[bytes, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: bytes) -> bool:
        """`address` (as text bytes) is one of the trusted proxies."""
        known = self._seen.get(address)
        if known is not None:
            return known
        trusted = self._trusted(_parse(address))
        if len(self._seen) >= SEEN_LIMIT:
            self._seen.clear()
        self._seen[address] = trusted
        return trusted

    def client_ip(self, peer: bytes, forwarded_for: bytes | None) -> bytes:
        """The client's address for a connection from `peer` carrying `forwarded_for`."""
        if forwarded_for is None or not self._networks or not self.trusts(peer):
            return peer
        for hop in reversed(forwarded_for.split(b",")):
            hop = hop.strip()
            if _parse(hop) is None:
                return hop or peer  # not an address: it proves nothing more
            if not self.trusts(hop):
                return hop
        return peer

    def forwarded_tls(self, peer: bytes, proto: bytes | None) -> bool:
        """A trusted proxy in front says the client's request came over TLS."""
        if proto is None or not self._networks or not self.trusts(peer):
            return False
        return proto.split(b",")[0].strip().lower() == b"https"

    def _trusted(self, address: Address | None) -> bool:
        return address is not None and any(address in network for network in self._networks)


def _parse(address: bytes) -> Address | None:
    text = address.decode("ascii", "replace").strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed
