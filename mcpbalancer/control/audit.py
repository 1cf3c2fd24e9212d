"""The audit trail of the admin API: one log line per change (drain, undrain, reload) and per
refused request, saying the action, the target, the client address and the outcome; every admin
request is counted in `mcpbalancer_admin_requests_total{action, outcome}`.

The lines go to the `mcpbalancer.audit` logger: `admin drain 'b' from 10.0.0.7: ok`, with the same
facts as fields of their own in JSON (`"audit": {"action": ..., "target": ..., "client": ...,
"outcome": ...}`). A target comes from the request's path; one that is not a backend name as the
configuration allows them is quoted and cut, so a line cannot be forged through it.
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from mcpbalancer.config.checks import BACKEND_NAME
from mcpbalancer.observability.metrics import ADMIN_ACTIONS, Metrics

log = logging.getLogger("mcpbalancer.audit")

# Actions that change something: logged when they succeed too.
CHANGES: Final = frozenset({"drain", "undrain", "reload", "service_drain", "service_undrain"})
_TARGET_MAX: Final = 64


def action_of(request: web.BaseRequest) -> str:
    """The route's name when it is an admin action (ADMIN_ACTIONS), else `other`."""
    name = request.match_info.route.name if isinstance(request, web.Request) else None
    return name if name in ADMIN_ACTIONS else "other"


def target_of(request: web.BaseRequest) -> str:
    """What the request acts on: the backend of a drain, the path of anything else."""
    if isinstance(request, web.Request) and "name" in request.match_info:
        return _printable(request.match_info["name"])
    return _printable(request.path)


def _printable(text: str) -> str:
    if BACKEND_NAME.fullmatch(text) or (text.startswith("/") and text[1:].isascii() and text.isprintable()):
        return text[:_TARGET_MAX]
    return ascii(text[:_TARGET_MAX])


class Audit:
    """Writes the audit lines and counts every admin request; `metrics` None counts nothing."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def done(
        self, request: web.Request, action: str, outcome: str, detail: str = "", target: str | None = None
    ) -> None:
        """An admin request was answered: counted; logged if it changed something or failed.
        `target` is what it acted on (the file of a reload), by default what its path names."""
        if self._metrics is not None:
            self._metrics.admin_request(action, outcome)
        if action in CHANGES or outcome != "ok":
            level = logging.INFO if outcome == "ok" else logging.WARNING
            where = target if target is not None else target_of(request)
            self._line(level, action, where, request.remote, outcome, detail)

    def refused(self, request: web.BaseRequest, problem: str) -> None:
        """A request without an accepted token (`problem`: missing or invalid)."""
        action = action_of(request)
        if self._metrics is not None:
            self._metrics.admin_request(action, "unauthorized")
        detail = f"{request.method}, {problem} bearer token"
        self._line(logging.WARNING, action, target_of(request), request.remote, "unauthorized", detail)

    @staticmethod
    def _line(level: int, action: str, target: str, client: str | None, outcome: str, detail: str) -> None:
        fields = {"action": action, "target": target, "client": client, "outcome": outcome}
        suffix = f" ({detail})" if detail else ""
        log.log(
            level,
            "admin %s %s from %s: %s%s",
            action,
            target,
            client or "-",
            outcome,
            suffix,
            extra={"audit": fields},
        )
