"""The data plane's own cost per request, without sockets: a deterministic micro benchmark.

    python benchmarks/micro.py [--sse] [--tracing] [--sessionless] [--requests N] [--profile]
                               [--auth jwt|jwt-verify|key] [--tool-policy] [--rate-limit]
                               [--access-log json|text] [--sealed] [--services]

One client connection and one pooled backend connection with in-memory transports; a session is
initialized, then a known-session POST and its answer (JSON, or with --sse a one-event SSE stream)
are relayed in a loop; with --sessionless the POST carries no session id, as a client of a stateless
server sends it. What is timed is the Python work of the proxy alone (httptools parsing,
routing, head building, metrics, bookkeeping): no syscalls, no event loop wake-ups, no other
process, so two versions of the code can be compared in seconds, even on a busy machine, to a few
percent. It is what the end-to-end numbers of run.py are made of, minus the kernel's part and
uvloop's. `--profile` prints cProfile's view of the same loop (slower, distorted, but it names the
functions). `--tracing` turns tracing on (every request sampled, a traceparent sent), with an
exporter that discards the spans: what is timed then includes the export thread's work (building
SDK spans and encoding them), which runs while the loop relays.

The access filters (docs/access.md) are off unless asked for: `--auth jwt` sends an RS256 token
(`--alg ES256` an ES256 one; checked once, then remembered until it expires), `--auth jwt-verify`
forgets it after every request (so each one checks the signature), `--auth key` an API key
(hashed every time); `--tool-policy` adds a tool policy, which reads and parses every legacy body;
`--rate-limit` a rate limit per session in this process's buckets. `--services` adds a service
(`/other`) beside the default one the requests go to: the cost of matching each request head.
`--access-log json` (or `text`) turns the access log on, written to a stream that keeps nothing
(the lines are made and flushed as on stdout, in batches). `--sealed` uses sealed session ids
(`session_ids: sealed`): the client holds a token that each request opens (a dict lookup once
opened) and each answer carries back.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import hashlib
import io
import json
import os
import pstats
import tempfile
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


API_KEY = b"micro-benchmark-api-key"


def access(args: argparse.Namespace, jwks_dir: str) -> tuple[dict[str, Any], bytes | None]:
    """The access settings of the options, and the Authorization value the requests carry."""
    settings: dict[str, Any] = {}
    credential = None
    if args.auth == "key":
        settings["auth"] = {"api_keys": [{"name": "bench", "sha256": hashlib.sha256(API_KEY).hexdigest()}]}
        credential = b"Bearer " + API_KEY
    elif args.auth is not None:
        # Imported only here: the proxy loads PyJWT only with auth, and so does its measurement.
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        key: Any
        if args.alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
            public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        path = os.path.join(jwks_dir, "jwks.json")
        with open(path, "w") as fh:
            json.dump({"keys": [{**public, "kid": "k1", "use": "sig"}]}, fh)
        issuer, audience = "https://idp.example", "http://127.0.0.1:8080/mcp"
        settings["auth"] = {"issuer": issuer, "audience": audience, "jwks_file": path}
        claims = {"iss": issuer, "aud": audience, "sub": "bench", "exp": int(time.time()) + 3600}
        token = jwt.encode(claims, key, algorithm=args.alg, headers={"kid": "k1"})
        credential = b"Bearer " + token.encode()
    if args.tool_policy:
        settings["tool_policy"] = [{"deny": ["drop_*"]}, {"allow": ["*"]}]
    if args.rate_limit:
        settings["rate_limits"] = [{"key": "session", "rate": "100000000/second"}]
    if args.access_log is not None:
        settings["log"] = {"level": "info", "access": True, "format": args.access_log}
    if args.sealed:
        key = base64.b64encode(b"micro-benchmark-session-key-32by").decode()
        settings.update(session_ids="sealed", session_keys=[key], session_binding_key="k" * 16)
    return settings, credential


class Sink(io.TextIOBase):
    """The access log's stream: takes every write, keeps nothing."""

    def write(self, text: str) -> int:
        return len(text)


