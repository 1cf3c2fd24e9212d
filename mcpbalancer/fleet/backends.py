"""Backend state: identity, address, weight, liveness, and the counts the balancer reads.

A Backend is mutable state shared by the router, the balancer and the data plane. It holds no
connections; the data plane keeps its connection pools keyed by backend name.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

from mcpbalancer.config import HealthConfig
from mcpbalancer.protocol import Era

BOTH_ERAS = frozenset(Era)
# What a backend does with legacy clients (`session_mode`): it keeps sessions, it serves every
# request without one, or the proxy does not know yet (session_modes.py learns it).
STATEFUL: Final = "stateful"
STATELESS: Final = "stateless"
UNKNOWN: Final = "unknown"

# Separates a backend's name from an incarnation token in the owner id stored with each session.
# Backend names cannot contain it (see config), so a name-only owner id never does.
OWNER_SEP: Final = "~"
_QUERY: Final = ord("?")


@dataclass(eq=False)
class Backend:
    name: str
    host: str
    port: int
    weight: int = 1
    tls: bool = False
    # The path of the backend's URL: its MCP endpoint, where requests for the proxy's `mcp_path`
    # go (see `target`); b"" when the URL has none, and every request path goes unchanged.
    endpoint: bytes = b""
    mcp_path: bytes = b"/mcp"
    eras: frozenset[Era] = BOTH_ERAS  # legacy: takes sessions; modern: takes 2026-07-28 requests
    # An https backend's TLS: the one context its traffic, probes and failover all use (dataplane/
    # tls.py), and the name sent as SNI and verified when it is not `host`.
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None
    # Its own health settings (its `health:` keys over the global block); None: the checker's.
    health: HealthConfig | None = None
    # `session_mode` from the file (STATEFUL or STATELESS), None for auto: then `session_mode` is
    # what was learned, UNKNOWN until then and again after a restart or a new address.
    declared_mode: str | None = None
    session_mode: str = UNKNOWN
    up: bool = True
    draining: bool = False
    evicted: bool = False  # drain_timeout passed: its sessions answer 404
    sessions: int = 0
    in_flight: int = 0
    # `max_in_flight`: requests sent at once (None: no limit), and how long one more waits for a
    # slot; filters/concurrency.py keeps the counts below (GET streams apart, never limited).
    max_in_flight: int | None = None
    queue_timeout: float = 10.0
    calls: int = 0
    streams: int = 0
    queued: int = 0
    # When its process was last seen to go away (refused, reset; fleet/generations.py), in seconds
    # since the epoch; 0 if never. A session bound before then is gone with that process.
    gone_at: float = 0.0
    host_header: bytes = field(init=False)
    # What the session store records as a session's owner: the name, or for a managed backend
    # `<name>~<token>` with a token new for every process, so a restarted process never inherits
    # the sessions of the one before it (see managed.py).
    owner_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.owner_id = self.name
        self.set_address(self.host, self.port, self.tls)
        self.declare_mode(self.declared_mode)

    def set_address(self, host: str, port: int, tls: bool) -> None:
        """A new address, so perhaps another server: what was learned of the old one is forgotten."""
        self.host, self.port, self.tls = host, port, tls
        self.forget_mode()
        default_port = 443 if self.tls else 80
        authority = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            authority = f"[{self.host}]" if self.port == default_port else f"[{self.host}]:{self.port}"
        self.host_header = authority.encode("ascii")

    def target(self, target: bytes) -> bytes:
        """The request target to send this backend: the proxy's MCP path, alone or with a query,
        becomes the backend's endpoint; any other target goes to the same origin unchanged."""
        endpoint = self.endpoint
        if not endpoint:
            return target
        mcp_path = self.mcp_path
        if target.startswith(mcp_path):
            rest = target[len(mcp_path) :]
            if not rest or rest[0] == _QUERY:
                return endpoint + rest
        return target

    def serves_mcp(self, target: bytes) -> bool:
        """`target` is the proxy's MCP path, alone or with a query: a request for this endpoint."""
        mcp_path = self.mcp_path
        if not target.startswith(mcp_path):
            return False
        return len(target) == len(mcp_path) or target[len(mcp_path)] == _QUERY

    def declare_mode(self, mode: str | None) -> None:
        """The file's `session_mode`: STATEFUL or STATELESS wins over what is learned; None (auto)
        learns it again."""
        self.declared_mode = mode
        self.session_mode = UNKNOWN if mode is None else mode

    def learned_mode(self, mode: str) -> None:
        """What the backend's answers showed; ignored when the file declares the mode."""
        if self.declared_mode is None:
            self.session_mode = mode

    def forget_mode(self) -> None:
        """Restarted or re-addressed: learned again."""
        if self.declared_mode is None:
            self.session_mode = UNKNOWN

    def relocate(self, port: int) -> None:
        """The backend now listens on `port` (a managed backend's new process)."""
        self.set_address(self.host, port, self.tls)

    @property
    def available(self) -> bool:
        """May take a new session."""
        return self.up and not self.draining

    @property
    def state(self) -> str:
        """up, down, draining, or drained (draining, and no session or exchange left)."""
        if self.draining:
            idle = self.in_flight == 0 and (self.sessions == 0 or self.evicted)
            return "drained" if idle else "draining"
        return "up" if self.up else "down"


class BackendSet:
    """The configured backends by name, in configuration order."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self.replace(backends)

    def replace(self, backends: Iterable[Backend]) -> None:
        """Swap the members in place (hot reload): holders of this set see the new members."""
        by_name: dict[str, Backend] = {}
        for backend in backends:
            if backend.name in by_name:
                raise ValueError(f"duplicate backend name {backend.name!r}")
            by_name[backend.name] = backend
        self._by_name = by_name
        self._ordered = tuple(by_name.values())

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def owner(self, owner_id: str) -> Backend | None:
        """The backend whose current owner id is `owner_id`: None once that process is gone."""
        backend = self._by_name.get(owner_id.partition(OWNER_SEP)[0])
        return backend if backend is not None and backend.owner_id == owner_id else None

    def available(self) -> list[Backend]:
        return [b for b in self._ordered if b.available]

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)
