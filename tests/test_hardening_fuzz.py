"""Property-based fuzzing of the data plane (issue 7, item 8): random methods, targets, headers and
truncated bodies, thrown at a running proxy in front of real FastMCP backends while real MCP sessions
keep working. No call may fail, and the proxy itself never answers 5xx to client input (CONNECT and
Upgrade included)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpbalancer.app import Proxy
from mcpbalancer.errors import BadGateway, render_error
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import mcp_url, recorded_client, text_of

EXAMPLES = 150
TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
    min_size=1,
    max_size=12,
)
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH", "TRACE", "CONNECT"]), TOKEN
)
ANY_BYTES = st.binary(max_size=40)
TARGETS = st.one_of(
    st.sampled_from(["/mcp", "/", "*", "/healthz", "/readyz", "/metrics", "http://localhost/mcp"]),
    st.builds(
        lambda s: "/" + s,
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
    ),
    ANY_BYTES.map(lambda b: b.decode("latin-1")),
)
NAMES = st.one_of(
    st.sampled_from(
        [
            "Mcp-Session-Id",
            "MCP-Protocol-Version",
            "Mcp-Method",
            "Mcp-Name",
            "Content-Type",
            "Accept",
            "Content-Length",
            "Transfer-Encoding",
            "Expect",
            "Origin",
            "Connection",
            "Upgrade",
            "HTTP2-Settings",
            "Host",
            "Last-Event-ID",
        ]
    ),
    TOKEN,
    ANY_BYTES.map(lambda b: b.decode("latin-1")),
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "2025-11-25",
            "2026-07-28",
            "chunked",
            "100-continue",
            "0",
            "5",
            "application/json",
            "close",
            "Upgrade",
            "websocket",
            "h2c",
            "x" * 300,
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    ANY_BYTES.map(lambda b: b.decode("latin-1")),
)
BODIES = st.one_of(
    st.just(b""),
    st.sampled_from(
        [b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', b"0\r\n\r\n", b"5\r\nab"]
    ),
    st.binary(max_size=200),
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(METHODS)
    target = draw(TARGETS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""]))
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=8))
    if draw(st.booleans()):
        headers.insert(0, ("Host", "localhost"))
    body = draw(BODIES)
    lines = [f"{method} {target} {version}".rstrip()] + [f"{n}: {v}" for n, v in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    cut = draw(st.integers(min_value=1, max_value=len(data)))  # truncated anywhere, or whole
    return data[: cut if draw(st.booleans()) else len(data)]


def exchange(port: int, data: bytes) -> bytes:
    """Send, half-close, read until the proxy closes (blocking: runs in a worker thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                out += chunk
        return bytes(out)


def proxy_made_5xx(answer: bytes) -> list[bytes]:
    """Status lines of 5xx answers the proxy wrote itself (backends' answers carry `server: uvicorn`)."""
    found = []
    for block in answer.split(b"HTTP/1.1 ")[1:]:
        head = block.split(b"\r\n\r\n", 1)[0].lower()
        if head[:1] == b"5" and b"\r\nserver: uvicorn" not in head:
            found.append(b"HTTP/1.1 " + head.split(b"\r\n", 1)[0])
    return found


def test_the_5xx_oracle_tells_the_proxys_answers_from_relayed_ones() -> None:
    relayed = b"HTTP/1.1 500 Internal Server Error\r\nserver: uvicorn\r\ncontent-length: 0\r\n\r\n"
    own = render_error(BadGateway(), keep_alive=False)
    assert proxy_made_5xx(relayed + own) == [b"HTTP/1.1 502 bad gateway"]


async def test_fuzzed_requests_never_break_live_sessions_nor_draw_proxy_5xx(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy: Proxy = await make_proxy(backends, limits={"head_timeout": 5})
    failures: list[BaseException] = []
    stop = asyncio.Event()
    calls = 0

    async def session() -> None:
        nonlocal calls
        async with recorded_client(mcp_url(proxy)) as (client, _):
            expected = 1
            while not stop.is_set():
                try:
                    assert text_of(await client.call_tool("count")) == str(expected)
                except Exception as exc:  # collected: every failed call is a finding
                    failures.append(exc)
                    return
                expected += 1
                calls += 1
                await asyncio.sleep(0.01)

    sessions = [asyncio.create_task(session()) for _ in range(3)]
    bad: list[tuple[bytes, list[bytes]]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw_requests())
    def fuzz(data: bytes) -> None:
        made = proxy_made_5xx(exchange(proxy.port, data))
        if made:
            bad.append((data, made))
        assert not made, (data, made)

    try:
        await asyncio.to_thread(fuzz)
    finally:
        stop.set()
        await asyncio.gather(*sessions)
    assert failures == []
    assert bad == []
    assert calls >= 3
