"""Call the demo (config/demo.yaml) through mcpbalancer with both kinds of MCP client.

    python examples/client.py [URL] [--calls N]      (default http://127.0.0.1:8080/mcp, 3 calls)

- ``mcp.Client(url)``, the SDK's default, negotiates the stateless 2026-07-28 revision when the
  server speaks it: there is no session, every request is balanced on its own and may reach
  another instance, and ``count`` answers 1 each time (it has no session to count in).
- ``mcp.Client(url, mode="legacy")`` runs the ``initialize`` handshake: one session, bound by the
  proxy to one instance, so every call reaches the same ``whoami`` and ``count`` goes 1, 2, 3.
"""

from __future__ import annotations

import argparse
import asyncio

import mcp_types
from mcp import Client


async def call(client: Client, tool: str) -> str:
    result = await client.call_tool(tool)
    block = result.content[0]
    if result.is_error or not isinstance(block, mcp_types.TextContent):
        raise RuntimeError(f"{tool} failed: {result}")
    return block.text


async def show(client: Client, title: str, calls: int) -> None:
    print(f"{title}, negotiated {client.protocol_version}")
    for _ in range(calls):
        print(f"  whoami -> {await call(client, 'whoami')}")
        print(f"  count  -> {await call(client, 'count')}")


async def main(url: str, calls: int) -> None:
    async with Client(url) as client:
        await show(client, "mcp.Client(url): stateless, each request balanced on its own", calls)
    async with Client(url, mode="legacy") as client:
        await show(client, 'mcp.Client(url, mode="legacy"): one session on one instance', calls)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Call the mcpbalancer demo in both protocol eras.")
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8080/mcp")
    parser.add_argument("--calls", type=int, default=3, help="calls of each tool per client (default 3)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.calls))
