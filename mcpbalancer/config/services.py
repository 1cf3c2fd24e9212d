"""`services`: each entry's own Config, and the checks across services.

A service's Config is the top-level file with the service's keys in place of the top-level ones,
validated as a whole file would be (so every check across keys holds per service) and built the
same way. A key the service does not set is the top-level one's, except `backends`, `pools` and
`routes`, which name the service's own backends.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from mcpbalancer.config.build import build, check_workers
from mcpbalancer.config.file import ConfigFile, ServiceEntry
from mcpbalancer.config.models import DEFAULT_SERVICE
from mcpbalancer.config.runtime import Config, ServiceConfig
from mcpbalancer.errors import ConfigError

# The keys of a service entry that are not settings of its pool.
OWN_KEYS: Final = frozenset({"name", "match", "strip_prefix"})
# The per-service settings: every other key of a service entry.
PER_SERVICE: Final = frozenset(f.name for f in dataclasses.fields(ServiceEntry)) - OWN_KEYS
# Per-service keys a service does not take from the top level when it leaves them out.
NOT_INHERITED: Final = frozenset({"backends", "pools", "routes"})

Validate = Callable[[object], ConfigFile]
Problem = Callable[[object, ErrorDetails], str]


def build_services(
    data: Mapping[str, Any], file: ConfigFile, source: str, validate: Validate, problem: Problem
) -> tuple[ServiceConfig, ...]:
    """The `services` of a validated `file` (`data` is what it was validated from); ConfigError
    naming `services[i]....` for a problem of one, or of two together."""
    entries = file.services or ()
    if not entries:
        return ()
    raw_entries: list[Mapping[str, Any]] = list(data.get("services") or ())
    inherited = {k: v for k, v in data.items() if k != "services" and k not in NOT_INHERITED}
    services: list[ServiceConfig] = []
    for i, (entry, raw) in enumerate(zip(entries, raw_entries, strict=True)):
        if not raw.get("backends"):
            needed = "is required: a service needs at least one `url`, `command` or `discover` entry"
            raise ConfigError(f"{source}: services[{i}].backends: {needed}")
        own = {k: v for k, v in raw.items() if k in PER_SERVICE}
        derived = {**inherited, **own}
        try:
            service_file = validate(derived)
        except ValidationError as exc:
            lines = [f"{source}: {problem(data, _under(i, e))}" for e in exc.errors(include_url=False)]
            raise ConfigError("\n".join(lines)) from None
        config = _checked(build(service_file, source), source, i)
        services.append(
            ServiceConfig(
                name=entry.name,
                host=None if entry.match.host is None else entry.match.host.lower(),
                path_prefix=entry.match.path_prefix,
                strip_prefix=entry.strip_prefix,
                config=config,
            )
        )
    _check_across(services, source)
    _check_hosts(services, file.allowed_hosts, source)
    return tuple(services)


def _check_hosts(services: list[ServiceConfig], allowed: tuple[str, ...] | None, source: str) -> None:
    """A service's exact host must be one `allowed_hosts` lets in, when that list is set (unset,
    the services' hosts are added to the default list): else its requests would all get 421."""
    if not allowed:
        return
    patterns = [p.lower() for p in allowed]

    def allows(host: str) -> bool:  # as filters/hosts.py's HostPolicy matches a name
        return any(p == host or (_is_glob(p) and fnmatch.fnmatchcase(host, p)) for p in patterns)

    for i, service in enumerate(services):
        host = service.host
        if host is not None and not _is_glob(host) and not allows(host):
            raise ConfigError(
                f"{source}: services[{i}].match.host: {host!r} is not in allowed_hosts, so every request "
                "for it would get 421; add it there"
            )


def _under(index: int, error: ErrorDetails) -> ErrorDetails:
    """`error` of a service's derived file, located under `services[index]`."""
    return {**error, "loc": ("services", index, *error["loc"])}


