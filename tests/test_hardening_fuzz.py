"""Property-based fuzzing of the data plane: random methods (CONNECT too), targets, headers (Upgrade
too), versions and truncated bodies, thrown at a running proxy in front of real FastMCP backends
while real MCP sessions keep working. Many requests carry a session id: a live session's, an unknown
one, or junk, next to any MCP-Protocol-Version.

What must hold: no MCP call of the live sessions fails; the proxy itself never answers 5xx to client
input (a 5xx of its own is only for an upstream fault, and there is none here); and, by the backends'
own session ledgers, no request carrying a session id reaches an instance that does not have that
session live (a live session's id at another instance, or an unknown id at any).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcpbalancer.app import Proxy
from mcpbalancer.errors import BadGateway, render_error
from tests.fixtures.backends import BackendProcess
from tests.fixtures.proxy import ProxyFactory
from tests.mcp_helpers import (
    DEADLINE,
    Ledger,
    mcp_url,
    open_session,
    recorded_client,
    session_ledger,
    text_of,
)

EXAMPLES = 500  # each sends two requests: a random one and a well-formed MCP one
VICTIMS = 3  # live sessions whose ids the fuzzer sends; one that the fuzzer ends is replaced
TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$%&'*+.^`|~",
    min_size=1,
    max_size=12,
)
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH", "TRACE", "CONNECT"]),
    TOKEN,
)
ANY_BYTES = st.binary(max_size=40)
TARGETS = st.one_of(
    st.sampled_from(["/mcp", "/mcp", "/", "*", "/healthz", "/readyz", "/metrics", "http://localhost/mcp"]),
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
VERSIONS = st.one_of(
    st.sampled_from(["2025-11-25", "2025-06-18", "2026-07-28", "2026-07-28", "1999-01-01", ""]),
    ANY_BYTES.map(lambda b: b.decode("latin-1")),
)
# Values a well-formed request may carry: visible ASCII, spaces and obs-text, no control bytes.
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
)
WELL_FORMED_VERSIONS = st.one_of(VERSIONS.filter(lambda v: v.isprintable()), HEADER_TEXT)
UNKNOWN_IDS = st.one_of(
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),  # the form FastMCP's ids have
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    ANY_BYTES.map(lambda b: b.decode("latin-1")),  # malformed: empty, spaces, obs-text
)
BODIES = st.one_of(
    st.just(b""),
    st.sampled_from(
        [
            b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}',
            b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
            b"0\r\n\r\n",
            b"5\r\nab",
        ]
    ),
    st.binary(max_size=200),
)


@st.composite
def raw_requests(draw: st.DrawFn, victims: Sequence[str]) -> bytes:
    """One request's bytes; `victims` is read when the example is drawn (it changes as it runs)."""
    method = draw(METHODS)
    target = draw(TARGETS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""]))
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=8))
    sid = draw(st.one_of(st.none(), st.integers(0, len(victims) - 1).map(lambda i: victims[i]), UNKNOWN_IDS))
    if sid is not None:
        headers.insert(draw(st.integers(0, len(headers))), ("Mcp-Session-Id", sid))
    protocol = draw(st.one_of(st.none(), VERSIONS))
    if protocol is not None:
        headers.insert(draw(st.integers(0, len(headers))), ("MCP-Protocol-Version", protocol))
    if draw(st.integers(0, 9)) > 0:
        headers.insert(0, ("Host", "localhost"))
    body = draw(BODIES)
    lines = [f"{method} {target} {version}".rstrip()] + [f"{n}: {v}" for n, v in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    cut = draw(st.integers(min_value=1, max_value=len(data)))  # truncated anywhere, or whole
    return data[: cut if draw(st.booleans()) else len(data)]


RPC_BODIES = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
    b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"whoami","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":3,"method":"ping"}',
    b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
    b'{"jsonrpc":"2.0","id":4,"method":"initialize","params":{}}',
    b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"count"}}',
    b"[]",
]
EXTRA_FIELDS = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Upgrade", "h2c"),
    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
    ("Mcp-Method", "tools/call"),
    ("Mcp-Name", "whoami"),
    ("Mcp-Name", "=?base64?%%%?="),
    ("Last-Event-ID", "0"),
    ("Accept", "text/event-stream"),
    ("Expect", "100-continue"),
    ("Connection", "close"),
]


