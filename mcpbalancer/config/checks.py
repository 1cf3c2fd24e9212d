"""Checks of single configuration values: pure functions that raise ValueError saying what is wrong.

The models (models.py) run them as validators; the loader turns the ValueError into an error naming
the file and the key path. Nothing here knows where a value came from.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import shlex
from collections.abc import Mapping
from typing import Final
from urllib.parse import SplitResult, urlsplit

from mcpbalancer.config.storeurl import CLUSTER_SCHEMES, SENTINEL_SCHEMES, parse_store, scheme_of

# Paths the proxy answers itself on the public listener; the metrics path must not shadow them.
PROBE_PATHS: Final = ("/healthz", "/readyz")
URL_PATH: Final = re.compile(r"/[!-~]{0,255}", re.ASCII)
URL_PATH_RULE: Final = "a path starting with '/', visible ASCII, at most 256 bytes"

# The backend name is the session's owner id in Redis: keep it short and free of separators.
BACKEND_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
BACKEND_NAME_RULE: Final = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
# Mcp-Param-<Name>: the name part is an HTTP token without the characters headers may not carry.
PARAM_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", re.ASCII)
# A DNS name or an IP address (v6 without brackets): what TLS verifies a certificate for.
SERVER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:.]{2,45}", re.ASCII)
SERVER_NAME_RULE: Final = "a host name or an IP address, such as 'mcp.internal'"
# A DNS name to look up: labels of letters, digits, '-' and '_' (SRV names start `_mcp._tcp.`),
# dot-separated, an optional final dot; at most 253 characters.
DNS_NAME: Final = re.compile(
    r"(?=[^.].{0,252}$)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?",
    re.ASCII,
)
DNS_NAME_RULE: Final = "a DNS name such as 'tools.mcp.svc.cluster.local' (letters, digits, '-', '_', dots)"
HEADER_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", re.ASCII)
HEADER_RULE: Final = "an HTTP header name such as 'authorization'"
ORIGIN: Final = re.compile(r"(?:https?)://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?", re.ASCII)
# A host name as `allowed_hosts` gives it: "*", a name, a glob of names, an IPv6 address in brackets.
HOST_NAME: Final = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*?-]+", re.ASCII)
HOST_NAME_RULE: Final = (
    "'*', a host name, a glob like '*.example.com' or an IPv6 address in brackets, without a port "
    "(any port matches)"
)
ORIGIN_RULE: Final = "'*' or an origin like 'https://app.example:8443' (no path)"

# Bracketed IPv6 or a host without colons, then a decimal port. re.ASCII keeps \d to 0-9.
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\s:/\[\]]+)):(?P<port>\d{1,5})", re.ASCII)
_REDIS_SCHEMES: Final = ("redis", "rediss")
PLACEHOLDERS: Final = ("port", "host", "name", "python")


def describe(raw: object) -> str:
    """A value as the user wrote it in YAML, for 'got ...' in messages."""
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, Mapping):
        return "a mapping"
    if isinstance(raw, list | tuple):
        return "a list"
    return repr(raw)


def split_host_port(value: str) -> tuple[str, int]:
    match = _HOST_PORT.fullmatch(value)
    if match is None:
        raise ValueError(f"must be 'host:port' (IPv6 as '[::1]:8080'), got {value!r}")
    host = match["host"] or match["v6"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    port = int(match["port"])
    if port > 65535:
        raise ValueError(f"port must be 0-65535, got {port}")
    return host, port


def check_host_port(value: str) -> str:
    split_host_port(value)
    return value


# RFC 6750's b64token, the syntax of a bearer credential: what `openssl rand -hex 32`,
# `openssl rand -base64 32` and Python's secrets.token_urlsafe() give.
ADMIN_TOKEN: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*", re.ASCII)
ADMIN_TOKEN_MIN: Final = 16


def check_admin_token(value: str) -> str:
    """A bearer token of the admin API. The messages never quote the value: it is a secret."""
    if len(value) < ADMIN_TOKEN_MIN:
        raise ValueError(
            f"must be at least {ADMIN_TOKEN_MIN} characters of random secret (e.g. `openssl rand -hex 32`), "
            f"got {len(value)} characters"
        )
    if not ADMIN_TOKEN.fullmatch(value):
        raise ValueError("must be letters, digits and - . _ ~ + / (then = padding), as a bearer token is")
    return value


def _split_url(value: str) -> SplitResult:
    # urlsplit silently strips or drops whitespace and control characters; refuse them instead.
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"must not contain whitespace or control characters, got {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - evaluated for the ValueError it raises on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc}): {redact(value)!r}") from None
    return parts


def split_backend_url(value: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a backend URL. The path is the server's MCP endpoint, kept as
    written (a trailing slash matters to the server, as it does to a client given the URL); "/" alone
    is no path."""
    parts = _split_url(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, got {redact(value)!r}")
    if "@" in parts.netloc:
        raise ValueError("must not contain user info (user:password@)")
    if "?" in value or "#" in value:
        raise ValueError(f"must not have a query or fragment, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"has no host, got {value!r}")
    if parts.port == 0:
        raise ValueError(f"port must be 1-65535, got {value!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not URL_PATH.fullmatch(parts.path or "/"):
        raise ValueError(f"the path must be visible ASCII, at most 256 bytes; got {parts.path!r}")
    return parts.scheme, parts.hostname, port, "" if parts.path == "/" else parts.path


def check_backend_url(value: str) -> str:
    split_backend_url(value)
    return value


def check_command(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"cannot be split into words ({exc}): {value!r}") from None
    if not words:
        raise ValueError("must name a program")
    try:
        for word in words:
            word.format_map(_CommandCheck())
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        problem = f"unknown placeholder {{{exc.args[0]}}}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"{problem}; placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)} "
            "(double a brace for a literal one)"
        ) from None
    return value


