"""The control listener (`admin: "host:port"`), on aiohttp: the metrics page and the health probes.

It runs only when configured. Other control endpoints (the admin API, the status page at `/`) add
their routes to `app` before `start()`.
"""

from __future__ import annotations

import socket

from aiohttp import web

from mcpbalancer.control.probes import ALIVE, Readiness, metrics_answer, readiness_answer
from mcpbalancer.dataplane.local import LocalAnswer
from mcpbalancer.observability.metrics import Metrics


class ControlServer:
    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness,
        metrics: Metrics | None = None,
        metrics_path: str = "/metrics",
    ) -> None:
        self.host = host
        self.requested_port = port
        self._readiness = readiness
        self._metrics = metrics
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        if metrics is not None:
            self.app.router.add_get(metrics_path, self._metrics_page)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        [server] = self._runner.sites
        sock: socket.socket = server._server.sockets[0]  # type: ignore[union-attr]
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return _response(ALIVE)

    async def _readyz(self, request: web.Request) -> web.Response:
        return _response(await readiness_answer(self._readiness))

    async def _metrics_page(self, request: web.Request) -> web.Response:
        assert self._metrics is not None
        return _response(metrics_answer(self._metrics))


def _response(answer: LocalAnswer) -> web.Response:
    # Set as a header: the exposition's content type carries parameters aiohttp would not take.
    response = web.Response(status=answer.status, body=answer.body)
    response.headers["Content-Type"] = answer.content_type
    response.headers["Cache-Control"] = "no-store"
    return response
