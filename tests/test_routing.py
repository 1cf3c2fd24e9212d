"""Router: the routing decision over a real MemoryStore (fake clock) and a real strategy. No sockets."""

from __future__ import annotations

import inspect
import random
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from mcpbalancer.errors import BadRequest, InvalidSessionId, NoBackendAvailable, SessionNotFound
from mcpbalancer.fleet.backends import Backend, BackendSet
from mcpbalancer.protocol import Era
from mcpbalancer.routing.balancer import LeastSessions
from mcpbalancer.routing.binding import backend_of
from mcpbalancer.routing.router import RequestFacts, Router, classify
from mcpbalancer.store.memory import MemoryStore

T = TypeVar("T")
TTL = 60.0
LEGACY = b"2025-06-18"
MODERN = b"2026-07-28"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def owner(h: Harness, sid: str) -> str | None:
    """The backend the store names for `sid` (its value also holds the bind time)."""
    value = h.store.peek(sid)
    return None if value is None else backend_of(value)


@dataclass
class Harness:
    router: Router
    store: MemoryStore
    clock: FakeClock
    a: Backend
    b: Backend
    expired: list[tuple[str, str]] = field(default_factory=list)

    async def settle(self) -> None:
        """Let the router's background store deletes finish."""
        await self.router.close()

    async def bind(self, sid: str, backend: Backend) -> None:
        """A new session on `backend`, learned the way the data plane learns it."""
        await_ = self.router.learn(new_session(), backend, 200, sid.encode())
        assert await_ is not None
        await await_


async def resolved(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value
    return value


def new_session(method: bytes = b"POST") -> RequestFacts:
    return classify(method, None, None)


def in_session(sid: str, method: bytes = b"POST") -> RequestFacts:
    return classify(method, sid.encode(), LEGACY)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    clock = FakeClock()
    a = Backend("a", "127.0.0.1", 9001)
    b = Backend("b", "127.0.0.1", 9002)
    expired: list[tuple[str, str]] = []
    store = MemoryStore(clock=clock, on_expire=lambda sid, owner: expired.append((sid, owner)))
    router = Router(BackendSet([a, b]), LeastSessions(random.Random(3)), store, TTL)
    harness = Harness(router, store, clock, a, b, expired)
    yield harness
    await router.close()


# --- classify ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session_id", "version", "era", "sid"),
    [
        (None, None, Era.LEGACY, None),
        (b"abc", None, Era.LEGACY, "abc"),
        (b"abc", LEGACY, Era.LEGACY, "abc"),
        # A session id decides, whatever the version says: a 2026-07-28 client never sends one.
        (b"abc", MODERN, Era.LEGACY, "abc"),
        (b"abc", b"1999-01-01", Era.LEGACY, "abc"),
        (b"abc", b"\xff\x00", Era.LEGACY, "abc"),
        (None, b"2030-01-01", Era.MODERN, None),
    ],
)
def test_classify(session_id: bytes | None, version: bytes | None, era: Era, sid: str | None) -> None:
    assert classify(b"POST", session_id, version) == RequestFacts(b"POST", era, sid)


@pytest.mark.parametrize("version", [LEGACY, MODERN, None])
@pytest.mark.parametrize("session_id", [b"", b"bad id", b"tab\there", b"x" * 257, b"caf\xc3\xa9", b"\x7f"])
def test_classify_rejects_malformed_session_id(session_id: bytes, version: bytes | None) -> None:
    with pytest.raises(InvalidSessionId) as caught:
        classify(b"POST", session_id, version)
    assert isinstance(caught.value, BadRequest)
    assert caught.value.reject_reason == "session_id"


# --- route ------------------------------------------------------------------------------------------


async def test_new_session_goes_to_a_backend_from_the_strategy(h: Harness) -> None:
    h.a.sessions = 5
    backend = h.router.route(new_session())
    assert backend is h.b  # least sessions, synchronously


@pytest.mark.parametrize("version", [MODERN, b"1999-01-01", b"\x01garbage"])
async def test_a_session_id_routes_by_the_session_whatever_the_version(h: Harness, version: bytes) -> None:
    await h.bind("s1", h.b)
    assert all(h.router.route(classify(b"POST", b"s1", version)) is h.b for _ in range(10))
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(classify(b"POST", b"whatever", version)))


@pytest.mark.parametrize("state", ["down", "draining", "mixed"])
async def test_no_backend_available(h: Harness, state: str) -> None:
    h.a.up = state == "draining"
    h.b.up = state == "draining"
    h.a.draining = state in ("draining", "mixed")
    h.b.draining = state == "draining"
    with pytest.raises(NoBackendAvailable) as exc_info:
        await resolved(h.router.route(new_session()))
    assert exc_info.value.retry_after is not None


