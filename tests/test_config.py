from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from mcpbalancer.config import (
    BackendConfig,
    Config,
    LimitsConfig,
    TimeoutsConfig,
    check_workers,
    load_config,
    parse_config,
    parse_listen,
)
from mcpbalancer.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "example.yaml"


def backend(name: object = "a", url: str = "http://127.0.0.1:8001", **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, **extra}


def minimal(**top: Any) -> dict[str, Any]:
    """A valid config with one backend, with `top` keys added or replaced."""
    return {"backends": [backend()], **top}


def config_error(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cfg.yaml")
    return str(info.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- valid configurations ---------------------------------------------------------------------------


def test_example_file_parses() -> None:
    config = load_config(EXAMPLE)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.store == "memory"
    assert [b.name for b in config.backends] == ["mcp-1", "mcp-2", "mcp-3"]
    assert [b.port for b in config.backends] == [8001, 8002, 8003]
    assert config.source == str(EXAMPLE)


def test_example_file_sets_every_key() -> None:
    # The example documents every key; a key added to the loader should be added there too.
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = ["listen", "workers", "store", "store_prefix", "local_cache_size", "session_ttl", "balance"]
    keys += ["heartbeat", "mcp_path"]
    keys += [f.name for f in dataclasses.fields(TimeoutsConfig)] + [
        f.name for f in dataclasses.fields(LimitsConfig)
    ]
    keys += ["backends", "timeouts", "limits", "name", "url", "weight"]
    missing = [key for key in keys if f"\n{key}:" not in text and f" {key}:" not in text]
    assert missing == []


def test_defaults() -> None:
    config = parse_config(minimal())
    assert config == Config(
        listen_host="127.0.0.1",
        listen_port=8080,
        store="memory",
        session_ttl=3600.0,
        balance="least_sessions",
        heartbeat=15.0,
        backends=(BackendConfig("a", "http://127.0.0.1:8001", "http", "127.0.0.1", 8001, "", 1),),
        timeouts=TimeoutsConfig(),
        limits=LimitsConfig(),
        store_prefix="mcpb:",
        local_cache_size=100_000,
        source="<config>",
    )


def test_every_key_set() -> None:
    config = parse_config(
        minimal(
            listen="0.0.0.0:0",
            store="rediss://:secret@redis.internal:6380/2",
            store_prefix="proxy-a:",
            local_cache_size=10,
            session_ttl=90.5,
            balance="p2c",
            heartbeat=0,
            timeouts={"connect": 1, "response_headers": 2.5, "stream_idle": 4},
            limits={"header_bytes": 1024, "header_count": 8, "body_bytes": 2048},
        ),
        "x.yaml",
    )
    assert (config.listen_host, config.listen_port, config.store_prefix) == ("0.0.0.0", 0, "proxy-a:")
    assert (config.session_ttl, config.heartbeat, config.balance) == (90.5, 0.0, "p2c")
    assert config.timeouts == TimeoutsConfig(connect=1.0, response_headers=2.5, stream_idle=4.0)
    assert config.limits == LimitsConfig(header_bytes=1024, header_count=8, body_bytes=2048)
    assert (config.local_cache_size, config.source) == (10, "x.yaml")


def test_integers_are_accepted_as_seconds_and_stored_as_floats() -> None:
    config = parse_config(minimal(session_ttl=60, heartbeat=5))
    assert type(config.session_ttl) is float
    assert type(config.heartbeat) is float


def test_config_is_frozen() -> None:
    config = parse_config(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.heartbeat = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.backends[0].weight = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path"),
    [
        ("http://127.0.0.1:8001", "http", "127.0.0.1", 8001, ""),
        ("http://mcp.internal", "http", "mcp.internal", 80, ""),
        ("https://mcp.internal", "https", "mcp.internal", 443, ""),
        ("HTTPS://MCP.internal:8443/", "https", "mcp.internal", 8443, ""),
        ("http://[::1]:9000/mcp", "http", "::1", 9000, "/mcp"),
        ("http://[fe80::1]", "http", "fe80::1", 80, ""),
        # The path is the server's MCP endpoint, as written: a trailing slash is the server's business.
        ("http://h:8001/base/", "http", "h", 8001, "/base/"),
        ("http://h/a/b", "http", "h", 80, "/a/b"),
    ],
)
def test_backend_url_parts(url: str, scheme: str, host: str, port: int, path: str) -> None:
    (parsed,) = parse_config(minimal(backends=[backend(url=url)])).backends
    assert (parsed.url, parsed.scheme, parsed.host, parsed.port, parsed.path) == (
        url,
        scheme,
        host,
        port,
        path,
    )


def test_duplicate_urls_are_allowed() -> None:
    same = "http://127.0.0.1:8001"
    config = parse_config(minimal(backends=[backend("a", same), backend("b", same, weight=1000)]))
    assert [(b.name, b.weight) for b in config.backends] == [("a", 1), ("b", 1000)]


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("[::1]:8080", "::1", 8080),
        ("[::]:0", "::", 0),
        ("localhost:65535", "localhost", 65535),
    ],
)
def test_listen(listen: str, host: str, port: int) -> None:
    config = parse_config(minimal(listen=listen))
    assert (config.listen_host, config.listen_port) == (host, port)
    assert parse_listen(listen) == (host, port)


