"""A small stateful MCP server (FastMCP 4.1.2) to run behind mcpbalancer; a template for your own.

    python examples/server.py [--name NAME] [--host 127.0.0.1] [--port 0]

It serves MCP over Streamable HTTP on ``/mcp``, in both protocol eras. A legacy (session) client
gets an ``Mcp-Session-Id`` and its state lives in this process's memory, which is why every request
of a session must reach this very process: the job mcpbalancer does. A 2026-07-28 client (the mcp
SDK's default) has no session: each request stands alone and may reach any instance. Tools:

- ``whoami()``: which instance answered (``--name``, the process id and the port) and which era it
  served: ``demo-2 (pid 41, port 40123): legacy session, protocol 2025-11-25`` or ``demo-1 (pid 40,
  port 40122): stateless 2026-07-28 request``.
- ``count()``: a counter per session (1, 2, 3, ...); a new session, or a new process, starts at 1.
  A stateless 2026-07-28 request has no session to count in, so it always answers 1.
- ``add(a, b)``: a + b, a stateless tool.

The server binds its socket itself (``--port 0``, the default, lets the system pick a free port) and
prints ``READY <port>`` on stdout once it serves, so a supervisor such as mcpbalancer's managed
backends (``command:`` in its YAML) needs no fixed port. SIGTERM stops it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

# Quiet by default; must be set before fastmcp is imported.
os.environ.setdefault("FASTMCP_LOG_LEVEL", "WARNING")
os.environ.setdefault("FASTMCP_SHOW_SERVER_BANNER", "false")
os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

import uvicorn
from fastmcp import Context, FastMCP
from mcp_types.version import MODERN_PROTOCOL_VERSIONS


def build_server(name: str, port: int) -> FastMCP:
    mcp: FastMCP = FastMCP(f"example-{name}")

    @mcp.tool
    def whoami(ctx: Context) -> str:
        """Which instance answered (its name, process id and port) and in which protocol era."""
        return f"{name} (pid {os.getpid()}, port {port}): {era(ctx)}"

    @mcp.tool
    async def count(ctx: Context) -> int:
        """A counter kept in this process for the calling session: 1, 2, 3, ..."""
        value = (await ctx.get_state("count") or 0) + 1
        await ctx.set_state("count", value)
        return value

    @mcp.tool
    def add(a: float, b: float) -> float:
        """a + b."""
        return a + b

    return mcp


def era(ctx: Context) -> str:
    version = ctx.session.protocol_version
    if version in MODERN_PROTOCOL_VERSIONS:
        return f"stateless {version} request"
    return f"legacy session, protocol {version}"


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="A small stateful MCP server.")
    parser.add_argument("--name", default="example", help="instance name answered by whoami")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default) lets the system pick one")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    app = build_server(args.name, sock.getsockname()[1]).http_app(path="/mcp")
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
