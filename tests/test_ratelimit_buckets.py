"""The GCRA buckets of store/ratelimit.py on a clock the test moves: the burst, the refill, the
Retry-After, all-or-nothing across a request's buckets, the bound on their number; and the same
answers from the Lua script on a real Redis."""

from __future__ import annotations

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.store.ratelimit import LocalBuckets, Rate, Refusal, SharedBuckets, bucket_key, retry_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


FIVE_PER_SECOND = Rate.of(5, 1.0, 5)  # a token every 0.2 s, five at once


def test_a_full_bucket_allows_its_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    buckets = LocalBuckets([FIVE_PER_SECOND], clock)
    assert [buckets.take([(0, "alice", 1)]) for _ in range(5)] == [None] * 5
    refused = buckets.take([(0, "alice", 1)])
    assert isinstance(refused, Refusal)
    assert refused.rule == 0
    assert refused.retry_after == pytest.approx(0.2)
    clock.now += 0.2
    assert buckets.take([(0, "alice", 1)]) is None  # one token back
    assert buckets.take([(0, "alice", 1)]) is not None
    clock.now += 10  # idle: full again, never more than the burst
    assert [buckets.take([(0, "alice", 1)]) for _ in range(6)].count(None) == 5
    assert buckets.take([(0, "bob", 1)]) is None  # another key, another bucket


def test_a_request_is_charged_to_all_its_buckets_or_none() -> None:
    clock = Clock()
    buckets = LocalBuckets([FIVE_PER_SECOND, Rate.of(1, 60.0, 1)], clock)
    assert buckets.take([(0, "alice", 1), (1, "search", 1)]) is None
    refused = buckets.take([(0, "alice", 1), (1, "search", 1)])
    assert refused == Refusal(1, pytest.approx(60.0))  # type: ignore[arg-type]
    # The refused request did not take alice's token: four are left of five.
    assert [buckets.take([(0, "alice", 1)]) for _ in range(5)].count(None) == 4


def test_a_cost_counts_several_calls_of_a_batch() -> None:
    buckets = LocalBuckets([FIVE_PER_SECOND], Clock())
    assert buckets.take([(0, "k", 5)]) is None
    assert buckets.take([(0, "k", 1)]) is not None
    assert LocalBuckets([FIVE_PER_SECOND], Clock()).take([(0, "k", 6)]) is not None  # never fits


def test_the_buckets_are_bounded() -> None:
    clock = Clock()
    buckets = LocalBuckets([FIVE_PER_SECOND], clock, max_entries=10)
    for i in range(10):
        buckets.take([(0, f"k{i}", 1)])
    clock.now += 1  # all full again: dropping them changes nothing
    buckets.take([(0, "new", 1)])
    assert len(buckets._tat) == 1
    for i in range(20):  # none full: past the bound, all are reset rather than grow
        buckets.take([(0, f"busy{i}", 1)])
    assert len(buckets._tat) <= 10


def test_retry_after_and_keys() -> None:
    assert retry_seconds(0.01) == 1
    assert retry_seconds(29.2) == 30
    assert bucket_key("alice") == "alice"
    long = "x" * 500
    assert bucket_key(long).startswith("#")
    assert len(bucket_key(long)) == 65


async def test_the_redis_script_answers_as_the_local_buckets(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    metrics = Metrics(CollectorRegistry())
    shared = SharedBuckets(client, [Rate.of(3, 60.0, 3), Rate.of(1, 60.0, 1)], prefix="t:", metrics=metrics)
    try:
        assert [await shared.take([(0, "alice", 1)]) for _ in range(3)] == [None] * 3
        refused = await shared.take([(0, "alice", 1)])
        assert refused is not None
        assert refused.rule == 0
        assert 19 < refused.retry_after <= 20  # a token every 20 s
        assert await shared.take([(1, "t", 1), (0, "bob", 1)]) is None
        refused = await shared.take([(0, "bob", 1), (1, "t", 1)])
        assert refused is not None
        assert refused.rule == 1
        assert [await shared.take([(0, "bob", 1)]) for _ in range(3)].count(None) == 2  # not charged
        ttl = await client.pttl("t:l:0:alice")
        assert 0 < ttl <= 60_001  # gone once full again (a millisecond over, rounded up)
        assert metrics.rate_local.value == 0
        assert not shared.degraded
    finally:
        await shared.close()
