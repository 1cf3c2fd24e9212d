"""Opt-in replay failover (`failover: replay`): a session whose owner is gone moves to a live backend.

The proxy keeps each session's `initialize` request body (bounded) when it binds the session. When
the owner refuses connections, or no longer exists (removed from the config, a managed process
replaced), the next request of the session does not get 404: the stored `initialize` and a
`notifications/initialized` are sent to a live backend, the client's session id is bound to that
backend, and the backend's new session id is swapped in for the client's on every request (and back
on every response) from then on. The client keeps its session; the server state of the old process
(per-session values, subscriptions, open streams, requests in flight) is lost.

The client resumes its event streams with `Last-Event-ID`s the dead process issued. The new backend
never issued them (some servers answer 400, others open a stream that stays silent), so a moved
session's requests go without `Last-Event-ID`: its GET opens a fresh stream on the new backend.

Records and aliases live in this proxy's memory: with a shared Redis, another proxy that has not seen
the session's `initialize` answers 404 as before.

With `bind_sessions`, the replayed requests carry the bound header (the session's credential, as the
request that triggered the replay sent it): a backend that authenticates with it accepts them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from mcpbalancer import protocol
from mcpbalancer.errors import NoBackendAvailable, SessionNotFound
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.observability.metrics import Metrics

if TYPE_CHECKING:
    from mcpbalancer.routing.router import RequestFacts, Router

log = logging.getLogger(__name__)

BODY_LIMIT: Final = 64 * 1024  # larger initialize bodies are not kept: such sessions answer 404
_INITIALIZED: Final = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
_ACCEPT: Final = "application/json, text/event-stream"


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


class Failover:
    def __init__(
        self,
        *,
        max_records: int,
        connect_timeout: float,
        response_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._records: collections.OrderedDict[str, tuple[bytes, bytes]] = collections.OrderedDict()
        self._aliases: dict[str, bytes] = {}  # client's session id -> the backend's
        self._moved: set[str] = set()  # sessions replayed at least once: their event ids are void
        self._inflight: dict[str, asyncio.Future[Backend]] = {}
        self._max = max_records
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=response_timeout)
        self._http: aiohttp.ClientSession | None = None
        self.replays = 0

    def configure(self, *, max_records: int, connect_timeout: float, response_timeout: float) -> None:
        """A reload: new limits; the records kept (fewer when `max_records` shrank)."""
        self._max = max_records
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=response_timeout)
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    # -- bookkeeping, on the data plane's path ---------------------------------------------------

    def remember(self, raw_sid: bytes, target: bytes, body: bytes) -> None:
        """The initialize (`target`, `body`) that created session `raw_sid`."""
        if not protocol.valid_session_id(raw_sid) or len(body) > BODY_LIMIT:
            return
        self._records[raw_sid.decode("ascii")] = (target, body)
        if len(self._records) > self._max:
            sid, _ = self._records.popitem(last=False)
            self._aliases.pop(sid, None)
            self._moved.discard(sid)

    def alias(self, sid: str) -> bytes | None:
        return self._aliases.get(sid)

    def moved(self, sid: str) -> bool:
        """The session was moved: the event ids its client holds name events of another process."""
        return sid in self._moved

    def can_replay(self, sid: str) -> bool:
        return sid in self._records

    def discard(self, sid: str) -> None:
        """The session ended (DELETE, the backend's 404, expiry)."""
        self._records.pop(sid, None)
        self._aliases.pop(sid, None)
        self._moved.discard(sid)

    # -- the replay ------------------------------------------------------------------------------

    def replay(self, router: Router, facts: RequestFacts, gone: Backend | None) -> asyncio.Future[Backend]:
        """The backend now holding `facts.session_id`; one replay per session at a time, shared by
        every request of the session that arrives meanwhile (a waiter going away does not cancel it).
        Raises SessionNotFound when the session cannot be moved."""
        sid = facts.session_id
        assert sid is not None
        running = self._inflight.get(sid)
        if running is None:
            running = asyncio.ensure_future(self._replay(router, facts, gone))
            self._inflight[sid] = running
            running.add_done_callback(lambda _: self._inflight.pop(sid, None))
        return asyncio.shield(running)

    async def _replay(self, router: Router, facts: RequestFacts, gone: Backend | None) -> Backend:
        sid, version = facts.session_id, facts.protocol_version
        assert sid is not None
        record = self._records.get(sid)
        if record is None:  # ended (DELETE, expiry) meanwhile
            raise SessionNotFound()
        target, body = record
        tried = {gone.name} if gone is not None else set()
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
                new_sid = await self._initialize(backend, target, body, version, _bound(router, facts))
            except _ReplayFailed as exc:
                log.warning("replay failover: backend %s refused the session: %s", backend.name, exc)
                continue
            # The alias first: a request routed by the new binding must already carry the new id
            # (and no event id of the old process).
            if new_sid == sid.encode("ascii"):
                self._aliases.pop(sid, None)
            else:
                self._aliases[sid] = new_sid
            self._moved.add(sid)
            await router.rebind(sid, backend, gone, facts.tag)
            self.replays += 1
            if self._metrics is not None:
                self._metrics.session_failover("moved")
            log.info("replay failover: session moved from %s to %s", gone.name if gone else "?", backend.name)
            return backend

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
        if self._http is not None:
            await self._http.close()