def _checked(config: Config, source: str, index: int) -> Config:
    try:
        return check_workers(config)
    except ConfigError as exc:
        problem = str(exc).removeprefix(f"{source}: ")
        raise ConfigError(f"{source}: services[{index}].{problem}") from None


def _check_across(services: list[ServiceConfig], source: str) -> None:
    seen: dict[str, int] = {DEFAULT_SERVICE: -1}
    for i, service in enumerate(services):
        if service.name in seen:
            also = "the top-level backends" if seen[service.name] < 0 else f"services[{seen[service.name]}]"
            raise ConfigError(
                f"{source}: services[{i}].name: duplicate service name {service.name!r} ({also})"
            )
        seen[service.name] = i
    for i, service in enumerate(services):
        for j in range(i):
            problem = ambiguity(services[j], service)
            if problem is not None:
                raise ConfigError(
                    f"{source}: services[{i}].match: {problem} as services[{j}] ({services[j].name})"
                )


def ambiguity(a: ServiceConfig, b: ServiceConfig) -> str | None:
    """Why a request could match `a` and `b` equally well, or None. The longest path prefix wins;
    at the same prefix an exact host wins over a glob, and a glob over no host. Left undecided,
    so refused: the same host (or both none) at the same prefix, and two different globs at the
    same prefix that one name may match both of."""
    if a.path_prefix != b.path_prefix:
        return None
    if a.host == b.host:
        return "the same host and path_prefix"
    if a.host is None or b.host is None:
        return None
    globs = [_is_glob(a.host), _is_glob(b.host)]
    if all(globs) and _may_overlap(a.host, b.host):
        return "two host globs one name can match both of, at the same path_prefix,"
    return None


def _is_glob(host: str) -> bool:
    return "*" in host or "?" in host


def _may_overlap(a: str, b: str) -> bool:
    """Whether some name may match both globs. Conservative: True unless their literal beginnings
    (before the first wildcard) or endings (after the last) contradict each other."""
    head_a, head_b = a.split("*")[0].split("?")[0], b.split("*")[0].split("?")[0]
    tail_a, tail_b = _tail(a), _tail(b)
    heads = head_a.startswith(head_b) or head_b.startswith(head_a)
    tails = tail_a.endswith(tail_b) or tail_b.endswith(tail_a)
    return (heads and tails) or fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a)


def _tail(glob: str) -> str:
    cut = max(glob.rfind("*"), glob.rfind("?"))
    return glob[cut + 1 :]


def check_backend_names(config: Config, source: str) -> None:
    """Backend (and discovery entry) names are unique across all services: they are the sessions'
    owners in the store and the `backend` label of every series."""
    owners: dict[str, str] = {}
    for where, cfg in (("backends", config), *((f"services.{s.name}", s.config) for s in config.services)):
        names = [b.name for b in cfg.backends] + [d.name for d in cfg.discovery]
        for name in names:
            if name in owners and owners[name] != where:
                raise ConfigError(
                    f"{source}: {where}: backend name {name!r} is also in {owners[name]}; backend names "
                    "are unique across services"
                )
            owners.setdefault(name, where)


def service_config(top: Config, service: ServiceConfig) -> Config:
    """`service`'s own Config, with the store keys of its sessions, affinity entries, replay records
    and rate buckets under `<store_prefix>svc:<name>:` (the default service keeps `store_prefix`,
    so the keys a proxy wrote before `services` existed stay valid)."""
    return dataclasses.replace(
        service.config, store_prefix=f"{top.store_prefix}svc:{service.name}:", source=top.source
    )


def match_of(service: ServiceConfig | None) -> dict[str, Any]:
    if service is None:
        return {"host": None, "path_prefix": None, "strip_prefix": False, "default": True}
    return {
        "host": service.host,
        "path_prefix": service.path_prefix,
        "strip_prefix": service.strip_prefix,
        "default": False,
    }
