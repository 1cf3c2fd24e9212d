"""The admin API, on the control listener only (never on the public one).

    GET  /admin/backends                 {"backends": [{name, state, weight, sessions, in_flight,
                                                        session_mode, last_check, last_probe,
                                                        down_reason, reason}]}
    POST /admin/backends/{name}/drain    {"backend": name, "state": ...}; 404 JSON for an unknown name
    POST /admin/backends/{name}/undrain
    POST /admin/reload                   {"reloaded": true, "added": [...], ...}; 400 JSON with the reason;
                                         409 when the file changes a setting only a restart applies
    GET  /admin/services                 {"services": [{name, match: {host, path_prefix, strip_prefix,
                                                        default}, backends: [as above]}]}
    POST /admin/services/{name}/drain    {"service": name, "backends": [{name, state}]}; 404 JSON for an
    POST /admin/services/{name}/undrain  unknown name

The backends of every service are in /admin/backends (backend names are unique across services).

`session_mode` is stateful, stateless or unknown (declared in the file, or learned). `last_check`
is the Unix time of the last active probe result, or null before the first one; `last_probe`
that probe, `{status, error, ok, at}` (`status` null when no answer came, `error` then a word:
timeout, refused, reset, tls, unreachable, invalid), or null. `down_reason` is the sentence that
says what took the backend down, null while it is up; `reason` the last failure's, null once a
check finds it healthy.
A drain or undrain from the API lasts until the next reload: the file is the source of truth.

Each route has a name, the `action` of the audit lines and of `mcpbalancer_admin_requests_total`.
With `audit` None (a worker's private channel, whose requests the supervisor audits) nothing is
logged or counted here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from mcpbalancer.config.services import match_of
from mcpbalancer.control.audit import Audit
from mcpbalancer.errors import ConfigError, RestartRequired
from mcpbalancer.fleet.health import HealthChecker
from mcpbalancer.fleet.lifecycle import Changes, Fleet

Reload = Callable[[], Changes]  # raises ConfigError with the reason
# (name, its `services` entry or None for the default one, its fleet, its health checker)
Services = Callable[[], Sequence[tuple[str, Any, Fleet[Any], HealthChecker]]]


class AdminApi:
    def __init__(
        self,
        services: Services,
        reload: Reload,
        *,
        audit: Audit | None = None,
        source: Callable[[], str] = lambda: "the configuration",
    ) -> None:
        self._services = services
        self._reload = reload
        self._audit = audit
        self._source = source

    def install(self, app: web.Application) -> None:
        app.router.add_get("/admin/backends", self._backends, name="backends")
        app.router.add_post("/admin/backends/{name}/drain", self._drain, name="drain")
        app.router.add_post("/admin/backends/{name}/undrain", self._undrain, name="undrain")
        app.router.add_post("/admin/reload", self._reload_file, name="reload")
        app.router.add_get("/admin/services", self._list_services, name="services")
        app.router.add_post("/admin/services/{name}/drain", self._drain_service, name="service_drain")
        app.router.add_post("/admin/services/{name}/undrain", self._undrain_service, name="service_undrain")

    async def _backends(self, request: web.Request) -> web.Response:
        self._done(request, "backends", "ok")
        listed = [row for _, _, fleet, health in self._services() for row in fleet.snapshot(health)]
        return _json({"backends": listed})

    async def _drain(self, request: web.Request) -> web.Response:
        return self._change(request, "drain", lambda fleet, name: fleet.drain(name))

    async def _undrain(self, request: web.Request) -> web.Response:
        return self._change(request, "undrain", lambda fleet, name: fleet.undrain(name))

    def _change(
        self, request: web.Request, action: str, change: Callable[[Fleet[Any], str], bool]
    ) -> web.Response:
        name = request.match_info["name"]
        fleet = next((f for _, _, f, _ in self._services() if f.backends.get(name) is not None), None)
        if fleet is None or not change(fleet, name):
            self._done(request, action, "not_found")
            return _json({"error": f"unknown backend {name!r}"}, status=404)
        backend = fleet.backends.get(name)
        assert backend is not None
        self._done(request, action, "ok", f"now {backend.state}")
        return _json({"backend": name, "state": backend.state})

    async def _list_services(self, request: web.Request) -> web.Response:
        self._done(request, "services", "ok")
        listed = [
            {"name": name, "match": match_of(entry), "backends": fleet.snapshot(health)}
            for name, entry, fleet, health in self._services()
        ]
        return _json({"services": listed})

    async def _drain_service(self, request: web.Request) -> web.Response:
        return self._change_service(request, "service_drain", lambda fleet, name: fleet.drain(name))

    async def _undrain_service(self, request: web.Request) -> web.Response:
        return self._change_service(request, "service_undrain", lambda fleet, name: fleet.undrain(name))

    def _change_service(
        self, request: web.Request, action: str, change: Callable[[Fleet[Any], str], bool]
    ) -> web.Response:
        name = request.match_info["name"]
        fleet = next((f for n, _, f, _ in self._services() if n == name), None)
        if fleet is None:
            self._done(request, action, "not_found")
            return _json({"error": f"unknown service {name!r}"}, status=404)
        names = [b.name for b in fleet.backends]
        for backend in names:
            change(fleet, backend)
        states = [{"name": b.name, "state": b.state} for b in fleet.backends]
        self._done(request, action, "ok", f"{len(names)} backends")
        return _json({"service": name, "backends": states})

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
