"""Opt-in replay failover (`failover: replay`): a session whose owner is gone moves to a live backend.

The proxy keeps each session's `initialize` request body (bounded) when it binds the session. When
the owner refuses connections, no longer exists (removed from the config, a managed process
replaced), went away since the session was bound (fleet/generations.py), or, with
`replay_on: [backend_404]`, answers 404 for it, the session's request does not get 404: the stored
`initialize` and a `notifications/initialized` are sent to a live backend, the client's session id
is bound to that backend, and the backend's new session id is swapped in for the client's on every
request (and back on every response) from then on. The client keeps its session; the server state
of the old process (per-session values, subscriptions, open streams, requests in flight) is lost.

The client resumes its event streams with `Last-Event-ID`s the dead process issued. The new backend
never issued them (some servers answer 400, others open a stream that stays silent), so a moved
session's requests go without `Last-Event-ID`: its GET opens a fresh stream on the new backend.

With a Redis store every record also goes to Redis (store/records.py) with the session's expiry,
slid as the session is used, and the new binding (with the new backend's id: routing/binding.py;
with sealed ids, a fresh token under the client's) is written there: any proxy can replay any
session, and finds one another proxy moved already instead of moving it again. A record holds the
`initialize` body, the protocol version it asked for and the binding tag, never the credential:
the request that finds the owner gone supplies that.

With `bind_sessions`, the replayed requests carry the bound header (the session's credential, as the
request that triggered the replay sent it): a backend that authenticates with it accepts them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol

import aiohttp

from mcpbalancer import protocol
from mcpbalancer.errors import NoBackendAvailable, SessionNotFound, StoreError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics

if TYPE_CHECKING:
    from mcpbalancer.routing.router import RequestFacts, Router

log = logging.getLogger(__name__)

BODY_LIMIT: Final = 64 * 1024  # larger initialize bodies are not kept: such sessions answer 404
_INITIALIZED: Final = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
_ACCEPT: Final = "application/json, text/event-stream"
_SLIDE_SLOTS: Final = 100_000  # sessions whose last slide of the shared record is remembered
LIFETIME: Final = 1.5  # a shared record lives as long as the session's key (store/cache.py)


class Records(Protocol):
    """The shared records (store/records.py), as the failover uses them."""

    async def put(self, sid: str, record: str, ttl: float) -> None: ...
    async def get(self, sid: str) -> str | None: ...
    async def touch(self, sid: str, ttl: float) -> None: ...
    async def delete(self, sid: str) -> None: ...
    async def close(self) -> None: ...


class Record(NamedTuple):
    target: bytes
    body: bytes
    version: bytes | None  # the protocolVersion the initialize asked for
    tag: str | None  # the binding tag (bind_sessions), for the record's reader to check

    def dumps(self) -> str:
        text = {"t": self.target.decode("latin-1"), "b": self.body.decode("latin-1")}
        extra = {"v": self.version.decode("latin-1") if self.version else None, "g": self.tag}
        return json.dumps({**text, **extra}, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Record | None:
        try:
            data = json.loads(text)
            version = data.get("v")
            return cls(
                data["t"].encode("latin-1"),
                data["b"].encode("latin-1"),
                version.encode("latin-1") if version else None,
                data.get("g"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class _ReplayFailed(Exception):
    pass


def _bound(router: Router, facts: RequestFacts) -> dict[str, str]:
    """With `bind_sessions`, the session's credential (the header the backend authenticates with):
    the replayed initialize carries it, as the client's own requests do."""
    if router.binder is None or facts.credential is None:
        return {}
    return {router.binder.header.decode("ascii"): facts.credential.decode("latin-1")}


def _tls(backend: Backend) -> dict[str, Any]:
    """The replayed requests speak TLS as the backend's traffic does: with its one context."""
    return {"ssl": backend.ssl_context or True, "server_hostname": backend.server_name}


