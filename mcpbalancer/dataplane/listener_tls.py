"""TLS on the listeners: the server SSLContext of each `listen` entry with `tls`, and its certificate.

The composition root builds them at start and on every reload (the files are read again then: a
renewed certificate is used by the handshakes after the reload, while open connections keep the
one they began with) and hands each to its listener's TlsEndpoint (handshake.py). A file that cannot
be read, a key that is not the certificate's, or a CA file without a certificate is a ConfigError
naming its key path; a reload that meets one is refused and the running contexts are kept.

`--check` also looks at the dates: an expired certificate (or one not valid yet) is an error, one
expiring within EXPIRY_WARNING is a warning.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from mcpbalancer.config import Config, ServerTlsConfig
from mcpbalancer.dataplane.tls import ALPN, file_path, read_file, ssl_reason
from mcpbalancer.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

EXPIRY_WARNING: Final = datetime.timedelta(days=14)
_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class ServerTls:
    """What a TLS listener serves with: its context, and its certificate's validity."""

    context: ssl.SSLContext
    not_before: datetime.datetime
    not_after: datetime.datetime
    verifies_clients: bool  # client_ca is set: a connection may carry a verified client certificate
    at: str  # the key path, `listen[i].tls`


def listener_tls(config: Config) -> list[ServerTls | None]:
    """The server TLS of every listener of `config` (None for a plain one), in `listen` order."""
    return [
        None if listener.tls is None else server_tls(listener.tls, source=config.source)
        for listener in config.all_listeners
    ]


def server_tls(tls: ServerTlsConfig, *, source: str = "<config>") -> ServerTls:
    base = os.path.dirname(source)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_RENEGOTIATION
    cert_path = file_path(base, tls.cert)
    pem = read_file(f"{tls.at}.cert", cert_path, source)
    key_path = file_path(base, tls.key) if tls.key is not None else None
    if key_path is not None:
        read_file(f"{tls.at}.key", key_path, source)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        keys = f"{tls.at}.cert" + (f", {tls.at}.key" if key_path else "")
        what = (
            "the certificate and key do not load or do not match"
            if key_path
            else "no certificate with its key"
        )
        raise ConfigError(f"{source}: {keys}: {what}: {ssl_reason(exc)}") from None
    if tls.client_ca is not None:
        _verify_clients(context, tls, base, source)
    context.set_alpn_protocols(list(ALPN))
    certificate = _first_certificate(pem, f"{tls.at}.cert", cert_path, source)
    return ServerTls(
        context,
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
        tls.client_ca is not None,
        tls.at,
    )


def _verify_clients(context: ssl.SSLContext, tls: ServerTlsConfig, base: str, source: str) -> None:
    assert tls.client_ca is not None
    key, path = f"{tls.at}.client_ca", file_path(base, tls.client_ca)
    pem = read_file(key, path, source)
    try:
        context.load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        why = ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)
        raise ConfigError(f"{source}: {key}: no usable PEM certificate in {path!r}: {why}") from None
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL


def _first_certificate(pem: str, key: str, path: str, source: str) -> x509.Certificate:
    from cryptography import x509  # only with a TLS listener: a plain proxy does not load it

    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError as exc:  # load_cert_chain took it: this is unlikely
        raise ConfigError(f"{source}: {key}: no PEM certificate in {path!r}: {exc}") from None


def date_problems(
    endpoints: list[ServerTls | None], source: str, now: datetime.datetime | None = None
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the certificates' dates, for `--check`."""
    now = now or datetime.datetime.now(datetime.UTC)
    errors, warnings = [], []
    for tls in endpoints:
        if tls is None:
            continue
        after, before = _stamp(tls.not_after), _stamp(tls.not_before)
        if tls.not_after <= now:
            errors.append(f"{source}: {tls.at}.cert: the certificate expired (notAfter {after})")
        elif tls.not_before > now:
            errors.append(f"{source}: {tls.at}.cert: the certificate is not valid yet (notBefore {before})")
        elif tls.not_after - now <= EXPIRY_WARNING:
            days = (tls.not_after - now).days
            warnings.append(
                f"{source}: {tls.at}.cert: the certificate expires in {days} days (notAfter {after})"
            )
    return errors, warnings


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def peer_subject(der: bytes | None) -> bytes | None:
    """The RFC 4514 subject of a verified client certificate (DER), as the session binding reads it."""
    if not der:
        return None
    from cryptography import x509  # loaded already by server_tls

    return x509.load_der_x509_certificate(der).subject.rfc4514_string().encode("utf-8")
