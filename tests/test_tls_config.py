"""The `tls` section of an https backend: validation, the contexts built from it (files read, errors
naming the key), `--check`, reload, and the pools a reload keeps or replaces."""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.config import TlsConfig, load_config, parse_config
from mcpbalancer.dataplane.tls import backend_contexts, client_context, tls_problem
from mcpbalancer.dataplane.upstream import UpstreamPool
from mcpbalancer.errors import ConfigError
from mcpbalancer.fleet.lifecycle import Fleet
from tests.fixtures.tls import Pki
from tests.mcp_helpers import DEADLINE


def https(tls: object = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "s", "url": "https://127.0.0.1:8443", **extra}
    if tls is not None:
        entry["tls"] = tls
    return {"backends": [entry]}


def config_error(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    return str(info.value)


# --- validation ----------------------------------------------------------------------------------


def test_an_https_backend_verifies_by_default_and_an_http_one_has_no_tls() -> None:
    config = parse_config({"backends": [https()["backends"][0], {"name": "p", "url": "http://127.0.0.1:1"}]})
    assert config.backends[0].tls == TlsConfig()
    assert config.backends[1].tls is None


def test_every_tls_key_is_read() -> None:
    tls = {"ca": "ca.pem", "server_name": "mcp.internal", "cert": "c.pem", "key": "c.key"}
    [backend] = parse_config(https(tls)).backends
    assert backend.tls == TlsConfig(ca="ca.pem", server_name="mcp.internal", cert="c.pem", key="c.key")
    assert backend.tls.at == "backends[0].tls"
    [lax] = parse_config(https({"insecure_skip_verify": True, "server_name": "::1"})).backends
    assert lax.tls == TlsConfig(server_name="::1", insecure_skip_verify=True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"backends": [{"name": "p", "url": "http://127.0.0.1:1", "tls": {"ca": "x"}}]},
            "backends[0].tls: is only for an https:// `url`; this backend is plain HTTP",
            id="plain-http",
        ),
        pytest.param(
            {"backends": [{"name": "m", "command": "python x.py --port {port}", "tls": {}}]},
            "backends[0].tls: is only for an https:// `url`; managed backends serve plain HTTP on 127.0.0.1",
            id="managed",
        ),
        pytest.param(
            https({"key": "c.key"}),
            "backends[0].tls.key: needs `cert`: the client certificate this key belongs to",
            id="key-without-cert",
        ),
        pytest.param(
            https({"ca": "ca.pem", "insecure_skip_verify": True}),
            "backends[0].tls.ca: has no effect with insecure_skip_verify: nothing is verified",
            id="ca-and-insecure",
        ),
        pytest.param(
            https({"insecure_skip_verify": "yes"}),
            "backends[0].tls.insecure_skip_verify: must be true or false, got 'yes'",
            id="insecure-not-bool",
        ),
        pytest.param(
            https({"server_name": "bad name"}),
            "backends[0].tls.server_name: must be a host name or an IP address, such as 'mcp.internal', "
            "got 'bad name'",
            id="server-name",
        ),
        pytest.param(
            https({"verify": False}),
            "backends[0].tls.verify: unknown key; allowed: ca, server_name, cert, key, insecure_skip_verify",
            id="unknown-key",
        ),
        pytest.param(https(["ca.pem"]), "backends[0].tls: must be a mapping, got a list", id="not-a-mapping"),
        pytest.param(https({"ca": ""}), "backends[0].tls.ca: must not be empty", id="empty-path"),
    ],
)
def test_invalid_tls(data: dict[str, Any], message: str) -> None:
    assert config_error(data) == f"cfg.yaml: {message}"


# --- contexts ------------------------------------------------------------------------------------


def test_contexts_verify_by_default_trust_a_private_ca_and_load_a_client_certificate(pki: Pki) -> None:
    default = client_context(TlsConfig())
    assert default.verify_mode is ssl.CERT_REQUIRED
    assert default.check_hostname
    assert default.cert_store_stats() == ssl.create_default_context().cert_store_stats()  # the system's
    private = client_context(
        TlsConfig(ca=str(pki.ca.cert), cert=str(pki.client.cert), key=str(pki.client.key))
    )
    assert [c["subject"] for c in private.get_ca_certs()] == [((("commonName", "mcpbalancer test CA"),),)]
    lax = client_context(TlsConfig(insecure_skip_verify=True))
    assert (lax.verify_mode, lax.check_hostname) == (ssl.CERT_NONE, False)


def test_a_key_in_the_cert_file_needs_no_key(pki: Pki, tmp_path: Path) -> None:
    both = tmp_path / "both.pem"
    both.write_bytes(pki.client.cert.read_bytes() + pki.client.key.read_bytes())
    client_context(TlsConfig(cert=str(both)))


def test_relative_paths_are_read_from_the_config_files_directory(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.ca.cert.read_bytes())
    path = tmp_path / "cfg.yaml"
    path.write_text("backends:\n  - name: s\n    url: https://127.0.0.1:8443\n    tls: {ca: ca.pem}\n")
    [context] = backend_contexts(load_config(path)).values()
    assert len(context.get_ca_certs()) == 1