class _CommandCheck(dict[str, str]):
    """format_map mapping that accepts exactly the command placeholders."""

    def __missing__(self, key: str) -> str:
        if key in PLACEHOLDERS:
            return ""
        raise KeyError(key)


def split_nameserver(value: str) -> tuple[str, int]:
    """(IP address, port) of a `nameservers` entry: an IP address, `IP:port` or `[v6]:port`; port 53
    when none is given. A name would need a resolver to find the resolver."""
    host, port = value, 53
    if value.startswith("[") or value.count(":") == 1:
        host, port = split_host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"must be an IP address, optionally with a port ('10.96.0.10', '127.0.0.1:5353', "
            f"'[fd00::10]:53'), got {value!r}"
        ) from None
    if port == 0:
        raise ValueError(f"port must be 1-65535, got {value!r}")
    return host, port


def check_nameserver(value: str) -> str:
    split_nameserver(value)
    return value


def check_endpoint_path(value: str) -> str:
    """A discovered endpoint's path: like the path of a backend URL."""
    if not URL_PATH.fullmatch(value) or "?" in value or "#" in value:
        rule = "a path starting with '/', visible ASCII without '?' or '#', at most 256 bytes"
        raise ValueError(f"must be {rule}; got {value!r}")
    return value


def check_metrics_path(value: str) -> str:
    check_probe_path(value)
    if value in PROBE_PATHS:
        raise ValueError(f"must not be {value}: the proxy answers that path itself")
    return value


def check_mcp_path(value: str) -> str:
    if not URL_PATH.fullmatch(value) or "?" in value or "#" in value:
        rule = "a path starting with '/', visible ASCII without '?' or '#', at most 256 bytes"
        raise ValueError(f"must be {rule}; got {value!r}")
    if value in PROBE_PATHS:
        raise ValueError(f"must not be {value}: the proxy answers that path itself")
    return value


