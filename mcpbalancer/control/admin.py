"""The admin API, on the control listener only (never on the public one).

    GET  /admin/backends                 {"backends": [{name, state, weight, sessions, in_flight,
                                                        last_check, reason}]}
    POST /admin/backends/{name}/drain    {"backend": name, "state": ...}; 404 JSON for an unknown name
    POST /admin/backends/{name}/undrain
    POST /admin/reload                   {"reloaded": true, "added": [...], ...}; 400 JSON with the reason;
                                         409 when the file changes a setting only a restart applies

`last_check` is the Unix time of the last active probe result, or null before the first one;
`reason` why the backend is down or its last check failed, null when it is healthy.
A drain or undrain from the API lasts until the next reload: the file is the source of truth.

Each route has a name, the `action` of the audit lines and of `mcpbalancer_admin_requests_total`.
With `audit` None (a worker's private channel, whose requests the supervisor audits) nothing is
logged or counted here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from mcpbalancer.control.audit import Audit
from mcpbalancer.errors import ConfigError, RestartRequired
from mcpbalancer.fleet.lifecycle import Changes, Fleet

Reload = Callable[[], Changes]  # raises ConfigError with the reason


class AdminApi:
    def __init__(
        self,
        fleet: Fleet[Any],
        last_check: dict[str, float],
        reload: Reload,
        reasons: dict[str, str],
        *,
        audit: Audit | None = None,
        source: Callable[[], str] = lambda: "the configuration",
    ) -> None:
        self._fleet = fleet
        self._last_check = last_check
        self._reasons = reasons
        self._reload = reload
        self._audit = audit
        self._source = source

    def install(self, app: web.Application) -> None:
        app.router.add_get("/admin/backends", self._backends, name="backends")
        app.router.add_post("/admin/backends/{name}/drain", self._drain, name="drain")
        app.router.add_post("/admin/backends/{name}/undrain", self._undrain, name="undrain")
        app.router.add_post("/admin/reload", self._reload_file, name="reload")

    async def _backends(self, request: web.Request) -> web.Response:
        self._done(request, "backends", "ok")
        return _json({"backends": self._fleet.snapshot(self._last_check, self._reasons)})

    async def _drain(self, request: web.Request) -> web.Response:
        return self._change(request, "drain", self._fleet.drain)

    async def _undrain(self, request: web.Request) -> web.Response:
        return self._change(request, "undrain", self._fleet.undrain)

    def _change(self, request: web.Request, action: str, change: Callable[[str], bool]) -> web.Response:
        name = request.match_info["name"]
        if not change(name):
            self._done(request, action, "not_found")
            return _json({"error": f"unknown backend {name!r}"}, status=404)
        backend = self._fleet.backends.get(name)
        assert backend is not None
        self._done(request, action, "ok", f"now {backend.state}")
        return _json({"backend": name, "state": backend.state})

    async def _reload_file(self, request: web.Request) -> web.Response:
        source = self._source()
        try:
            changes = self._reload()
        except RestartRequired as exc:
            self._done(request, "reload", "restart_required", target=source)
            return _json({"reloaded": False, "restart_required": True, "error": str(exc)}, status=409)
        except ConfigError as exc:
            self._done(request, "reload", "invalid", target=source)
            return _json({"reloaded": False, "error": str(exc)}, status=400)
        self._done(request, "reload", "ok", _summary(changes), target=source)
        return _json({"reloaded": True, **changes.as_json()})

    def _done(
        self, request: web.Request, action: str, outcome: str, detail: str = "", target: str | None = None
    ) -> None:
        if self._audit is not None:
            self._audit.done(request, action, outcome, detail, target)


def _summary(changes: Changes) -> str:
    return ", ".join(f"{kind} {', '.join(names) or 'none'}" for kind, names in changes.as_json().items())


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    response = web.json_response(payload, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response
