"""The control listener (`admin`), on aiohttp: the metrics page and the health probes.

It runs only when configured. Other control endpoints (the admin API, the status page at `/`) add
their routes to `app` before `start()`; with `auth` every route but the probes and the metrics page
needs the token (auth.py), the routes added later included. A worker of a supervisor serves the
same application on a private unix socket (`path`) without a token: only the supervisor talks to it.
"""

from __future__ import annotations

import contextlib
import os
import socket

from aiohttp import web

from mcpbalancer.config import host_port
from mcpbalancer.control import auth as admin_auth
from mcpbalancer.control.audit import Audit
from mcpbalancer.control.probes import ALIVE, Readiness, metrics_answer, readiness_answer
from mcpbalancer.dataplane.local import LocalAnswer
from mcpbalancer.observability.metrics import Metrics


class Listener:
    """An aiohttp application served on host:port, or on the unix socket `path` instead."""

    def __init__(self, app: web.Application, host: str, port: int, path: str | None = None) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.path = path
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        [server] = self._runner.sites
        sock: socket.socket = server._server.sockets[0]  # type: ignore[union-attr]
        return 0 if self.path is not None else int(sock.getsockname()[1])

    @property
    def address(self) -> str:
        return self.path if self.path is not None else host_port(self.host, self.port)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # the socket of this worker's previous process
            site = web.UnixSite(self._runner, self.path)
        else:
            site = web.TCPSite(self._runner, self.host, self.requested_port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class ControlServer(Listener):
    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        metrics: Metrics | None = None,
        metrics_path: str = "/metrics",
        *,
        auth: admin_auth.AdminAuth | None = None,
        audit: Audit | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(web.Application(), host, port, path)
        self._readiness = readiness
        self._metrics = metrics
        self.auth = auth
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        if metrics is not None:
            self.app.router.add_get(metrics_path, self._metrics_page)
        if auth is not None:
            admin_auth.install(self.app, auth, audit)

    async def _healthz(self, request: web.Request) -> web.Response:
        return response(ALIVE)

    async def _readyz(self, request: web.Request) -> web.Response:
        return response(await readiness_answer(self._readiness))

    async def _metrics_page(self, request: web.Request) -> web.Response:
        assert self._metrics is not None
        return response(metrics_answer(self._metrics))


def response(answer: LocalAnswer) -> web.Response:
    # Set as a header: the exposition's content type carries parameters aiohttp would not take.
    resp = web.Response(status=answer.status, body=answer.body)
    resp.headers["Content-Type"] = answer.content_type
    resp.headers["Cache-Control"] = "no-store"
    return resp