def test_parse_listen_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"^admin\.listen: must be 'host:port'"):
        parse_listen("8080", "admin.listen")


@pytest.mark.parametrize(
    "store",
    ["memory", "redis://localhost", "redis://:pw@10.0.0.5:6379/1", "rediss://r", "unix:///tmp/r.sock"],
)
def test_store_values(store: str) -> None:
    assert parse_config(minimal(store=store)).store == store


@pytest.mark.parametrize(("heartbeat", "stream_idle"), [(15, 0), (15, 15.5), (0, 1), (0, 0)])
def test_stream_idle_accepted(heartbeat: float, stream_idle: float) -> None:
    config = parse_config(minimal(heartbeat=heartbeat, timeouts={"stream_idle": stream_idle}))
    assert config.timeouts.stream_idle == stream_idle


def test_null_section_means_defaults() -> None:
    # `timeouts:` with every child commented out loads as None.
    config = parse_config(minimal(timeouts=None, limits=None))
    assert (config.timeouts, config.limits) == (TimeoutsConfig(), LimitsConfig())


# --- invalid configurations -------------------------------------------------------------------------

TOP_ALLOWED = "allowed: listen, store, store_prefix, local_cache_size, session_ttl, balance, heartbeat"

ERRORS = [
    # top level
    pytest.param([1], "the top level must be a mapping of settings, got a list", id="top-list"),
    pytest.param("x", "the top level must be a mapping of settings, got 'x'", id="top-scalar"),
    pytest.param(None, "the configuration is empty", id="top-empty"),
    pytest.param(minimal(bogus=1), f"bogus: unknown key; {TOP_ALLOWED}", id="top-unknown"),
    # listen
    pytest.param(
        minimal(listen="8080"),
        "listen: must be 'host:port' (IPv6 as '[::1]:8080'), got '8080'",
        id="listen-no-host",
    ),
    pytest.param(minimal(listen=":8080"), "listen: must be 'host:port'", id="listen-empty-host"),
    pytest.param(minimal(listen="::1:8080"), "listen: must be 'host:port'", id="listen-bare-ipv6"),
    pytest.param(
        minimal(listen="[x]:80"), "listen: 'x' in brackets is not an IPv6 address", id="listen-bad-ipv6"
    ),
    pytest.param(
        minimal(listen="h:65536"), "listen: port must be 0-65535, got 65536", id="listen-port-range"
    ),
    pytest.param(minimal(listen="h:+80"), "listen: must be 'host:port'", id="listen-port-sign"),
    pytest.param(
        minimal(listen=8080), "listen: must be 'host:port' or a list of listeners, got 8080", id="listen-int"
    ),
    # store
    pytest.param(
        minimal(store="mysql://x"),
        "store: must be 'memory' or a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// "
        "URL",
        id="store-scheme",
    ),
    pytest.param(minimal(store="Memory"), "store: must be 'memory' or a redis://", id="store-word"),
    pytest.param(
        minimal(store="redis://"), "store: a redis:// URL needs a host, got 'redis://'", id="store-no-host"
    ),
    pytest.param(minimal(store="unix://"), "store: a unix:// URL needs a socket path", id="store-no-path"),
    pytest.param(minimal(store="redis://h:99999"), "store: is not a valid URL", id="store-port"),
    pytest.param(minimal(store="redis://h /0"), "store: must not contain whitespace", id="store-space"),
    pytest.param(minimal(store=""), "store: must not be empty", id="store-empty"),
    pytest.param(minimal(store_prefix=""), "store_prefix: must not be empty", id="prefix-empty"),
    pytest.param(minimal(local_cache_size=0), "local_cache_size: must be >= 1, got 0", id="cache-zero"),
    pytest.param(
        minimal(local_cache_size=1.5), "local_cache_size: must be an integer, got 1.5", id="cache-float"
    ),
    # numbers
    pytest.param(minimal(session_ttl=0), "session_ttl: must be > 0, got 0", id="ttl-zero"),
    pytest.param(minimal(session_ttl=-1.5), "session_ttl: must be > 0, got -1.5", id="ttl-negative"),
    pytest.param(minimal(session_ttl=True), "session_ttl: must be a number, got true", id="ttl-bool"),
    pytest.param(minimal(session_ttl="3600"), "session_ttl: must be a number, got '3600'", id="ttl-string"),
    pytest.param(minimal(session_ttl=None), "session_ttl: must be a number, got null", id="ttl-null"),
    pytest.param(minimal(session_ttl=float("inf")), "session_ttl: must be a finite number", id="ttl-inf"),
    pytest.param(minimal(heartbeat=-1), "heartbeat: must be >= 0, got -1", id="heartbeat-negative"),
    pytest.param(minimal(heartbeat=False), "heartbeat: must be a number, got false", id="heartbeat-bool"),
    pytest.param(
        minimal(balance="random"),
        "balance: must be one of least_sessions, p2c, round_robin; got 'random'",
        id="balance",
    ),
    # backends list
    pytest.param({}, "backends: is required", id="backends-missing"),
    pytest.param({"backends": []}, "backends: must have at least one entry", id="backends-empty"),
    pytest.param({"backends": None}, "backends: must be a list, got null", id="backends-null"),
    pytest.param({"backends": {"a": 1}}, "backends: must be a list, got a mapping", id="backends-mapping"),
    pytest.param(
        {"backends": ["http://h"]}, "backends[0]: must be a mapping, got 'http://h'", id="backend-scalar"
    ),
    # one backend
    pytest.param({"backends": [{"url": "http://h"}]}, "backends[0].name: is required", id="name-missing"),
    pytest.param({"backends": [backend(), {"name": "b"}]}, "backends[1].url: is required", id="url-missing"),
    pytest.param(
        {"backends": [backend(name="-a")]}, "backends[0].name: must be 1-64 letters, digits", id="name-dash"
    ),
    pytest.param({"backends": [backend(name="a" * 65)]}, "backends[0].name: must be 1-64", id="name-long"),
    pytest.param({"backends": [backend(name="a:b")]}, "backends[0].name: must be 1-64", id="name-colon"),
    pytest.param({"backends": [backend(name=7)]}, "backends[0].name: must be a string, got 7", id="name-int"),
    pytest.param(
        {"backends": [backend("a"), backend("b"), backend("a")]},
        "backends[2].name: duplicate name 'a' (also backends[0].name)",
        id="name-duplicate",
    ),
    pytest.param(
        {"backends": [backend(), backend("b", "ftp://x")]},
        "backends[1].url: must be an http:// or https:// URL, got 'ftp://x'",
        id="url-scheme",
    ),
    pytest.param(
        {"backends": [backend(url="127.0.0.1:8001")]},
        "backends[0].url: must be an http://",
        id="url-no-scheme",
    ),
    pytest.param(
        {"backends": [backend(url="http://h/?a=1")]},
        "backends[0].url: must not have a query or fragment",
        id="url-query",
    ),
    pytest.param(
        {"backends": [backend(url="http://h/?")]},
        "backends[0].url: must not have a query",
        id="url-empty-query",
    ),
    pytest.param(
        {"backends": [backend(url="http://h/#x")]},
        "backends[0].url: must not have a query or fragment",
        id="url-fragment",
    ),
    pytest.param(
        {"backends": [backend(url="http://u:pw@h")]},
        "backends[0].url: must not contain user info",
        id="url-userinfo",
    ),
    pytest.param(
        {"backends": [backend(url="http://:8001")]}, "backends[0].url: has no host", id="url-no-host"
    ),
    pytest.param(
        {"backends": [backend(url="http://h:0")]}, "backends[0].url: port must be 1-65535", id="url-port-zero"
    ),
    pytest.param(
        {"backends": [backend(url="http://h:99999")]},
        "backends[0].url: is not a valid URL",
        id="url-port-range",
    ),
    pytest.param(
        {"backends": [backend(url="http://[::1")]}, "backends[0].url: is not a valid URL", id="url-ipv6"
    ),
    pytest.param({"backends": [backend(url="")]}, "backends[0].url: must not be empty", id="url-empty"),
    pytest.param(
        {"backends": [backend(weight=0)]}, "backends[0].weight: must be >= 1, got 0", id="weight-zero"
    ),
    pytest.param(
        {"backends": [backend(weight=1001)]}, "backends[0].weight: must be <= 1000, got 1001", id="weight-big"
    ),
    pytest.param(
        {"backends": [backend(weight=True)]},
        "backends[0].weight: must be an integer, got true",
        id="weight-bool",
    ),
    pytest.param(
        {"backends": [backend(weight=1.5)]},
        "backends[0].weight: must be an integer, got 1.5",
        id="weight-float",
    ),
    pytest.param(
        {"backends": [backend(weight="2")]},
        "backends[0].weight: must be an integer, got '2'",
        id="weight-string",
    ),
    pytest.param(
        {"backends": [backend(), backend("b", wieght=2)]},
        "backends[1].wieght: unknown key; allowed: name, url, weight",
        id="backend-unknown",
    ),
    # timeouts and limits
    pytest.param(minimal(timeouts=[]), "timeouts: must be a mapping, got a list", id="timeouts-list"),
    pytest.param(
        minimal(timeouts={"conect": 1}),
        "timeouts.conect: unknown key; allowed: connect, response_headers, stream_idle",
        id="timeouts-unknown",
    ),
    pytest.param(minimal(timeouts={"connect": 0}), "timeouts.connect: must be > 0, got 0", id="connect-zero"),
    pytest.param(
        minimal(timeouts={"connect": True}), "timeouts.connect: must be a number, got true", id="connect-bool"
    ),
    pytest.param(
        minimal(timeouts={"response_headers": -1}), "timeouts.response_headers: must be > 0", id="headers-neg"
    ),
    pytest.param(
        minimal(timeouts={"stream_idle": -1}),
        "timeouts.stream_idle: must be >= 0, got -1",
        id="idle-negative",
    ),
    pytest.param(
        minimal(timeouts={"stream_idle": 10}),
        "timeouts.stream_idle: must be greater than heartbeat (15) or 0 (off), got 10",
        id="idle-below-heartbeat",
    ),
    pytest.param(
        minimal(heartbeat=5, timeouts={"stream_idle": 5}),
        "timeouts.stream_idle: must be greater than heartbeat (5) or 0 (off), got 5",
        id="idle-equal-heartbeat",
    ),
    pytest.param(
        minimal(limits={"header_bytes": 1023}),
        "limits.header_bytes: must be >= 1024, got 1023",
        id="header-bytes",
    ),
    pytest.param(
        minimal(limits={"header_count": 7}), "limits.header_count: must be >= 8, got 7", id="header-count"
    ),
    pytest.param(
        minimal(limits={"body_bytes": 1e6}),
        "limits.body_bytes: must be an integer, got 1000000.0",
        id="body-float",
    ),
    pytest.param(
        minimal(limits={"body": 1}), "limits.body: unknown key; allowed: header_bytes", id="limits-unknown"
    ),
]


