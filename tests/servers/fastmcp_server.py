"""A small, stateful FastMCP 4 backend for mcpbalancer's tests.

Run: ``python tests/servers/fastmcp_server.py --name a [--host 127.0.0.1] [--port 0]``

The script binds its listening socket itself (port 0 lets the OS choose), serves FastMCP's Streamable
HTTP app on ``/mcp`` through uvicorn with that pre-bound socket, and prints exactly one line
``READY <port>`` to stdout once uvicorn has finished its startup (lifespan done, socket being served).
SIGTERM/SIGINT shut it down gracefully (in-flight requests get ``--graceful-timeout`` seconds) and the
process exits with status 0.

One endpoint serves both protocol eras:

* legacy clients (``initialize`` handshake, no ``MCP-Protocol-Version`` header or a 2024/2025 one) get a
  stateful session with an ``Mcp-Session-Id`` (unless ``--stateless-http``);
* 2026-07-28 clients (``MCP-Protocol-Version: 2026-07-28``) are served statelessly, one POST per request.

Tools and their behaviour per era:

``whoami()``
    The instance name (``--name``). Both eras.
``count()``
    Legacy: a per-session counter (1, 2, 3, ... within one ``Mcp-Session-Id``), kept with
    ``ctx.get_state``/``ctx.set_state``, which FastMCP keys by the session id. Modern (2026-07-28):
    every request is its own connection with a fresh, random ``ctx.session_id``, so the counter always
    answers 1.
``progress_and_wait(key, wait_seconds=10)``
    Sends one ``notifications/progress`` (0.5/1.0, only if the caller asked for progress by sending a
    progress token) and then waits until ``release(key)`` is called (from any session or era) or
    ``wait_seconds`` pass; returns ``"released"`` or ``"timeout"``. In SSE mode (the default) the
    progress event is written on the POST's response stream before the tool finishes, in both eras. In
    ``--json-response`` mode there is no stream, so the progress notification is dropped.
``release(key)``
    Sets the event for ``key``; returns ``"released <key>"``. Releasing before the wait starts works too.
``ask_user()``
    Legacy: a server-to-client ``elicitation/create`` request (``ctx.elicit``) on the tool call's SSE
    stream; the client's answer comes back as a separate POST carrying the session id. Returns
    ``"accepted:<value>"``, ``"declined"`` or ``"cancelled"``.
    Modern: no back-channel, so the tool uses the 2026 multi-round-trip pattern: the first call returns
    an ``InputRequiredResult`` with an embedded ``elicitation/create`` request and a ``requestState``
    sealed with this process's ephemeral key; the client (mcp.Client does this automatically) retries
    ``tools/call`` with ``inputResponses`` + ``requestState``. A retry that lands on a *different*
    instance is rejected, because the state is sealed per process: that is the MRTR affinity case.
``ask_llm(prompt)``
    Same shape as ``ask_user`` but with sampling (``sampling/createMessage``; legacy: server-to-client
    request via ``ctx.session.create_message`` since FastMCP 4.1.2 has no ``ctx.sample``; modern:
    embedded in an ``InputRequiredResult``). Returns the text of the client's answer.
``slow(seconds)``
    Sleeps, then returns the instance name. Both eras.
``notify_stream()``
    Legacy: sends ``notifications/tools/list_changed`` *unrelated* to the current request, so the server
    writes it on the session's standalone GET SSE stream (if one is open; with ``--event-store`` it is
    also stored for replay). Returns ``"sent"``. Modern: there is no standalone stream, the SDK drops the
    notification; the tool still answers ``"sent"``.

``request_headers()``
    ``{"traceparent": ..., "tracestate": ..., "x-request-id": ...}``: those headers of the HTTP request
    that carried the call, as the backend received them (null when absent). Both eras.
``GET /whoami`` (a custom route, not MCP)
    ``{"name": <instance>, "path": <request path>, "query": <query string>}``.

``background(seconds)`` (only with ``--tasks``)
    Registered with ``task=True`` under the fastmcp-tasks extension (in-memory Docket, so tasks live in
    this process only): a 2026-07-28 client that opts in (``_meta`` clientCapabilities ``extensions``
    ``io.modelcontextprotocol/tasks``) gets a task (``resultType: "task"``, ``taskId``, ``ttlMs``) to
    poll with ``tasks/get``; other calls run it inline. Returns the instance name.

Options useful to the proxy's tests: ``--json-response`` (answer POSTs with ``application/json``
instead of SSE), ``--stateless-http`` (legacy clients get no session), ``--event-store`` (in-memory
FastMCP ``EventStore``: SSE events carry ``id:``, 2025-11-25 POST streams start with a priming event
``id: <x>`` / empty ``data:``, and ``GET`` with ``Last-Event-ID`` replays what followed),
``--retry-interval MS`` (adds ``retry:`` to priming events; needs ``--event-store``),
``--session-idle-timeout S``, ``--ready-route`` (a ``GET /ready`` the test sets, and a record of
the proxy's probes: see ``ReadyRoute``), ``--host-origin-protection off|auto|strict`` (FastMCP's
Host/Origin guard; off by default, see the fixtures module for the 421 rule), ``--ledger-path P``
(``GET P`` answers the instance's session ledger, see ``SessionLedger``).

TLS: ``--ssl-certfile CERT --ssl-keyfile KEY`` serve HTTPS (uvicorn's own TLS), ``--ssl-client-ca CA``
also requires a client certificate signed by CA (mutual TLS). With TLS on, one more tool:

``tls_handshakes()``
    ``{"handshakes": N, "server_names": [...]}``: the TLS handshakes this process has begun (one per
    connection, counted from the ClientHello) and the SNI name of each (``null`` when none was sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from types import FrameType
from typing import Any, Literal

# Keep the subprocess quiet; the fixtures drain stderr anyway. Must be set before fastmcp is imported.
os.environ.setdefault("FASTMCP_LOG_LEVEL", "WARNING")
os.environ.setdefault("FASTMCP_SHOW_SERVER_BANNER", "false")
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

import mcp_types
import uvicorn
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_headers
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MCP_PATH = "/mcp"
WHOAMI_PATH = "/whoami"
DEFAULT_WAIT_SECONDS = 10.0
SEEN_HEADERS = ("traceparent", "tracestate", "x-request-id")

HostOriginProtection = bool | Literal["auto"]


def _is_modern(ctx: Context) -> bool:
    return ctx.session.protocol_version in MODERN_PROTOCOL_VERSIONS


def _first_response(ctx: Context) -> Any | None:
    responses = ctx.input_responses
    if not responses:
        return None
    return next(iter(responses.values()))


def _sampling_text(result: Any) -> str:
    """Text of a CreateMessageResult (or its dict form) as the client answered it."""
    if isinstance(result, dict):
        content = result.get("content")
        if isinstance(content, dict):
            return str(content.get("text", ""))
        return str(content)
    content = getattr(result, "content", None)
    text = getattr(content, "text", None)
    return str(text) if text is not None else str(content)


def _elicit_outcome(result: Any) -> str:
    """``accepted:<value>`` / ``declined`` / ``cancelled`` from an ElicitResult (or its dict form)."""
    if isinstance(result, dict):
        action = result.get("action")
        content = result.get("content") or {}
    else:
        action = getattr(result, "action", None)
        content = getattr(result, "content", None) or {}
    if action == "accept":
        return f"accepted:{content.get('value')}"
    return "declined" if action == "decline" else "cancelled"


def build_server(
    name: str, *, tasks: bool = False, tls: TlsLog | None = None, tools: Sequence[str] = ()
) -> FastMCP:
    """The FastMCP app of one backend instance called ``name``; each of ``tools`` is one more tool
    of that name answering ``<tool>@<name>`` (servers of different tool sets)."""
    mcp: FastMCP = FastMCP(f"backend-{name}")
    for tool in tools:
        _add_named_tool(mcp, tool, name)
    if tasks:
        _add_tasks(mcp, name)
    if tls is not None:
        _add_tls_report(mcp, tls)
    release_events: dict[str, asyncio.Event] = {}

    def event_for(key: str) -> asyncio.Event:
        return release_events.setdefault(key, asyncio.Event())

    @mcp.tool
    def whoami() -> str:
        """The instance name."""
        return name

    @mcp.tool
    async def count(ctx: Context) -> int:
        """Per-session counter (legacy sessions); always 1 for stateless 2026-07-28 requests."""
        current = await ctx.get_state("count")
        value = (current or 0) + 1
        await ctx.set_state("count", value)
        return value

    @mcp.tool
    async def progress_and_wait(key: str, ctx: Context, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> str:
        """Report progress, then wait until release(key) is called (or the timeout passes)."""
        await ctx.report_progress(0.5, 1.0, f"waiting for {key}")
        event = event_for(key)
        try:
            await asyncio.wait_for(event.wait(), wait_seconds)
        except TimeoutError:
            return "timeout"
        finally:
            release_events.pop(key, None)
        return "released"

    @mcp.tool
    def release(key: str) -> str:
        """Release every progress_and_wait(key)."""
        event_for(key).set()
        return f"released {key}"

    @mcp.tool
    async def ask_user(ctx: Context) -> str | mcp_types.InputRequiredResult:
        """Elicitation round trip: push request (legacy) or InputRequiredResult (2026-07-28)."""
        if not _is_modern(ctx):
            result = await ctx.elicit("What is your answer?", response_type=str)
            if result.action == "accept":
                return f"accepted:{result.data}"
            return "declined" if result.action == "decline" else "cancelled"
        answer = _first_response(ctx)
        if answer is None:
            return mcp_types.InputRequiredResult(
                input_requests={
                    "answer": mcp_types.ElicitRequest(
                        params=mcp_types.ElicitRequestFormParams(
                            message="What is your answer?",
                            requested_schema={
                                "type": "object",
                                "properties": {"value": {"type": "string"}},
                                "required": ["value"],
                            },
                        )
                    )
                },
                request_state=f"ask_user@{name}",
            )
        if ctx.request_state != f"ask_user@{name}":
            raise ToolError(f"unexpected requestState {ctx.request_state!r}")
        return _elicit_outcome(answer)

    @mcp.tool
    async def ask_llm(prompt: str, ctx: Context) -> str | mcp_types.InputRequiredResult:
        """Sampling round trip: push request (legacy) or InputRequiredResult (2026-07-28)."""
        message = mcp_types.SamplingMessage(
            role="user", content=mcp_types.TextContent(type="text", text=prompt)
        )
        if not _is_modern(ctx):
            result = await ctx.session.create_message(
                [message], max_tokens=64, related_request_id=ctx.request_id
            )
            return _sampling_text(result)
        answer = _first_response(ctx)
        if answer is None:
            return mcp_types.InputRequiredResult(
                input_requests={
                    "llm": mcp_types.CreateMessageRequest(
                        params=mcp_types.CreateMessageRequestParams(messages=[message], max_tokens=64)
                    )
                },
                request_state=f"ask_llm@{name}",
            )
        if ctx.request_state != f"ask_llm@{name}":
            raise ToolError(f"unexpected requestState {ctx.request_state!r}")
        return _sampling_text(answer)

    @mcp.tool
    async def slow(seconds: float) -> str:
        """Sleep, then return the instance name."""
        await asyncio.sleep(seconds)
        return name

    @mcp.tool
    async def notify_stream(ctx: Context) -> str:
        """Send tools/list_changed on the session's standalone GET stream (legacy only)."""
        # No related_request_id: the notification goes to the connection's standalone channel.
        await ctx.session.send_tool_list_changed()
        return "sent"

    @mcp.tool
    def request_headers() -> str:
        """The HTTP headers of the request that carried this call, as JSON: every one (lower-case
        names, a repeated header's values joined with ", "), and the tracing and request-id ones
        always (null when absent)."""
        headers: dict[str, str | None] = dict.fromkeys(SEEN_HEADERS)
        for key, value in get_http_headers(include_all=True).items():
            headers[key] = value
        return json.dumps(headers)

    @mcp.custom_route(WHOAMI_PATH, methods=["GET"])
    async def whoami_route(request: Request) -> Response:
        """A plain HTTP route beside the MCP endpoint: the name and the target it was asked for."""
        return JSONResponse({"name": name, "path": request.url.path, "query": request.url.query})

    return mcp


