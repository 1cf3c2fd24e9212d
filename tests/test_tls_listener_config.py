"""The `listen` key as a list of plain and TLS listeners: what it loads to, every error it has, and
what a reload may change of it (the TLS files) and may not (the addresses, TLS on or off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mcpbalancer.app import restart_only_problem
from mcpbalancer.config import ListenerConfig, ServerTlsConfig, check_workers, load_config, parse_config
from mcpbalancer.errors import ConfigError

BACKENDS = [{"name": "a", "url": "http://127.0.0.1:9001"}]
TLS = {"cert": "server.pem", "key": "server.key"}


def load(listen: Any, **top: Any) -> Any:
    return parse_config({"listen": listen, "backends": BACKENDS, **top}, source="cfg.yaml")


def test_one_string_is_one_plain_listener_as_before() -> None:
    config = load("0.0.0.0:8080")
    assert (config.listen_host, config.listen_port, config.listeners) == ("0.0.0.0", 8080, ())
    assert config.all_listeners == (ListenerConfig("0.0.0.0", 8080),)


def test_a_list_holds_plain_and_tls_listeners_the_first_is_listen_host_and_port() -> None:
    config = load(["[::1]:8080", {"address": "0.0.0.0:8443", "tls": {**TLS, "min_version": "1.3"}}])
    assert (config.listen_host, config.listen_port) == ("::1", 8080)
    plain, tls = config.listeners
    assert plain == ListenerConfig("::1", 8080)
    assert tls == ListenerConfig(
        "0.0.0.0", 8443, ServerTlsConfig("server.pem", "server.key", min_version="1.3")
    )
    assert tls.tls is not None
    assert tls.tls.at == "listen[1].tls"
    assert tls.address == "0.0.0.0:8443"


def test_min_version_written_as_a_yaml_number_is_read_as_the_version(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("listen:\n  - address: 127.0.0.1:8443\n    tls: {cert: c.pem, min_version: 1.3}\n"
                    "backends:\n  - {name: a, url: 'http://127.0.0.1:9001'}\n")  # fmt: skip
    [listener] = load_config(str(path)).listeners
    assert listener.tls is not None
    assert listener.tls.min_version == "1.3"


A = "127.0.0.1:8080"
TWICE = f"listen[1].address: {A} is listed twice (also listen[0])"


def tls(**settings: Any) -> list[dict[str, Any]]:
    return [{"address": A, "tls": {**TLS, **settings}}]


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (8080, "listen: must be 'host:port' or a list of listeners, got 8080"),
        ([], "listen: must name at least one address"),
        ([A, A], TWICE),
        ([A, *tls()], TWICE),
        (["nope"], "listen[0].address: must be 'host:port'"),
        ([{"tls": TLS}], "listen[0].address: is required"),
        ([{"address": A, "port": 2}], "listen[0].port: unknown key; allowed: address, tls"),
        ([{"address": A, "tls": {}}], "listen[0].tls.cert: is required"),
        (tls(min_version="1.1"), "listen[0].tls.min_version: must be one of 1.2, 1.3"),
        (tls(require_client_cert=True), "listen[0].tls.require_client_cert: needs `client_ca`"),
        (tls(ca="x"), "listen[0].tls.ca: unknown key"),
    ],
)
def test_listen_errors_name_the_key(listen: Any, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(listen)
    assert f"cfg.yaml: {message}" in str(raised.value)


def test_two_listeners_on_port_0_are_no_duplicate() -> None:
    assert len(load(["127.0.0.1:0", {"address": "127.0.0.1:0", "tls": TLS}]).listeners) == 2


def test_workers_need_every_listener_on_a_fixed_port() -> None:
    config = load(["127.0.0.1:8080", {"address": "127.0.0.1:0", "tls": TLS}], session_ids="sealed",
                  session_keys=["A" * 43 + "="])  # fmt: skip
    with pytest.raises(ConfigError, match="workers need a fixed `listen` port"):
        check_workers(config.__class__(**{**_fields(config), "workers": 2}))


def _fields(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


@pytest.mark.parametrize(
    ("after", "restart"),
    [
        ([{"address": "127.0.0.1:8443", "tls": {**TLS, "cert": "renewed.pem"}}], False),  # TLS files: live
        ([{"address": "127.0.0.1:8443", "tls": {**TLS, "client_ca": "ca.pem"}}], False),
        ([{"address": "127.0.0.1:8444", "tls": TLS}], True),  # another address
        (["127.0.0.1:8443"], True),  # TLS turned off
        ([{"address": "127.0.0.1:8443", "tls": TLS}, "127.0.0.1:8080"], True),  # a listener added
    ],
)
def test_a_reload_may_change_the_tls_files_but_not_the_listeners(after: list[Any], restart: bool) -> None:
    running = load([{"address": "127.0.0.1:8443", "tls": TLS}])
    problem = restart_only_problem(running, load(after))
    assert (problem is not None) == restart
    if restart:
        assert problem is not None
        assert problem.startswith("`listen` changed")


def test_the_example_listen_list_loads(tmp_path: Path) -> None:
    """The list shown in config/example.yaml's comment, as a file of its own."""
    example = Path(__file__).resolve().parents[1] / "config" / "example.yaml"
    lines = example.read_text(encoding="utf-8").splitlines()
    start = lines.index("# listen:")
    block = []
    for line in lines[start:]:
        if not line.startswith("# ") or (block and not line.startswith("#   ")):
            break
        block.append(line[2:].split("  #")[0].rstrip())
    data = yaml.safe_load("\n".join(block))
    config = parse_config({**data, "backends": BACKENDS})
    assert [listener.tls is not None for listener in config.listeners] == [False, True]
    tls = config.listeners[1].tls
    assert tls is not None
    assert (tls.client_ca, tls.require_client_cert, tls.min_version) == ("certs/clients-ca.pem", False, "1.2")