@st.composite
def mcp_requests(draw: st.DrawFn, victims: Sequence[str]) -> bytes:
    """A well-formed request to the MCP endpoint, with any session id and any version header: these
    get past the framing checks, so they are the ones routing decides on."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "DELETE"]))
    headers = [("Host", "localhost"), ("Accept", "application/json, text/event-stream")]
    victim = st.integers(0, len(victims) - 1).map(lambda i: victims[i])
    sid = draw(st.one_of(victim, victim, victim, UNKNOWN_IDS, st.none()))  # live ids half the time
    if sid is not None:
        headers.append(("Mcp-Session-Id", sid))
    protocol = draw(st.one_of(st.none(), WELL_FORMED_VERSIONS))
    if protocol is not None:
        headers.append(("MCP-Protocol-Version", protocol))
    headers += draw(st.lists(st.sampled_from(EXTRA_FIELDS), max_size=3))
    body = draw(st.sampled_from(RPC_BODIES)) if method == "POST" else b""
    if body:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    lines = [f"{method} /mcp HTTP/1.1"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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


async def ledgers(backends: Sequence[BackendProcess]) -> dict[str, Ledger]:
    return {b.name: await session_ledger(b) for b in backends}


def strays(before: dict[str, Ledger], after: dict[str, Ledger]) -> list[str]:
    """The requests that reached an instance without the session live there, since `before`."""
    found = []
    for name, ledger in after.items():
        fresh = ledger.stray[len(before[name].stray) :]
        assert ledger.stray_total - before[name].stray_total == len(fresh), "ledger overflowed"
        for stray in fresh:
            owners = [other for other, led in after.items() if stray["sid"] in led.issued]
            whose = f"a live session of {owners[0]}" if owners else "an unknown id"
            found.append(f"{stray['method']} {stray['path']} at {name}: {whose} {stray['sid']!r}")
    return found


async def test_fuzzed_requests_never_break_live_sessions_nor_reach_a_wrong_instance_nor_draw_proxy_5xx(
    backends: list[BackendProcess], make_proxy: ProxyFactory
) -> None:
    proxy: Proxy = await make_proxy(backends, limits={"head_timeout": 5})
    loop = asyncio.get_running_loop()
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
                await asyncio.sleep(0.05)

    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE))
    victims = [await open_session(http, mcp_url(proxy)) for _ in range(VICTIMS)]
    every_victim = list(victims)
    replaced = 0

    async def replace_ended_victims() -> None:
        # A fuzzed DELETE, or a backend's 404 (to a path it does not serve), ends a victim's session:
        # a new one takes its place, so live ids keep coming.
        nonlocal replaced
        for i, sid in enumerate(victims):
            if proxy.store.peek(sid) is None:
                victims[i] = await open_session(http, mcp_url(proxy))
                every_victim.append(victims[i])
                replaced += 1

    # The ledger oracle can fail: an unknown id sent to a backend directly is a stray.
    async with http.post(backends[0].mcp_url, headers={"Mcp-Session-Id": "f" * 32}) as resp:
        assert resp.status in (400, 404)
    before = await ledgers(backends)
    assert before[backends[0].name].stray[-1]["sid"] == "f" * 32
    sessions = [asyncio.create_task(session()) for _ in range(3)]
    bad: list[tuple[bytes, list[bytes]]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.tuples(raw_requests(victims), mcp_requests(victims)))
    def fuzz(pair: tuple[bytes, bytes]) -> None:
        for data in pair:
            made = proxy_made_5xx(exchange(proxy.port, data))
            asyncio.run_coroutine_threadsafe(replace_ended_victims(), loop).result(DEADLINE)
            if made:
                bad.append((data, made))
            assert not made, (data, made)

    try:
        await asyncio.to_thread(fuzz)
    finally:
        stop.set()
        await asyncio.gather(*sessions)
        await http.close()
    assert failures == []
    assert bad == []
    after = await ledgers(backends)
    assert strays(before, after) == []
    assert calls >= 3
    # Live ids were in play: fuzzed requests carrying them reached their owners (each victim's own
    # notifications/initialized is not counted).
    routed = sum(led.seen.get(sid, 0) for led in after.values() for sid in every_victim) - len(every_victim)
    assert routed >= EXAMPLES // 10
    print(f"{2 * EXAMPLES} requests: {routed} reached a victim's owner, {replaced} victims replaced")
