"""The life of a request as named phases, after Cloudflare Pingora's `ProxyHttp`.

Every feature that acts on a request is a small filter registered at the phases it needs, and
only when it is configured. `compose` turns the configured filters into one `Phases` record, with
one callable per phase, or None when no filter acts there: the exchange pays one `is None` test
for a phase nobody uses, and one call for a phase one filter uses.

    phase             when                                        today's filters
    early_request     the head is complete (client connection)    Host allow list, Origin/CORS,
                                                                  the protected-resource metadata
    request           the exchange's turn, facts classified       auth, tool policy, rate limits,
                                                                  session binding, route rules
    request_body      the whole body, for filters that want it    strict headers, MRTR state key,
                                                                  tool policy and rate limits (legacy)
    upstream_peer     Router.route decides; then a filter may     max_in_flight (a ticket for a slot)
                      hold the request for room on the backend
    upstream_request  the head that goes to the backend           replay failover's id alias, auth,
                                                                  the backend's own session id
    response          the backend's response head                 (hooks for what comes next)
    session_id        a new session's id, as its client gets it   sealed session ids
    response_body     the pieces of a response a filter watches   affinity learning
    logging           the exchange is over                        access log
    fail_to_connect   no connection to the backend                passive health
    error_while_proxy the backend failed after the connection     passive health

A filter refuses a request by raising a ProxyError (errors.py) from `request` or
`request_body`; the exchange answers it, counts it (its `reject_reason`) and logs it. An
`early_request` filter returns its verdict instead, because the connection answers it in turn,
after the requests queued ahead of it.

`request` and `request_body` may return an awaitable when they must ask something first (a key
set, a Redis round trip): the filters after it run once it is done, always in order, so each sees
what the ones before it set in the facts (auth's principal first). A `request_body` filter acts
only on the requests its own `wants_body` names, and may bound the body it reads (`body_limit`).

This module imports nothing of the data plane: a filter sees a request through the narrow
protocols below, which the exchange and the request head satisfy.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mcpbalancer.errors import ProxyError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.routing.router import RequestFacts


class Head(Protocol):
    """What a filter reads of a request head (dataplane/head.py's RequestHead)."""

    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    @property
    def origin(self) -> bytes | None: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def cors_request_headers(self) -> bytes | None: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes, bytes]]: ...  # (lower-case name, name, value)


class MutableHead(Head, Protocol):
    """An early filter may set the CORS lines every answer to this request carries."""

    cors: bytes | None


class Context(Protocol):
    """What a filter reads of one exchange (dataplane/exchange.py), the per-request context."""

    @property
    def head(self) -> Head: ...
    @property
    def peer_ip(self) -> bytes: ...  # the client connection's peer address
    @property
    def client_subject(self) -> bytes | None: ...  # its verified TLS client certificate's subject
    @property
    def facts(self) -> RequestFacts | None: ...
    @property
    def backend(self) -> Backend | None: ...
    @property
    def status(self) -> int: ...  # the status the client was sent; 0 while none


# An early verdict: an error to answer, or a whole answer of the proxy's own (status, bytes).
Verdict = ProxyError | tuple[int, bytes]
# What a request or request_body filter returns: None when it is done, else what to wait for.
Pending = Awaitable[None] | None


@dataclass(slots=True)
class HeadEdits:
    """What the upstream_request filters change in the head sent to the backend."""

    session_id: bytes | None = None  # the id the backend knows this session by, if not the client's
    drop: frozenset[bytes] = frozenset()  # lower-case names of fields not to forward
    add: list[bytes] = field(default_factory=list)  # whole header lines, CRLF-terminated


class Ticket(Protocol):
    """A request's hold on its backend (an upstream_peer filter's, filters/concurrency.py): `ready`
    is set while it must wait for room, and `release` is called once, when the exchange ends or
    moves to another backend."""

    ready: Awaitable[None] | None

    def release(self) -> None: ...


class BodyWatcher(Protocol):
    """One response's body filter: sees every piece before the client does."""

    def feed(self, data: bytes) -> None: ...
    def finish(self) -> None: ...


# The filter protocols: a filter implements the methods of the phases it acts at.


class EarlyRequestFilter(Protocol):
    def early_request(self, head: MutableHead, peer_ip: bytes) -> Verdict | None: ...


class RequestFilter(Protocol):
    def request(self, ctx: Context, facts: RequestFacts) -> Pending: ...


