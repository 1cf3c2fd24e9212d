"""The shared session store: one Redis key per session, shared by every proxy replica.

Key `<prefix>s:<sid>`, value what routing/binding.py writes, expiry in milliseconds (PX). Each call
is bounded by `op_timeout`, and every redis-py error or timeout becomes a StoreError in `call`, the
one place where this module meets the library's exceptions.

One Redis, a master watched by Sentinel, or a Cluster (`from_spec`): the commands are the same.
Keys of one session that an operation touches together (its replay record, store/records.py) are
hash-tagged with the session's key, `{<prefix>s:<sid>}:i`, so that they live in its Cluster slot.
Besides the keys, the proxies speak on one pub/sub channel, `<prefix>events` (store/cache.py says
what), and keep when each backend was last seen to go away in one sorted set, `<prefix>g`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mcpbalancer.config.storeurl import StoreSpec, parse_store
from mcpbalancer.errors import StoreError
from mcpbalancer.store.base import UNKNOWN, Unknown

T = TypeVar("T")
Client = redis.asyncio.Redis | RedisCluster
EVENT_POLL = 1.0  # seconds a subscriber waits for a message before it looks again
_BIND_ANNOUNCING = """
local previous = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if not previous then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return previous
"""

# A PING on a connection idle this long catches a half-dead socket before a real command does.
_HEALTH_CHECK_INTERVAL = 30


class RedisStore:
    """SessionStore on Redis. `peek` cannot answer without I/O, so it is always UNKNOWN: put a
    CachedStore in front of it for the hot path."""

    def __init__(
        self, client: Client, prefix: str = "mcpb:", op_timeout: float = 0.25, space: str = "s"
    ) -> None:
        self._client = client
        self._key_prefix = f"{prefix}{space}:"  # space: s sessions; t, r affinity (store/shared.py)
        self._op_timeout = op_timeout
        # This instance's marker: its absence means Redis lost what we wrote (restart, flush).
        self._marker = f"{prefix}m:{secrets.token_hex(8)}"
        self._channel = f"{prefix}events"
        self._generations = f"{prefix}g"
        self.cluster = isinstance(client, RedisCluster)  # errors are per slot, not the whole store
        self._turn = 0  # the Cluster node tried next for a keyless command
        self._command_table_due = self.cluster

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "mcpb:", op_timeout: float = 0.25, space: str = "s"
    ) -> RedisStore:
        """A store on `url`, any form `store` takes but memory; connects on first use, not here."""
        return cls(
            client_for(parse_store(url), op_timeout), prefix=prefix, op_timeout=op_timeout, space=space
        )

    @property
    def client(self) -> Client:
        return self._client

    def record_key(self, sid: str) -> str:
        """The key of `sid`'s replay record, in its session key's Cluster slot."""
        return "{" + self.key(sid) + "}:i"

    def key(self, sid: str) -> str:
        return self._key_prefix + sid

    def peek(self, sid: str) -> Unknown:
        return UNKNOWN

    async def get(self, sid: str) -> str | None:
        value = await self.call(self._client.get(self.key(sid)))
        return _text(value)

    async def bind(self, sid: str, backend: str, ttl: float, announce: str | None = None) -> str:
        # SET NX GET (Redis >= 7.0) binds and reports an existing owner in one round trip: the
        # reply is the previous value, None when our SET took effect.
        if announce is None:
            command = self._client.set(self.key(sid), backend, px=_millis(ttl), nx=True, get=True)
        else:
            # The binding and its announcement in one script: the other proxies hear of it only if
            # it took effect, and before this proxy has its reply (and its client the session id).
            command = self._client.eval(
                _BIND_ANNOUNCING, 1, self.key(sid), backend, _millis(ttl), self._channel, announce
            )
        previous = _text(await self.call(command))
        return backend if previous is None else previous

    async def refresh(self, sid: str) -> str | None:
        return await self.get(sid)

    async def put(self, sid: str, backend: str, ttl: float) -> None:
        """Bind `sid` to `backend` whatever it was bound to before (a session moved elsewhere)."""
        await self.call(self._client.set(self.key(sid), backend, px=_millis(ttl)))

    async def touch(self, sid: str, ttl: float) -> bool:
        return bool(await self.call(self._client.pexpire(self.key(sid), _millis(ttl))))

    async def delete(self, sid: str) -> None:
        await self.call(self._client.delete(self.key(sid)))

    async def ping(self) -> None:
        if isinstance(self._client, RedisCluster):  # reachable while any node answers
            await self._on_any_node(lambda c, node: c.ping(target_nodes=node))
            return
        await self.call(self._client.ping())

    async def mark(self, ttl: float) -> bool:
        """Set this instance's marker key for `ttl` seconds; True if it was absent (first call, or
        Redis lost its data since the last one). One round trip: SET PX GET."""
        previous = await self.call(self._client.set(self._marker, "1", px=_millis(ttl), get=True))
        return previous is None

    # -- the proxies' channel and the backends' generations ------------------------------------------

    async def publish(self, message: str) -> None:
        channel = self._channel
        if isinstance(self._client, RedisCluster):  # a Cluster relays it from any node to all
            await self._on_any_node(lambda c, node: c.publish(channel, message, target_nodes=node))
            return
        await self.call(self._client.publish(channel, message))

    async def _on_any_node(self, command: Callable[[RedisCluster, ClusterNode], Awaitable[Any]]) -> None:
        """A keyless command on a Cluster: on the next primary that answers (one down must not
        fail what any node can do)."""
        client = self._client
        assert isinstance(client, RedisCluster)
        nodes = client.get_primaries() or [client.get_default_node()]
        failure: StoreError | None = None
        for _ in range(len(nodes)):
            self._turn = (self._turn + 1) % len(nodes)
            try:
                await self.call(command(client, nodes[self._turn]))
                return
            except StoreError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def events(self) -> AsyncIterator[str]:
        """The messages of the proxies' channel, for as long as the subscription holds; StoreError
        when it breaks (the caller subscribes again)."""
        client = self._client
        if isinstance(client, RedisCluster):
            # Any node hears every message: subscribe to the next one each time, so that a lost node
            # is left for another. Before the client knows any node, a ping finds them.
            nodes = client.get_primaries()
            if not nodes:
                await self.ping()
                nodes = client.get_primaries()
            if not nodes:
                raise StoreError("redis: no Cluster node known to subscribe to")
            self._turn = (self._turn + 1) % len(nodes)
            pubsub: PubSub = client.pubsub(node=nodes[self._turn], ignore_subscribe_messages=True)
        else:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await self.call(pubsub.subscribe(self._channel))
            while True:
                try:
                    # Bounded here too: a subscription must never wait without a timer.
                    async with asyncio.timeout(EVENT_POLL + self._op_timeout):
                        message = await pubsub.get_message(timeout=EVENT_POLL)
                except (RedisError, OSError, TimeoutError) as exc:
                    raise StoreError(f"redis: {type(exc).__name__}: {exc}") from exc
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    yield data if isinstance(data, str) else bytes(data).decode()
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self._op_timeout):
                    await pubsub.aclose()

    async def record_gone(self, name: str, when: float) -> None:
        """Backend `name` went away at `when` (seconds since the epoch); the latest time wins."""
        await self.call(self._client.zadd(self._generations, {name: round(when * 1000)}, gt=True))

    async def generations(self) -> dict[str, float]:
        """When each backend was last seen to go away, by name."""
        pairs: list[Any] = await self.call(self._client.zrange(self._generations, 0, -1, withscores=True))
        return {str(name): float(score) / 1000 for name, score in pairs}

    async def close(self) -> None:
        await self.call(self._client.aclose())

    async def call(self, command: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._op_timeout):
                if self._command_table_due:
                    await self._fetch_command_table(command)
                return await command
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _fetch_command_table(self, command: Awaitable[object]) -> None:
        """redis-py's Cluster client reads its command table from the master of the first slots,
        and cannot start while that one is down (8.2): every command would fail, the slots that
        answer too. Read it from any startup node that answers; the topology comes next, as usual."""
        client = self._client
        assert isinstance(client, RedisCluster)
        failure: BaseException | None = None
        for node in list(client.nodes_manager.startup_nodes.values()):
            try:
                await client.commands_parser.initialize(node)
            except (RedisError, OSError) as exc:
                failure = exc
                continue
            self._command_table_due = False
            return
        if inspect.iscoroutine(command):
            command.close()  # never sent: no "never awaited" warning
        raise failure or RedisError("no Cluster node answered")


def client_for(spec: StoreSpec, op_timeout: float) -> Client:
    """The redis-py client of a store spec: one Redis, Sentinel's current master, or a Cluster."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": op_timeout,
        "socket_timeout": max(op_timeout, 1.0),  # op_timeout bounds each call; this, a stuck socket
        "health_check_interval": _HEALTH_CHECK_INTERVAL,
        # One immediate retry reconnects a connection that died with a restarted server (or, with
        # Sentinel, asks for the new master); anything slower would only eat into op_timeout.
        "retry": Retry(NoBackoff(), retries=1),
    }
    if spec.kind == "redis":
        return redis.asyncio.from_url(spec.url, **common)
    auth: dict[str, Any] = {"username": spec.username, "password": spec.password}
    if spec.kind == "sentinel":
        sentinel_kwargs = {
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            "ssl": spec.tls,
        }
        sentinel = Sentinel(list(spec.nodes), sentinel_kwargs=sentinel_kwargs, ssl=spec.tls, **common)
        assert spec.master is not None
        master: redis.asyncio.Redis = sentinel.master_for(spec.master, db=spec.db, **auth)
        return master
    # A node lost leaves the other slots working (require_full_coverage off): on_store_error then
    # applies to the sessions whose slot is down, not to all of them.
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in spec.nodes],
        require_full_coverage=False,
        ssl=spec.tls,
        cluster_error_retry_attempts=1,
        **auth,
        **common,
    )


def _millis(ttl: float) -> int:
    # PX 0 is an error in Redis; a non-positive ttl is a caller bug better served by an instant expiry.
    return max(1, round(ttl * 1000))


def _text(value: object) -> str | None:
    # decode_responses=True gives str; a client built without it gives bytes.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    raise StoreError(f"redis: unexpected reply {value!r}")