@pytest.mark.parametrize(("data", "message"), ERRORS)
def test_invalid(data: object, message: str) -> None:
    text = config_error(data)
    assert text.startswith(f"cfg.yaml: {message}"), text


def test_unknown_key_lists_every_allowed_key() -> None:
    text = config_error(minimal(Listen="x"))
    assert text.endswith(
        "heartbeat, backends, timeouts, limits, admin, metrics, log, tracing, health, shutdown_timeout, "
        "pools, routes, affinity, validate_headers, failover, allowed_origins, allowed_hosts, "
        "bind_sessions, session_binding_key, session_ids, session_keys, session_max_age, on_store_error, "
        "workers, mcp_path, auth, tool_policy, rate_limits, trusted_proxies, services; did you mean `listen`?"
    )


@pytest.mark.parametrize(
    ("data", "path", "closest"),
    [
        pytest.param(minimal(helth={"interval": 1}), "helth", "health", id="top"),
        pytest.param(minimal(backends=[backend(wieght=2)]), "backends[0].wieght", "weight", id="backend"),
        pytest.param(minimal(timeouts={"conect": 1}), "timeouts.conect", "connect", id="section"),
        pytest.param(minimal(Store="memory"), "Store", "store", id="casing"),
    ],
)
def test_unknown_key_suggests_the_closest_known_one(data: dict[str, Any], path: str, closest: str) -> None:
    text = config_error(data)
    assert text.startswith(f"cfg.yaml: {path}: unknown key; allowed: "), text
    assert text.endswith(f"; did you mean `{closest}`?"), text