def check_probe_path(value: str) -> str:
    if not URL_PATH.fullmatch(value):
        raise ValueError(f"must be {URL_PATH_RULE}; got {value!r}")
    return value


def check_store(value: str) -> str:
    if value == "memory":
        return value
    if scheme_of(value) in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise ValueError("must not contain whitespace or control characters")
        try:
            parse_store(value)
        except ValueError as exc:
            raise ValueError(f"{exc}; got {redact(value)!r}") from None
        return value
    parts = _split_url(value)
    if parts.scheme not in (*_REDIS_SCHEMES, "unix"):
        kinds = "a redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// URL"
        raise ValueError(f"must be 'memory' or {kinds}, got {redact(value)!r}")
    if parts.scheme in _REDIS_SCHEMES and not parts.hostname:
        raise ValueError(f"a {parts.scheme}:// URL needs a host, got {redact(value)!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"a unix:// URL needs a socket path, got {redact(value)!r}")
    return value


def check_origin(value: str) -> str:
    """One `allowed_origins` entry, lower-cased: "*" or scheme://host[:port]."""
    if value != "*" and not ORIGIN.fullmatch(value):
        raise ValueError(f"must be {ORIGIN_RULE}, got {value!r}")
    return value.lower()


def check_host_name(value: str) -> str:
    """One `allowed_hosts` entry, lower-cased."""
    if not HOST_NAME.fullmatch(value):
        raise ValueError(f"must be {HOST_NAME_RULE}, got {value!r}")
    return value.lower()


def check_params(raw: object) -> object:
    """`match.param`: {Name: value}, both strings; the value check names the parameter and says to
    quote it, because YAML reads `Region: 1` as a number."""
    if not isinstance(raw, Mapping):
        return raw  # the model's own type check says what it must be
    for name, value in raw.items():
        if not isinstance(name, str) or not PARAM_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a parameter name (header Mcp-Param-<name>)")
        if not isinstance(value, str):
            raise ValueError(f"{name}: the value must be a string, got {describe(value)} (quote it)")
    return raw


KEY_FILE_PREFIX: Final = "file:"
MIN_SESSION_KEY_BYTES: Final = 32
SESSION_KEY_RULE: Final = (
    f"the base64 of at least {MIN_SESSION_KEY_BYTES} random bytes (`mcpbalancer keygen` prints one), "
    f"or {KEY_FILE_PREFIX}PATH naming a file that holds it"
)


def check_session_key(value: str) -> str:
    """A `session_keys` entry: a key, or a file reference read when the config is built. The
    messages never quote the value: it is a secret."""
    if value.startswith(KEY_FILE_PREFIX):
        if not value[len(KEY_FILE_PREFIX) :].strip():
            raise ValueError(f"{KEY_FILE_PREFIX} needs a path after it")
        return value
    decode_session_key(value)
    return value


def decode_session_key(text: str) -> bytes:
    """The bytes of a base64 key (standard or URL-safe alphabet, padding optional); ValueError for
    one that is not base64 or too short, without the key in the message."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        key = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is not base64: must be {SESSION_KEY_RULE}") from None
    if len(key) < MIN_SESSION_KEY_BYTES:
        raise ValueError(f"is {len(key)} bytes, too short: must be {SESSION_KEY_RULE}")
    return key


def redact(url: str) -> str:
    """The URL with any user info masked: error messages end up in logs, passwords must not."""
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{tail}"


def check_path_prefix(value: str) -> str:
    """A service's `match.path_prefix`: a path of whole segments, `/github` or `/api/v1`."""
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    if value.endswith("/"):
        hint = "; leave path_prefix out to match every path" if value == "/" else ""
        raise ValueError(f"must not end with '/' (it matches whole path segments), got {value!r}{hint}")
    if not URL_PATH.fullmatch(value) or "?" in value or "#" in value or "*" in value:
        raise ValueError(f"must be visible ASCII without '?', '#' or '*', at most 256 bytes; got {value!r}")
    return value