async def test_draining_backend_gets_no_new_sessions_but_keeps_its_own(h: Harness) -> None:
    await h.bind("s1", h.a)
    h.a.draining = True
    assert all(h.router.route(new_session()) is h.b for _ in range(5))
    assert h.router.route(in_session("s1")) is h.a


async def test_known_session_routes_to_its_backend_synchronously(h: Harness) -> None:
    await h.bind("s1", h.b)
    assert h.router.route(in_session("s1")) is h.b
    assert h.router.route(in_session("s1", b"GET")) is h.b
    assert h.router.route(in_session("s1", b"DELETE")) is h.b


async def test_known_session_on_a_down_backend_still_routes_there(h: Harness) -> None:
    # Never re-route a session: the data plane finds the owner unreachable and calls owner_gone.
    await h.bind("s1", h.a)
    h.a.up = False
    assert await resolved(h.router.route(in_session("s1"))) is h.a


async def test_unknown_session_is_not_found(h: Harness) -> None:
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(in_session("nope")))


async def test_expired_session_is_not_found(h: Harness) -> None:
    await h.bind("s1", h.a)
    h.clock.advance(TTL + 1)
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(in_session("s1")))
    assert [(sid, backend_of(value)) for sid, value in h.expired] == [("s1", "a")]


async def test_session_activity_slides_expiry(h: Harness) -> None:
    await h.bind("s1", h.a)
    for _ in range(3):
        h.clock.advance(TTL * 0.9)
        assert await resolved(h.router.route(in_session("s1"))) is h.a


async def test_mapping_to_unconfigured_backend_is_not_found_and_deleted(h: Harness) -> None:
    assert await h.store.bind("s1", "gone", TTL) == "gone"
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(in_session("s1")))
    await h.settle()
    assert h.store.peek("s1") is None
    assert (h.a.sessions, h.b.sessions) == (0, 0)


# --- learn: binding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 202])
async def test_learn_binds_on_2xx_with_session_header(h: Harness, status: int) -> None:
    pending = h.router.learn(new_session(), h.a, status, b"s1")
    assert pending is not None
    await pending
    assert owner(h, "s1") == "a"
    assert h.a.sessions == 1
    assert h.router.route(in_session("s1")) is h.a


@pytest.mark.parametrize("status", [400, 404, 500, 301, 101])
async def test_learn_does_not_bind_non_2xx(h: Harness, status: int) -> None:
    # Stateful servers put a fresh, unusable id on their 400 "missing session id" answers.
    await resolved(h.router.learn(new_session(), h.a, status, b"s1"))
    assert h.store.peek("s1") is None
    assert h.a.sessions == 0


async def test_learn_does_not_bind_without_session_header(h: Harness) -> None:
    assert h.router.learn(new_session(), h.a, 200, None) is None
    assert len(h.store) == 0


async def test_learn_does_not_bind_for_a_request_that_carried_an_id(h: Harness) -> None:
    await h.bind("s1", h.a)
    await resolved(h.router.learn(in_session("s1"), h.a, 200, b"s2"))
    assert h.store.peek("s2") is None
    assert h.a.sessions == 1


@pytest.mark.parametrize("raw", [b"bad id", b"", b"x" * 257, b"caf\xc3\xa9"])
async def test_learn_does_not_bind_malformed_response_id(h: Harness, raw: bytes) -> None:
    await resolved(h.router.learn(new_session(), h.a, 200, raw))
    assert len(h.store) == 0
    assert h.a.sessions == 0


async def test_modern_never_binds(h: Harness) -> None:
    facts = classify(b"POST", None, MODERN)
    assert h.router.learn(facts, h.a, 200, b"s1") is None
    assert len(h.store) == 0
    assert h.a.sessions == 0


async def test_a_session_request_ends_its_session_whatever_the_version(h: Harness) -> None:
    await h.bind("s1", h.a)
    await h.bind("s2", h.a)
    assert h.router.learn(classify(b"DELETE", b"s1", MODERN), h.a, 200, None) is None
    assert h.router.learn(classify(b"POST", b"s2", b"1999-01-01"), h.a, 404, None) is None
    await h.settle()
    assert (h.store.peek("s1"), h.store.peek("s2")) == (None, None)
    assert h.a.sessions == 0


async def test_id_collision_keeps_first_owner_and_counts(h: Harness) -> None:
    await h.bind("s1", h.a)
    await h.bind("s1", h.b)
    assert owner(h, "s1") == "a"
    assert (h.a.sessions, h.b.sessions) == (1, 0)


# --- learn: forgetting ------------------------------------------------------------------------------


async def test_404_to_session_request_forgets_it(h: Harness) -> None:
    await h.bind("s1", h.a)
    assert h.router.learn(in_session("s1"), h.a, 404, None) is None
    await h.settle()
    assert h.store.peek("s1") is None
    assert h.a.sessions == 0
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(in_session("s1")))


