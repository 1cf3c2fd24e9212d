"""The response relay: the backend's answer, from its head to its last byte, back to the client.

The head is scanned once (framing.scan) and rewritten for the client; the router learns the
session it binds (the client waits, with the answer held, while a shared store writes it); the
body is relayed as it arrives, re-framed where the client needs another framing, and watched by
the response_body filters. An event stream gets a StreamRelay for its heartbeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from time import perf_counter

from mcpbalancer import protocol
from mcpbalancer.dataplane.framing import LAST_CHUNK, chunk, content_length, filtered, scan, tokens
from mcpbalancer.dataplane.state import ExchangeState
from mcpbalancer.dataplane.stream_relay import StreamRelay
from mcpbalancer.dataplane.tls import tls_problem
from mcpbalancer.errors import BadGateway, GatewayTimeout, ProxyError
from mcpbalancer.protocol import Era

log = logging.getLogger(__name__)

JSON = b"application/json"
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}  # made once per status and reason, not per answer
_STATUS_LINES_MAX = 64  # the reason is the backend's to choose: a bounded few are kept


def _status_line(status: int, reason: bytes) -> bytes:
    line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
    if len(_STATUS_LINES) < _STATUS_LINES_MAX:
        _STATUS_LINES[(status, reason)] = line
    return line


class ResponseRelay(ExchangeState):
    __slots__ = ()

    def response_begun(self) -> None:
        # The backend had the request and had started answering when the connection was lost
        # (upstream.py tells it then, not per response): sending it again could run a tool twice,
        # so it is not retried.
        self._replay = None

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._replay = None
        facts, backend = self.facts, self.backend
        assert facts is not None and backend is not None
        if status == 404 and self._resend is not None and self._replays_404():
            return
        self.status = status
        plane = self.plane
        elapsed = perf_counter() - self.received_at
        head = self.head
        method = head.method
        plane.metrics.answered(backend.name, facts.era, method, status, head.mcp_method, elapsed)
        phases = plane.phases
        if status >= 500 and phases.error_while_proxy is not None:
            phases.error_while_proxy(backend.name, "5xx")
        edits = self._edits
        # The backend knows the session by another id (filters/phases.py upstream_request): the
        # client keeps the one it has, put back in the scan's one pass.
        swap = head.session_id if edits is not None and edits.session_id is not None else None
        lines, response_sid, content_type, length, coding, length_at, cors_given = scan(headers, swap)
        # Router.learn's rule: a 2xx with an id, to a legacy request without one, made a session.
        if response_sid is not None and head.session_id is None and 200 <= status < 300:
            if phases.session_id is not None:  # the id the client gets instead (sealed)
                try:
                    given = phases.session_id(facts, backend, response_sid)
                except ProxyError as err:
                    self._answer_error(err)
                    return
                if given is not None:
                    if lines is not None:
                        lines = [given if part is response_sid else part for part in lines]
                    response_sid = swap = given
            self.created = response_sid if facts.era is Era.LEGACY else None  # for the access log
        self._no_body = no_body = method == b"HEAD" or status in (204, 304)
        unsized = not no_body and (coding is not None or length is None)
        if unsized:
            coding = self._unsized_body(coding)  # and its Content-Length, if any, is not relayed
        if lines is None:  # Connection named more fields to drop: the general, slower pass
            if swap is not None:
                headers = [(n, swap if n.lower() == protocol.SESSION_ID else v) for n, v in headers]
            drop = protocol.HOP_BY_HOP | tokens(headers)
            lines = filtered(headers, drop | {protocol.CONTENT_LENGTH} if unsized else drop)
        elif unsized and length_at:
            del lines[length_at : length_at + 4]
        lines[0] = _STATUS_LINES.get((status, reason)) or _status_line(status, reason)
        if self._chunked_out:
            lines += (b"Transfer-Encoding: ", coding or b"chunked", b"\r\n")
        if head.cors is not None and not cors_given:
            lines.append(head.cors)
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif not head.http11:
            lines.append(b"Connection: keep-alive\r\n")  # HTTP/1.0 closes unless told it persists
        lines.append(b"\r\n")
        out = b"".join(lines)
        # (a JSON answer, the usual one, is told apart without three calls)
        is_stream = content_type != JSON and content_type.lstrip().lower().startswith(protocol.EVENT_STREAM)
        if is_stream and not no_body:
            self._start_stream()
        if phases.response_body is not None and not no_body:
            expected = content_length(length) if coding is None else None
            self._watcher = phases.response_body(facts, backend, status, is_stream, expected)
        if phases.response is not None:
            phases.response(self, status, response_sid)
        wait = plane.router.learn(facts, backend, status, response_sid, head.target)
        if self._capture is not None and response_sid is not None and 200 <= status < 300:
            failover = plane.router.failover
            if failover is not None and self.request_complete and protocol.valid_session_id(response_sid):
                tag = facts.tag if plane.router.binder is not None else None
                failover.remember(response_sid.decode("ascii"), head.target, b"".join(self._capture), tag)
            self._capture = None
        if wait is None:
            self._started = True
            self.client.write(out)
        else:
            self._held = [out]
            if self.upstream is not None:
                self.upstream.pause_reading()
            self._hold_until(wait)
        if method == b"HEAD" and self.upstream is not None:
            self.upstream.skip_body()
            self.response_done()

    def _unsized_body(self, coding: bytes | None) -> bytes:
        """Frame a chunked or close-delimited upstream body: chunked to an HTTP/1.1 client, until
        close to an HTTP/1.0 one. Returns the Transfer-Encoding for the client."""
        plain = coding == b"chunked" or (coding is not None and coding.strip().lower() == b"chunked")
        chunked = plain or (coding is not None and coding.rstrip().lower().endswith(b"chunked"))
        self._until_close = not chunked
        self._chunked_out = self.head.http11
        if not self.head.http11:
            self.keep_alive = False
        if coding is None or plain:
            # Heartbeats need room in the framing (a Content-Length leaves none) and a body without
            # a coding of its own (a ping inside gzip would corrupt it).
            self._beat = self.plane.heartbeat
            return b"chunked"
        # Codings before chunked ("gzip, chunked") are still on the body: they keep their label.
        return coding if chunked else coding + b", chunked"

    def _replays_404(self) -> bool:
        """The owner answered 404 for a session the proxy holds (`replay_on: [backend_404]`): it
        forgot it, having restarted at the same address. Replay the session on a live backend (that
        one or another) and send this request again, rather than pass the 404 on. Only a request the
        proxy has whole (its body kept, at most REPLAY_LIMIT): the 404 says the backend ran nothing."""
        facts, resend, backend = self.facts, self._resend, self.backend
        failover = self.plane.router.failover
        self._resend = None
        if not self.request_complete or resend is None or facts is None or facts.session_id is None:
            return False
        if failover is None or not failover.can_replay(facts.session_id):
            return False
        log.info("backend %s answered 404 for a live session: replaying it", backend.name if backend else "?")
        if self.upstream is not None:
            self.upstream.abort()  # its 404 body is not read: the connection cannot be reused
            self.upstream = None
        self._body, self._terminated = resend, False
        self._await(failover.replay(self.plane.router, facts, backend, avoid=False), "replay")
        return True

    def _hold_until(self, wait: Awaitable[None]) -> None:
        async def run() -> None:
            trace = self.trace
            started = time.perf_counter() if trace is not None else 0.0
            try:
                await wait
            except ProxyError as err:  # the binding could not be stored, and must be (fail)
                self._held = None
                self._answer_error(err)
                return
            finally:
                if trace is not None:  # the new session's binding, written to the shared store
                    trace.store_seconds = time.perf_counter() - started
                held, self._held = self._held, None
                if not self.done and held is not None:
                    self._started = True
                    self.client.write(b"".join(held))
                    if self.upstream is not None and not self.client.write_paused:
                        self.upstream.resume_reading()
                    if self._held_complete:
                        self._complete()

        self._task = self.plane.loop.create_task(run())

    def _start_stream(self) -> None:
        assert self.backend is not None
        plane = self.plane
        plane.metrics.stream_started(self.backend.name)
        self._stream = stream = StreamRelay(self)
        if self.upstream is not None and (self._beat > 0 or plane.timeouts.stream_idle > 0):
            # Armed after this upstream read: a streamed answer that ends in the read it began in
            # (the usual POST) never needs the timer.
            self.upstream.after_read = stream.arm

    def response_body(self, data: bytes) -> None:
        if self.done or self._no_body:
            return
        self.sent += len(data)
        if self._watcher is not None:
            self._watcher.feed(data)  # before the client can see it and ask again
        stream = self._stream
        if stream is not None:
            stream.feed(data)
            if stream.timer is not None:  # else not read, or set when it is armed
                stream.last_write = stream.last_upstream = self.plane.loop.time()
        if self._held is not None:
            self._held.append(chunk(data) if self._chunked_out else data)
        elif self._chunked_out:
            self.client.write_chunk(data)
        else:
            self.client.write(data)

    def response_done(self) -> None:
        if self.done:
            return
        if self._watcher is not None:
            self._watcher.finish()
            self._watcher = None
        if self._held is not None:
            self._held_complete = True
            return
        if self._chunked_out:  # _complete, without a call of its own on every answer
            self.client.write(LAST_CHUNK)
        self._finish(reusable=self.request_complete)

    def _complete(self) -> None:
        if self._chunked_out:
            self.client.write(LAST_CHUNK)
        self._finish(reusable=self.request_complete)

    def client_writable(self, writable: bool) -> None:
        if self.upstream is not None:
            if writable:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()

    # -- faults -----------------------------------------------------------------------------------

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        self.upstream = None
        problem = tls_problem(exc, handshake=False)
        if self._until_close and problem is None and (self._started or self._held is not None):
            self.response_done()  # a close-delimited body ends with the connection (not a TLS error)
            return
        if self._started or self._held is not None:
            # Mid-body: the client sees the truncation as a closed connection.
            self._upstream_failed("reset" if problem is None else "tls")
            self._abort_client()
            return
        assert self.backend is not None and self.facts is not None
        if self._replay is not None and not self._retried and self._reused:
            self._retry_fresh()
            return
        if problem is not None:  # a TLS alert after the handshake: a client certificate refused
            self._tls_failed(self.backend, problem, connecting=False)
            return
        log.warning(
            "backend %s closed the connection before answering: %s",
            self.backend.name,
            exc,
            extra=self.log_fields(),
        )
        self._upstream_failed("reset")
        fault = self.plane.phases.error_while_proxy
        if fault is not None:
            fault(self.backend.name, "reset")
        if self.facts.session_id is not None:
            self._answer_error(self.plane.router.owner_gone(self.facts, self.backend))
        else:
            self._answer_error(BadGateway("Backend closed the connection"))

    def response_timeout(self) -> None:
        if self.done or self._started:
            return
        name = self.backend.name if self.backend else "?"
        log.warning(
            "backend %s: no response head within %ss",
            name,
            self.plane.timeouts.response_headers,
            extra=self.log_fields(),
        )
        self._upstream_failed("timeout")
        fault = self.plane.phases.error_while_proxy
        if self.backend is not None and fault is not None:
            fault(self.backend.name, "timeout")
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._answer_error(GatewayTimeout("Backend response timeout"))

    def _upstream_failed(self, kind: str) -> None:
        if self.backend is not None:
            self.plane.metrics.upstream_error(self.backend.name, kind)
