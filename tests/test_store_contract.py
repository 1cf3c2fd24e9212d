"""One contract for every SessionStore, plus what each implementation promises on top.

Everything runs on a real redis-server (tests.fixtures.redis). Memory-side time is a fake clock;
Redis-side expiry is waited for by polling under a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import redis.asyncio

from mcpbalancer.errors import StoreError
from mcpbalancer.store import UNKNOWN, SessionStore
from mcpbalancer.store.cache import LIFETIME, CachedStore
from mcpbalancer.store.factory import create_store
from mcpbalancer.store.memory import MemoryStore
from mcpbalancer.store.redis import RedisStore
from tests.fixtures.redis import RedisServer

PREFIX = "mcpb:"
KINDS = ["memory", "redis", "cached"]
SHARED_KINDS = ["redis", "cached"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


async def command_calls(raw: redis.asyncio.Redis) -> dict[str, int]:
    """Commands the server ran since the last CONFIG RESETSTAT, minus our own bookkeeping."""
    stats = await raw.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    return {name: n for name, n in calls.items() if not name.startswith(("info", "config"))}


@dataclass
class Harness:
    kind: str
    store: SessionStore
    clock: FakeClock
    raw: redis.asyncio.Redis
    expired: list[tuple[str, str]] = field(default_factory=list)

    async def wait_expired(self, sid: str, ttl: float) -> None:
        """Let `sid`, bound with `ttl`, expire in the store under test."""
        if self.kind == "memory":
            self.clock.advance(ttl)
            return
        if self.kind == "redis":
            await eventually(lambda: self._is_none(sid))
            return
        # Wait on Redis directly: polling the cache would slide the expiry. Then age the cache.
        await eventually(lambda: self._key_gone(sid))
        self.clock.advance(ttl * 2)

    async def _is_none(self, sid: str) -> bool:
        return await self.store.get(sid) is None

    async def _key_gone(self, sid: str) -> bool:
        return await self.raw.exists(f"{PREFIX}s:{sid}") == 0


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def build(kind: str, url: str, clock: FakeClock, expired: list[tuple[str, str]]) -> SessionStore:
    if kind == "memory":
        return MemoryStore(clock=clock, on_expire=lambda sid, backend: expired.append((sid, backend)))
    shared = RedisStore.from_url(url, prefix=PREFIX)
    return shared if kind == "redis" else CachedStore(shared, clock=clock)


@pytest.fixture(params=KINDS)
async def harness(
    request: pytest.FixtureRequest, redis_url: str, raw: redis.asyncio.Redis, clock: FakeClock
) -> AsyncIterator[Harness]:
    expired: list[tuple[str, str]] = []
    h = Harness(request.param, build(request.param, redis_url, clock, expired), clock, raw, expired)
    yield h
    await h.store.close()


# The contract, for every implementation.


async def test_bind_then_get(harness: Harness) -> None:
    assert await harness.store.bind("s1", "b1", 60) == "b1"
    assert await harness.store.get("s1") == "b1"


async def test_get_unknown_is_none(harness: Harness) -> None:
    assert await harness.store.get("nope") is None


async def test_bind_keeps_first_owner(harness: Harness) -> None:
    await harness.store.bind("s1", "b1", 60)
    assert await harness.store.bind("s1", "b2", 60) == "b1"
    assert await harness.store.get("s1") == "b1"


async def test_delete(harness: Harness) -> None:
    await harness.store.bind("s1", "b1", 60)
    await harness.store.delete("s1")
    assert await harness.store.get("s1") is None
    await harness.store.delete("s1")  # deleting what is gone is fine
    assert await harness.store.bind("s1", "b2", 60) == "b2"


async def test_touch_missing_is_false(harness: Harness) -> None:
    assert await harness.store.touch("nope", 60) is False


async def test_touch_extends(harness: Harness) -> None:
    await harness.store.bind("s1", "b1", 10)
    if harness.kind == "memory":
        harness.clock.advance(6)
        assert await harness.store.touch("s1", 20) is True
        harness.clock.advance(15)  # past the first ttl, within the touched one
        assert await harness.store.get("s1") == "b1"
    else:
        assert await harness.store.touch("s1", 60) is True
        assert await harness.raw.pttl(f"{PREFIX}s:s1") > 30_000


async def test_expiry(harness: Harness) -> None:
    await harness.store.bind("s1", "b1", 0.2)
    await harness.wait_expired("s1", 0.2)
    assert await harness.store.get("s1") is None
    assert await harness.store.touch("s1", 60) is False
    assert await harness.store.bind("s1", "b2", 60) == "b2"


async def test_peek_never_contradicts_get(harness: Harness) -> None:
    await harness.store.bind("s1", "b1", 60)
    assert harness.store.peek("s1") in ("b1", UNKNOWN)
    assert harness.store.peek("nope") in (None, UNKNOWN)


# Shared (Redis-backed) stores: what lands in Redis.


@pytest.mark.parametrize("harness", SHARED_KINDS, indirect=True)
async def test_keys_are_namespaced_and_values_are_backend_names(harness: Harness) -> None:
    shared = harness
    await shared.store.bind("s1", "b1", 60)
    await shared.store.bind("s2", "b2", 60)
    assert sorted(await shared.raw.keys("*")) == ["mcpb:s:s1", "mcpb:s:s2"]
    assert await shared.raw.get("mcpb:s:s1") == "b1"
    # The cache writes its keys to outlive the ttl by the half ttl between its lazy slides.
    lifetime = 60_000 * (LIFETIME if shared.kind == "cached" else 1)
    assert lifetime - 5_000 < await shared.raw.pttl("mcpb:s:s1") <= lifetime


async def test_prefix_is_configurable(redis_url: str, raw: redis.asyncio.Redis) -> None:
    store = RedisStore.from_url(redis_url, prefix="other:")
    await store.bind("s1", "b1", 60)
    await store.close()
    assert await raw.keys("*") == ["other:s:s1"]


async def test_bind_is_one_set_nx_get(redis_url: str, raw: redis.asyncio.Redis) -> None:
    server = await raw.info("server")
    assert tuple(map(int, server["redis_version"].split(".")[:2])) >= (7, 0), "SET NX GET needs 7.0"
    store = RedisStore.from_url(redis_url)
    await store.bind("warm", "b0", 60)  # connection setup out of the count
    await raw.config_resetstat()
    assert await store.bind("s1", "b1", 60) == "b1"
    assert await store.bind("s1", "b2", 60) == "b1"
    assert await command_calls(raw) == {"set": 2}
    await store.close()


async def test_redis_peek_is_always_unknown(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    assert store.peek("s1") is UNKNOWN
    await store.bind("s1", "b1", 60)
    assert store.peek("s1") is UNKNOWN
    await store.close()


# MemoryStore.


async def test_memory_peek_is_authoritative_and_slides(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    assert store.peek("s1") is None
    await store.bind("s1", "b1", 10)
    for _ in range(3):  # three hops of 8 s: 24 s in all, alive because each peek slid it
        clock.advance(8)
        assert store.peek("s1") == "b1"
    clock.advance(10)
    assert store.peek("s1") is None


async def test_memory_sweep_calls_on_expire(clock: FakeClock) -> None:
    expired: list[tuple[str, str]] = []
    store = MemoryStore(clock=clock, on_expire=lambda sid, backend: expired.append((sid, backend)))
    await store.bind("s1", "b1", 10)
    await store.bind("s2", "b2", 30)
    clock.advance(20)
    assert store.sweep() == 1
    assert expired == [("s1", "b1")]
    assert len(store) == 1
    assert store.peek("s2") == "b2"


async def test_memory_lazy_expiry_calls_on_expire_but_delete_does_not(clock: FakeClock) -> None:
    expired: list[tuple[str, str]] = []
    store = MemoryStore(clock=clock, on_expire=lambda sid, backend: expired.append((sid, backend)))
    await store.bind("s1", "b1", 10)
    await store.bind("s2", "b2", 60)
    await store.delete("s2")
    clock.advance(10)
    assert await store.get("s1") is None
    assert expired == [("s1", "b1")]
    assert len(store) == 0


async def test_memory_rebind_over_expired_entry(clock: FakeClock) -> None:
    expired: list[tuple[str, str]] = []
    store = MemoryStore(clock=clock, on_expire=lambda sid, backend: expired.append((sid, backend)))
    await store.bind("s1", "b1", 10)
    clock.advance(10)
    assert await store.bind("s1", "b2", 10) == "b2"
    assert expired == [("s1", "b1")]


async def test_memory_binds_sweep_expired_entries(clock: FakeClock) -> None:
    expired: list[tuple[str, str]] = []
    store = MemoryStore(clock=clock, on_expire=lambda sid, backend: expired.append((sid, backend)))
    for i in range(100):
        await store.bind(f"old{i}", "b1", 1)
    clock.advance(2)
    for i in range(100):
        await store.bind(f"new{i}", "b2", 60)
    assert len(store) == 100  # no lookups of the old ones needed
    assert sorted(expired) == sorted((f"old{i}", "b1") for i in range(100))


# CachedStore in front of Redis.


@pytest.fixture
async def cached(redis_url: str, clock: FakeClock) -> AsyncIterator[CachedStore]:
    store = CachedStore(RedisStore.from_url(redis_url, prefix=PREFIX), clock=clock)
    yield store
    await store.close()


async def test_cached_peek(cached: CachedStore, clock: FakeClock) -> None:
    assert cached.peek("s1") is UNKNOWN  # a cache miss proves nothing
    await cached.bind("s1", "b1", 10)
    assert cached.peek("s1") == "b1"
    await cached.delete("s1")
    assert cached.peek("s1") is UNKNOWN
    await cached.bind("s2", "b2", 10)
    clock.advance(10.001)  # untouched for a whole ttl: stale
    assert cached.peek("s2") is UNKNOWN


async def test_cached_known_session_costs_no_redis_command(
    cached: CachedStore, raw: redis.asyncio.Redis
) -> None:
    await cached.bind("s1", "b1", 60)
    await raw.config_resetstat()
    for _ in range(1000):
        assert cached.peek("s1") == "b1"
        assert await cached.get("s1") == "b1"
    await cached.drain()
    assert await command_calls(raw) == {}


async def test_cached_half_ttl_touch_happens_once(
    cached: CachedStore, raw: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await cached.bind("s1", "b1", 60)
    await raw.pexpire("mcpb:s:s1", 10_000)  # shrink it, so the touch is visible
    await raw.config_resetstat()
    clock.advance(29)
    assert cached.peek("s1") == "b1"
    await cached.drain()
    assert await command_calls(raw) == {}  # under half the ttl: nothing
    clock.advance(1)
    for _ in range(100):
        assert cached.peek("s1") == "b1"
    await cached.drain()
    assert await command_calls(raw) == {"pexpire": 1}
    assert await raw.pttl("mcpb:s:s1") > 30_000


async def test_cached_touch_finding_key_gone_drops_entry(
    cached: CachedStore, raw: redis.asyncio.Redis, clock: FakeClock
) -> None:
    await cached.bind("s1", "b1", 60)
    await raw.delete("mcpb:s:s1")  # e.g. another replica ended the session
    clock.advance(30)
    assert cached.peek("s1") == "b1"  # the cache cannot know yet
    await cached.drain()
    assert cached.peek("s1") is UNKNOWN
    assert await cached.get("s1") is None


async def test_cached_explicit_touch_of_gone_key_drops_entry(
    cached: CachedStore, raw: redis.asyncio.Redis
) -> None:
    await cached.bind("s1", "b1", 60)
    await raw.delete("mcpb:s:s1")
    assert await cached.touch("s1", 60) is False
    assert cached.peek("s1") is UNKNOWN


async def test_cached_capacity_evicts_least_recently_used(redis_url: str, clock: FakeClock) -> None:
    store = CachedStore(RedisStore.from_url(redis_url), capacity=2, clock=clock)
    await store.bind("s1", "b1", 60)
    await store.bind("s2", "b2", 60)
    assert store.peek("s1") == "b1"  # s2 is now the least recently used
    await store.bind("s3", "b3", 60)
    assert len(store) == 2
    assert store.peek("s2") is UNKNOWN
    assert await store.get("s2") == "b2"  # still in Redis
    await store.close()


async def test_two_caches_on_one_redis_share_sessions(
    redis_url: str, raw: redis.asyncio.Redis, clock: FakeClock
) -> None:
    a = CachedStore(RedisStore.from_url(redis_url), clock=clock)
    b = CachedStore(RedisStore.from_url(redis_url), clock=clock, default_ttl=60)
    await a.bind("s1", "b1", 60)
    assert b.peek("s1") is UNKNOWN
    assert await b.get("warm") is None  # connection setup out of the count
    await raw.config_resetstat()
    assert await b.get("s1") == "b1"
    await b.drain()
    # One GET, and one PEXPIRE: a lookup is activity and b cannot know when the key was last slid.
    assert await command_calls(raw) == {"get": 1, "pexpire": 1}
    assert b.peek("s1") == "b1"
    assert await b.bind("s1", "b2", 60) == "b1"  # NX holds across replicas
    await a.close()
    await b.close()


async def test_cached_get_without_known_ttl_does_not_cache(redis_url: str, clock: FakeClock) -> None:
    a = CachedStore(RedisStore.from_url(redis_url), clock=clock)
    b = CachedStore(RedisStore.from_url(redis_url), clock=clock)
    await a.bind("s1", "b1", 60)
    assert await b.get("s1") == "b1"
    assert b.peek("s1") is UNKNOWN  # b has seen no ttl: it could not slide the expiry
    await a.close()
    await b.close()


async def test_cached_close_cancels_background_touch(
    redis_url: str, raw: redis.asyncio.Redis, clock: FakeClock
) -> None:
    store = CachedStore(RedisStore.from_url(redis_url, op_timeout=5), clock=clock)
    await store.bind("s1", "b1", 60)
    await raw.client_pause(600)  # the server holds every command, so the touch hangs
    clock.advance(30)
    assert store.peek("s1") == "b1"
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 0.4


# Outages.


async def test_redis_outage_is_bounded_and_cache_keeps_answering(
    private_redis_server: RedisServer, clock: FakeClock
) -> None:
    server = private_redis_server
    plain = RedisStore.from_url(server.url, op_timeout=0.25)
    cached = CachedStore(RedisStore.from_url(server.url, op_timeout=0.25), clock=clock)
    await plain.bind("s2", "b2", 60)
    await cached.bind("s1", "b1", 60)

    server.kill()
    for op in (plain.get("s2"), plain.bind("s3", "b3", 60), plain.touch("s2", 60), plain.delete("s2")):
        started = time.monotonic()
        with pytest.raises(StoreError):
            await op
        assert time.monotonic() - started < 1
    assert cached.peek("s1") == "b1"
    clock.advance(30)  # due for a touch, which fails in the background
    assert cached.peek("s1") == "b1"
    await cached.drain()
    assert cached.peek("s1") == "b1"  # a failed touch does not forget the session
    with pytest.raises(StoreError):
        await cached.get("other")

    server.start()
    await eventually(lambda: _answers(plain))
    assert await plain.bind("s3", "b3", 60) == "b3"
    assert await cached.bind("s4", "b4", 60) == "b4"
    assert await plain.get("s4") == "b4"
    await plain.close()
    await cached.close()


async def _answers(store: RedisStore) -> bool:
    try:
        await store.get("probe")
    except StoreError:
        return False
    return True


async def test_timeout_mid_command_leaves_no_stray_reply(redis_url: str, raw: redis.asyncio.Redis) -> None:
    store = RedisStore.from_url(redis_url, op_timeout=0.1)
    await store.bind("a", "x", 60)
    await store.bind("b", "y", 60)
    await raw.client_pause(300)
    started = time.monotonic()
    with pytest.raises(StoreError):
        await store.get("a")
    assert 0.05 < time.monotonic() - started < 1  # it did wait for the server, and not long
    await eventually(lambda: _answers(store))
    # Had the timed-out GET's reply stayed on the connection, this would read "x".
    assert await store.get("b") == "y"
    await store.close()


# The factory.


def test_factory_memory() -> None:
    assert isinstance(create_store("memory", prefix=PREFIX, cache_size=10), MemoryStore)


def test_factory_rejects_unknown_spec() -> None:
    with pytest.raises(ValueError, match="unknown session store"):
        create_store("memcached://x", prefix=PREFIX, cache_size=10)


async def test_factory_redis_connects_on_first_use_only() -> None:
    port = _closed_port()
    store = create_store(f"redis://127.0.0.1:{port}", prefix=PREFIX, cache_size=10)
    assert isinstance(store, CachedStore)
    with pytest.raises(StoreError):
        await store.get("s1")
    await store.close()


async def test_factory_unix_socket(redis_server: RedisServer, redis_url: str) -> None:
    store = create_store(redis_server.unix_url, prefix=PREFIX, cache_size=10, session_ttl=60)
    assert await store.bind("s1", "b1", 60) == "b1"
    other = RedisStore.from_url(redis_url, prefix=PREFIX)
    assert await other.get("s1") == "b1"
    await other.close()
    await store.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
