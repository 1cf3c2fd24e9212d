"""Logs in one shape in both formats, and request ids: every error answer of the proxy carries an
X-Request-Id that its log lines carry too; a client's own id is kept (and forwarded unchanged).

Real FastMCP backends, raw aiohttp clients, the proxy's own access log and event records.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mcpbalancer.app import Proxy
from mcpbalancer.config import LogConfig, parse_config
from mcpbalancer.observability.logs import configure_logging, request_fields
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import HasUrl, proxy_config
from tests.mcp_helpers import call_tool, mcp_url, open_session, session_headers

MINTED = re.compile(r"[0-9a-f]{16}")


class Logged:
    def __init__(self, proxy: Proxy, access: io.StringIO) -> None:
        self.proxy, self._access = proxy, access

    def access(self) -> list[dict[str, Any]]:
        assert self.proxy.access_log is not None
        self.proxy.access_log.flush()
        return [json.loads(line) for line in self._access.getvalue().splitlines()]


@pytest.fixture
async def logged() -> AsyncIterator[Any]:
    started: list[Proxy] = []

    async def make(backends: Sequence[HasUrl], **overrides: Any) -> Logged:
        access = io.StringIO()
        config = parse_config(proxy_config(backends, **overrides), source="<test>")
        proxy = Proxy(config, registry=CollectorRegistry(), access_stream=access)
        await proxy.start()
        started.append(proxy)
        return Logged(proxy, access)

    yield make
    for proxy in reversed(started):
        await proxy.stop()


def events(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "request_id", None) == request_id]


async def test_an_error_answer_carries_a_request_id_its_log_lines_carry(
    backends: list[BackendProcess], logged: Any, web: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpbalancer")
    obs = await logged(backends[:1])
    url = mcp_url(obs.proxy)
    async with web.post(url, json={}, headers=session_headers("no-such-session")) as resp:
        assert resp.status == 404
        minted = resp.headers["X-Request-Id"]
    assert MINTED.fullmatch(minted)
    [line] = [e for e in obs.access() if e["status"] == 404]
    assert (line["request_id"], line["service"], line["outcome"]) == (minted, "default", "error")
    [record] = events(caplog, minted)
    assert "-> 404" in record.getMessage()
    assert getattr(record, "service", None) == "default"
    # Another error, another id.
    async with web.post(url, json={}, headers=session_headers("another-unknown")) as resp:
        assert resp.headers["X-Request-Id"] not in ("", minted)


async def test_a_clients_request_id_is_kept_and_forwarded_unchanged(
    backends: list[BackendProcess], logged: Any, web: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpbalancer")
    obs = await logged(backends[:1])
    url = mcp_url(obs.proxy)
    headers = {**session_headers("no-such-session"), "X-Request-Id": "client-abc-1"}
    async with web.post(url, json={}, headers=headers) as resp:
        assert (resp.status, resp.headers.getall("X-Request-Id")) == (404, ["client-abc-1"])
    assert events(caplog, "client-abc-1")
    # A request the backend answers: the id reaches it as sent, and the access line shows it; the
    # proxy adds no X-Request-Id to an answer that is not its own.
    sid = await open_session(web, url)
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "request_headers"}}
    headers = {**session_headers(sid), "X-Request-Id": "client-abc-2"}
    async with web.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        assert "X-Request-Id" not in resp.headers
        text = await resp.text()
    seen = json.loads(json.loads(text.split("data: ", 1)[1])["result"]["content"][0]["text"])
    assert seen["x-request-id"] == "client-abc-2"
    by_id = {e["request_id"]: e for e in obs.access()}
    assert (by_id["client-abc-1"]["status"], by_id["client-abc-2"]["status"]) == (404, 200)
    plain = await call_tool(web, url, sid, "whoami")
    assert plain.status == 200
    assert obs.access()[-1]["request_id"] is None  # no id sent, none needed


async def test_an_unusable_request_id_is_replaced_on_an_error_answer(
    backends: list[BackendProcess], logged: Any, web: aiohttp.ClientSession
) -> None:
    obs = await logged(backends[:1])
    headers = {**session_headers("no-such-session"), "X-Request-Id": "x" * 200}
    async with web.post(mcp_url(obs.proxy), json={}, headers=headers) as resp:
        assert resp.status == 404
        assert MINTED.fullmatch(resp.headers["X-Request-Id"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_backend_failure_is_logged_with_the_id_the_client_sees(
    logged: Any, web: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpbalancer")

    class Gone:
        name = "gone"
        url = f"http://127.0.0.1:{_closed_port()}"

    obs = await logged([Gone()])
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with web.post(mcp_url(obs.proxy), json={"jsonrpc": "2.0", "id": 1}, headers=headers) as resp:
        assert resp.status == 502
        request_id = resp.headers["X-Request-Id"]
    messages = [r.getMessage() for r in events(caplog, request_id)]
    assert any("connect failed" in m for m in messages), messages
    assert any("-> 502" in m for m in messages), messages
    [line] = obs.access()
    assert (line["request_id"], line["status"], line["backend"]) == (request_id, 502, "gone")


async def test_a_broken_request_stream_is_answered_with_a_request_id(
    backends: list[BackendProcess], logged: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcpbalancer")
    obs = await logged(backends[:1])
    reader, writer = await asyncio.open_connection("127.0.0.1", obs.proxy.port)
    writer.write(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    found = re.search(rb"\r\nX-Request-Id: ([0-9a-f]{16})\r\n", answer)
    assert found, answer
    assert any("refused request" in r.getMessage() for r in events(caplog, found[1].decode()))


@pytest.mark.parametrize("worker", [None, 4])
def test_event_lines_carry_the_same_fields_in_both_formats(worker: int | None) -> None:
    lines = {}
    for fmt in ("json", "text"):
        stream = io.StringIO()
        configure_logging(LogConfig(format=fmt), stream=stream, worker=worker)
        try:
            request_log = logging.getLogger("mcpbalancer.dataplane.exchange")
            request_log.warning("backend b: connect failed", extra=request_fields("tools", b"req-9"))
            logging.getLogger("mcpbalancer.app").info("listening")
        finally:
            logging.basicConfig(handlers=[logging.NullHandler()], force=True)
        lines[fmt] = stream.getvalue().splitlines()
    about_request, lifecycle = (json.loads(line) for line in lines["json"])
    expected = {"service": "tools", "request_id": "req-9"} | ({} if worker is None else {"worker": worker})
    assert {
        k: about_request[k] for k in ("service", "request_id", "worker") if k in about_request
    } == expected
    assert list(about_request)[-len(expected) :] == list(expected)
    assert "service" not in lifecycle
    assert "request_id" not in lifecycle
    suffix = "".join(f" {k}={v}" for k, v in expected.items())
    assert lines["text"][0].endswith("mcpbalancer.dataplane.exchange: backend b: connect failed" + suffix)
    assert lines["text"][1].endswith(": listening" + ("" if worker is None else f" worker={worker}"))
