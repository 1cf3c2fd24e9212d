"""The filters of `affinity:` (routing/affinity.py holds the maps; the router reads them while it
routes). The request_body filter reads the `requestState` an MRTR retry carries, so the retry can
reach the backend that asked for it; the response_body filter learns the tasks and request states
a watched response creates, before the client can see them and ask again."""

from __future__ import annotations

from mcpbalancer.filters.phases import BodyWatcher
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.protocol import Era
from mcpbalancer.routing.affinity import (
    MRTR_METHODS,
    ResultSniffer,
    parse_json,
    request_state_of,
    state_digest,
)
from mcpbalancer.routing.router import RequestFacts, Router


class RequestStateKey:
    """Registered with `affinity.request_state`."""

    def wants_body(self, facts: RequestFacts) -> bool:
        return facts.era is Era.MODERN and facts.method == b"POST" and facts.mcp_method in MRTR_METHODS

    def request_body(self, facts: RequestFacts, body: bytes, message: object) -> object:
        if facts.mcp_method in MRTR_METHODS and b"requestState" in body:
            if message is None:
                message = parse_json(body)
            state = request_state_of(message)
            facts.state_key = None if state is None else state_digest(state)
        return message


class AffinityLearning:
    """Registered with `affinity.tasks` or `affinity.request_state`."""

    def __init__(self, router: Router) -> None:
        self._router = router

    def response_body(
        self, facts: RequestFacts, backend: Backend, status: int, stream: bool, length: int | None
    ) -> BodyWatcher | None:
        if not facts.watch or not 200 <= status < 300:
            return None
        return _Learner(self._router, backend, ResultSniffer(stream, length))


class _Learner:
    __slots__ = ("_backend", "_router", "_sniffer")

    def __init__(self, router: Router, backend: Backend, sniffer: ResultSniffer) -> None:
        self._router, self._backend, self._sniffer = router, backend, sniffer

    def feed(self, data: bytes) -> None:
        for message in self._sniffer.feed(data):
            self._router.learn_result(self._backend, message)

    def finish(self) -> None:
        for message in self._sniffer.finish():
            self._router.learn_result(self._backend, message)
