"""Helpers of the TLS listener tests: a config with a TLS listener, client contexts trusting the test
CA, the handshake-failure counts, and what certificate a new handshake is served. (The fixture
`file_proxy`, a proxy started from a file for reloads, is in tests/fixtures/tls.py.)"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcpbalancer.app import Proxy
from mcpbalancer.observability.metrics import TLS_FAILURE_REASONS
from tests.fixtures.proxy import HasUrl
from tests.fixtures.tls import Pki
from tests.pki import Issued


def tls_config(
    backends: Sequence[HasUrl],
    pki: Pki,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    **tls: Any,
) -> dict[str, Any]:
    """A config whose one listener is TLS on 127.0.0.1 port 0, with the test CA's server certificate."""
    section = {"cert": str(cert or pki.server.cert), "key": str(key or pki.server.key), **tls}
    return {
        "listen": [{"address": "127.0.0.1:0", "tls": section}],
        "backends": [{"name": b.name, "url": b.url} for b in backends],
        "health": {"interval": 0},
    }


def client_context(pki: Pki, *, cert: Issued | None = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting `cert` when given."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def failures(proxy: Proxy) -> dict[str, float]:
    """mcpbalancer_tls_handshake_failures_total by reason."""
    registry = proxy.metrics.registry
    name = "mcpbalancer_tls_handshake_failures_total"
    return {r: registry.get_sample_value(name, {"reason": r}) or 0.0 for r in TLS_FAILURE_REASONS}


def served_certificate(port: int, context: ssl.SSLContext) -> str:
    """The SHA-256 of the certificate a new handshake on `port` is served (blocking)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()