def _add_named_tool(mcp: FastMCP, tool: str, name: str) -> None:
    def named() -> str:
        return f"{tool}@{name}"

    mcp.tool(named, name=tool, description=f"The tool {tool} of this server.")


def _add_tasks(mcp: FastMCP, name: str) -> None:
    """The SEP-2663 tasks extension (fastmcp-tasks, in-memory ``memory://`` Docket: tasks live in this
    process only) and a tool that runs as a task when the client opts in."""
    from fastmcp_tasks import TasksExtension

    mcp.add_extension(TasksExtension(url="memory://"))

    @mcp.tool(task=True)
    async def background(seconds: float = 0.0) -> str:
        """Sleep in the background, then return the instance name (a task when the client opts in)."""
        await asyncio.sleep(seconds)
        return name


class TlsLog:
    """The SNI name of every TLS handshake the server began, in order."""

    def __init__(self) -> None:
        self.server_names: list[str | None] = []

    def context_factory(
        self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        """uvicorn's own server context, with a callback that sees each ClientHello."""
        context = default()
        context.sni_callback = self._hello
        return context

    def _hello(self, sock: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self.server_names.append(server_name)


def _add_tls_report(mcp: FastMCP, tls: TlsLog) -> None:
    @mcp.tool
    def tls_handshakes() -> str:
        """TLS handshakes begun by this process, and the SNI name each one carried."""
        return json.dumps({"handshakes": len(tls.server_names), "server_names": tls.server_names})


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
STRAY_KEPT = 1000


class SessionLedger:
    """An ASGI wrapper that keeps, for the proxy's tests, the session ids this instance issued (a 2xx
    answer with ``Mcp-Session-Id`` to a request without one) and ended (a 2xx to a DELETE), and every
    request that carried an id not live here: a "stray" is a request a proxy sent to an instance that
    does not own its session, or with an id no instance knows. ``GET <path>`` answers it as JSON
    (``issued``, ``ended``, ``seen``: how many requests carried each live id, ``stray_total`` and the
    first ``STRAY_KEPT`` strays)."""

    def __init__(self, app: App, path: str) -> None:
        self.app, self.path = app, path
        self.issued: set[str] = set()
        self.ended: set[str] = set()
        self.seen: dict[str, int] = {}
        self.stray: list[dict[str, str]] = []
        self.stray_total = 0
        self.paths: dict[str, int] = {}  # every request's path (this ledger's own excepted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.path:
            await self._answer(send)
            return
        self.paths[scope["path"]] = self.paths.get(scope["path"], 0) + 1
        sids = [v.decode("latin-1") for n, v in scope["headers"] if n == b"mcp-session-id"]
        for sid in sids:
            if sid not in self.issued or sid in self.ended:
                self.stray_total += 1
                if len(self.stray) < STRAY_KEPT:
                    self.stray.append({"sid": sid, "method": scope["method"], "path": scope["path"]})
            else:
                self.seen[sid] = self.seen.get(sid, 0) + 1

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                if not sids:
                    ids = [v for n, v in message.get("headers", []) if n.lower() == b"mcp-session-id"]
                    self.issued.update(v.decode("latin-1") for v in ids)
                elif scope["method"] == "DELETE":
                    self.ended.update(sids)
            await send(message)

        await self.app(scope, receive, record)

    async def _answer(self, send: Send) -> None:
        body = json.dumps(
            {
                "issued": sorted(self.issued),
                "ended": sorted(self.ended),
                "seen": self.seen,
                "stray_total": self.stray_total,
                "stray": self.stray,
                "paths": self.paths,
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ReadyRoute:
    """An ASGI wrapper that adds, for the proxy's health tests, a readiness route whose answer the
    test sets, and a record of the proxy's probes.

    ``GET``/``HEAD /ready`` answers the status last set (200 at first) with a small JSON body, or
    never answers while ``hang`` is set (until the client goes). ``POST /_test/ready?status=503``
    or ``?hang=1`` sets it. Every request whose ``User-Agent`` starts with ``mcpbalancer-`` (the
    proxy's probes, whatever their path) is recorded; ``GET /_test/probes`` answers them as JSON,
    ``{"probes": [{"method", "path", "headers"}, ...]}`` with the headers lower-cased."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.status = 200
        self.hang = False
        self.probes: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in scope["headers"]}
        if headers.get("user-agent", "").startswith("mcpbalancer-"):
            self.probes.append({"method": scope["method"], "path": scope["path"], "headers": headers})
        path = scope["path"]
        if path == "/ready" and scope["method"] in ("GET", "HEAD"):
            await self._ready(scope, receive, send)
        elif path == "/_test/ready" and scope["method"] == "POST":
            query = dict(
                part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
            )
            self.hang = query.get("hang") == "1"
            self.status = int(query.get("status", self.status))
            await _json_answer(send, {"status": self.status, "hang": self.hang})
        elif path == "/_test/probes":
            await _json_answer(send, {"probes": self.probes})
        else:
            await self.app(scope, receive, send)

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.hang:
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        bodiless = scope["method"] == "HEAD" or self.status in (204, 304)
        body = b"" if bodiless else json.dumps({"status": self.status}).encode()
        headers = [(b"content-type", b"application/json")]
        if self.status not in (204, 304):
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _json_answer(send: Send, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    """uvicorn.Server that announces readiness and exits with status 0 on SIGTERM/SIGINT."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own version re-raises the captured signal after shutdown, which would make the
        # process die "by SIGTERM" instead of exiting 0.
        def handle(sig: int, frame: FrameType | None) -> None:
            self.handle_exit(sig, frame)

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _exit_on_stdin_eof() -> None:
    """Shut down gracefully once stdin reaches EOF: the test process that holds the pipe is gone."""

    def watch() -> None:
        # os.read on the raw fd, not sys.stdin: a daemon thread blocked inside a buffered reader makes
        # the interpreter abort at exit ("could not acquire lock for <stdin>").
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-eof-watch", daemon=True).start()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True, help="instance name returned by whoami/slow")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS pick a free port")
    parser.add_argument("--json-response", action="store_true", help="answer POSTs with JSON, not SSE")
    parser.add_argument("--stateless-http", action="store_true", help="no sessions for legacy clients")
    parser.add_argument("--event-store", action="store_true", help="in-memory EventStore (resumability)")
    parser.add_argument("--retry-interval", type=int, default=None, help="SSE retry: in ms (event store)")
    parser.add_argument("--session-idle-timeout", type=float, default=None, help="seconds; default 1800")
    parser.add_argument(
        "--host-origin-protection", choices=("off", "auto", "strict"), default="off", help="FastMCP guard"
    )
    parser.add_argument("--allowed-host", action="append", default=None, help="extra allowed Host values")
    parser.add_argument(
        "--tasks", action="store_true", help="fastmcp-tasks extension (in memory) + the `background` tool"
    )
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--ssl-client-ca", default=None, help="require a client certificate signed by this CA (PEM)"
    )
    parser.add_argument("--ledger-path", default=None, help="serve the SessionLedger at this path")
    parser.add_argument("--tool", action="append", default=[], help="one more tool of this name")
    parser.add_argument(
        "--ready-route", action="store_true", help="serve GET /ready as the test sets it (ReadyRoute)"
    )
    parser.add_argument("--graceful-timeout", type=float, default=3.0, help="seconds to drain on SIGTERM")
    parser.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="shut down when stdin closes (the parent died)"
    )
    return parser.parse_args(argv)


def _tls_options(args: argparse.Namespace, tls: TlsLog | None) -> dict[str, Any]:
    if tls is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_context_factory": tls.context_factory,
    }
    if args.ssl_client_ca:
        options.update(ssl_ca_certs=args.ssl_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    protections: dict[str, HostOriginProtection] = {"off": False, "auto": "auto", "strict": True}
    protection = protections[args.host_origin_protection]
    tls = TlsLog() if args.ssl_certfile else None
    mcp = build_server(args.name, tasks=args.tasks, tls=tls, tools=args.tool)
    event_store = None
    if args.event_store:
        from fastmcp.server.event_store import EventStore

        event_store = EventStore()
    app = mcp.http_app(
        path=MCP_PATH,
        json_response=args.json_response,
        stateless_http=args.stateless_http,
        event_store=event_store,
        retry_interval=args.retry_interval,
        host_origin_protection=protection,
        allowed_hosts=args.allowed_host,
        session_idle_timeout=args.session_idle_timeout if args.session_idle_timeout is not None else "auto",
    )
    sock = bind_socket(args.host, args.port)
    served: App = app if args.ledger_path is None else SessionLedger(app, args.ledger_path)
    config = uvicorn.Config(
        served if not args.ready_route else ReadyRoute(served),
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=args.graceful_timeout,
        access_log=False,
        **_tls_options(args, tls),
    )
    server = _Server(config)
    if args.exit_on_stdin_eof:
        _exit_on_stdin_eof()
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
