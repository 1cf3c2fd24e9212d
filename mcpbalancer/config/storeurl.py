"""The `store` setting: `memory`, or a URL naming one Redis, a Sentinel-watched master or a Cluster.

    memory
    redis://[user:password@]host:port/db         rediss:// for TLS; unix:///path/to/redis.sock
    redis+sentinel://[user:password@]h1:26379,h2:26379/<master>/<db>    rediss+sentinel:// for TLS
    redis+cluster://[user:password@]h1:7000,h2:7001                     rediss+cluster:// for TLS

The plain forms are redis-py's own URLs, handed to it as they are. The Sentinel and Cluster forms
list several nodes in one authority, which no URL parser reads, so they are parsed here into a
`StoreSpec`. Pure: the store factory builds the clients from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

MEMORY: Final = "memory"
PLAIN_SCHEMES: Final = ("redis", "rediss", "unix")
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES: Final = ("redis+cluster", "rediss+cluster")
DEFAULT_PORTS: Final = {"sentinel": 26379, "cluster": 6379}
_NODE = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?", re.ASCII
)
_MASTER = re.compile(r"[A-Za-z0-9_.-]{1,128}", re.ASCII)


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """What a `store` value names. `url` is the value as written (redis-py parses the plain forms)."""

    kind: str  # memory, redis, sentinel or cluster
    url: str = MEMORY
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels, or the Cluster's startup nodes
    master: str | None = None  # the name Sentinel watches the master under
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # the password must not reach a log line
        return f"StoreSpec(kind={self.kind!r}, nodes={self.nodes!r}, master={self.master!r}, db={self.db})"


def scheme_of(value: str) -> str:
    return value.partition("://")[0].lower() if "://" in value else ""


def parse_store(value: str) -> StoreSpec:
    """The spec of a `store` value; ValueError saying what is wrong (without the password)."""
    if value == MEMORY:
        return StoreSpec(MEMORY)
    scheme = scheme_of(value)
    if scheme in PLAIN_SCHEMES:
        return StoreSpec("redis", url=value, tls=scheme == "rediss")
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        return _parse_multi(value, scheme)
    raise ValueError(
        "must be 'memory' or a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
    )


def _parse_multi(value: str, scheme: str) -> StoreSpec:
    kind = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
    rest = value.split("://", 1)[1]
    if "?" in rest or "#" in rest:
        raise ValueError(f"a {scheme}:// URL takes no query or fragment")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(text, kind) for text in hosts.split(","))
    spec = StoreSpec(
        kind, value, nodes, tls=scheme.startswith("rediss"), username=username, password=password
    )
    if kind == "cluster":
        if path.strip("/"):
            raise ValueError("a redis+cluster:// URL has no path: a cluster has one database (db 0)")
        return spec
    master, _, db = path.partition("/")
    if not _MASTER.fullmatch(master):
        raise ValueError("a redis+sentinel:// URL names the master after the nodes: .../<master>[/<db>]")
    db = db.rstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database after the master name must be a number, got {db!r}")
    return StoreSpec(kind, value, nodes, master, int(db or 0), spec.tls, username=username, password=password)


def _node(text: str, kind: str) -> tuple[str, int]:
    found = _NODE.fullmatch(text)
    if found is None:
        raise ValueError(f"{text!r} is not host:port (nodes are separated by commas)")
    port = int(found["port"] or DEFAULT_PORTS[kind])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} of {text!r} is not 1-65535")
    return found["v6"] or found["host"], port
