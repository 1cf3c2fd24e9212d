"""`mcpbalancer admin ...`: the admin API from the command line.

It reaches the admin listener of a configuration file (its `admin` address, a wildcard one on the
loopback address, and its first token), or a URL with the token in MCPBALANCER_ADMIN_TOKEN. The
answers are printed for people (a table of the backends, one line for a change), or as the JSON the
server sent (`--json`). Exit 0 when the server answered 2xx, 1 otherwise (its error on stderr).
A plain blocking client (http.client): one request, then the process ends.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO
from urllib.parse import quote, urlsplit

from mcpbalancer.config import Config, host_port
from mcpbalancer.control.healthcheck import healthz_address

TOKEN_ENV: Final = "MCPBALANCER_ADMIN_TOKEN"
TIMEOUT: Final = 30.0  # a reload with workers waits for every worker
COMMANDS: Final = ("backends", "services", "drain", "undrain", "reload")


class AdminError(Exception):
    """The request could not be made, or the server refused it: the message says which."""


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # scheme://host:port, no path
    token: str | None


def from_config(config: Config) -> Target:
    """The admin listener `config` names, with its first token."""
    if config.admin is None:
        raise AdminError(f"{config.source}: no `admin` listener is configured")
    host, port = healthz_address(config)
    if port == 0:
        raise AdminError(f"{config.source}: admin port 0 is picked at start-up; give it a port or use --url")
    token = config.admin_tokens[0] if config.admin_tokens else None
    return Target(f"http://{host_port(host, port)}", token)


def from_url(url: str, environ: dict[str, str] | None = None) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AdminError(f"--url must be http://host:port or https://host:port, got {url!r}")
    token = (os.environ if environ is None else environ).get(TOKEN_ENV) or None
    return Target(f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", token)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any  # the JSON answer, or its text


def call(target: Target, method: str, path: str, timeout: float = TIMEOUT) -> Answer:
    parts = urlsplit(target.url + path)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.netloc, timeout=timeout)
    headers = {"Accept": "application/json"}
    if target.token is not None:
        headers["Authorization"] = f"Bearer {target.token}"
    try:
        connection.request(method, parts.path, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise AdminError(f"{target.url}: {str(exc) or type(exc).__name__}") from None
    finally:
        connection.close()
    try:
        return Answer(response.status, json.loads(raw))
    except ValueError:
        return Answer(response.status, raw.decode("utf-8", "replace"))


def request_of(command: str, name: str | None) -> tuple[str, str]:
    """(method, path) of a command."""
    if command == "backends":
        return "GET", "/admin/backends"
    if command == "services":
        return "GET", "/admin/services"
    if command == "reload":
        return "POST", "/admin/reload"
    assert name is not None
    return "POST", f"/admin/backends/{quote(name, safe='')}/{command}"


def run(target: Target, command: str, name: str | None, *, raw: bool, out: TextIO, err: TextIO) -> int:
    method, path = request_of(command, name)
    try:
        answer = call(target, method, path)
    except AdminError as exc:
        print(f"mcpbalancer admin: {exc}", file=err)
        return 1
    if raw:
        out.write(
            json.dumps(answer.body, indent=2) + "\n" if not isinstance(answer.body, str) else answer.body
        )
    if not 200 <= answer.status < 300:
        print(f"mcpbalancer admin: HTTP {answer.status}: {error_of(answer.body)}", file=err)
        return 1
    if not raw:
        out.write(describe(command, answer.body))
    return 0


def error_of(body: Any) -> str:
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return str(body).strip() or "no reason given"


# --- for people --------------------------------------------------------------------------------------


def describe(command: str, body: Any) -> str:
    if not isinstance(body, dict):
        return f"{body}\n"
    if command == "backends":
        return table(body.get("backends", []))
    if command == "services":
        return "\n".join(_service(s) for s in body.get("services", []))
    if command == "reload":
        changes = ", ".join(
            f"{k} {', '.join(body.get(k) or []) or 'none'}" for k in ("added", "removed", "updated")
        )
        return f"reloaded: {changes}{_workers(body)}\n"
    return f"{body.get('backend')}: {body.get('state')}{_workers(body)}\n"


def _workers(body: dict[str, Any]) -> str:
    workers = body.get("workers")
    if not isinstance(workers, list):
        return ""
    done = [str(w.get("worker")) for w in workers if w.get("applied")]
    pending = [str(w.get("worker")) for w in workers if w.get("pending")]
    text = f" (worker{'s' if len(done) != 1 else ''} {', '.join(done) or 'none'}"
    return text + (f"; {', '.join(pending)} when they serve)" if pending else ")")


def _service(service: dict[str, Any]) -> str:
    match = service.get("match") or {}
    if match.get("default"):
        where = "the rest (top-level backends)"
    else:
        parts = [f"host {match['host']}" if match.get("host") else "", match.get("path_prefix") or ""]
        where = " ".join(p for p in parts if p) + ("" if match.get("strip_prefix") else " (prefix kept)")
    return f"service {service.get('name')}: {where}\n" + table(service.get("backends", []))


HEADER: Final = ("NAME", "STATE", "SESSIONS", "IN FLIGHT", "WHY DOWN")


def table(backends: Sequence[dict[str, Any]]) -> str:
    rows = [HEADER, *(_row(b) for b in backends)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = [
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def _row(backend: dict[str, Any]) -> tuple[str, str, str, str, str]:
    state = str(backend.get("state"))
    states = backend.get("states")
    if isinstance(states, dict) and len(states) > 1:  # with workers: not the same on every one
        state = ", ".join(f"{s} on {n}" for s, n in states.items())
    why = backend.get("down_reason") or backend.get("reason") if "down" in state else None
    return (
        str(backend.get("name")),
        state,
        str(backend.get("sessions", "")),
        str(backend.get("in_flight", "")),
        str(why) if why else "",
    )