def test_unknown_key_far_from_every_known_one_gets_no_suggestion() -> None:
    assert "did you mean" not in config_error(minimal(colour="blue"))


def test_store_password_is_not_echoed() -> None:
    text = config_error(minimal(store="mysql://user:hunter2@db:3306"))
    assert "hunter2" not in text
    assert "mysql://***@db:3306" in text


def test_backend_password_is_not_echoed() -> None:
    for url in ("http://u:hunter2@h", "ftp://u:hunter2@h/x"):
        assert "hunter2" not in config_error({"backends": [backend(url=url)]})


# --- files ------------------------------------------------------------------------------------------


def test_load_config_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "backends:\n  - name: a\n    url: http://h\n  - name: b\n    url: ftp://x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: backends[1].url: must be an http:// or https:// URL, got 'ftp://x'"


def test_load_config_reads_a_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: '[::1]:0'\nbackends:\n  - {name: a, url: 'http://[::1]:9000/mcp/'}\n")
    config = load_config(str(path))
    assert (config.listen_host, config.listen_port, config.source) == ("::1", 0, str(path))
    assert (config.backends[0].host, config.backends[0].path) == ("::1", "/mcp/")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read the file"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:8080\nbackends: [\n  {name: a, url: http://h}\nstore: memory\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: line 4, column 1: invalid YAML: ")


