"""The admin listener of a supervisor (`workers: N`): one control plane for the whole proxy.

The supervisor serves `admin` itself and asks every worker through the worker's private control
channel (a unix socket, process/supervisor.py) before it answers:

- `POST` drain, undrain and reload go to every serving worker; the answer says, per worker, whether
  it applied the change, or will (a worker still starting gets it once it is ready, and one that
  restarts later is started with the drains posted since the last reload).
- `GET /admin/backends` merges the workers' lists (merge.py): sessions and in-flight summed, one
  state per backend, or the states it has on different workers.
- The metrics page is the sum of the workers' pages and the supervisor's own (its admin requests,
  its process), by the rules of observability/aggregate.py.
- `/readyz` is ready when every serving worker is; `/healthz` says the supervisor runs.

The token, the audit lines and `mcpbalancer_admin_requests_total` are the supervisor's: the workers
do not check, log or count what comes through their channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from mcpbalancer.config import Config
from mcpbalancer.control import merge
from mcpbalancer.control.audit import Audit
from mcpbalancer.control.auth import PROBES, AdminAuth, install, warn_if_open
from mcpbalancer.control.probes import ALIVE, JSON
from mcpbalancer.control.server import Listener, response
from mcpbalancer.observability.aggregate import PageSum
from mcpbalancer.observability.metrics import EXPOSITION_CONTENT_TYPE, Metrics
from mcpbalancer.process.supervisor import Channel

log = logging.getLogger(__name__)

_Merge = Callable[[Mapping[int, Sequence[Any]]], list[dict[str, Any]]]  # merge.backends, merge.services

FANOUT_TIMEOUT: Final = 10.0  # seconds a worker has to answer the supervisor
_SUPERVISOR: Final = "supervisor"  # the supervisor's own metrics page, one source of the sum


class Workers(Protocol):
    """What the admin listener uses of the supervisor."""

    config: Config
    admin_drains: dict[str, bool]
    on_behind: Any  # Callable[[int], None] | None

    def channels(self) -> list[Channel]: ...
    def begin_drain(self, name: str, drained: bool) -> list[Channel]: ...
    def forget_drain(self, name: str) -> None: ...
    def begin_reload(self) -> list[Channel]: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's answer: its status and body (JSON, or text), or why there is none."""

    index: int
    status: int | None
    body: Any = None
    error: str | None = None


