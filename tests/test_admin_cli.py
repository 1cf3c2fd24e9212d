"""`mcpbalancer admin backends | drain NAME | undrain NAME | reload` against a running proxy.

The proxy runs in the test's event loop; the CLI (a blocking client) runs in a thread, through
`main()`, as the command does. Its exit status: 0 done, 1 the server refused (its error on
stderr) or could not be reached, 2 a usage error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.cli import main, parse_args
from mcpbalancer.config import load_config
from tests.fixtures.backends import BackendProcess
from tests.mcp_helpers import wait_until

TOKEN = "cli-admin-token-0123456789abcdef"
NEXT = "cli-next-token-0123456789abcdef"


@dataclass
class Running:
    proxy: Proxy
    path: Path
    settings: dict[str, Any]

    @property
    def url(self) -> str:
        assert self.proxy.control is not None
        return f"http://127.0.0.1:{self.proxy.control.port}"


@pytest.fixture
async def running(tmp_path: Path, backends: list[BackendProcess]) -> AsyncIterator[Running]:
    """A proxy with an admin token, backend a (a real FastMCP) and gone (nothing listens there)."""
    settings = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": [TOKEN, NEXT]},
        "health": {"interval": 0.2, "timeout": 1},
        "backends": [{"name": "a", "url": backends[0].url}, {"name": "gone", "url": "http://127.0.0.1:9"}],
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(settings))
    proxy = Proxy(load_config(path))
    await proxy.start()

    async def gone_is_down() -> bool:
        return not proxy.backends.get("gone").up

    await wait_until(gone_is_down, "backend `gone` to be marked down")
    yield Running(proxy, path, settings)
    await proxy.stop()


def with_port(running: Running) -> Path:
    """A copy of the running file that names the admin port the proxy picked, for --config."""
    admin = {**running.settings["admin"], "listen": running.url.removeprefix("http://")}
    path = running.path.with_name("cli.yaml")
    path.write_text(yaml.safe_dump({**running.settings, "admin": admin}))
    return path


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["admin", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_backends_prints_a_table_with_why_a_backend_is_down(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await cli(capsys, "backends", "--config", str(with_port(running)))
    assert (code, err) == (0, "")
    header, a, gone = out.splitlines()
    assert header.split() == ["NAME", "STATE", "SESSIONS", "IN", "FLIGHT", "WHY", "DOWN"]
    assert a.split() == ["a", "up", "0", "0"]
    assert gone.split()[:4] == ["gone", "down", "0", "0"]
    assert "probe: connection refused by http://127.0.0.1:9" in gone
    assert gone.index("probe:") == header.index("WHY DOWN")  # in its column


async def test_json_prints_the_servers_answer(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli(capsys, "--config", str(with_port(running)), "backends", "--json")
    assert code == 0
    body = json.loads(out)
    assert [b["name"] for b in body["backends"]] == ["a", "gone"]
    assert body["backends"][1]["reason"].startswith("probe: connection refused")


async def test_drain_undrain_and_reload(
    running: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPBALANCER_ADMIN_TOKEN", NEXT)  # --url takes the token from here
    where = ["--url", running.url]
    assert await cli(capsys, "drain", "a", *where) == (0, "a: drained\n", "")
    assert running.proxy.backends.get("a").draining
    assert await cli(capsys, "undrain", "a", *where) == (0, "a: up\n", "")
    assert not running.proxy.backends.get("a").draining
    code, out, _ = await cli(capsys, "drain", "a", *where, "--json")
    assert (code, json.loads(out)) == (0, {"backend": "a", "state": "drained"})
    # A reload applies the file (a is not drained there) and says what changed.
    running.path.write_text(
        yaml.safe_dump({**running.settings, "backends": running.settings["backends"][:1]})
    )
    code, out, err = await cli(capsys, "reload", *where)
    assert (code, out, err) == (0, "reloaded: added none, removed gone, updated none\n", "")
    assert [b.name for b in running.proxy.backends] == ["a"]
    assert not running.proxy.backends.get("a").draining


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("wrong-token-but-well-formed-000", "mcpbalancer admin: HTTP 401: invalid bearer token\n"),
        (None, "mcpbalancer admin: HTTP 401: missing bearer token\n"),
    ],
)
async def test_a_wrong_or_missing_token_exits_1_with_the_servers_error(
    running: Running,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    token: str | None,
    message: str,
) -> None:
    if token is None:
        monkeypatch.delenv("MCPBALANCER_ADMIN_TOKEN", raising=False)
    else:
        monkeypatch.setenv("MCPBALANCER_ADMIN_TOKEN", token)
    assert await cli(capsys, "drain", "a", "--url", running.url) == (1, "", message)
    assert not running.proxy.backends.get("a").draining


async def test_server_errors_exit_1(
    running: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPBALANCER_ADMIN_TOKEN", TOKEN)
    code, out, err = await cli(capsys, "drain", "nope", "--url", running.url)
    assert (code, out, err) == (1, "", "mcpbalancer admin: HTTP 404: unknown backend 'nope'\n")
    running.path.write_text("backends: []\n")
    code, out, err = await cli(capsys, "reload", "--url", running.url)
    assert code == 1
    assert err.startswith(f"mcpbalancer admin: HTTP 400: {running.path}: backends: must have at least one")
    code, out, err = await cli(capsys, "reload", "--url", running.url, "--json")
    assert code == 1
    assert json.loads(out)["reloaded"] is False  # the raw answer, and the error on stderr


async def test_an_unreachable_proxy_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await cli(capsys, "backends", "--url", "http://127.0.0.1:9")
    assert (code, out) == (1, "")
    assert err.startswith("mcpbalancer admin: http://127.0.0.1:9: ")
    assert "refused" in err.lower()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["drain", "--url", "http://127.0.0.1:1"], id="no-name"),
        pytest.param(["stop", "--url", "http://127.0.0.1:1"], id="unknown-command"),
        pytest.param(["backends", "--config", "x.yaml", "--url", "http://h:1"], id="both-places"),
        pytest.param(["backends", "--nope"], id="unknown-option"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["admin", *argv])
    assert info.value.code == 2
    assert "usage: mcpbalancer admin" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "files", "message"),
    [
        (["backends"], {}, "mcpbalancer admin: give --config FILE or --url URL\n"),
        (["backends", "--url", "ftp://h"], {}, "mcpbalancer admin: --url must be http://host:port"),
        (
            ["backends", "--config", "{dir}/none.yaml"],
            {"none.yaml": "backends: [{name: a, url: 'http://127.0.0.1:1'}]\n"},
            "mcpbalancer admin: {dir}/none.yaml: no `admin` listener is configured\n",
        ),
        (
            ["backends", "--config", "{dir}/bad.yaml"],
            {"bad.yaml": "admin: {listen: '127.0.0.1:1', token: '${NOT_SET_HERE}'}\nbackends: []\n"},
            "mcpbalancer admin: invalid configuration: {dir}/bad.yaml: admin.token: environment variable",
        ),
    ],
)
def test_a_config_or_url_that_cannot_be_used_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [arg.replace("{dir}", str(tmp_path)) for arg in argv]
    assert main(["admin", *argv]) == 2
    assert capsys.readouterr().err.startswith(message.replace("{dir}", str(tmp_path)))


def test_options_go_before_or_after_the_command() -> None:
    for argv in (
        ["admin", "--json", "--url", "http://h:1", "drain", "b"],
        ["admin", "drain", "b", "--url", "http://h:1", "--json"],
        ["admin", "--url", "http://h:1", "drain", "--json", "b"],
    ):
        args = parse_args(argv)
        assert (args.command, args.admin_command, args.name, args.url, args.json) == (
            "admin",
            "drain",
            "b",
            "http://h:1",
            True,
        )
    assert parse_args(["admin", "reload", "-c", "f.yaml"]).config == "f.yaml"
