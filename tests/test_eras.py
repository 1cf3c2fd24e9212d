"""Era-aware placement: the router only picks backends that serve the request's era. No sockets."""

from __future__ import annotations

import random

import pytest

from mcpbalancer.config import parse_config
from mcpbalancer.errors import ConfigError, NoBackendAvailable
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.protocol import Era
from mcpbalancer.routing.balancer import LeastSessions
from mcpbalancer.routing.router import Router, classify
from mcpbalancer.store.memory import MemoryStore

LEGACY_ONLY = frozenset({Era.LEGACY})
MODERN_ONLY = frozenset({Era.MODERN})


def router(*backends: Backend) -> Router:
    return Router(BackendSet(backends), LeastSessions(random.Random(1)), MemoryStore(), 60.0)


def test_each_era_goes_only_to_backends_that_serve_it() -> None:
    old = Backend("old", "127.0.0.1", 9001, eras=LEGACY_ONLY)
    new = Backend("new", "127.0.0.1", 9002, eras=MODERN_ONLY)
    both = Backend("both", "127.0.0.1", 9003)
    r = router(old, new, both)
    legacy = classify(b"POST", None, None)
    modern = classify(b"POST", None, b"2026-07-28")
    assert {r.pick(legacy).name for _ in range(20)} == {"old", "both"}
    assert {r.pick(modern).name for _ in range(20)} == {"new", "both"}
    assert r.pick(modern, exclude={"both"}).name == "new"
    with pytest.raises(NoBackendAvailable):
        r.pick(legacy, exclude={"old", "both"})


def test_no_backend_of_the_era_is_503() -> None:
    r = router(Backend("old", "127.0.0.1", 9001, eras=LEGACY_ONLY))
    with pytest.raises(NoBackendAvailable):
        r.route(classify(b"POST", None, b"2026-07-28"))


def minimal(**backend: object) -> dict[str, object]:
    return {"backends": [{"name": "a", "url": "http://127.0.0.1:8001", **backend}]}


def test_eras_default_to_both_and_parse() -> None:
    assert parse_config(minimal()).backends[0].eras == ("legacy", "modern")
    assert parse_config(minimal(eras=["modern"])).backends[0].eras == ("modern",)


@pytest.mark.parametrize(
    ("eras", "message"),
    [
        ([], "backends[0].eras: must have at least one entry"),
        (["legacy", "legacy"], "backends[0].eras: lists an era twice"),
        (["2026"], "backends[0].eras[0]: must be one of legacy, modern; got '2026'"),
        ("modern", "backends[0].eras: must be a list"),
    ],
)
def test_bad_eras(eras: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(minimal(eras=eras), "x.yaml")
