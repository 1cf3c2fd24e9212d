"""A throw-away PKI for TLS tests: a CA, and server and client certificates it signs, as PEM files.

    ca = CertificateAuthority.create(tmp_path / "ca", "test CA")
    server = ca.issue("server", dns=("localhost",), ips=("127.0.0.1",))   # server.cert, server.key
    client = ca.issue("client", client=True)

Keys are P-256 (made in microseconds, unlike RSA). Certificates are valid from an hour ago for a
day, so a clock that is a little off does not matter. A server certificate carries its names as
subjectAltName entries (what verification reads; the common name is ignored) and the serverAuth
extended key usage; a client certificate carries clientAuth.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES: tuple[str, ...] = ("localhost",)
LOCAL_IPS: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(
    builder: x509.CertificateBuilder, valid: tuple[datetime.timedelta, datetime.timedelta] | None = None
) -> x509.CertificateBuilder:
    """Valid from an hour ago for a day, or from now + valid[0] to now + valid[1]."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = valid or (-datetime.timedelta(hours=1), datetime.timedelta(days=1))
    return builder.not_valid_before(now + start).not_valid_after(now + end)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


class CertificateAuthority:
    """A self-signed CA whose certificate is `self.cert` (a PEM file) and that issues leaf certificates
    into its directory."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self._cert = cert
        self.cert = directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, common_name: str = "mcpbalancer test CA") -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        cert = builder.sign(key, hashes.SHA256())
        ca = cls(directory, key, cert)
        ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def issue(
        self,
        name: str,
        *,
        dns: Sequence[str] = LOCAL_NAMES,
        ips: Sequence[str] = LOCAL_IPS,
        client: bool = False,
        valid: tuple[datetime.timedelta, datetime.timedelta] | None = None,
    ) -> Issued:
        """A leaf certificate `<name>.pem` and key `<name>.key`: for a server with the given
        subjectAltNames, or (`client=True`) for a TLS client, named `name`; `valid` is its validity
        (from now + valid[0] to now + valid[1]) when not the default hour ago to a day on."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _validity(x509.CertificateBuilder(), valid)
            .subject_name(_name(name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, issued.key)
        return issued
