"""A backend URL with a path names that server's MCP endpoint (`http://h:8000/mcp`, as every MCP
document writes it): requests for the proxy's `mcp_path` go to it, every other path goes to the same
origin unchanged, and a URL without a path forwards every target as it came. Real FastMCP backends
(their `GET /whoami` route echoes the path and query it was asked for) and the real mcp client."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mcpbalancer.app import Proxy
from mcpbalancer.config import load_config, parse_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.fleet.http_probe import HttpProbe
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import modern_whoami, recorded_client, text_of

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class At:
    """A backend as the proxy config names it: `url` is the given URL, path and all."""

    name: str
    url: str


def at_endpoint(backend: BackendProcess) -> At:
    return At(backend.name, backend.mcp_url)  # http://127.0.0.1:PORT/mcp


async def origin_echo(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return (
            resp.status,
            await resp.json() if resp.content_type == "application/json" else await resp.text(),
        )


# --- the mapping, pure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        (b"/mcp", b"/api/mcp"),
        (b"/mcp?x=1", b"/api/mcp?x=1"),
        (b"/mcp?", b"/api/mcp?"),
        (b"/mcp/", b"/mcp/"),  # another path: unchanged
        (b"/mcpx", b"/mcpx"),
        (b"/mcp#x", b"/mcp#x"),
        (b"/.well-known/oauth-protected-resource", b"/.well-known/oauth-protected-resource"),
        (b"/.well-known/oauth-protected-resource/mcp", b"/.well-known/oauth-protected-resource/mcp"),
        (b"/", b"/"),
        (b"*", b"*"),
    ],
)
def test_only_the_mcp_path_goes_to_the_endpoint(target: bytes, sent: bytes) -> None:
    backend = Backend("a", "h", 1, endpoint=b"/api/mcp", mcp_path=b"/mcp")
    assert backend.target(target) == sent


def test_without_an_endpoint_every_target_is_sent_as_it_came() -> None:
    backend = Backend("a", "h", 1)
    for target in (b"/mcp", b"/mcp?x=1", b"/other"):
        assert backend.target(target) is target  # the very object: nothing is built


def test_the_config_gives_the_backend_its_endpoint_and_the_mcp_path() -> None:
    config = parse_config(
        {
            "mcp_path": "/tools",
            "backends": [{"name": "a", "url": "http://h:8000/mcp"}, {"name": "b", "url": "http://h"}],
        }
    )
    assert config.mcp_path == "/tools"
    assert [b.path for b in config.backends] == ["/mcp", ""]
    assert config.health.path == "/tools"  # the probe asks for the MCP path, so each endpoint is probed
    assert parse_config({"backends": [{"name": "a", "url": "http://h"}]}).mcp_path == "/mcp"


# --- real backends through the proxy ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_backend_url_ending_in_its_mcp_endpoint_serves_tool_calls(
    backends: list[BackendProcess], make_proxy: ProxyFactory, mode: str
) -> None:
    a = backends[0]
    proxy = await make_proxy([at_endpoint(a)])
    async with recorded_client(proxy.url + "/mcp", mode=mode) as (client, wire):
        assert text_of(await client.call_tool("whoami")) == "a"
        counts = [text_of(await client.call_tool("count")) for _ in range(2)]
    # Legacy: one session on its instance, counting up; 2026-07-28: stateless, always 1.
    assert counts == (["1", "2"] if mode == "legacy" else ["1", "1"])
    assert all(status < 400 for status, _ in wire.responses), wire.responses


async def test_a_custom_mcp_path_goes_to_each_backends_endpoint(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy = await make_proxy([at_endpoint(backends[0])], mcp_path="/tools")
    async with recorded_client(proxy.url + "/tools?tenant=x", mode="legacy") as (client, _):
        assert text_of(await client.call_tool("whoami")) == "a"


async def test_other_paths_go_to_the_same_origin_unchanged(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy([at_endpoint(backends[0])])
    assert await origin_echo(web, proxy.url + "/whoami?x=1") == (
        200,
        {"name": "a", "path": "/whoami", "query": "x=1"},
    )
    # The MCP path with a query string is still the endpoint.
    assert await modern_whoami(web, proxy.url + "/mcp?x=1") == (200, "a")
    # A path the origin does not serve gets the origin's own 404 (not one for /mcp/.well-known/...).
    async with web.get(proxy.url + "/.well-known/oauth-protected-resource") as resp:
        assert (resp.status, resp.headers.get("Server")) == (404, "uvicorn")


async def test_a_url_without_a_path_forwards_every_target_as_before(
    backends: list[BackendProcess], make_proxy: ProxyFactory, web: aiohttp.ClientSession
) -> None:
    # mcp_path maps nothing for a backend without an endpoint: /mcp still reaches /mcp.
    proxy = await make_proxy([backends[1]], mcp_path="/tools")
    assert await modern_whoami(web, proxy.url + "/mcp") == (200, "b")
    assert await origin_echo(web, proxy.url + "/whoami") == (
        200,
        {"name": "b", "path": "/whoami", "query": ""},
    )
    status, _ = await modern_whoami(web, proxy.url + "/tools")
    assert status == 404  # the backend's own answer: it serves no /tools


async def test_a_reload_changes_the_mcp_path_of_running_backends(
    backends: list[BackendProcess],
    web: aiohttp.ClientSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = backends[0]
    path = tmp_path / "proxy.yaml"

    def write(mcp_path: str) -> None:
        data = {"listen": "127.0.0.1:0", "mcp_path": mcp_path, "backends": [{"name": "a", "url": a.mcp_url}]}
        path.write_text(yaml.safe_dump({**data, "health": {"interval": 0}}))

    write("/mcp")
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        assert await modern_whoami(web, proxy.url + "/mcp") == (200, "a")
        write("/tools")
        proxy.reload()
        assert await modern_whoami(web, proxy.url + "/tools") == (200, "a")
        # The probe follows: health.path defaults to the new mcp_path, which maps to the endpoint.
        assert proxy.health.config.path == "/tools"
        backend = proxy.backends.get("a")
        assert backend is not None
        assert HttpProbe(lambda: proxy.health.config).url(backend) == a.mcp_url
        assert "takes effect after a restart" not in caplog.text
    finally:
        await proxy.stop()


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mcp_path": "mcp"}, "mcp_path: must be a path starting with '/'"),
        ({"mcp_path": "/mcp?x=1"}, "mcp_path: must be a path starting with '/'"),
        ({"mcp_path": "/healthz"}, "mcp_path: must not be /healthz: the proxy answers that path itself"),
        ({"mcp_path": 5}, "mcp_path: must be a string"),
        ({"metrics": {"path": "/mcp"}}, "metrics.path: must not be `mcp_path` (/mcp)"),
    ],
)
def test_mcp_path_is_validated(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"backends": [{"name": "a", "url": "http://h"}], **extra})


def test_a_backend_url_path_must_be_visible_ascii() -> None:
    with pytest.raises(ConfigError, match=re.escape("backends[0].url: the path must be visible ASCII")):
        parse_config({"backends": [{"name": "a", "url": "http://h/caf\u00e9"}]})


def test_metrics_may_share_the_mcp_path_on_the_admin_listener() -> None:
    config = parse_config(
        {"admin": "127.0.0.1:0", "metrics": {"path": "/mcp"}, "backends": [{"name": "a", "url": "http://h"}]}
    )
    assert (config.metrics.path, config.mcp_path) == ("/mcp", "/mcp")


def test_mcp_path_is_documented() -> None:
    table = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = (ROOT / "config" / "example.yaml").read_text(encoding="utf-8")
    assert '| `mcp_path` | `"/mcp"` |' in table
    assert "\nmcp_path: /mcp\n" in example
    assert parse_config({"backends": [{"name": "a", "url": "http://h"}]}).mcp_path == "/mcp"
