"""A deadline that moves on every request without a timer per request.

A uvloop `call_later` and its `cancel` cost more than routing a request, and a connection's
deadlines move on every request (the keep-alive timeout after each answer, the response-head
timeout after each request sent). A Deadline keeps one timer: moving the deadline later only
records it, and the timer, when it fires early, looks again; it is replaced only to fire earlier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INF = float("inf")


class Deadline:
    __slots__ = ("_callback", "_loop", "_timer", "_timer_at", "at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback  # called once the deadline has passed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = INF  # when `_timer` fires
        self.at = INF  # the loop time it is due at; INF when none

    def set(self, seconds: float) -> None:
        """Due `seconds` from now, whatever it was before."""
        self.at = at = self._loop.time() + seconds
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._fire)

    def clear(self) -> None:
        """Not due any more (the timer, if any, finds that out when it fires)."""
        self.at = INF

    def rest(self) -> None:
        """When nothing is due, drop the timer too (the next `set` makes one): for a connection that
        may wait long with nothing due, such as one relaying an event stream."""
        if self.at == INF and self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = INF

    def cancel(self) -> None:
        """Not due, and no timer left: for a connection that is over."""
        self.at = INF
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = INF

    def _fire(self) -> None:
        self._timer, self._timer_at = None, INF
        at = self.at
        if at == INF:
            return
        if self._loop.time() < at:
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._fire)
            return
        self.at = INF
        self._callback()
