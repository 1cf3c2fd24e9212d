"""Pure strategies that place a new session (or a stateless modern request) on one backend.

No I/O and no clock; randomness is injected. Candidates arrive already filtered (available, right
era), so a strategy only ranks them. Weights are positive integers (the config rejects others).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

from mcpbalancer.fleet.backends import Backend


class Strategy(Protocol):
    def pick(self, candidates: Sequence[Backend]) -> Backend | None:
        """One of `candidates`; None iff there are none."""
        ...


class LeastSessions:
    """The candidate with the least (sessions + in_flight) / weight; ties rotate.

    `sessions` grows only once the backend has answered `initialize`, a round trip after the pick.
    The data plane counts the initialize in `in_flight` from the moment it relays it, so adding
    `in_flight` to the load makes a burst of concurrent initializes see each other: with sessions
    (0, 5, 5), 30 concurrent picks end near 13/13/13 instead of 30/5/5, which a tie-break on
    `in_flight` alone would give. It also steers new sessions away from busy backends, and makes
    this strategy least-request for stateless modern traffic (no sessions). Exact ties — e.g. picks
    made before any count moves — rotate with a counter, so they spread evenly instead of all going
    to the first candidate; the counter starts at a random offset so that several workers or
    replicas do not move in lockstep.
    """

    def __init__(self, rng: random.Random) -> None:
        self._turn = rng.randrange(1 << 16)

    def pick(self, candidates: Sequence[Backend]) -> Backend | None:
        if not candidates:
            return None
        least = min(map(_session_load, candidates))
        tied = [c for c in candidates if _session_load(c) == least]
        self._turn += 1
        return tied[self._turn % len(tied)]


def _session_load(backend: Backend) -> float:
    # Equal ratios give equal floats: IEEE division is correctly rounded.
    return (backend.sessions + backend.in_flight) / backend.weight


class PowerOfTwoChoices:
    """Draw two distinct candidates, each with probability by weight; keep the one with the
    smaller in_flight / weight (the first drawn on a tie)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Backend]) -> Backend | None:
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first = self._draw(candidates)
        second = self._draw([c for c in candidates if c is not first])
        return second if _request_load(second) < _request_load(first) else first

    def _draw(self, candidates: Sequence[Backend]) -> Backend:
        return self._rng.choices(candidates, weights=[c.weight for c in candidates])[0]


def _request_load(backend: Backend) -> float:
    return backend.in_flight / backend.weight


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: every candidate's current weight grows by its weight,
    the largest wins (the first listed on a tie) and gives back the total.

    State is kept per backend name. A backend missing from a call keeps its current weight frozen,
    as nginx does for a peer that is down, so it resumes its place in the cycle when it returns; a
    new name starts at 0. Each pick adds and removes the same total, so the currents stay bounded
    and every set of candidates that stays put gets its exact proportions.
    """

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Backend]) -> Backend | None:
        if not candidates:
            return None
        current = self._current
        for c in candidates:
            current[c.name] = current.get(c.name, 0) + c.weight
        best = max(candidates, key=lambda c: current[c.name])
        current[best.name] -= sum(c.weight for c in candidates)
        return best


StrategyFactory = Callable[[random.Random], Strategy]

# The name table, like uvicorn's LOOP_FACTORIES: config names a strategy, make_strategy builds it.
STRATEGIES: Mapping[str, StrategyFactory] = MappingProxyType(
    {
        "least_sessions": LeastSessions,
        "p2c": PowerOfTwoChoices,
        "round_robin": lambda _rng: SmoothRoundRobin(),
    }
)


def make_strategy(name: str, rng: random.Random | None = None) -> Strategy:
    try:
        factory = STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown balancing strategy {name!r} (known: {known})") from None
    return factory(rng if rng is not None else random.Random())