@pytest.mark.parametrize("status", [200, 202, 204])
async def test_2xx_delete_forgets_it(h: Harness, status: int) -> None:
    await h.bind("s1", h.a)
    await resolved(h.router.learn(in_session("s1", b"DELETE"), h.a, status, None))
    await h.settle()
    assert h.store.peek("s1") is None
    assert h.a.sessions == 0


@pytest.mark.parametrize("status", [400, 405, 500, 502])
async def test_non_2xx_delete_keeps_it(h: Harness, status: int) -> None:
    await h.bind("s1", h.a)
    await resolved(h.router.learn(in_session("s1", b"DELETE"), h.a, status, None))
    await h.settle()
    assert owner(h, "s1") == "a"
    assert h.a.sessions == 1


@pytest.mark.parametrize(
    ("method", "status"), [(b"POST", 200), (b"GET", 200), (b"POST", 400), (b"POST", 500)]
)
async def test_other_session_responses_keep_it(h: Harness, method: bytes, status: int) -> None:
    await h.bind("s1", h.a)
    await resolved(h.router.learn(in_session("s1", method), h.a, status, None))
    await h.settle()
    assert owner(h, "s1") == "a"
    assert h.a.sessions == 1


async def test_two_404s_in_sequence_count_down_once(h: Harness) -> None:
    await h.bind("s1", h.a)
    await h.bind("s2", h.a)
    for _ in range(2):
        await resolved(h.router.learn(in_session("s1"), h.a, 404, None))
        await h.settle()
    assert h.a.sessions == 1


async def test_concurrent_404s_count_down_once(h: Harness) -> None:
    # Several in-flight requests of one session learn of its end before the store delete runs.
    await h.bind("s1", h.a)
    await h.bind("s2", h.a)
    await resolved(h.router.learn(in_session("s1"), h.a, 404, None))
    await resolved(h.router.learn(in_session("s1"), h.a, 404, None))
    await resolved(h.router.learn(in_session("s1", b"DELETE"), h.a, 200, None))
    await h.settle()
    assert h.a.sessions == 1
    assert h.store.peek("s1") is None
    assert owner(h, "s2") == "a"


async def test_404_after_expiry_counts_down_once(h: Harness) -> None:
    h.store = MemoryStore(clock=h.clock, on_expire=h.router.session_expired)
    h.router = Router(h.router.backends, LeastSessions(random.Random(3)), h.store, TTL)
    await h.bind("s1", h.a)
    h.clock.advance(TTL / 2)
    await h.bind("s2", h.a)
    h.clock.advance(TTL / 2 + 1)  # s1 has expired (not yet noticed), s2 has not
    await resolved(h.router.learn(in_session("s1"), h.a, 404, None))
    await h.settle()
    assert h.a.sessions == 1
    assert owner(h, "s2") == "a"


# --- owner_gone and expiry --------------------------------------------------------------------------


async def test_owner_gone_forgets_and_answers_not_found(h: Harness) -> None:
    await h.bind("s1", h.b)
    err = h.router.owner_gone(in_session("s1"), h.b)
    assert isinstance(err, SessionNotFound)
    await h.settle()
    assert h.store.peek("s1") is None
    assert h.b.sessions == 0
    with pytest.raises(SessionNotFound):
        await resolved(h.router.route(in_session("s1")))


async def test_owner_gone_twice_counts_down_once(h: Harness) -> None:
    await h.bind("s1", h.b)
    await h.bind("s2", h.b)
    h.router.owner_gone(in_session("s1"), h.b)
    h.router.owner_gone(in_session("s1"), h.b)
    await h.settle()
    assert h.b.sessions == 1


async def test_owner_gone_for_new_session_request_forgets_nothing(h: Harness) -> None:
    await h.bind("s1", h.a)
    assert isinstance(h.router.owner_gone(new_session(), h.a), SessionNotFound)
    await h.settle()
    assert h.a.sessions == 1


async def test_session_expired_decrements(h: Harness) -> None:
    await h.bind("s1", h.a)
    await h.bind("s2", h.a)
    h.router.session_expired("s1", "a")
    assert h.a.sessions == 1


@pytest.mark.parametrize("owner", ["a", "unknown"])
async def test_session_expired_never_goes_negative(h: Harness, owner: str) -> None:
    h.router.session_expired("s1", owner)
    assert h.a.sessions == 0


async def test_store_expiry_callback_keeps_counts_honest(h: Harness) -> None:
    h.store = MemoryStore(clock=h.clock, on_expire=h.router.session_expired)
    h.router = Router(h.router.backends, LeastSessions(random.Random(3)), h.store, TTL)
    for sid in ("s1", "s2", "s3"):
        await h.bind(sid, h.b)
    h.clock.advance(TTL + 1)
    assert h.store.sweep() == 3
    assert h.b.sessions == 0