class ClusterControl(Listener):
    def __init__(
        self,
        workers: Workers,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry | None = None,
        timeout: float = FANOUT_TIMEOUT,
    ) -> None:
        super().__init__(web.Application(), host, port)
        config = workers.config
        self._workers = workers
        self._timeout = timeout
        self.metrics = Metrics(registry or CollectorRegistry(), runtime=True)
        self._metrics_path = config.metrics.path if config.metrics.enabled else None
        open_paths = PROBES if self._metrics_path is None else (*PROBES, self._metrics_path)
        self.auth = AdminAuth(lambda: self._workers.config.admin_tokens, open_paths)
        self._audit = Audit(self.metrics)
        self._clients: dict[str, aiohttp.ClientSession] = {}
        self._sum = PageSum()
        self._resyncs: set[asyncio.Task[None]] = set()
        self._routes()
        install(self.app, self.auth, self._audit)
        workers.on_behind = self._resync

    def _routes(self) -> None:
        add_get, add_post = self.app.router.add_get, self.app.router.add_post
        add_get("/healthz", self._healthz)
        add_get("/readyz", self._readyz)
        if self._metrics_path is not None:
            add_get(self._metrics_path, self._metrics_page)
        add_get("/admin/backends", self._backends, name="backends")
        add_post("/admin/backends/{name}/drain", self._drain, name="drain")
        add_post("/admin/backends/{name}/undrain", self._undrain, name="undrain")
        add_post("/admin/reload", self._reload, name="reload")
        add_get("/admin/services", self._services, name="services")
        add_post("/admin/services/{name}/drain", self._drain_service, name="service_drain")
        add_post("/admin/services/{name}/undrain", self._undrain_service, name="service_undrain")

    async def start(self) -> None:
        await super().start()
        warn_if_open(self.host, self.port, self.auth)
        log.info("admin on %s answers for %d workers", self.address, len(self._workers.channels()))

    async def stop(self) -> None:
        for task in self._resyncs:
            task.cancel()
        await asyncio.gather(*self._resyncs, return_exceptions=True)
        await super().stop()
        for client in self._clients.values():
            await client.close()

    # -- asking the workers ------------------------------------------------------------------------

    def _client(self, path: str) -> aiohttp.ClientSession:
        client = self._clients.get(path)
        if client is None or client.closed:
            timeout = aiohttp.ClientTimeout(total=self._timeout)
            client = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=timeout)
            self._clients[path] = client
        return client

    async def _ask(self, channel: Channel, method: str, path: str) -> Reply:
        assert channel.socket is not None
        try:
            async with self._client(channel.socket).request(method, "http://worker" + path) as resp:
                raw = await resp.read()
                status, kind = resp.status, resp.content_type
        except TimeoutError:
            return Reply(channel.index, None, error=f"no answer within {self._timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Reply(channel.index, None, error=f"no answer: {str(exc) or type(exc).__name__}")
        if kind != JSON:
            return Reply(channel.index, status, raw.decode("utf-8", "replace"))
        try:
            return Reply(channel.index, status, json.loads(raw))
        except ValueError:
            return Reply(channel.index, None, error="an answer that is not JSON")

    async def _ask_all(self, channels: Sequence[Channel], method: str, path: str) -> list[Reply]:
        return list(await asyncio.gather(*(self._ask(c, method, path) for c in channels)))

    def _serving(self) -> list[Channel]:
        return [c for c in self._workers.channels() if c.serving]

    # -- probes and metrics ------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return response(ALIVE)

    async def _readyz(self, request: web.Request) -> web.Response:
        replies = await self._ask_all(self._serving(), "GET", "/readyz")
        answers = {
            r.index: r.body if r.status in (200, 503) and isinstance(r.body, dict) else None for r in replies
        }
        ready, body = merge.readiness(answers)
        return _json(body, status=200 if ready else 503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        assert self._metrics_path is not None
        channels = self._workers.channels()
        replies = await self._ask_all([c for c in channels if c.serving], "GET", self._metrics_path)
        pages: dict[Hashable, str] = {_SUPERVISOR: self.metrics.exposition().decode()}
        pages.update({r.index: r.body for r in replies if r.status == 200 and isinstance(r.body, str)})
        alive: dict[Hashable, Hashable] = {_SUPERVISOR: 0}
        alive.update({c.index: c.run for c in channels if c.alive})
        body = self._sum.add(pages, alive)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = EXPOSITION_CONTENT_TYPE
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # -- the admin API -----------------------------------------------------------------------------

    async def _backends(self, request: web.Request) -> web.Response:
        return await self._listing(request, "backends", merge.backends)

    async def _services(self, request: web.Request) -> web.Response:
        return await self._listing(request, "services", merge.services)

    async def _listing(self, request: web.Request, key: str, merged: _Merge) -> web.Response:
        """GET /admin/<key> of every worker, merged into one list."""
        channels = self._serving()
        replies = await self._ask_all(channels, "GET", f"/admin/{key}")
        lists = {r.index: r.body[key] for r in replies if r.status == 200 and _has(r.body, key)}
        body = {key: merged(lists), "workers": self._report(replies, "answered")}
        if not lists:
            self._audit.done(request, key, "failed", "no worker answered")
            return _json({**body, "error": "no worker answered"}, status=503 if not channels else 502)
        self._audit.done(request, key, "ok")
        return _json(body)

    async def _drain_service(self, request: web.Request) -> web.Response:
        return await self._change_service(request, "drain", drained=True)

    async def _undrain_service(self, request: web.Request) -> web.Response:
        return await self._change_service(request, "undrain", drained=False)

    async def _change_service(self, request: web.Request, verb: str, *, drained: bool) -> web.Response:
        """Every worker drains (undrains) the service's backends; each backend is remembered as an
        admin drain, so a worker that starts later gets it too."""
        name, action = request.match_info["name"], f"service_{verb}"
        channels = self._serving()
        if not channels:
            return self._no_worker(request, action)
        replies = await self._ask_all(channels, "POST", f"/admin/services/{quote(name, safe='')}/{verb}")
        if all(r.status == 404 for r in replies):
            self._audit.done(request, action, "not_found")
            return _json({"error": f"unknown service {name!r}"}, status=404)
        applied = [r for r in replies if r.status == 200 and _has(r.body, "backends")]
        backends = merge.backends({r.index: r.body["backends"] for r in applied})
        for backend in backends:
            self._workers.begin_drain(str(backend["name"]), drained)
        body = {
            "service": name,
            "backends": backends,
            "applied": len(applied) == len(replies),
            "workers": self._report(replies, "applied"),
        }
        return self._answer(request, action, replies, body, ok=len(applied) == len(replies))

    async def _drain(self, request: web.Request) -> web.Response:
        return await self._change(request, "drain", drained=True)

    async def _undrain(self, request: web.Request) -> web.Response:
        return await self._change(request, "undrain", drained=False)

    async def _change(self, request: web.Request, action: str, *, drained: bool) -> web.Response:
        name = request.match_info["name"]
        channels = self._workers.begin_drain(name, drained)
        if not channels:
            self._workers.forget_drain(name)
            return self._no_worker(request, action)
        replies = await self._ask_all(channels, "POST", f"/admin/backends/{quote(name, safe='')}/{action}")
        if all(r.status == 404 for r in replies):
            self._workers.forget_drain(name)
            self._audit.done(request, action, "not_found")
            return _json({"error": f"unknown backend {name!r}"}, status=404)
        applied = [r for r in replies if r.status == 200 and _has(r.body, "state")]
        states = merge.backends({r.index: [{"name": name, "state": r.body["state"]}] for r in applied})
        body = {
            "backend": name,
            "state": states[0]["state"] if states else None,
            "applied": len(applied) == len(replies),
            "workers": self._report(replies, "applied"),
        }
        return self._answer(request, action, replies, body, ok=len(applied) == len(replies))

    async def _reload(self, request: web.Request) -> web.Response:
        channels = self._workers.begin_reload()
        if not channels:
            return self._no_worker(request, "reload")
        replies = await self._ask_all(channels, "POST", "/admin/reload")
        statuses = {r.status for r in replies}
        first = replies[0].body if isinstance(replies[0].body, dict) else {}
        body = {**first, "workers": self._report(replies, "applied")}
        target = self._workers.config.source
        if statuses == {200}:
            return self._answer(request, "reload", replies, body, ok=True, target=target)
        if statuses in ({400}, {409}):
            status = 400 if statuses == {400} else 409
            outcome = "invalid" if status == 400 else "restart_required"
            self._audit.done(request, "reload", outcome, str(first.get("error", "")), target)
            return _json(body, status=status)
        body = {**body, "reloaded": False, "error": "not every worker applied the file; see `workers`"}
        return self._answer(request, "reload", replies, body, ok=False, target=target)

    def _answer(
        self,
        request: web.Request,
        action: str,
        replies: list[Reply],
        body: dict[str, Any],
        *,
        ok: bool,
        target: str | None = None,
    ) -> web.Response:
        done = [r.index for r in replies if r.status == 200]
        missed = [f"worker {r.index}: {r.error or f'HTTP {r.status}'}" for r in replies if r.status != 200]
        detail = f"applied by worker(s) {', '.join(map(str, done)) or 'none'}"
        detail += f"; not by {'; '.join(missed)}" if missed else ""
        pending = [str(c.index) for c in self._workers.channels() if not c.serving]
        detail += f"; worker(s) {', '.join(pending)} get it when they serve" if pending else ""
        self._audit.done(request, action, "ok" if ok else "failed", detail, target)
        return _json(body, status=200 if ok else 502)

    def _no_worker(self, request: web.Request, action: str) -> web.Response:
        self._audit.done(request, action, "failed", "no worker serving")
        return _json({"error": "no worker is serving; nothing was changed"}, status=503)

    def _report(self, replies: list[Reply], verb: str) -> list[dict[str, Any]]:
        """Each worker: whether it answered (applied), and why not."""
        by_index = {r.index: r for r in replies}
        report = []
        for channel in self._workers.channels():
            reply = by_index.get(channel.index)
            entry: dict[str, Any] = {"worker": channel.index, "serving": channel.serving}
            if reply is not None:
                entry[verb] = reply.status == 200
                if reply.status != 200:
                    entry["error"] = reply.error or _error_of(reply)
                elif _has(reply.body, "state"):
                    entry["state"] = reply.body["state"]
            else:
                entry[verb] = False
                entry["pending"] = "starting" if channel.alive else "restarting"
            report.append(entry)
        return report

    # -- a worker that became ready while drains were posted ---------------------------------------

    def _resync(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._send_drains(index))
        self._resyncs.add(task)
        task.add_done_callback(self._resyncs.discard)

    async def _send_drains(self, index: int) -> None:
        [channel] = [c for c in self._workers.channels() if c.index == index]
        for name, drained in list(self._workers.admin_drains.items()):
            action = "drain" if drained else "undrain"
            reply = await self._ask(channel, "POST", f"/admin/backends/{quote(name, safe='')}/{action}")
            if reply.status != 200:
                log.warning("worker %d: the admin %s of %s failed: %s", index, action, name, _error_of(reply))


def _has(body: object, key: str) -> bool:
    return isinstance(body, dict) and key in body


def _error_of(reply: Reply) -> str:
    if reply.error is not None:
        return reply.error
    if isinstance(reply.body, dict) and "error" in reply.body:
        return str(reply.body["error"])
    return f"HTTP {reply.status}"


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    resp = web.json_response(payload, status=status)
    resp.headers["Cache-Control"] = "no-store"
    return resp
