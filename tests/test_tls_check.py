"""`mcpbalancer --check` of a TLS listener's files, as a subprocess: an unreadable file, a key that is
not the certificate's, an expired (or not yet valid) certificate fail it with the key path and the
date; one expiring within 14 days is a warning; a good one passes."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.config import ServerTlsConfig
from mcpbalancer.dataplane.listener_tls import date_problems, server_tls
from tests.fixtures.tls import Pki
from tests.pki import Issued
from tests.test_cli import run

DAY = datetime.timedelta(days=1)


def write(tmp_path: Path, tls: dict[str, Any]) -> Path:
    config = tmp_path / "tls.yaml"
    data = {
        "listen": ["127.0.0.1:0", {"address": "127.0.0.1:0", "tls": tls}],
        "backends": [{"name": "a", "url": "http://127.0.0.1:9001"}],
    }
    config.write_text(yaml.safe_dump(data))
    return config


async def check(config: Path) -> tuple[int, str, str]:
    return await run(sys.executable, "-m", "mcpbalancer", "--config", str(config), "--check")


def pair(issued: Issued) -> dict[str, Any]:
    return {"cert": str(issued.cert), "key": str(issued.key)}


async def test_a_good_certificate_passes(pki: Pki, tmp_path: Path) -> None:
    long_lived = pki.ca.issue("long-lived", valid=(-DAY, 90 * DAY))
    status, out, err = await check(write(tmp_path, {**pair(long_lived), "client_ca": str(pki.ca.cert)}))
    assert (status, err) == (0, "")
    assert "OK" in out


async def test_an_unreadable_file_fails_naming_its_key(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    status, _, err = await check(write(tmp_path, {"cert": str(missing), "key": str(pki.server.key)}))
    assert status == 2
    assert "listen[1].tls.cert: cannot read" in err
    assert "No such file or directory" in err
    status, _, err = await check(write(tmp_path, {**pair(pki.server), "client_ca": str(missing)}))
    assert status == 2
    assert "listen[1].tls.client_ca: cannot read" in err


async def test_a_key_that_is_not_the_certificates_fails(pki: Pki, tmp_path: Path) -> None:
    status, _, err = await check(write(tmp_path, {"cert": str(pki.server.cert), "key": str(pki.client.key)}))
    assert status == 2
    assert "listen[1].tls.cert, listen[1].tls.key: the certificate and key do not load or do not match" in err
    assert "KEY_VALUES_MISMATCH" in err or "key values mismatch" in err


@pytest.mark.parametrize(
    ("valid", "problem", "date"),
    [
        ((-10 * DAY, -DAY), "the certificate expired (notAfter ", -DAY),
        ((DAY, 10 * DAY), "the certificate is not valid yet (notBefore ", DAY),
    ],
)
async def test_an_expired_or_not_yet_valid_certificate_fails_with_its_date(
    valid: tuple[datetime.timedelta, datetime.timedelta],
    problem: str,
    date: datetime.timedelta,
    pki: Pki,
    tmp_path: Path,
) -> None:
    issued = pki.ca.issue(f"dated{valid[0].days}", valid=valid)
    status, _, err = await check(write(tmp_path, pair(issued)))
    assert status == 2
    assert f"listen[1].tls.cert: {problem}" in err
    day = (datetime.datetime.now(datetime.UTC) + date).strftime("%Y-%m-%d")
    assert day in err


async def test_a_certificate_expiring_within_14_days_is_a_warning(pki: Pki, tmp_path: Path) -> None:
    soon = pki.ca.issue("soon", valid=(-DAY, 5 * DAY + datetime.timedelta(hours=1)))
    status, out, err = await check(write(tmp_path, pair(soon)))
    assert status == 0
    assert "OK" in out
    assert "mcpbalancer: warning: " in err
    assert "listen[1].tls.cert: the certificate expires in 5 days (notAfter " in err


def test_the_dates_are_read_from_the_certificate(pki: Pki) -> None:
    later = pki.ca.issue("later", valid=(-DAY, 30 * DAY))
    tls = server_tls(ServerTlsConfig(cert=str(later.cert), key=str(later.key), at="listen[0].tls"))
    now = datetime.datetime.now(datetime.UTC)
    assert abs((tls.not_after - now) - 30 * DAY) < datetime.timedelta(minutes=5)
    assert date_problems([None, tls], "f.yaml") == ([], [])
    errors, warnings = date_problems([tls], "f.yaml", now=now + 20 * DAY)
    assert errors == []
    assert warnings[0].startswith("f.yaml: listen[0].tls.cert: the certificate expires in 9 days")
    errors, _ = date_problems([tls], "f.yaml", now=now + 31 * DAY)
    assert errors[0].startswith("f.yaml: listen[0].tls.cert: the certificate expired (notAfter ")
