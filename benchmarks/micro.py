"""The data plane's own cost per request, without sockets: a deterministic micro benchmark.

    python benchmarks/micro.py [--sse] [--tracing] [--requests N] [--profile]

One client connection and one pooled backend connection with in-memory transports; a session is
initialized, then a known-session POST and its answer (JSON, or with --sse a one-event SSE stream)
are relayed in a loop. What is timed is the Python work of the proxy alone (httptools parsing,
routing, head building, metrics, bookkeeping): no syscalls, no event loop wake-ups, no other
process, so two versions of the code can be compared in seconds, even on a busy machine, to a few
percent. It is what the end-to-end numbers of run.py are made of, minus the kernel's part and
uvloop's. `--profile` prints cProfile's view of the same loop (slower, distorted, but it names the
functions). `--tracing` turns tracing on (every request sampled, a traceparent sent), with an
exporter that discards the spans: what is timed then includes the export thread's work (building
SDK spans and encoding them), which runs while the loop relays.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

import uvloop

from mcpbalancer.app import Proxy
from mcpbalancer.config import TracingConfig, parse_config
from mcpbalancer.dataplane.plane import DataPlane
from mcpbalancer.dataplane.upstream import UpstreamConnection

BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"x":1}}}'
RESULT = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}]}}'


class MemoryTransport:
    """Just enough of an asyncio transport: writes are kept, closing is an error here."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.out.extend(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise RuntimeError("the proxy closed a connection: the loop is not what it should be")

    abort = close


class Discard:
    """A SpanExporter that encodes every batch as OTLP would, then drops it."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        encode_spans(spans).SerializePartialToString()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def request(sid: bytes | None, sse: bool, traced: bool = False) -> bytes:
    lines = [
        b"POST /mcp%s HTTP/1.1" % (b"?sse=1" if sse else b""),
        b"Host: 127.0.0.1:8080",
        b"Content-Type: application/json",
        b"Accept: application/json, text/event-stream",
        b"MCP-Protocol-Version: 2025-06-18",
    ]
    if sid is not None:
        lines.append(b"Mcp-Session-Id: " + sid)
    if traced:
        lines.append(b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    lines.append(b"Content-Length: %d" % len(BODY))
    return b"\r\n".join(lines) + b"\r\n\r\n" + BODY


def response(sid: bytes | None, sse: bool) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nX-Backend: s1\r\n"
    if sid is not None:
        head += b"Mcp-Session-Id: " + sid + b"\r\n"
    if not sse:
        return head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(RESULT) + RESULT
    event = b"event: message\ndata: " + RESULT + b"\n\n"
    head += b"Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    return head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event)


async def main(args: argparse.Namespace) -> None:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "backends": [{"name": "s1", "url": "http://127.0.0.1:9"}],
            "health": {"interval": 0},
            "log": {"level": "warning", "access": False},
        },
        source="<micro>",
    )
    proxy = Proxy(config)
    tracing = None
    if args.tracing:
        from mcpbalancer.observability.tracing import Tracing

        tracing = Tracing(
            TracingConfig(enabled=True), proxy.metrics, session_key=b"k" * 16, exporter=Discard()
        )
        tracing.start()
        proxy.tracing = tracing  # registered by compose_phases, as a configured one is
    plane = DataPlane(
        proxy.router,
        proxy.fleet.pools,
        heartbeat=config.heartbeat,
        timeouts=config.timeouts,
        limits=config.limits,
        loop=asyncio.get_running_loop(),
        metrics=proxy.metrics,
        phases=proxy.compose_phases(config),  # the default filters (Host, Origin, passive health)
    )
    upstream, up = UpstreamConnection(proxy.fleet.pools["s1"]), MemoryTransport()
    upstream.connection_made(up)  # type: ignore[arg-type]
    proxy.fleet.pools["s1"].release(upstream)
    client, down = plane.protocol_factory(), MemoryTransport()
    client.connection_made(down)  # type: ignore[arg-type]
    client.data_received(request(None, args.sse))
    upstream.data_received(response(b"sess-1", args.sse))
    await asyncio.sleep(0.01)  # the session's binding is stored in a task
    ask, answer = request(b"sess-1", args.sse, args.tracing), response(None, args.sse)

    def relay(n: int) -> None:
        for _ in range(n):
            client.data_received(ask)
            upstream.data_received(answer)
            down.out.clear()
            up.out.clear()

    relay(2000)  # warm up, and check the loop works: a refusal or a close raises
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(relay, args.requests // 5)
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
        return
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        relay(args.requests // 5)
        best = min(best, (time.perf_counter() - started) / (args.requests // 5))
    kind = ("SSE" if args.sse else "JSON") + (" traced" if args.tracing else "")
    print(f"{kind}: {best * 1e6:.2f} µs of proxy Python per request (best of 5 runs of {args.requests // 5})")
    if tracing is not None:
        tracing.close()
        spans = proxy.metrics.registry.get_sample_value
        exported = spans("mcpbalancer_trace_spans_total", {"result": "exported"})
        dropped = spans("mcpbalancer_trace_spans_total", {"result": "dropped"})
        print(f"  spans exported {exported:.0f}, dropped (queue full) {dropped:.0f}")


if __name__ == "__main__":
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--sse", action="store_true", help="answers as a one-event SSE stream")
    parser.add_argument("--tracing", action="store_true", help="tracing on, every request sampled")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    uvloop.run(main(parser.parse_args()))
