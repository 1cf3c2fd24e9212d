"""DNS lookups for the `discover` entries, on dnspython's asyncio resolver.

A lookup answers the records an entry's name has now: a list of `Record` (possibly empty: the name
does not exist, or has no record of the kind asked), or LookupFailed saying why no answer came (a
timeout, every server failing, SERVFAIL). The two are kept apart on purpose: discovery keeps its
last known backends in both cases, but only a failure is an outage to report as one.

- `dns: NAME` asks for the A (or, with `family: ipv6`, AAAA) records of NAME; each address is an
  instance on the entry's port.
- `srv: NAME` asks for its SRV records, then for the A/AAAA records of each target; each address is
  an instance on its record's port, with its record's weight. A target whose name does not exist
  (or the "." target, "no service") adds nothing; a target whose lookup fails fails the whole
  lookup, so that a half answer never drains the other half. Priorities are not used: every target
  takes sessions (the health checks and the drain do what a lower priority would).

Without `nameservers` the system's resolver configuration is read (/etc/resolv.conf, with its
search list, so a Kubernetes short name works as it does for getaddrinfo); with them, only those
servers are asked and a name is taken as absolute. Every lookup is bounded by the entry's `timeout`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mcpbalancer.config import DiscoveryConfig
from mcpbalancer.errors import LookupFailed

_ADDRESS_TYPES = {"ipv4": dns.rdatatype.A, "ipv6": dns.rdatatype.AAAA}


@dataclass(frozen=True, slots=True, order=True)
class Record:
    """One instance an answer names."""

    host: str  # an IP address
    port: int
    weight: int | None = None  # the SRV record's weight; None for an A/AAAA answer


class DnsResolver:
    """`await resolver(entry)` -> the records of `entry`'s name, or LookupFailed. One dnspython
    resolver per set of `nameservers`, made on first use."""

    def __init__(self) -> None:
        self._resolvers: dict[tuple[tuple[str, int], ...], dns.asyncresolver.Resolver] = {}

    async def __call__(self, entry: DiscoveryConfig) -> list[Record]:
        lookup = _Lookup(self._resolver(entry.nameservers), entry)
        try:
            async with asyncio.timeout(entry.timeout):
                return await lookup.records()
        except TimeoutError:
            raise LookupFailed(f"no answer within {entry.timeout:g} s") from None

    def _resolver(self, nameservers: tuple[tuple[str, int], ...]) -> dns.asyncresolver.Resolver:
        resolver = self._resolvers.get(nameservers)
        if resolver is None:
            resolver = self._resolvers[nameservers] = _make(nameservers)
        return resolver


def _make(nameservers: tuple[tuple[str, int], ...]) -> dns.asyncresolver.Resolver:
    if not nameservers:
        try:
            return dns.asyncresolver.Resolver()
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf, or no server in it
            raise LookupFailed(f"no DNS resolver configured ({exc}); set `discover.nameservers`") from None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    resolver.domain = dns.name.root
    resolver.search = []
    return resolver


class _Lookup:
    """The queries of one lookup of one entry."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, entry: DiscoveryConfig) -> None:
        self._resolver = resolver
        self._entry = entry
        self._address_type = _ADDRESS_TYPES[entry.family]

    async def records(self) -> list[Record]:
        entry = self._entry
        # The system's search list applies to the configured name (a Kubernetes short name); an
        # SRV target is a name as the server wrote it.
        search = not entry.nameservers
        if entry.dns is not None:
            assert entry.port is not None
            port = entry.port
            return sorted(Record(host, port) for host in await self._addresses(entry.dns, search))
        assert entry.srv is not None
        answer = await self._query(entry.srv, dns.rdatatype.SRV, search)
        targets = [(rd.target, rd.port, rd.weight) for rd in answer if rd.target != dns.name.root]
        found = await asyncio.gather(*(self._addresses(target, False) for target, _, _ in targets))
        records = {
            Record(host, port, weight)
            for (_, port, weight), hosts in zip(targets, found, strict=True)
            for host in hosts
        }
        return sorted(records)

    async def _addresses(self, name: str | dns.name.Name, search: bool) -> list[str]:
        return [str(rd.address) for rd in await self._query(name, self._address_type, search)]

    async def _query(
        self, name: str | dns.name.Name, rdtype: dns.rdatatype.RdataType, search: bool
    ) -> list[Any]:
        """The records of one name and type; [] when the name or the records do not exist."""
        what = f"{_text(name)} {rdtype.name}"
        lifetime = self._entry.timeout
        try:
            answer = await self._resolver.resolve(name, rdtype, search=search, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.LifetimeTimeout:
            raise LookupFailed(f"{what}: no answer within {lifetime:g} s") from None
        except dns.resolver.NoNameservers as exc:
            raise LookupFailed(f"{what}: every DNS server failed: {_reasons(exc)}") from None
        except dns.exception.DNSException as exc:
            raise LookupFailed(f"{what}: {exc}") from None
        except OSError as exc:
            raise LookupFailed(f"{what}: {exc.strerror or exc}") from None
        return list(answer)


def _text(name: str | dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True) if isinstance(name, dns.name.Name) else name


def _reasons(exc: dns.resolver.NoNameservers) -> str:
    """What each server did ("127.0.0.1:5353 answered SERVFAIL"), from dnspython's error list."""
    errors = exc.kwargs.get("errors") or []
    parts = []
    for error in errors[:3]:
        server, _tcp, port, problem = error[0], error[1], error[2], error[3]
        why = problem if isinstance(problem, str) else (getattr(problem, "strerror", None) or str(problem))
        parts.append(f"{server}:{port} {why}")
    return "; ".join(parts) or "no server answered"