class RequestBodyFilter(Protocol):
    def wants_body(self, facts: RequestFacts) -> bool: ...

    def request_body(self, ctx: Context, facts: RequestFacts, body: bytes, message: object) -> object:
        """Check or read the whole body; returns the parsed message (`message`, if an earlier
        filter parsed it already, else None or what this one parsed), so it is parsed once; or
        an awaitable to wait for, after which the next filter gets `message` as it was."""
        ...


class BodyLimit(Protocol):
    def body_limit(self, facts: RequestFacts) -> int | None:
        """The most body bytes this filter reads of this request (a larger one is refused with
        413); None when it sets no bound of its own (limits.body_bytes applies)."""
        ...


class UpstreamPeerFilter(Protocol):
    def upstream_peer(self, ctx: Context, backend: Backend) -> Ticket | None: ...


class UpstreamRequestFilter(Protocol):
    def upstream_request(self, facts: RequestFacts, edits: HeadEdits) -> None: ...


class UpstreamEditsFilter(Protocol):
    """An upstream_request filter that makes its edits whole, so that it may hand out one object
    per session rather than fill a new one per request. What it returns is never changed."""

    def upstream_edits(self, facts: RequestFacts) -> HeadEdits | None: ...


class SessionIdFilter(Protocol):
    def session_id(self, facts: RequestFacts, backend: Backend, session_id: bytes) -> bytes | None:
        """The id the client gets for the session `backend` just created as `session_id`, or
        None to relay it as it is. A ProxyError refuses the answer (the exchange answers it)."""
        ...


class ResponseFilter(Protocol):
    def response(self, ctx: Context, status: int, session_id: bytes | None) -> None: ...


class ResponseBodyFilter(Protocol):
    def response_body(
        self, facts: RequestFacts, backend: Backend, status: int, stream: bool, length: int | None
    ) -> BodyWatcher | None:
        """A watcher for this response's body, or None to let it pass unseen."""
        ...


class LoggingFilter(Protocol):
    def logging(self, ctx: Context) -> None: ...


class FaultFilter(Protocol):
    def fail_to_connect(self, backend: str, kind: str) -> None: ...  # refused | timeout | tls
    def error_while_proxy(self, backend: str, kind: str) -> None: ...  # reset | timeout | 5xx | tls


@dataclass(frozen=True, slots=True)
class Phases:
    """One callable per phase, None where no filter acts."""

    early_request: Callable[[MutableHead, bytes], Verdict | None] | None = None
    request: Callable[[Context, RequestFacts], Pending] | None = None
    wants_body: Callable[[RequestFacts], bool] | None = None
    request_body: Callable[[Context, RequestFacts, bytes], Pending] | None = None
    body_limit: Callable[[RequestFacts], int | None] | None = None
    upstream_peer: Callable[[Context, Backend], Ticket | None] | None = None
    upstream_request: Callable[[RequestFacts], HeadEdits | None] | None = None
    response: Callable[[Context, int, bytes | None], None] | None = None
    session_id: Callable[[RequestFacts, Backend, bytes], bytes | None] | None = None
    response_body: Callable[[RequestFacts, Backend, int, bool, int | None], BodyWatcher | None] | None = None
    logging: Callable[[Context], None] | None = None
    fail_to_connect: Callable[[str, str], None] | None = None
    error_while_proxy: Callable[[str, str], None] | None = None
    filters: tuple[object, ...] = ()  # what was composed, in order: for the admin API and tests

    @property
    def reads_names(self) -> bool:
        """Some filter reads Mcp-Name: the client connection must capture it."""
        return any(getattr(f, "reads_names", False) for f in self.filters)


NO_PHASES = Phases()


def compose(filters: Sequence[object]) -> Phases:
    """The phases of `filters`, in their order at every phase (the first filter runs first)."""

    def bound(method: str) -> list[Callable[..., object]]:
        return [getattr(f, method) for f in filters if callable(getattr(f, method, None))]

    peers = bound("upstream_peer")
    if len(peers) > 1:
        raise ValueError("one upstream_peer filter at most: a request holds one ticket")
    return Phases(
        early_request=_first_verdict(bound("early_request")),
        request=_in_order(bound("request")),
        wants_body=_any(bound("wants_body")),
        request_body=_body_chain(bound("request_body")),
        body_limit=_least(bound("body_limit")),
        upstream_peer=peers[0] if peers else None,  # type: ignore[arg-type]
        upstream_request=_edits(bound("upstream_request"), bound("upstream_edits")),
        response=_each(bound("response")),
        session_id=_first_answer(bound("session_id")),
        response_body=_watchers(bound("response_body")),
        logging=_each(bound("logging")),
        fail_to_connect=_each(bound("fail_to_connect")),
        error_while_proxy=_each(bound("error_while_proxy")),
        filters=tuple(filters),
    )