def request(sid: bytes | None, sse: bool, traced: bool = False, credential: bytes | None = None) -> bytes:
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
    if credential is not None:
        lines.append(b"Authorization: " + credential)
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


def session_id_of(answer: bytes) -> bytes:
    """The Mcp-Session-Id an answer gave its client."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"mcp-session-id":
            return value.strip()
    raise RuntimeError(f"no session id in the answer: {answer[:200]!r}")


SERVICES: dict[str, Any] = {
    "services": [
        {
            "name": "other",
            "match": {"path_prefix": "/other"},
            "backends": [{"name": "s2", "url": "http://127.0.0.1:9"}],
        }
    ]
}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as jwks_dir:
        await measure(args, *access(args, jwks_dir))


async def measure(args: argparse.Namespace, settings: dict[str, Any], credential: bytes | None) -> None:
    config = parse_config(
        {
            "listen": "127.0.0.1:0",
            "backends": [{"name": "s1", "url": "http://127.0.0.1:9"}],
            "health": {"interval": 0},
            "log": {"level": "warning", "access": False},
            **settings,
            **(SERVICES if args.services else {}),
        },
        source="<micro>",
    )
    proxy = Proxy(config, access_stream=Sink())
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
    if args.services:  # what start() does, without its sockets
        proxy._plane = plane
        for service in proxy.services.values():
            service._prepared = True
        proxy._serve_services()
    upstream, up = UpstreamConnection(proxy.fleet.pools["s1"]), MemoryTransport()
    upstream.connection_made(up)  # type: ignore[arg-type]
    proxy.fleet.pools["s1"].release(upstream)
    client, down = plane.protocol_factory(), MemoryTransport()
    client.connection_made(down)  # type: ignore[arg-type]
    client.data_received(request(None, args.sse, args.tracing, credential))
    upstream.data_received(response(b"sess-1", args.sse))
    await asyncio.sleep(0.01)  # the session's binding is stored in a task
    # The id the client was given: the backend's, or with --sealed the token that names it.
    minted = session_id_of(b"".join(down.out))
    down.out.clear()
    up.out.clear()
    # --sessionless: a legacy request without a session id (a client of a stateless server).
    sid = None if args.sessionless else minted
    ask, answer = request(sid, args.sse, args.tracing, credential), response(None, args.sse)
    # --auth jwt-verify: the verified token is forgotten after each request, so each checks it.
    forget = proxy.access_filters[0]._cache.clear if args.auth == "jwt-verify" else None  # type: ignore[attr-defined]

    def relay(n: int) -> None:
        for _ in range(n):
            client.data_received(ask)
            upstream.data_received(answer)
            if not down.out or not down.out[0].startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not relayed: {b''.join(down.out)[:200]!r}")
            down.out.clear()
            up.out.clear()
            if forget is not None:
                forget()

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
    kind += " session-less" if args.sessionless else ""
    shown = {
        k: v
        for k, v in vars(args).items()
        if v and k not in ("sse", "requests", "alg", "tracing", "sessionless")
    }
    if args.auth in ("jwt", "jwt-verify"):
        shown["alg"] = args.alg
    options = ", ".join(f"{k}={v}" for k, v in shown.items())
    print(
        f"{kind}: {best * 1e6:.2f} µs of proxy Python per request (best of 5 runs of {args.requests // 5})"
        + (f" [{options}]" if options else "")
    )
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
    parser.add_argument("--sessionless", action="store_true", help="requests without a session id")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--auth", choices=("jwt", "jwt-verify", "key"), help="auth on, with this credential")
    parser.add_argument("--alg", choices=("RS256", "ES256"), default="RS256", help="the token's algorithm")
    parser.add_argument("--tool-policy", action="store_true", help="a tool policy (legacy bodies read)")
    parser.add_argument("--rate-limit", action="store_true", help="a rate limit per session (memory)")
    parser.add_argument("--services", action="store_true", help="a second service: each head is matched")
    parser.add_argument("--access-log", choices=("json", "text"), help="the access log on, in this format")
    parser.add_argument("--sealed", action="store_true", help="session_ids: sealed (clients hold tokens)")
    uvloop.run(main(parser.parse_args()))
