"""The shipped alert rules and the Grafana dashboard, evaluated by a real Prometheus.

`promtool` checks deploy/prometheus/alerts.yaml and runs its unit tests (alerts.test.yaml, every alert
firing and not firing). Then Debian's `prometheus` scrapes a running proxy (real FastMCP backends,
Redis, traffic from the mcp SDK) and every PromQL expression of the dashboard and of the rules is
evaluated through its HTTP API: none may fail, and each one that the traffic should fill must
return series.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from mcp import Client

from mcpbalancer.app import Proxy
from tests.fixtures.backends import BackendProcess
from tests.fixtures.binaries import binary
from tests.fixtures.proxy import ProxyFactory
from tests.fixtures.redis import RedisServer
from tests.fixtures.tls import Pki
from tests.mcp_helpers import mcp_url, text_of

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
READY_DEADLINE = 30.0
DATA_DEADLINE = 60.0
# Grafana's variables, as the dashboard is used: every proxy, a rate window of a few scrapes.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "20s"}
# Panels that read "No data" under healthy traffic, and must: nothing of the kind happened.
EMPTY_WHEN_HEALTHY = {
    "Upstream errors by backend and kind",  # no backend failed
}
COMPARISON = re.compile(r"^(?P<value>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.DOTALL)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its templating query included."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    targets = [
        (panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", ())
    ]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):  # label_values(metric, label): the metric must have series
            found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert found, query
            targets.append((f"variable {variable['name']}", found[1]))
    return targets


def grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr


# --- promtool --------------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    promtool = binary("promtool", "prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_firing_and_one_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES.name]
    cases: dict[str, set[bool]] = {}
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", ()):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts
    assert {name: {True, False} for name in alerts} == cases


# --- a real Prometheus scraping a real proxy ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A `prometheus` process scraping one target every second, with the shipped rules loaded."""

    def __init__(self, executable: str, workdir: Path, target: str) -> None:
        self.port = _free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "mcpbalancer", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = workdir / "prometheus.log"
        self._command = [
            executable,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for server in started:
        server.stop()


async def query(http: aiohttp.ClientSession, prometheus: Prometheus, expr: str) -> list[Any]:
    """The instant vector `expr` evaluates to; fails on a PromQL error."""
    async with http.get(prometheus.url + "/api/v1/query", params={"query": expr}) as resp:
        answer = await resp.json()
    assert resp.status == 200, (expr, answer)
    assert answer["status"] == "success", (expr, answer)
    return list(answer["data"]["result"])


async def until(what: str, deadline: float, check: Any) -> Any:
    end = time.monotonic() + deadline
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline}s waiting for {what}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def traffic(proxy: Proxy) -> AsyncIterator[None]:
    """Healthy MCP traffic until the block ends: a legacy session holding its GET stream open, and a
    loop of short legacy sessions (initialize, tool calls, DELETE) and stateless 2026-07-28 calls.
    Bounded in time; any failure of a call fails the test."""
    url = mcp_url(proxy)
    stop = asyncio.Event()

    async def loop() -> None:
        async with Client(url, mode="legacy") as held:  # its GET stream stays open meanwhile
            end = time.monotonic() + DATA_DEADLINE + READY_DEADLINE
            while not stop.is_set() and time.monotonic() < end:
                async with Client(url, mode="legacy") as session:
                    assert text_of(await session.call_tool("count", {})) == "1"
                    text_of(await session.call_tool("whoami", {}))
                async with Client(url, mode="2026-07-28") as modern:
                    text_of(await modern.call_tool("whoami", {}))
                text_of(await held.call_tool("whoami", {}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_real_prometheus_evaluates_every_dashboard_and_alert_expression(
    backends: list[BackendProcess],
    redis_server: RedisServer,
    make_proxy: ProxyFactory,
    prometheus_factory: list[Prometheus],
    tmp_path: Path,
    pki: Pki,
) -> None:
    executable = binary("prometheus", "prometheus")
    # A TLS listener beside the plain one, whose certificate is far from its end: the certificate
    # alert has its series, and stays inactive.
    served = pki.ca.issue("prometheus", valid=(-datetime.timedelta(days=1), datetime.timedelta(days=90)))
    tls = {"address": "127.0.0.1:0", "tls": {"cert": str(served.cert), "key": str(served.key)}}
    proxy = await make_proxy(
        backends[:2],
        listen=["127.0.0.1:0", tls],
        store=redis_server.url,
        admin="127.0.0.1:0",
        heartbeat=0.5,
        health={"interval": 0.5},
    )
    assert proxy.control is not None
    prometheus = Prometheus(executable, tmp_path, f"127.0.0.1:{proxy.control.port}")
    prometheus_factory.append(prometheus)
    prometheus.start()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http, traffic(proxy):

        async def ready() -> bool:
            assert prometheus.process is not None
            assert prometheus.process.poll() is None, prometheus.output()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(prometheus.url + "/-/ready") as resp:
                    return resp.status == 200
            return False

        await until("prometheus to be ready", READY_DEADLINE, ready)

        async def filled() -> bool:
            # Several scrapes with traffic between them, and a session ended by its client.
            up = await query(http, prometheus, 'up{job="mcpbalancer"} == 1')
            rated = await query(http, prometheus, "sum(rate(mcpbalancer_requests_total[20s])) > 0")
            ended = await query(http, prometheus, 'mcpbalancer_sessions_ended_total{reason="delete"} > 0')
            return bool(up and rated and ended)

        await until("scrapes of the proxy under traffic", DATA_DEADLINE, filled)
        await asyncio.sleep(0)
        empty = []
        for title, expr in dashboard_targets():
            result = await query(http, prometheus, grafana(expr))
            if not result:
                empty.append(title)
        assert sorted(set(empty)) == sorted(EMPTY_WHEN_HEALTHY)

        for rule in rules():
            expr = str(rule["expr"])
            await query(http, prometheus, expr)  # a PromQL error fails here
            compared = COMPARISON.match(expr)
            assert compared, f"{rule['alert']}: an alert compares a value with a threshold"
            assert await query(http, prometheus, compared["value"]), f"{rule['alert']}: no series"

        async def evaluated() -> list[dict[str, Any]] | None:
            async with http.get(prometheus.url + "/api/v1/rules") as resp:
                loaded = [r for g in (await resp.json())["data"]["groups"] for r in g["rules"]]
            done = all(r["lastEvaluation"] > "2000" for r in loaded)
            return loaded if done and len(loaded) == len(rules()) else None

        loaded = await until("prometheus to evaluate the rules", DATA_DEADLINE, evaluated)
        assert {r["name"]: (r["health"], r.get("lastError", "")) for r in loaded} == {
            rule["alert"]: ("ok", "") for rule in rules()
        }
        # Healthy traffic: nothing fires, or is even pending.
        assert {r["name"]: r["state"] for r in loaded} == {rule["alert"]: "inactive" for rule in rules()}