def test_yaml_tab_indent_error(tmp_path: Path) -> None:
    path = write(tmp_path, "backends:\n\t- name: a\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: line 2, column 1: invalid YAML"):
        load_config(path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml: the configuration is empty"):
        load_config(write(tmp_path, "# nothing yet\n"))


def test_yaml_tags_are_refused(tmp_path: Path) -> None:
    # safe_load: no Python objects from a config file.
    path = write(tmp_path, "backends: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: .*invalid YAML"):
        load_config(path)


# --- managed backends (`command`) -----------------------------------------------------------------


def managed(name: str = "m", command: str = "python server.py --port {port}", **extra: Any) -> dict[str, Any]:
    return {"name": name, "command": command, **extra}


def test_managed_backend_expands_to_named_replicas() -> None:
    config = parse_config({"backends": [backend("a"), managed(replicas=3, weight=2)]})
    assert [b.name for b in config.backends] == ["a", "m-1", "m-2", "m-3"]
    first, *replicas = config.backends
    assert first.command is None
    for b in replicas:
        assert (b.command, b.url, b.host, b.port, b.weight) == (
            "python server.py --port {port}",
            "",
            "127.0.0.1",
            0,
            2,
        )


def test_managed_backend_without_replicas_is_one_suffixed_instance() -> None:
    config = parse_config({"backends": [managed("solo", "srv")]})
    assert [b.name for b in config.backends] == ["solo-1"]


def test_demo_file_parses() -> None:
    config = load_config(EXAMPLE.parent / "demo.yaml")
    assert [b.name for b in config.backends] == ["demo-1", "demo-2", "demo-3"]
    assert all(b.command is not None and "{port}" in b.command for b in config.backends)
    assert config.store == "memory"


MANAGED_ERRORS = [
    pytest.param(
        [managed(url="http://127.0.0.1:1")],
        "backends[0].url: give either `url` or `command`",
        id="url-and-command",
    ),
    pytest.param([{"name": "m"}], "backends[0].url: is required (or `command`", id="neither"),
    pytest.param(
        [backend(replicas=2)], "backends[0].replicas: is only allowed with `command`", id="replicas-with-url"
    ),
    pytest.param([managed(replicas=0)], "backends[0].replicas: must be >= 1, got 0", id="replicas-0"),
    pytest.param([managed(replicas=65)], "backends[0].replicas: must be <= 64, got 65", id="replicas-65"),
    pytest.param([managed(replicas="3")], "backends[0].replicas: must be an integer", id="replicas-str"),
    pytest.param([managed(command="")], "backends[0].command: must not be empty", id="command-empty"),
    pytest.param([managed(command="  ")], "backends[0].command: must name a program", id="command-blank"),
    pytest.param([managed(command=["srv"])], "backends[0].command: must be a string", id="command-list"),
    pytest.param(
        [managed(command="srv 'unclosed")],
        "backends[0].command: cannot be split into words",
        id="command-quote",
    ),
    pytest.param(
        [managed(command="srv --port {prot}")],
        "backends[0].command: unknown placeholder {prot}; placeholders: {port}, {host}, {name}, {python}",
        id="placeholder-typo",
    ),
    pytest.param([managed(command="srv {0}")], "backends[0].command: ", id="placeholder-positional"),
    pytest.param(
        [managed("a" * 63, replicas=2)],
        "backends[0].name: with the replica suffix must be 1-64",
        id="name-long",
    ),
    pytest.param(
        [backend("m-2"), managed(replicas=2)],
        "backends[1].name: duplicate name 'm-2' (also backends[0].name)",
        id="replica-name-taken",
    ),
]


@pytest.mark.parametrize(("backends", "message"), MANAGED_ERRORS)
def test_invalid_managed_backend(backends: list[dict[str, Any]], message: str) -> None:
    text = config_error({"backends": backends})
    assert text.startswith(f"cfg.yaml: {message}"), text
    assert "Traceback" not in text


def test_failover_modes() -> None:
    assert parse_config(minimal()).failover == "reinitialize"
    assert parse_config(minimal(failover="replay")).failover == "replay"
    assert parse_config(minimal(failover="reinitialize")).failover == "reinitialize"
    assert config_error(minimal(failover="retry")).startswith(
        "cfg.yaml: failover: must be one of reinitialize, replay, or a mapping with `mode` and "
        "`replay_on`; got 'retry'"
    )


# --- workers ------------------------------------------------------------------------------------------

REDIS = "redis://127.0.0.1:6379/0"


def test_workers_default_to_one() -> None:
    assert parse_config(minimal()).workers == 1
    # One worker needs nothing more: the memory store and port 0 are fine.
    assert parse_config(minimal(workers=1, listen="127.0.0.1:0")).workers == 1


def test_workers_with_redis_and_a_fixed_port() -> None:
    config = parse_config(minimal(workers=4, store=REDIS, listen="0.0.0.0:8080", admin="127.0.0.1:9100"))
    assert config.workers == 4
    assert config.admin == ("127.0.0.1", 9100)  # one address for the proxy: the supervisor serves it


def test_the_admin_port_needs_no_room_for_the_workers() -> None:
    # The workers' control channels are unix sockets: nothing is bound at the admin port + k.
    config = parse_config(minimal(workers=3, store=REDIS, listen="0.0.0.0:8080", admin="127.0.0.1:65535"))
    assert config.admin == ("127.0.0.1", 65535)


WORKER_ERRORS = [
    pytest.param(minimal(workers=0), "workers: must be >= 1, got 0", id="zero"),
    pytest.param(minimal(workers="x"), "workers: must be an integer, got 'x'", id="string"),
    pytest.param(minimal(workers=2.0), "workers: must be an integer, got 2.0", id="float"),
    pytest.param(minimal(workers=True), "workers: must be an integer, got true", id="bool"),
    pytest.param(minimal(workers=5000), "workers: must be <= 1024, got 5000", id="too-many"),
    pytest.param(
        minimal(workers=2),
        "workers: 2 workers need a Redis `store` or `session_ids: sealed`: the memory store is per "
        "process, so a session initialized on one worker would be unknown (404) to the others",
        id="memory-store",
    ),
    pytest.param(
        minimal(workers=2, store=REDIS, listen="127.0.0.1:0"),
        "workers: 2 workers need a fixed `listen` port: with port 0 each worker would get a different one",
        id="port-zero",
    ),
    pytest.param(
        {"backends": [backend(), managed(replicas=2)], "workers": 3, "store": REDIS},
        "workers: 3 workers cannot run managed (`command`) backends (m-1, m-2): each worker would start "
        "its own copies",
        id="managed",
    ),
]


@pytest.mark.parametrize(("data", "message"), WORKER_ERRORS)
def test_invalid_workers(data: dict[str, Any], message: str) -> None:
    text = config_error(data)
    assert text.startswith(f"cfg.yaml: {message}"), text


def test_check_workers_names_the_flag() -> None:
    config = dataclasses.replace(parse_config(minimal(), "cfg.yaml"), workers=2)
    with pytest.raises(ConfigError) as info:
        check_workers(config, key="--workers")
    assert str(info.value).startswith("cfg.yaml: --workers: 2 workers need a Redis `store`")
