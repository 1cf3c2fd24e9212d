"""TLS termination: mcpbalancer's TLS listener against HAProxy's `bind ... ssl crt`, on this machine.

    python benchmarks/tls.py [--duration S] [--rounds N] [--connections N] [--sessions N] [--no-pin]

Both proxies get the same three stub backends, the same certificate (ECDSA P-256, made here) and
the same CPU split as benchmarks/run.py (proxy on CPU 0, stubs and wrk on CPU 1). Each listens in
plain HTTP and in TLS; sessions are made over the plain port, then wrk (`wrk_sessions.lua`, every
answer checked for status and affinity) drives:

- **keep-alive**: `--connections` connections, many requests each: plain HTTP, then HTTPS. The TLS
  column is the issue's target (>= 0.8x HAProxy's req/s, <= 1.5x its CPU per request); plain vs
  TLS of one proxy is what TLS adds on top of its plain path.
- **handshakes**: `Connection: close`, a new connection per request, in plain HTTP and over HTTPS
  (a full TLS handshake each: wrk does not resume sessions): the rate, and the proxy CPU a
  handshake costs over a plain connection.

For what is repeated (`--rounds`), the best round is kept (highest req/s, least CPU per request).
Needs haproxy and wrk (apt-get install haproxy wrk). Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import ssl
import string
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from drivers import LoadResult, Session, create_sessions
from loads import WrkLoad
from procs import LOAD_CPU, PROXY_CPU, Supervisor, free_port, pinning_available, tree_cpu_times
from run import raise_fd_limit, versions
from systems import HAPROXY_TEMPLATE, MCPBALANCER, Stub, start_stubs

MODES = ("plain keep-alive", "TLS keep-alive", "plain connection per request", "TLS handshake per request")
PLAIN = frozenset({MODES[0], MODES[2]})


@dataclass
class Proxy:
    name: str
    plain: int
    tls: int
    pid: int


@dataclass
class Run:
    result: LoadResult
    cpu_s: float

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.result.requests * 1e6 if self.result.requests else float("nan")


def certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: (cert, key, both in one file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = workdir / "tls.pem", workdir / "tls.key", workdir / "tls-both.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    return paths


def start_haproxy(sup: Supervisor, workdir: Path, stubs: Sequence[Stub], pem: Path) -> Proxy:
    plain, tls = free_port(), free_port()
    servers = "\n".join(f"    server {s.name} 127.0.0.1:{s.port}" for s in stubs)
    config = string.Template(HAPROXY_TEMPLATE.read_text()).substitute(port=plain, servers=servers)
    bind = f"    bind 127.0.0.1:{plain}\n"
    # The same floor and ALPN as mcpbalancer's listener (min_version 1.2, http/1.1).
    tls_bind = f"    bind 127.0.0.1:{tls} ssl crt {pem} alpn http/1.1 ssl-min-ver TLSv1.2\n"
    config = config.replace(bind, bind + tls_bind)
    path = workdir / "haproxy-tls.cfg"
    path.write_text(config)
    child = sup.start("haproxy", ["haproxy", "-db", "-f", str(path)], PROXY_CPU)
    child.wait_port(plain)
    return Proxy("haproxy", plain, tls, child.pid)


def start_mcpbalancer(sup: Supervisor, workdir: Path, stubs: Sequence[Stub], cert: Path, key: Path) -> Proxy:
    plain, tls = free_port(), free_port()
    lines = [
        "listen:",
        f'  - "127.0.0.1:{plain}"',
        f'  - address: "127.0.0.1:{tls}"',
        "    tls:",
        f'      cert: "{cert}"',
        f'      key: "{key}"',
        "log:",
        "  level: warning",
        "  access: false",
        "backends:",
    ]
    for s in stubs:
        lines += [f"  - name: {s.name}", f'    url: "http://127.0.0.1:{s.port}"']
    path = workdir / "mcpb-tls.yaml"
    path.write_text("\n".join(lines) + "\n")
    argv = [str(MCPBALANCER), "--config", str(path), "--log-level", "warning"]
    child = sup.start("mcpb-tls", argv, PROXY_CPU)
    child.wait_port(plain)
    return Proxy("mcpbalancer", plain, tls, child.pid)


async def measure(
    proxy: Proxy, sessions: Sequence[Session], mode: str, args: argparse.Namespace, load: WrkLoad
) -> Run:
    port = proxy.plain if mode in PLAIN else proxy.tls
    moved = [Session(s.sid, s.owner, port) for s in sessions]
    before = tree_cpu_times(proxy.pid)
    result = await load.run(moved, args.duration, args.connections, sse=False)
    return Run(result, (tree_cpu_times(proxy.pid) - before).total)


def best(runs: Sequence[Run]) -> tuple[float, float]:
    """The highest req/s and the least CPU per request over the rounds."""
    return max(r.result.rate for r in runs), min(r.cpu_us for r in runs)


async def bench(args: argparse.Namespace, sup: Supervisor, workdir: Path, pin: bool) -> list[str]:
    cert, key, both = certificate(workdir)
    stubs = start_stubs(sup, 3, 1000.0)
    proxies = [start_haproxy(sup, workdir, stubs, both), start_mcpbalancer(sup, workdir, stubs, cert, key)]
    loads = {
        MODES[0]: WrkLoad(workdir, pin),
        MODES[1]: WrkLoad(workdir, pin, scheme="https"),
        MODES[2]: WrkLoad(workdir, pin, close=True),
        MODES[3]: WrkLoad(workdir, pin, scheme="https", close=True),
    }
    figures: dict[tuple[str, str], tuple[float, float]] = {}
    errors = 0
    for proxy in proxies:
        sessions = await create_sessions([proxy.plain], args.sessions)
        for mode in MODES:
            print(f"== {proxy.name}: {mode}", flush=True)
            runs = [await measure(proxy, sessions, mode, args, loads[mode]) for _ in range(args.rounds)]
            errors += sum(r.result.errors for r in runs)
            figures[proxy.name, mode] = best(runs)
    lines = [
        "| mode | HAProxy req/s | mcpbalancer req/s | ratio | HAProxy CPU µs/req | mcpbalancer CPU µs/req "
        "| ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        (h_rate, h_cpu), (m_rate, m_cpu) = figures["haproxy", mode], figures["mcpbalancer", mode]
        lines.append(
            f"| {mode} | {h_rate:,.0f} | {m_rate:,.0f} | {m_rate / h_rate:.2f}x | {h_cpu:.1f} | {m_cpu:.1f} "
            f"| {m_cpu / h_cpu:.2f}x |"
        )
    for name in ("haproxy", "mcpbalancer"):
        plain, tls = figures[name, MODES[0]], figures[name, MODES[1]]
        lines.append(
            f"\n{name}: TLS keep-alive adds {tls[1] - plain[1]:.1f} µs of proxy CPU per request "
            f"({tls[1] / plain[1]:.2f}x its plain path); a TLS handshake per request costs "
            f"{figures[name, MODES[3]][1] - figures[name, MODES[2]][1]:.0f} µs of proxy CPU more than a "
            "plain connection per request."
        )
    if errors:
        lines.append(f"\n{errors} requests failed or went to the wrong backend.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode, the best kept (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--sessions", type=int, default=100, help="sessions the requests spread over")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    missing = [tool for tool in ("haproxy", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)} (apt-get install haproxy wrk)", file=sys.stderr)
        return 2
    pin = pinning_available() and not args.no_pin
    if pin:
        os.sched_setaffinity(0, {LOAD_CPU})  # the sessions' driver, beside wrk and the stubs
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="mcpbench-tls-"))
    sup = Supervisor(workdir, pin)
    try:
        lines = uvloop.run(bench(args, sup, workdir, pin))
    finally:
        sup.stop_all()
    env = {**versions(), "openssl (python)": ssl.OPENSSL_VERSION}
    print("", *(f"- {k}: {v}" for k, v in env.items()), sep="\n")
    print(f"- pinned: {'proxy on CPU 0, load on CPU 1' if pin else 'no'}\n")
    print("\n".join(lines))
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any("failed" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
