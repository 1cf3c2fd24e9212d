"""Token buckets for `rate_limits`, as GCRA: in this process, or shared by every proxy on one Redis.

GCRA (the generic cell rate algorithm) keeps one number per bucket, its theoretical arrival time
(TAT): a request of cost n at time `now` moves it to `max(TAT, now) + n * interval`, and is allowed
while that lies at most `burst * interval` ahead of now. It is a token bucket refilling one token
per `interval` with room for `burst`, without a refill timer or a second number to store.

`take(items)` counts one request against several buckets at once, all or nothing: each item is
(rule index, key, cost), the rule giving its interval and burst. A refused request moves no bucket,
so a request refused by one rule is not charged to the others.

- LocalBuckets: a dict in this process (the memory store, and the fallback below). Bounded: when it
  reaches `max_entries`, the buckets already refilled are dropped, and if that is not enough, all.
- SharedBuckets: one Lua script per request on the session store's Redis, one round trip, atomic,
  with Redis's own clock (so proxies with skewed clocks agree). While Redis fails (an error, or
  no answer within `op_timeout`), every proxy counts on its own LocalBuckets: the limits still hold
  per proxy (so N proxies allow up to N times the rate) and nothing is refused for want of Redis.
  Redis is tried again after `retry_interval`; the outage is logged once, its end too.
Keys: `<prefix>l:<rule index>:<key>`, expiring when the bucket is full again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import redis.asyncio
from redis.exceptions import RedisError

from mcpbalancer.observability.metrics import Metrics

log = logging.getLogger(__name__)

MAX_KEY: Final = 200  # longer keys (a long principal) are hashed
# Five tokens of 0.2 s add up to 1.0000000000000002 s: a burst must not lose its last token to that.
_SLACK: Final = 1e-9
DEFAULT_MAX_ENTRIES: Final = 100_000
Item = tuple[int, str, int]  # (rule index, bucket key, cost)


@dataclass(frozen=True, slots=True)
class Rate:
    """One rule's bucket shape: a token every `interval` seconds, room for `burst` tokens."""

    interval: float
    burst: int

    @classmethod
    def of(cls, count: int, period: float, burst: int) -> Rate:
        return cls(period / count, burst)

    @property
    def window(self) -> float:
        """How far ahead of now the TAT may be."""
        return self.interval * self.burst


@dataclass(frozen=True, slots=True)
class Refusal:
    rule: int  # the index of the rule whose bucket was empty
    retry_after: float  # seconds until the request would be allowed


class LocalBuckets:
    """GCRA buckets in this process."""

    def __init__(
        self,
        rates: Sequence[Rate],
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self._rates = tuple(rates)
        self._clock = clock
        self._max = max_entries
        self._tat: dict[tuple[int, str], float] = {}

    def take(self, items: Sequence[Item]) -> Refusal | None:
        now = self._clock()
        tats = self._tat
        moved = []
        for rule, key, cost in items:
            rate = self._rates[rule]
            new = max(tats.get((rule, key), now), now) + rate.interval * cost
            if new - now > rate.window + _SLACK:
                return Refusal(rule, new - now - rate.window)
            moved.append(((rule, key), new))
        if len(tats) + len(moved) > self._max:
            self._sweep(now)
        tats.update(moved)
        return None

    def _sweep(self, now: float) -> None:
        for bucket in [bucket for bucket, tat in self._tat.items() if tat <= now]:
            del self._tat[bucket]  # full again: forgetting it changes nothing
        if len(self._tat) >= self._max:
            log.warning("rate limits: %d buckets in use; all are reset", len(self._tat))
            self._tat.clear()


# All or nothing across the request's buckets, on Redis's clock (microseconds). ARGV holds, per key,
# its interval, its window (interval * burst) and the request's cost there.
_GCRA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
for i = 1, #KEYS do
  local interval, window, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + interval * cost
  if new - now > window + 0.001 then return {i, math.ceil(new - now - window)} end
  tats[i] = new
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', math.ceil((tats[i] - now) / 1000) + 1)
end
return {0, 0}
"""


class SharedBuckets:
    """GCRA buckets on Redis, shared by every proxy of the store; LocalBuckets while it fails."""

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.RedisCluster,  # one key per script: a slot
        rates: Sequence[Rate],
        *,
        prefix: str,
        metrics: Metrics,
        op_timeout: float = 0.25,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._script = client.register_script(_GCRA)
        self._rates = tuple(rates)
        self._prefix = f"{prefix}l:"
        self._metrics = metrics
        self._op_timeout = op_timeout
        self._retry_interval = retry_interval
        self._clock = clock
        self.local = LocalBuckets(rates, clock)
        self._down_until: float | None = None  # while set: Redis failed, count locally until then

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def take(self, items: Sequence[Item]) -> Refusal | None:
        if self._down_until is not None and self._clock() < self._down_until:
            return self._locally(items)
        keys: list[str] = []
        args: list[float] = []
        for rule, key, cost in items:
            rate = self._rates[rule]
            keys.append(f"{self._prefix}{rule}:{bucket_key(key)}")
            args += (rate.interval * 1e6, rate.window * 1e6, cost)
        try:
            async with asyncio.timeout(self._op_timeout):
                index, wait = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return self._locally(items)
        if self._down_until is not None:
            self._down_until = None
            self._metrics.rate_degraded.value = 0
            log.info("rate limits: Redis answers again; buckets are shared again")
        if index == 0:
            return None
        return Refusal(items[int(index) - 1][0], int(wait) / 1e6)

    def _locally(self, items: Sequence[Item]) -> Refusal | None:
        self._metrics.rate_local.value += 1
        return self.local.take(items)

    def _failed(self, exc: Exception) -> None:
        if self._down_until is None:
            log.warning(
                "rate limits: Redis failed (%s); each proxy counts on its own until it answers",
                exc or type(exc).__name__,
            )
            self._metrics.rate_degraded.value = 1
        self._down_until = self._clock() + self._retry_interval

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, OSError) as exc:
            log.debug("closing the rate-limit client: %s", exc)


def bucket_key(key: str) -> str:
    """A bucket's key as stored: as given, or its SHA-256 when long."""
    if len(key) <= MAX_KEY:
        return key
    return "#" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def retry_seconds(wait: float) -> int:
    """Retry-After for a refusal: whole seconds, at least 1."""
    return max(1, math.ceil(wait))