def _bad_files(pki: Pki, tmp_path: Path) -> dict[str, tuple[dict[str, str], str]]:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    missing = str(tmp_path / "missing.pem")
    return {
        "missing-ca": (
            {"ca": missing},
            f"backends[0].tls.ca: cannot read {missing!r}: No such file or directory",
        ),
        "ca-is-a-directory": (
            {"ca": str(tmp_path)},
            f"backends[0].tls.ca: cannot read {str(tmp_path)!r}: Is a directory",
        ),
        "ca-not-pem": ({"ca": str(junk)}, f"backends[0].tls.ca: no usable PEM certificate in {str(junk)!r}"),
        "missing-cert": ({"cert": missing}, f"backends[0].tls.cert: cannot read {missing!r}"),
        "missing-key": (
            {"cert": str(pki.client.cert), "key": missing},
            f"backends[0].tls.key: cannot read {missing!r}",
        ),
        "key-mismatch": (
            {"cert": str(pki.client.cert), "key": str(pki.server.key)},
            "backends[0].tls.cert, backends[0].tls.key: the certificate and key do not load or do not match",
        ),
        "cert-without-its-key": (
            {"cert": str(pki.client.cert)},
            "backends[0].tls.cert: no certificate with its key",
        ),
    }


BAD_FILES = ["missing-ca", "ca-is-a-directory", "ca-not-pem", "missing-cert", "missing-key", "key-mismatch"]


@pytest.mark.parametrize("case", [*BAD_FILES, "cert-without-its-key"])
def test_an_unusable_tls_file_is_a_config_error_naming_the_key(pki: Pki, tmp_path: Path, case: str) -> None:
    tls, message = _bad_files(pki, tmp_path)[case]
    config = parse_config(https(tls), "cfg.yaml")
    with pytest.raises(ConfigError) as info:
        backend_contexts(config)
    assert str(info.value).startswith(f"cfg.yaml: {message}"), str(info.value)
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: backends\[0\]\.tls"):
        Proxy(config)  # the proxy is never built without its contexts


async def mcpbalancer(config: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mcpbalancer", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _yaml(ca: Path) -> str:
    backends = f"backends:\n  - name: s\n    url: https://127.0.0.1:8443\n    tls: {{ca: {ca}}}\n"
    return "listen: 127.0.0.1:0\n" + backends


async def test_check_and_start_read_the_tls_files(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    path = tmp_path / "cfg.yaml"
    path.write_text(_yaml(missing))
    for check in (["--check"], []):  # serving refuses to start too, naming the key
        status, out, err = await mcpbalancer(path, *check)
        assert status == 2, (out, err)
        assert f"{path}: backends[0].tls.ca: cannot read {str(missing)!r}" in err
        assert "Traceback" not in err
    path.write_text(_yaml(pki.ca.cert))
    status, out, _ = await mcpbalancer(path, "--check")
    assert status == 0
    assert "OK" in out


# --- reload --------------------------------------------------------------------------------------


def _write(path: Path, tls: str) -> None:
    path.write_text(
        "listen: 127.0.0.1:0\nhealth: {interval: 0}\n"
        f"backends:\n  - name: s\n    url: https://127.0.0.1:8443\n    tls: {tls}\n"
    )


async def test_reload_reads_the_tls_files_again_and_refuses_unusable_ones(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    _write(path, f"{{ca: {pki.ca.cert}}}")
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        backend = proxy.backends.get("s")
        assert backend is not None
        first, pool = backend.ssl_context, proxy.fleet.pools["s"]
        proxy.reload()  # the same settings: the files are read again, the idle connections kept
        assert backend.ssl_context is not first
        assert proxy.fleet.pools["s"] is pool
        _write(path, f"{{ca: {pki.stranger.cert}}}")
        proxy.reload()  # other settings: a new pool, so no connection made under the old ones is used
        assert proxy.fleet.pools["s"] is not pool
        assert [c["subject"] for c in backend.ssl_context.get_ca_certs()] == [  # type: ignore[union-attr]
            ((("commonName", "untrusted test CA"),),)
        ]
        _write(path, f"{{ca: {tmp_path / 'gone.pem'}}}")
        kept = backend.ssl_context
        with pytest.raises(ConfigError, match=r"backends\[0\]\.tls\.ca: cannot read"):
            proxy.reload()
        assert backend.ssl_context is kept
    finally:
        await proxy.stop()


def test_an_https_backend_is_never_built_without_a_context() -> None:
    configs = parse_config(https()).backends
    with pytest.raises(ValueError, match="no TLS context"):
        Fleet(configs, pool=lambda backend: UpstreamPool(backend, connect_timeout=1.0))


def test_tls_problems_read_as_the_operator_needs_them() -> None:
    refused = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    refused.verify_message = "unable to get local issuer certificate"
    assert (
        tls_problem(refused, handshake=True)
        == "certificate verify failed: unable to get local issuer certificate"
    )
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert tls_problem(plain, handshake=True) == (
        "wrong version number (the backend does not seem to speak TLS on this port)"
    )
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    assert tls_problem(eof, handshake=False) is None  # a plain close once the connection is up
    assert tls_problem(eof, handshake=True) == "EOF occurred in violation of protocol"
    assert tls_problem(ConnectionResetError(), handshake=True) is None
    assert tls_problem(None, handshake=False) is None
