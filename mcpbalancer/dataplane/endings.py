"""How an exchange ends: the proxy's own answers (errors, local endpoints, preset answers), a cut
connection, and the one place an exchange finishes, which runs the logging phase."""

from __future__ import annotations

import logging
import time

from mcpbalancer import protocol
from mcpbalancer.dataplane.local import LocalAnswer, LocalHandler, render_local
from mcpbalancer.dataplane.state import ExchangeState
from mcpbalancer.errors import PayloadTooLarge, ProxyError, render_error
from mcpbalancer.observability.metrics import NO_BACKEND

log = logging.getLogger(__name__)


class Endings(ExchangeState):
    __slots__ = ()

    def _too_large(self) -> None:
        self.plane.metrics.rejected("body_limit")
        if not self._turn:
            # Pipelined behind an exchange still being answered: answer in turn, keep no body.
            self._body = []
            self.keep_alive = False
            self._preset = PayloadTooLarge()
            return
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self._started:
            self._abort_client()
        else:
            self._answer_error(PayloadTooLarge())

    def _answer_error(self, err: ProxyError) -> None:
        if self.done:
            return
        if err.reject_reason is not None:  # a refusal found while routing or by a filter (errors.py)
            self.plane.metrics.rejected(err.reject_reason)
        if self._started or self._held is not None:
            self._abort_client()
            return
        # The rest of the body is read and dropped, unless the client still waits for 100 Continue
        # (it may never send it) or the body is over the limit: then close after answering.
        if not self.request_complete and (self.head.expect_continue or isinstance(err, PayloadTooLarge)):
            self.keep_alive = False
        target = self.head.target[:200].decode("latin-1")
        fields = self.log_fields()
        log.info("%s %s -> %d %s", self.head.method.decode("latin-1"), target, err.status, err, extra=fields)
        self._record_own_answer(err.status, "error")
        head_only = self.head.method == b"HEAD"
        answer = render_error(
            err, keep_alive=self.keep_alive, head_only=head_only, request_id=self.request_id
        )
        if self.head.cors is not None:  # a browser may read the error only with CORS headers
            end = answer.index(b"\r\n") + 2
            answer = answer[:end] + self.head.cors + answer[end:]
        self.sent = len(answer) - answer.index(b"\r\n\r\n") - 4
        self.client.write(answer)
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)

    def _answer_preset(self, status: int, answer: bytes) -> None:
        """An answer an early_request filter made whole (a CORS preflight)."""
        if not self.request_complete and self.head.expect_continue:
            self.keep_alive = False  # the client may or may not send the body it announced
        self._record_own_answer(status, "local")
        self.client.write(answer)
        self._finish(reusable=False)

    def _record_own_answer(self, status: int, outcome: str) -> None:
        self.status, self.outcome = status, outcome
        head, facts = self.head, self.facts
        era = facts.era if facts is not None else protocol.era_of(head.session_id, head.protocol_version)
        backend = self.backend.name if self.backend is not None else NO_BACKEND
        self.plane.metrics.answered_by_proxy(backend, era, head.method, status, head.mcp_method, self.service)

    def _serve_local(self, handler: LocalHandler) -> None:
        """A path the proxy answers itself (/healthz, /readyz, /metrics): never forwarded."""
        answer = handler(self.head.method)
        if isinstance(answer, LocalAnswer):
            self._write_local(answer)
            return

        async def run() -> None:
            result = await answer
            if not self.done:
                self._write_local(result)

        self._task = self.plane.loop.create_task(run())

    def _write_local(self, answer: LocalAnswer) -> None:
        if not self.request_complete and self.head.expect_continue:
            self.keep_alive = False  # the client may or may not send the body it announced
        self._record_own_answer(answer.status, "local")
        self.sent = len(answer.body)
        head_only = self.head.method == b"HEAD"
        self.client.write(render_local(answer, keep_alive=self.keep_alive, head_only=head_only))
        self._finish(reusable=False)

    def _abort_client(self) -> None:
        self.outcome = "aborted"
        self.keep_alive = False
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._finish(reusable=False)
        self.client.abort()

    def _finish(self, reusable: bool) -> None:
        if self.done:
            return
        self.done = True
        plane = self.plane
        stream = self._stream
        if stream is not None:
            self._stream = None  # the stream holds its exchange: no cycle left for the collector
            if stream.timer is not None:
                stream.timer.cancel()
                stream.timer = None
            if self.backend is not None:
                plane.metrics.stream_ended(self.backend.name, time.perf_counter() - stream.started_at)
        logging_phase = plane.phases.logging
        if logging_phase is not None:
            logging_phase(self)
        if self.backend is not None:
            self.backend.in_flight -= 1
        if self._ticket is not None:
            self._ticket.release()
            self._ticket = None
        if self.upstream is not None:
            self.upstream.release(reusable)
            self.upstream = None
        self.client.exchange_finished(self)