def _requested_version(body: bytes) -> bytes | None:
    """The protocolVersion an initialize asked for (once per session, never on the hot path)."""
    try:
        message = json.loads(body)
        version = message["params"]["protocolVersion"]
    except (ValueError, KeyError, TypeError):
        return None
    return version.encode("latin-1") if isinstance(version, str) and version.isascii() else None


class Failover:
    def __init__(
        self,
        *,
        max_records: int,
        connect_timeout: float,
        response_timeout: float,
        metrics: Metrics | None = None,
        shared: Records | None = None,
        session_ttl: float = 3600.0,
        on_backend_404: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._records: collections.OrderedDict[str, Record] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future[_Moved]] = {}
        self._shared = shared
        self._slid: dict[str, float] = {}  # when this proxy last slid a shared record
        self._clock = clock
        self._background: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self.replays = 0
        self.configure(
            max_records=max_records,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
            session_ttl=session_ttl,
            on_backend_404=on_backend_404,
        )

    def configure(
        self,
        *,
        max_records: int,
        connect_timeout: float,
        response_timeout: float,
        session_ttl: float = 3600.0,
        on_backend_404: bool = False,
    ) -> None:
        """A reload: new limits; the records kept (fewer when `max_records` shrank)."""
        self._max = max_records
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=response_timeout)
        self._ttl = session_ttl
        self.on_backend_404 = on_backend_404
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    @property
    def shared(self) -> bool:
        return self._shared is not None

    # -- bookkeeping, on the data plane's path ---------------------------------------------------

    def remember(self, sid: str, target: bytes, body: bytes, tag: str | None) -> None:
        """The initialize (`target`, `body`) that created session `sid`."""
        if len(body) > BODY_LIMIT:
            return
        record = Record(target, body, _requested_version(body), tag)
        self._records[sid] = record
        if len(self._records) > self._max:
            self._records.popitem(last=False)
        if self._shared is not None:
            self._slid[sid] = self._clock()
            self._spawn(self._shared.put(sid, record.dumps(), self._ttl * LIFETIME), "share a replay record")

    def can_replay(self, sid: str) -> bool:
        """A replay may find a record: here, or in the shared store."""
        return self._shared is not None or sid in self._records

    def used(self, sid: str) -> None:
        """A request of `sid` was routed: slide its shared record, at most once per half ttl."""
        if self._shared is None:
            return
        now = self._clock()
        last = self._slid.get(sid)
        if last is not None and now - last < self._ttl / 2:
            return
        self._slid[sid] = now
        if len(self._slid) > _SLIDE_SLOTS:
            del self._slid[next(iter(self._slid))]
        self._spawn(self._shared.touch(sid, self._ttl * LIFETIME), "slide a replay record")

    def discard(self, sid: str) -> None:
        """The session ended (DELETE, the backend's 404, expiry): here and in the shared store."""
        self.forget_local(sid)
        if self._shared is not None:
            self._spawn(self._shared.delete(sid), "delete a replay record")

    def forget_local(self, sid: str) -> None:
        """Another proxy ended the session (and deleted the shared record)."""
        self._records.pop(sid, None)
        self._slid.pop(sid, None)

    def _spawn(self, work: Awaitable[None], what: str) -> None:
        async def run() -> None:
            try:
                await work
            except StoreError as exc:
                log.warning("replay failover: could not %s: %s", what, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the replay ------------------------------------------------------------------------------

    def replay(
        self, router: Router, facts: RequestFacts, gone: Backend | None, *, avoid: bool = True
    ) -> Awaitable[Backend]:
        """The backend now holding `facts.session_id`; one replay per session at a time, shared by
        every request of the session that arrives meanwhile (a waiter going away does not cancel it).
        `gone` is the session's lost owner, not tried again unless `avoid` is False (it answers, but
        forgot the session). Raises SessionNotFound when the session cannot be moved."""
        sid = facts.session_id
        assert sid is not None
        running = self._inflight.get(sid)
        if running is None:
            running = asyncio.ensure_future(self._replay(router, facts, gone, avoid))
            self._inflight[sid] = running
            running.add_done_callback(lambda _: self._inflight.pop(sid, None))
        return _joined(running, facts)

    async def _replay(self, router: Router, facts: RequestFacts, gone: Backend | None, avoid: bool) -> _Moved:
        sid = facts.session_id
        assert sid is not None
        adopted = await router.adopt(facts, gone)
        if adopted is not None:  # another proxy moved it already
            log.info("replay failover: session already moved to %s by another proxy", adopted.name)
            return _Moved(adopted, facts.upstream_sid)
        record = await self._record(sid)
        if record is None:  # ended (DELETE, expiry) meanwhile, or never recorded
            router.session_lost(sid, gone)
            raise SessionNotFound()
        tried = {gone.name} if gone is not None and avoid else set()
        version = facts.protocol_version or record.version
        while True:
            try:
                backend = router.pick(facts, tried)
            except NoBackendAvailable:
                log.warning("replay failover: no live backend for a session; it ends")
                router.session_lost(sid, gone)
                if self._metrics is not None:
                    self._metrics.session_failover("failed")
                raise SessionNotFound() from None
            tried.add(backend.name)
            try:
                new_sid = await self._initialize(
                    backend, record.target, record.body, version, _bound(router, facts)
                )
            except _ReplayFailed as exc:
                log.warning("replay failover: backend %s refused the session: %s", backend.name, exc)
                continue
            # The new binding carries the new backend's id: a request routed by it already sends
            # that id (and no event id of the old process).
            await router.rebind(facts, backend, gone, new_sid)
            self.replays += 1
            if self._metrics is not None:
                self._metrics.session_failover("moved")
            log.info("replay failover: session moved from %s to %s", gone.name if gone else "?", backend.name)
            return _Moved(backend, new_sid)

    async def _record(self, sid: str) -> Record | None:
        record = self._records.get(sid)
        if record is not None or self._shared is None:
            return record
        try:
            text = await self._shared.get(sid)
        except StoreError as exc:
            log.warning("replay failover: could not read a shared replay record: %s", exc)
            return None
        return None if text is None else Record.loads(text)

    async def _initialize(
        self, backend: Backend, target: bytes, body: bytes, version: bytes | None, bound: dict[str, str]
    ) -> bytes:
        http = self._session()
        scheme = "https" if backend.tls else "http"
        url = f"{scheme}://{backend.host_header.decode()}{backend.target(target).decode('latin-1')}"
        headers = {"Content-Type": "application/json", "Accept": _ACCEPT, **bound}
        try:
            async with http.post(
                url, data=body, headers=headers, timeout=self._timeout, **_tls(backend)
            ) as resp:
                await resp.read()
                new_sid = resp.headers.get("Mcp-Session-Id", "").encode("latin-1")
                if not 200 <= resp.status < 300 or not protocol.valid_session_id(new_sid):
                    raise _ReplayFailed(f"initialize answered {resp.status}")
            headers["Mcp-Session-Id"] = new_sid.decode("ascii")
            if version is not None:
                headers["MCP-Protocol-Version"] = version.decode("latin-1")
            async with http.post(
                url, data=_INITIALIZED, headers=headers, timeout=self._timeout, **_tls(backend)
            ) as resp:
                await resp.read()
                if not 200 <= resp.status < 300:
                    raise _ReplayFailed(f"notifications/initialized answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a header aiohttp refuses
            raise _ReplayFailed(f"{type(exc).__name__}: {exc}") from None
        return new_sid

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout, auto_decompress=False)
        return self._http

    async def close(self) -> None:
        for future in list(self._inflight.values()):
            future.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self._shared is not None:
            with contextlib.suppress(StoreError):
                await self._shared.close()


class _Moved(NamedTuple):
    backend: Backend
    upstream_sid: bytes | None  # the id the backend knows the session by


async def _joined(running: asyncio.Future[_Moved], facts: RequestFacts) -> Backend:
    """Wait for a replay (shielded: this waiter going away does not cancel it), then carry its
    outcome onto this request's facts: the replay may have been started by another request."""
    moved = await asyncio.shield(running)
    facts.upstream_sid, facts.moved = moved.upstream_sid, True
    return moved.backend
