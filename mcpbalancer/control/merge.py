"""The answers of several workers' admin API as the answer of one proxy; pure functions.

A backend's fields are merged without knowing them all, so that a field a worker adds shows up:
the counts of SUMMED are added; `state` is the one state every worker reports, or the states
joined by "," (`"up,down"`: down on some workers, up on others), with `states` counting the workers
in each; any other field is its value when the workers agree, else the largest number (a probe's
time) or the first value that is not null (a reason). `workers` keeps each worker's own fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

SUMMED: Final = frozenset({"sessions", "in_flight"})
_STATES: Final = ("up", "draining", "drained", "down")  # the order of a mixed `state`
_READINESS: Final = ("ready", "degraded", "unavailable")  # worst last

Entry = Mapping[str, Any]


def backends(per_worker: Mapping[int, Sequence[Entry]]) -> list[dict[str, Any]]:
    """The `backends` lists of the workers (worker index -> list) as one list, by name, in the
    order the workers list them."""
    names: dict[str, list[tuple[int, Entry]]] = {}
    for index, entries in per_worker.items():
        for entry in entries:
            names.setdefault(str(entry.get("name")), []).append((index, entry))
    return [_backend(name, seen) for name, seen in names.items()]


def services(per_worker: Mapping[int, Sequence[Entry]]) -> list[dict[str, Any]]:
    """The `services` lists of the workers as one list, by service name: its match as the first
    worker gives it, its backends merged as `backends` merges them."""
    seen: dict[str, dict[int, Sequence[Entry]]] = {}
    match: dict[str, Any] = {}
    for index, entries in per_worker.items():
        for entry in entries:
            name = str(entry.get("name"))
            seen.setdefault(name, {})[index] = entry.get("backends") or []
            match.setdefault(name, entry.get("match"))
    return [{"name": n, "match": match[n], "backends": backends(lists)} for n, lists in seen.items()]


def _backend(name: str, seen: list[tuple[int, Entry]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"name": name}
    fields = dict.fromkeys(key for _, entry in seen for key in entry if key != "name")
    for field in fields:
        values = [entry[field] for _, entry in seen if field in entry]
        merged[field] = _state(values) if field == "state" else _field(field, values)
    states: dict[str, int] = {}
    for _, entry in seen:
        state = str(entry.get("state"))
        states[state] = states.get(state, 0) + 1
    merged["states"] = states
    merged["workers"] = [
        {"worker": index, **{k: v for k, v in entry.items() if k != "name"}} for index, entry in seen
    ]
    return merged


def _state(values: list[Any]) -> str:
    distinct = sorted({str(v) for v in values}, key=lambda s: (_rank(s), s))
    return ",".join(distinct)


def _rank(state: str) -> int:
    return _STATES.index(state) if state in _STATES else len(_STATES)


def _field(field: str, values: list[Any]) -> Any:
    if field in SUMMED and all(_number(v) for v in values):
        return sum(values)
    if all(v == values[0] for v in values):
        return values[0]
    numbers = [v for v in values if _number(v)]
    if len(numbers) == len(values):
        return max(numbers)
    return next((v for v in values if v is not None), None)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def readiness(answers: Mapping[int, Entry | None]) -> tuple[bool, dict[str, Any]]:
    """(ready, body) of /readyz from every serving worker's answer (None: it did not answer).
    Ready when a worker serves and every serving worker is ready; the status, reason and store are
    the worst worker's, and `workers` has each worker's answer."""
    workers = [
        {"worker": index, **(body if body is not None else _SILENT)} for index, body in answers.items()
    ]
    if not workers:
        return False, {
            "status": "unavailable",
            "reason": "no worker serving",
            "store": "unknown",
            "workers": [],
        }
    worst = max(workers, key=_readiness_rank)
    ready = _readiness_rank(worst) < _READINESS.index("unavailable")
    reason = str(worst.get("reason"))
    if any(w.get("reason") != reason for w in workers):  # not every worker's: say whose
        reason = f"worker {worst['worker']}: {reason}"
    body = {"status": worst.get("status"), "reason": reason, "store": worst.get("store"), "workers": workers}
    return ready, body


_SILENT: Final = {"status": "unavailable", "reason": "no answer", "store": "unknown"}


def _readiness_rank(body: Entry) -> int:
    status = body.get("status")
    return _READINESS.index(status) if status in _READINESS else len(_READINESS)
