"""`services`: what the composition root (app.py) needs to run several services behind one
listener, apart from building each one (a service is built as a Proxy without a listener).

- `service_config`: a service's Config as its parts read it, its store keys under their own prefix;
- `MergedMapping`: one read-only mapping over the services' health maps (the status page's);
- `describe`: a service as GET /admin/services shows it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from mcpbalancer.config import Config
from mcpbalancer.config.runtime import ServiceConfig

V = TypeVar("V")


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


class MergedMapping(Mapping[str, V]):
    """The union of the mappings `parts` returns now (keys are unique across them: backend names)."""

    def __init__(self, parts: Callable[[], Iterable[Mapping[str, V]]]) -> None:
        self._parts = parts

    def __getitem__(self, key: str) -> V:
        for part in self._parts():
            if key in part:
                return part[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for part in self._parts():
            yield from part

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts())
