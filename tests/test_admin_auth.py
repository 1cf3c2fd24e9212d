"""The admin API's token and its audit trail, on a real proxy's admin listener (one process).

`admin: {listen, token}`: every /admin/... request and every other path but the probes and the
metrics page need `Authorization: Bearer <token>`; a refusal is a 401 with a challenge and a JSON
body, changes nothing, and is logged and counted like every admin change.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from mcpbalancer.app import Proxy
from mcpbalancer.config import ConfigError, load_config, parse_config
from mcpbalancer.control.auth import AdminAuth, authorized

TOKEN = "t0ken-for-the-admin-api-0123456789"
OTHER = "an0ther-token-for-rotation-987654"
WRONG = "wrong-token-but-well-formed-00000"
BACKENDS = [{"name": "a", "url": "http://127.0.0.1:9"}, {"name": "b", "url": "http://127.0.0.1:10"}]


@dataclass
class Admin:
    proxy: Proxy
    path: Path
    settings: dict[str, Any]
    http: aiohttp.ClientSession = field(default_factory=aiohttp.ClientSession)

    @property
    def url(self) -> str:
        assert self.proxy.control is not None
        return f"http://127.0.0.1:{self.proxy.control.port}"

    async def ask(self, method: str, path: str, token: str | None = None) -> tuple[int, Any, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with self.http.request(method, self.url + path, headers=headers) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, resp.headers, body

    def count(self, action: str, outcome: str) -> float:
        labels = {"action": action, "outcome": outcome}
        value = self.proxy.metrics.registry.get_sample_value("mcpbalancer_admin_requests_total", labels)
        return value or 0.0

    def rewrite(self, **changes: Any) -> None:
        self.settings = {**self.settings, **changes}
        self.path.write_text(yaml.safe_dump(self.settings))

    def weights(self) -> list[int]:
        return [b.weight for b in self.proxy.backends]


StartAdmin = Callable[..., Awaitable[Admin]]


@pytest.fixture
async def start_admin(tmp_path: Path) -> AsyncIterator[StartAdmin]:
    """`await start_admin(token=...)` -> a proxy whose admin listener has that `admin.token`."""
    started: list[Admin] = []

    async def start(admin: Any = None, **top: Any) -> Admin:
        settings = {
            "listen": "127.0.0.1:0",
            "admin": admin if admin is not None else {"listen": "127.0.0.1:0", "token": TOKEN},
            "health": {"interval": 0},
            "backends": BACKENDS,
            **top,
        }
        path = tmp_path / f"proxy{len(started)}.yaml"
        path.write_text(yaml.safe_dump(settings))
        proxy = Proxy(load_config(path))
        await proxy.start()
        running = Admin(proxy, path, settings)
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        await running.proxy.stop()
        await running.http.close()


# --- the token ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/backends"),
        ("POST", "/admin/backends/a/drain"),
        ("POST", "/admin/backends/a/undrain"),
        ("POST", "/admin/reload"),
        ("GET", "/admin/nothing-here"),  # an unknown admin path tells nothing without the token
        ("GET", "/"),  # the status page's place
    ],
)
async def test_every_admin_path_needs_the_token(start_admin: StartAdmin, method: str, path: str) -> None:
    admin = await start_admin()
    status, headers, body = await admin.ask(method, path)
    assert (status, body) == (401, {"error": "missing bearer token"})
    assert headers["WWW-Authenticate"] == 'Bearer realm="mcpbalancer admin"'
    assert headers["Content-Type"].startswith("application/json")
    status, headers, body = await admin.ask(method, path, WRONG)
    assert (status, body) == (401, {"error": "invalid bearer token"})
    assert headers["WWW-Authenticate"] == 'Bearer realm="mcpbalancer admin", error="invalid_token"'


@pytest.mark.parametrize(
    "authorization",
    [f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer ", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer é"],
)
async def test_anything_but_the_bearer_token_is_refused(start_admin: StartAdmin, authorization: str) -> None:
    admin = await start_admin()
    async with admin.http.get(
        admin.url + "/admin/backends", headers={"Authorization": authorization}
    ) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer ")


async def test_the_right_token_is_served(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    status, _, body = await admin.ask("GET", "/admin/backends", TOKEN)
    assert status == 200
    assert [b["name"] for b in body["backends"]] == ["a", "b"]
    assert (await admin.ask("POST", "/admin/backends/a/drain", TOKEN))[:3:2] == (
        200,
        {"backend": "a", "state": "drained"},
    )
    async with admin.http.get(
        admin.url + "/admin/backends", headers={"authorization": f"bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 200  # the scheme is case-insensitive (RFC 9110)


async def test_an_unauthorized_post_changes_nothing(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    for token in (None, WRONG):
        assert (await admin.ask("POST", "/admin/backends/a/drain", token))[0] == 401
    assert [b.draining for b in admin.proxy.backends] == [False, False]
    admin.rewrite(backends=[{**b, "weight": 5} for b in BACKENDS])
    for token in (None, WRONG):
        assert (await admin.ask("POST", "/admin/reload", token))[0] == 401
    assert admin.weights() == [1, 1]
    # The same file, with the token: applied.
    status, _, body = await admin.ask("POST", "/admin/reload", TOKEN)
    assert (status, body["reloaded"]) == (200, True)
    assert admin.weights() == [5, 5]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_metrics_answer_without_a_token(start_admin: StartAdmin, path: str) -> None:
    admin = await start_admin()
    for token in (None, WRONG):
        status, _, _ = await admin.ask("GET", path, token)
        assert status in (200, 503)  # /readyz: 503 while no backend is up, still not a 401
        assert status != 401


async def test_a_moved_metrics_path_stays_open_and_the_default_one_is_guarded(
    start_admin: StartAdmin,
) -> None:
    admin = await start_admin(metrics={"path": "/prom"})
    assert (await admin.ask("GET", "/prom"))[0] == 200
    assert (await admin.ask("GET", "/metrics"))[0] == 401


async def test_without_a_token_the_admin_api_is_open(start_admin: StartAdmin) -> None:
    admin = await start_admin("127.0.0.1:0")
    assert (await admin.ask("GET", "/admin/backends"))[0] == 200


async def test_a_token_from_the_environment(start_admin: StartAdmin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    admin = await start_admin({"listen": "127.0.0.1:0", "token": "${ADMIN_TOKEN}"})
    assert admin.proxy.config.admin_tokens == (TOKEN,)
    assert (await admin.ask("GET", "/admin/backends", TOKEN))[0] == 200
    assert (await admin.ask("GET", "/admin/backends", "${ADMIN_TOKEN}"))[0] == 401


async def test_either_of_two_tokens_works_and_a_reload_rotates_them(start_admin: StartAdmin) -> None:
    admin = await start_admin({"listen": "127.0.0.1:0", "token": [TOKEN, OTHER]})
    for token in (TOKEN, OTHER):
        assert (await admin.ask("GET", "/admin/backends", token))[0] == 200
    assert (await admin.ask("GET", "/admin/backends", WRONG))[0] == 401
    # Rotation, second step: only the new token. A reload applies it to the next request.
    admin.rewrite(admin={**admin.settings["admin"], "token": OTHER})
    assert (await admin.ask("POST", "/admin/reload", TOKEN))[0] == 200
    assert (await admin.ask("GET", "/admin/backends", TOKEN))[0] == 401
    assert (await admin.ask("GET", "/admin/backends", OTHER))[0] == 200


def test_the_check_compares_every_token() -> None:
    tokens = (TOKEN, OTHER)
    auth = AdminAuth(lambda: tokens)
    assert auth.problem(f"Bearer {OTHER}") is None
    assert auth.problem(f"Bearer {TOKEN}") is None
    assert auth.problem(f"Bearer {WRONG}") == "invalid"
    assert auth.problem(None) == "missing"
    assert AdminAuth(lambda: ()).problem(None) is None  # no token configured: open


# --- the configuration ----------------------------------------------------------------------------------


def config_of(admin: Any) -> Any:
    return parse_config({"backends": BACKENDS, "admin": admin}, "cfg.yaml", environ={"T": TOKEN})


def test_admin_is_an_address_or_a_mapping() -> None:
    assert config_of("127.0.0.1:9100").admin == ("127.0.0.1", 9100)
    assert config_of("127.0.0.1:9100").admin_tokens == ()
    config = config_of({"listen": "[::1]:9100", "token": "${T}"})
    assert (config.admin, config.admin_tokens) == (("::1", 9100), (TOKEN,))
    assert config_of({"listen": "127.0.0.1:1", "token": [TOKEN, OTHER]}).admin_tokens == (TOKEN, OTHER)
    assert TOKEN not in repr(config)  # a Config in a log line or a traceback does not show it


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ("9100", "admin: must be 'host:port'"),
        ({"listen": "x"}, "admin.listen: must be 'host:port'"),
        ({"token": TOKEN}, "admin.listen: is required"),
        ({"listen": "127.0.0.1:1", "tokens": TOKEN}, "admin.tokens: unknown key; allowed: listen, token"),
        ({"listen": "127.0.0.1:1", "token": "short-secret"}, "admin.token: must be at least 16 characters"),
        (
            {"listen": "127.0.0.1:1", "token": "has spaces in it, 0123"},
            "admin.token: must be letters, digits",
        ),
        ({"listen": "127.0.0.1:1", "token": []}, "admin.token: must have at least one entry"),
        (
            {"listen": "127.0.0.1:1", "token": [TOKEN, 1234567890123456789]},
            "admin.token[1]: must be a string",
        ),
        ({"listen": "127.0.0.1:1", "token": 1234567890123456789}, "admin.token: must be a string or a list"),
        (
            {"listen": "127.0.0.1:1", "token": "${UNSET}"},
            "admin.token: environment variable UNSET is not set",
        ),
        (5, "admin: must be 'host:port' or a mapping with `listen` and `token`, got 5"),
    ],
)
def test_bad_admin_settings_are_refused_without_showing_the_token(admin: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_of(admin)
    assert str(info.value).startswith(f"cfg.yaml: {message}"), info.value
    assert "1234567890123456789" not in str(info.value)
    assert "has spaces" not in str(info.value)
    assert "short-secret" not in str(info.value)


# --- start-up warning -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin", "warned"),
    [
        ("0.0.0.0:0", True),
        ({"listen": "0.0.0.0:0", "token": TOKEN}, False),
        ("127.0.0.1:0", False),
    ],
)
async def test_an_open_admin_api_off_loopback_is_a_warning(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture, admin: Any, warned: bool
) -> None:
    with caplog.at_level(logging.WARNING, logger="mcpbalancer.control.auth"):
        await start_admin(admin)
    lines = [r.getMessage() for r in caplog.records if r.name == "mcpbalancer.control.auth"]
    assert bool(lines) == warned, lines
    if warned:
        assert "without a token" in lines[0]
        assert "set admin.token" in lines[0]


# --- the audit trail --------------------------------------------------------------------------------------


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.levelname, r.audit) for r in caplog.records if r.name == "mcpbalancer.audit"]  # type: ignore[attr-defined]


async def test_changes_and_refusals_are_audited_and_counted(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await start_admin()
    with caplog.at_level(logging.INFO, logger="mcpbalancer.audit"):
        await admin.ask("POST", "/admin/backends/b/drain", TOKEN)
        await admin.ask("POST", "/admin/backends/b/undrain", TOKEN)
        await admin.ask("POST", "/admin/backends/nope/drain", TOKEN)
        await admin.ask("POST", "/admin/reload", TOKEN)
        await admin.ask("POST", "/admin/backends/a/drain", WRONG)
        await admin.ask("GET", "/admin/backends")
        await admin.ask("GET", "/admin/backends", TOKEN)  # a read: counted, not logged
    client = "127.0.0.1"
    source = str(admin.path)
    assert audit_lines(caplog) == [
        ("INFO", {"action": "drain", "target": "b", "client": client, "outcome": "ok"}),
        ("INFO", {"action": "undrain", "target": "b", "client": client, "outcome": "ok"}),
        ("WARNING", {"action": "drain", "target": "nope", "client": client, "outcome": "not_found"}),
        ("INFO", {"action": "reload", "target": source, "client": client, "outcome": "ok"}),
        ("WARNING", {"action": "drain", "target": "a", "client": client, "outcome": "unauthorized"}),
        (
            "WARNING",
            {"action": "backends", "target": "/admin/backends", "client": client, "outcome": "unauthorized"},
        ),
    ]
    messages = [r.getMessage() for r in caplog.records if r.name == "mcpbalancer.audit"]
    assert messages[0] == "admin drain b from 127.0.0.1: ok (now drained)"
    assert messages[4] == "admin drain a from 127.0.0.1: unauthorized (POST, invalid bearer token)"
    assert TOKEN not in "\n".join(messages)
    assert WRONG not in "\n".join(messages)
    counted = {
        ("drain", "ok"): 1,
        ("undrain", "ok"): 1,
        ("drain", "not_found"): 1,
        ("reload", "ok"): 1,
        ("drain", "unauthorized"): 1,
        ("backends", "unauthorized"): 1,
        ("backends", "ok"): 1,
    }
    assert {key: admin.count(*key) for key in counted} == counted
    _status, _, page = await admin.ask("GET", "/metrics")
    assert 'mcpbalancer_admin_requests_total{action="drain",outcome="unauthorized"} 1.0' in page


async def test_a_refused_reload_is_audited_with_its_outcome(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await start_admin()
    with caplog.at_level(logging.INFO, logger="mcpbalancer.audit"):
        admin.path.write_text("backends: []\n")
        assert (await admin.ask("POST", "/admin/reload", TOKEN))[0] == 400
        admin.rewrite(store_prefix="other:")
        assert (await admin.ask("POST", "/admin/reload", TOKEN))[0] == 409
    outcomes = [fields["outcome"] for _, fields in audit_lines(caplog)]
    assert outcomes == ["invalid", "restart_required"]
    assert admin.count("reload", "invalid") == admin.count("reload", "restart_required") == 1


async def test_a_target_that_is_not_a_name_cannot_forge_a_line(
    start_admin: StartAdmin, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await start_admin()
    with caplog.at_level(logging.INFO, logger="mcpbalancer.audit"):
        await admin.ask("POST", "/admin/backends/x%0A2026-01-01%20INFO%20forged/drain", TOKEN)
    [message] = [r.getMessage() for r in caplog.records if r.name == "mcpbalancer.audit"]
    assert "\n" not in message
    assert message.startswith("admin drain 'x\\n2026-01-01 INFO forged' from 127.0.0.1: not_found")


async def test_a_route_added_later_is_guarded_and_can_ask_itself(start_admin: StartAdmin) -> None:
    """A route of its own on the listener, added after the admin API, is behind the same token."""
    admin = await start_admin()
    assert admin.proxy.control is not None
    seen: list[bool] = []

    async def page(request: web.Request) -> web.Response:
        seen.append(authorized(request))
        return web.Response(text="later")

    # Routes are frozen once the listener runs: a fresh proxy gets the route before start().
    await admin.proxy.stop()
    proxy = Proxy(load_config(admin.path))
    assert proxy.control is not None
    proxy.control.app.router.add_get("/later", page, name="later")
    await proxy.start()
    admin.proxy = proxy
    assert (await admin.ask("GET", "/later"))[0] == 401
    assert (await admin.ask("GET", "/later", TOKEN))[:3:2] == (200, "later")
    assert seen == [True]


async def test_the_status_page_needs_the_token(start_admin: StartAdmin) -> None:
    admin = await start_admin()
    assert (await admin.ask("GET", "/"))[0] == 401
    status, _, body = await admin.ask("GET", "/", TOKEN)
    assert status == 200
    assert "<html" in body.lower()
    assert admin.count("status", "unauthorized") == 1
