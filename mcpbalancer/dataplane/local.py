"""Answers the proxy gives itself on the public listener (/healthz, /readyz, /metrics).

The data plane looks the request target up in a dict of LocalHandlers before routing; a hit is
answered here and never forwarded. A handler gets the request method and returns the answer, or an
awaitable of it when it must ask something first (the readiness probe pings the store).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    status: int
    reason: str
    content_type: str
    body: bytes


LocalHandler = Callable[[bytes], LocalAnswer | Awaitable[LocalAnswer]]


def render_local(answer: LocalAnswer, *, keep_alive: bool, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {answer.status} {answer.reason}\r\n"
        f"Content-Type: {answer.content_type}\r\n"
        f"Content-Length: {len(answer.body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        + ("Allow: GET, HEAD\r\n" if answer.status == 405 else "")
        + "\r\n"
    ).encode("latin-1")
    return head if head_only else head + answer.body
