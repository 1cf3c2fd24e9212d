from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from mcpbalancer.fleet.backends import Backend
from mcpbalancer.routing.balancer import STRATEGIES, Strategy, make_strategy


def backend(name: str, weight: int = 1, sessions: int = 0, in_flight: int = 0) -> Backend:
    return Backend(name, "127.0.0.1", 8000, weight=weight, sessions=sessions, in_flight=in_flight)


def trio(**weights: int) -> list[Backend]:
    return [backend(n, weight=weights.get(n, 1)) for n in "abc"]


def strategy(name: str, seed: int = 7) -> Strategy:
    return make_strategy(name, random.Random(seed))


def names(picks: Sequence[Backend | None]) -> list[str]:
    return [p.name if p is not None else "-" for p in picks]


def tally(s: Strategy, candidates: Sequence[Backend], n: int) -> Counter[str]:
    return Counter(names([s.pick(candidates) for _ in range(n)]))


# --- common ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_empty_candidates_give_none(name: str) -> None:
    assert strategy(name).pick([]) is None


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_single_candidate_is_always_picked(name: str) -> None:
    only = backend("a", weight=3, sessions=9, in_flight=9)
    s = strategy(name)
    assert all(s.pick([only]) is only for _ in range(20))


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown balancing strategy 'fastest'"):
        make_strategy("fastest")


def test_default_rng_is_created() -> None:
    assert make_strategy("p2c").pick(trio()) is not None


# --- least_sessions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([(1, 4, 0), (1, 2, 0), (1, 3, 0)], "b"),  # fewest sessions
        ([(2, 3, 0), (1, 2, 0), (1, 3, 0)], "a"),  # 3/2 < 2/1
        ([(1, 1, 0), (1, 0, 3), (1, 2, 0)], "a"),  # in-flight initializes count as load
    ],
)
def test_least_sessions_picks_the_least_loaded(counts: list[tuple[int, int, int]], expected: str) -> None:
    candidates = [backend(n, w, s, f) for n, (w, s, f) in zip("abc", counts, strict=True)]
    assert strategy("least_sessions").pick(candidates) is candidates["abc".index(expected)]


def test_least_sessions_weight_two_with_two_ties_weight_one_with_one() -> None:
    candidates = [backend("a", weight=2, sessions=2), backend("b", weight=1, sessions=1)]
    assert tally(strategy("least_sessions"), candidates, 10) == {"a": 5, "b": 5}


def test_least_sessions_spreads_ties_when_counts_move_after_all_picks() -> None:
    # 30 initializes picked before any count moves (nothing relayed yet): rotation spreads them.
    assert tally(strategy("least_sessions"), trio(), 30) == {"a": 10, "b": 10, "c": 10}


def test_least_sessions_concurrent_initializes_see_each_other_in_flight() -> None:
    # 30 concurrent initializes: each is in flight once relayed, none is a session yet.
    candidates = [backend("a"), backend("b", sessions=5), backend("c", sessions=5)]
    s = strategy("least_sessions")
    for _ in range(30):
        picked = s.pick(candidates)
        assert picked is not None
        picked.in_flight += 1
    assert sorted(c.sessions + c.in_flight for c in candidates) == [13, 13, 14]


def test_least_sessions_spreads_when_counted_after_each_pick() -> None:
    candidates = trio(a=2)
    s = strategy("least_sessions")
    for _ in range(40):
        picked = s.pick(candidates)
        assert picked is not None
        picked.sessions += 1
    assert [c.sessions for c in candidates] == [20, 10, 10]


@pytest.mark.parametrize("seed", range(3))
def test_least_sessions_rotation_is_even_whatever_the_seed(seed: int) -> None:
    assert tally(strategy("least_sessions", seed), trio(), 300) == {"a": 100, "b": 100, "c": 100}


# --- p2c -------------------------------------------------------------------------------------------


def test_p2c_least_in_flight_gets_the_most() -> None:
    candidates = [backend("a", in_flight=10), backend("b", in_flight=0), backend("c", in_flight=5)]
    counts = tally(strategy("p2c"), candidates, 10_000)
    # b wins every pair it is in (2/3), c wins only against a (1/3), a never wins.
    assert counts["a"] == 0
    assert counts["b"] == pytest.approx(6667, abs=200)
    assert counts["c"] == pytest.approx(3333, abs=200)


def test_p2c_compares_in_flight_per_weight() -> None:
    candidates = [backend("a", weight=4, in_flight=8), backend("b", weight=1, in_flight=3)]
    assert tally(strategy("p2c"), candidates, 100) == {"a": 100}  # 8/4 < 3/1


def test_p2c_draws_by_weight_when_loads_tie() -> None:
    candidates = trio(a=3)  # a is drawn first 3/5 of the time, and wins ties as the first drawn
    counts = tally(strategy("p2c"), candidates, 10_000)
    assert counts["a"] == pytest.approx(6000, abs=200)
    assert counts["b"] == pytest.approx(2000, abs=200)
    assert counts["c"] == pytest.approx(2000, abs=200)


def test_p2c_is_reproducible_with_a_seeded_rng() -> None:
    candidates = trio(a=2)
    s1, s2 = strategy("p2c", 42), strategy("p2c", 42)
    assert names([s1.pick(candidates) for _ in range(50)]) == names([s2.pick(candidates) for _ in range(50)])


# --- round_robin -----------------------------------------------------------------------------------


def test_round_robin_is_nginx_smooth_sequence() -> None:
    s, candidates = strategy("round_robin"), trio(a=5)
    assert "".join(names([s.pick(candidates) for _ in range(14)])) == "aabacaa" * 2


@pytest.mark.parametrize(
    "weights",
    [{"a": 1, "b": 1, "c": 1}, {"a": 5, "b": 1, "c": 1}, {"a": 3, "b": 2, "c": 7}, {"a": 1, "b": 10, "c": 4}],
)
def test_round_robin_exact_proportions(weights: dict[str, int]) -> None:
    cycles = 50
    total = sum(weights.values())
    counts = tally(strategy("round_robin"), trio(**weights), total * cycles)
    assert counts == {n: w * cycles for n, w in weights.items()}


def test_round_robin_every_cycle_is_exact() -> None:
    s, candidates = strategy("round_robin"), trio(a=3, b=2, c=7)
    for _ in range(20):
        assert tally(s, candidates, 12) == {"a": 3, "b": 2, "c": 7}


def test_round_robin_survives_a_candidate_leaving_and_returning() -> None:
    s = strategy("round_robin")
    a, b, c = trio(a=5)
    assert names([s.pick([a, b, c]) for _ in range(4)]) == list("aaba")  # c is next when it goes down
    without_c = tally(s, [a, b], 600)
    assert without_c == {"a": 500, "b": 100}
    assert names([s.pick([a, b, c]) for _ in range(7)]).count("c") == 1
    # Back in: exact proportions, cycle after cycle.
    for _ in range(20):
        assert tally(s, [a, b, c], 7) == {"a": 5, "b": 1, "c": 1}


def test_round_robin_takes_in_a_new_backend() -> None:
    s = strategy("round_robin")
    a, b, c = trio(a=2, b=1, c=3)
    tally(s, [a, b], 5)
    assert tally(s, [a, b, c], 600) == {"a": 200, "b": 100, "c": 300}