def _each(calls: list[Callable[..., object]]) -> Callable[..., None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]  # one filter: called directly, no wrapper

    def run(*args: object) -> None:
        for call in calls:
            call(*args)

    return run


def _in_order(calls: list[Callable[..., object]]) -> Callable[..., Pending] | None:
    """Filters at a phase that may wait: each runs once the one before it is done."""
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]

    def run(*args: object) -> Pending:
        for i, call in enumerate(calls):
            pending = call(*args)
            if pending is not None:
                return _rest(pending, calls[i + 1 :], args)  # type: ignore[arg-type]
        return None

    return run


async def _rest(
    pending: Awaitable[None], calls: list[Callable[..., object]], args: tuple[object, ...]
) -> None:
    await pending
    for call in calls:
        later = call(*args)
        if later is not None:
            await later  # type: ignore[misc]


def _first_verdict(
    calls: list[Callable[..., object]],
) -> Callable[[MutableHead, bytes], Verdict | None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]

    def run(head: MutableHead, peer_ip: bytes) -> Verdict | None:
        for call in calls:
            verdict = call(head, peer_ip)
            if verdict is not None:
                return verdict  # type: ignore[return-value]
        return None

    return run


def _first_answer(
    calls: list[Callable[..., object]],
) -> Callable[[RequestFacts, Backend, bytes], bytes | None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]

    def run(facts: RequestFacts, backend: Backend, session_id: bytes) -> bytes | None:
        for call in calls:
            answer = call(facts, backend, session_id)
            if answer is not None:
                return answer  # type: ignore[return-value]
        return None

    return run


def _any(calls: list[Callable[..., object]]) -> Callable[[RequestFacts], bool] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]
    return lambda facts: any(call(facts) for call in calls)


def _body_chain(
    calls: list[Callable[..., object]],
) -> Callable[[Context, RequestFacts, bytes], Pending] | None:
    if not calls:
        return None

    def run(ctx: Context, facts: RequestFacts, body: bytes) -> Pending:
        message: object = None
        for i, call in enumerate(calls):
            result = call(ctx, facts, body, message)
            if inspect.isawaitable(result):  # parsed JSON never is: a filter must wait
                return _body_rest(result, calls[i + 1 :], (ctx, facts, body), message)
            message = result
        return None

    return run


async def _body_rest(
    pending: Awaitable[Any], calls: list[Callable[..., object]], args: tuple[object, ...], message: object
) -> None:
    await pending
    for call in calls:
        result = call(*args, message)
        if inspect.isawaitable(result):
            await result
        else:
            message = result


def _least(calls: list[Callable[..., object]]) -> Callable[[RequestFacts], int | None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]

    def run(facts: RequestFacts) -> int | None:
        limits: list[int] = [limit for call in calls if (limit := call(facts)) is not None]  # type: ignore[misc]
        return min(limits) if limits else None

    return run


def _edits(
    calls: list[Callable[..., object]], whole: list[Callable[..., object]]
) -> Callable[[RequestFacts], HeadEdits | None] | None:
    if not calls and not whole:
        return None
    if not calls and len(whole) == 1:
        return whole[0]  # type: ignore[return-value]  # its own edits, as they are: no copy

    def run(facts: RequestFacts) -> HeadEdits:
        edits = HeadEdits()
        for make in whole:
            given: HeadEdits | None = make(facts)  # type: ignore[assignment]
            if given is not None:
                edits.session_id = given.session_id or edits.session_id
                edits.drop = edits.drop | given.drop
                edits.add += given.add
        for call in calls:
            call(facts, edits)
        return edits

    return run


def _watchers(
    calls: list[Callable[..., object]],
) -> Callable[[RequestFacts, Backend, int, bool, int | None], BodyWatcher | None] | None:
    if not calls:
        return None
    if len(calls) == 1:
        return calls[0]  # type: ignore[return-value]

    def run(
        facts: RequestFacts, backend: Backend, status: int, stream: bool, length: int | None
    ) -> BodyWatcher | None:
        watchers = [w for call in calls if (w := call(facts, backend, status, stream, length)) is not None]
        if not watchers:
            return None
        return watchers[0] if len(watchers) == 1 else _Watchers(watchers)  # type: ignore[return-value,arg-type]

    return run


class _Watchers:
    __slots__ = ("_watchers",)

    def __init__(self, watchers: list[BodyWatcher]) -> None:
        self._watchers = watchers

    def feed(self, data: bytes) -> None:
        for watcher in self._watchers:
            watcher.feed(data)

    def finish(self) -> None:
        for watcher in self._watchers:
            watcher.finish()
