"""The filter phases (filters/phases.py): how filters compose, and that the proxy registers a
filter only for a feature that is configured, so an unconfigured one costs a request nothing."""

from __future__ import annotations

from typing import Any

import pytest

from mcpbalancer.app import Proxy
from mcpbalancer.config import parse_config
from mcpbalancer.errors import Forbidden, ProxyError
from mcpbalancer.filters.affinity import AffinityLearning, RequestStateKey
from mcpbalancer.filters.failover import ReplayAlias
from mcpbalancer.filters.front_door import FrontDoor
from mcpbalancer.filters.headercheck import StrictHeaders
from mcpbalancer.filters.phases import NO_PHASES, HeadEdits, Phases, compose
from mcpbalancer.filters.route_rules import RouteRules
from mcpbalancer.filters.session_binding import SessionBinding
from mcpbalancer.fleet.backends import Backend
from mcpbalancer.routing.router import RequestFacts, classify

PHASES = (
    "early_request",
    "request",
    "wants_body",
    "request_body",
    "upstream_request",
    "response",
    "response_body",
    "logging",
    "fail_to_connect",
    "error_while_proxy",
)


class Recorder:
    """A filter at every phase, writing what it saw into a shared journal."""

    def __init__(self, name: str, journal: list[str], *, refuse: bool = False) -> None:
        self.name, self.journal, self.refuse = name, journal, refuse

    def early_request(self, head: Any) -> ProxyError | None:
        self.journal.append(f"{self.name}:early")
        return Forbidden(self.name) if self.refuse else None

    def request(self, ctx: Any, facts: RequestFacts) -> None:
        self.journal.append(f"{self.name}:request")

    def wants_body(self, facts: RequestFacts) -> bool:
        self.journal.append(f"{self.name}:wants")
        return self.refuse

    def request_body(self, facts: RequestFacts, body: bytes, message: object) -> object:
        self.journal.append(f"{self.name}:body:{message}")
        return self.name

    def upstream_request(self, facts: RequestFacts, edits: HeadEdits) -> None:
        edits.add.append(f"X-{self.name}: 1\r\n".encode())

    def response_body(self, *args: object) -> Any:
        return self

    def feed(self, data: bytes) -> None:
        self.journal.append(f"{self.name}:feed:{data.decode()}")

    def finish(self) -> None:
        self.journal.append(f"{self.name}:finish")


def test_no_filter_leaves_every_phase_empty() -> None:
    phases = compose([])
    assert all(getattr(phases, name) is None for name in PHASES)
    assert phases == NO_PHASES
    assert not phases.reads_names


def test_one_filter_is_called_directly_with_no_wrapper() -> None:
    only = Recorder("a", [])
    phases = compose([only])
    assert phases.early_request == only.early_request
    assert phases.request == only.request
    assert phases.wants_body == only.wants_body


def test_several_filters_run_in_order_and_the_first_verdict_wins() -> None:
    journal: list[str] = []
    phases = compose([Recorder("a", journal), Recorder("b", journal, refuse=True), Recorder("c", journal)])
    assert phases.early_request is not None
    verdict = phases.early_request(object())  # type: ignore[arg-type]
    assert isinstance(verdict, Forbidden)
    assert str(verdict) == "b"
    assert journal == ["a:early", "b:early"]  # c never runs: the request is refused already
    journal.clear()
    facts = classify(b"POST", None, None)
    assert phases.request is not None
    phases.request(object(), facts)  # type: ignore[arg-type]
    assert journal == ["a:request", "b:request", "c:request"]


def test_body_filters_hand_the_parsed_message_on_and_any_one_may_want_the_body() -> None:
    journal: list[str] = []
    phases = compose([Recorder("a", journal), Recorder("b", journal, refuse=True)])
    facts = classify(b"POST", None, None)
    assert phases.wants_body is not None
    assert phases.wants_body(facts)
    assert phases.request_body is not None
    phases.request_body(facts, b"{}")
    assert journal[-2:] == ["a:body:None", "b:body:a"]


def test_upstream_edits_and_body_watchers_combine() -> None:
    journal: list[str] = []
    phases = compose([Recorder("a", journal), Recorder("b", journal)])
    assert phases.upstream_request is not None
    edits = phases.upstream_request(classify(b"POST", None, None))
    assert edits.add == [b"X-a: 1\r\n", b"X-b: 1\r\n"]
    assert phases.response_body is not None
    watcher = phases.response_body(
        classify(b"POST", None, None), Backend("x", "127.0.0.1", 1), 200, False, None
    )
    assert watcher is not None
    watcher.feed(b"z")
    watcher.finish()
    assert journal == ["a:feed:z", "b:feed:z", "a:finish", "b:finish"]


BASE: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "backends": [{"name": "a", "url": "http://127.0.0.1:9"}],
    "health": {"interval": 0},
    "log": {"access": False},
}


def composed(**extra: Any) -> Phases:
    config = parse_config({**BASE, **extra}, source="<test>")
    return Proxy(config).compose_phases(config)


def kinds(phases: Phases) -> set[type]:
    return {type(f) for f in phases.filters}


def test_the_default_proxy_registers_only_the_front_door_and_passive_health() -> None:
    phases = composed()
    # Only the phases every proxy needs: the Host/Origin check and passive health.
    assert {name for name in PHASES if getattr(phases, name) is not None} == {
        "early_request",
        "fail_to_connect",
        "error_while_proxy",
    }
    assert FrontDoor in kinds(phases)


@pytest.mark.parametrize(
    ("extra", "kind", "phase"),
    [
        ({"bind_sessions": "authorization"}, SessionBinding, "request"),
        ({"routes": [{"match": {"name": "x"}, "deny": 403}]}, RouteRules, "request"),
        ({"validate_headers": True}, StrictHeaders, "request_body"),
        ({"affinity": {"request_state": True}}, RequestStateKey, "request_body"),
        ({"affinity": {"tasks": True}}, AffinityLearning, "response_body"),
        ({"failover": "replay"}, ReplayAlias, "upstream_request"),
        ({"log": {"access": True}}, type(None), "logging"),
    ],
)
def test_a_configured_feature_registers_its_filter(extra: dict[str, Any], kind: type, phase: str) -> None:
    phases = composed(**extra)
    assert getattr(phases, phase) is not None
    if kind is not type(None):
        assert kind in kinds(phases)
    assert getattr(composed(), phase) is None  # and without it, the phase is empty


def test_filters_that_read_mcp_name_make_the_connection_capture_it() -> None:
    assert composed(validate_headers=True).reads_names
    assert composed(routes=[{"match": {"name": "x"}, "deny": 403}]).reads_names
    assert not composed(affinity={"request_state": True}).reads_names
