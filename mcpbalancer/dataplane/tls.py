"""TLS to backends: the client SSLContext of each https backend, and how a TLS failure reads.

(TLS on the listeners, the server side, is listener_tls.py; it shares the file and reason helpers.)

The composition root builds one context per https backend from its `tls` settings, at start and on
every reload, and hands it to the Backend. Everything that talks to that backend uses that one
object: the data plane's pool (which keeps TLS connections alive like plain ones), the health probe
and the replay failover. There is no plain-text fallback: an https backend gets TLS or nothing.

By default a certificate is verified against the system's CA store for the URL's host name, which is
also sent as SNI. `ca` trusts that CA file instead of the store, `server_name` verifies (and sends)
another name, `cert`/`key` present a client certificate, and `insecure_skip_verify` turns
verification off (a warning at every load).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from typing import Final

from mcpbalancer.config import Config, TlsConfig
from mcpbalancer.errors import ConfigError

log = logging.getLogger(__name__)

# The data plane and the probes speak HTTP/1.1 only; saying so keeps an h2-capable backend from
# hoping for more.
ALPN: Final = ("http/1.1",)
_SSL_NOISE = re.compile(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$")
# What some OpenSSL reasons mean for an operator, added to the reason in the log line.
_HINTS: Final = {
    "WRONG_VERSION_NUMBER": "the backend does not seem to speak TLS on this port",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the backend requires a client certificate (tls.cert)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no protocol version or cipher in common, or a client certificate "
    "is required (tls.cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the backend refused the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the backend does not trust the client certificate's CA",
}


def backend_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """The client context of every https backend of `config`, by backend name, and of every https
    `discover` entry, by entry name (all its backends share it). ConfigError (naming the file and
    the key) when a CA, certificate or key file cannot be read or used."""
    contexts: dict[str, ssl.SSLContext] = {}
    for backend in (*config.backends, *(entry.template for entry in config.discovery)):
        if backend.tls is None:
            continue
        contexts[backend.name] = client_context(backend.tls, source=config.source)
        if backend.tls.insecure_skip_verify:
            log.warning(
                "backend %s: %s.insecure_skip_verify is set: its certificate is not verified, so "
                "anyone on the network path can pose as it and read its traffic",
                backend.name,
                backend.tls.at,
            )
    return contexts


def client_context(tls: TlsConfig, *, source: str = "<config>") -> ssl.SSLContext:
    """The context of one backend's `tls` settings; relative paths are read from the directory of
    the config file `source`."""
    base = os.path.dirname(source)
    context = _trusting(tls, base, source) if tls.ca else ssl.create_default_context()
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        _client_certificate(context, tls, base, source)
    context.set_alpn_protocols(list(ALPN))
    return context


def file_path(base: str, path: str) -> str:
    return os.path.join(base, os.path.expanduser(path))


def read_file(key: str, path: str, source: str) -> str:
    """The text of a PEM file; ConfigError naming `key` (its key path) when it cannot be read."""
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{source}: {key}: cannot read {path!r}: {why}") from None


def _trusting(tls: TlsConfig, base: str, source: str) -> ssl.SSLContext:
    """A verifying context that trusts the CAs of `tls.ca` only (not the system store)."""
    assert tls.ca is not None
    key, path = f"{tls.at}.ca", file_path(base, tls.ca)
    pem = read_file(key, path, source)
    try:
        return ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        why = ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)
        raise ConfigError(f"{source}: {key}: no usable PEM certificate in {path!r}: {why}") from None


def _client_certificate(context: ssl.SSLContext, tls: TlsConfig, base: str, source: str) -> None:
    assert tls.cert is not None
    cert = file_path(base, tls.cert)
    read_file(f"{tls.at}.cert", cert, source)
    key = file_path(base, tls.key) if tls.key is not None else None
    if key is not None:
        read_file(f"{tls.at}.key", key, source)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        what = "the certificate and key do not load or do not match" if key else "no certificate with its key"
        keys = f"{tls.at}.cert" + (f", {tls.at}.key" if key else "")
        raise ConfigError(f"{source}: {keys}: {what}: {ssl_reason(exc)}") from None


def tls_problem(exc: BaseException | None, *, handshake: bool) -> str | None:
    """What went wrong in TLS, for the log; None when `exc` is no TLS failure. After the handshake
    (`handshake=False`) a TLS-level end of the connection is a plain close, not a TLS failure."""
    if not isinstance(exc, ssl.SSLError):
        return None
    if not handshake and isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return None
    if isinstance(exc, ssl.SSLCertVerificationError) and getattr(exc, "verify_message", None):
        return f"certificate verify failed: {exc.verify_message}"
    hint = _HINTS.get(getattr(exc, "reason", None) or "")  # set by OpenSSL, absent on a made-up one
    return f"{ssl_reason(exc)} ({hint})" if hint else ssl_reason(exc)


def ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, without the library and source-line noise."""
    message = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return _SSL_NOISE.sub("", message) or type(exc).__name__
