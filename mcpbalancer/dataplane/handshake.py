"""TLS on a listener: accept, shake hands, then serve the connection as a plain one is served.

A TLS listener accepts sockets itself and hands each to `loop.connect_accepted_socket` with the
context its TlsEndpoint holds at that moment, bounded by `limits.head_timeout`. A reload swaps the
endpoint's context, so the handshakes after it use the new certificate while open connections keep
theirs. The connection's protocol is a TlsConnection, a ClientConnection whose connection_made
comes once the handshake is done (and reads the client certificate's subject then, once): from
then on nothing is done per request for TLS. A failed handshake raises out of
connect_accepted_socket here: it is counted (`mcpbalancer_tls_handshake_failures_total{reason}`),
logged (a line a second at most, with OpenSSL's reason) and the socket closed; never a traceback.

Why not `create_server(ssl=context)`: uvloop (like asyncio) then does the handshake inside the
transport, and a failure never reaches the protocol nor the caller: it would be neither counted nor
logged. Why not `start_tls` on a plain server's connection: uvloop may have read the ClientHello
into the plain protocol before start_tls takes the socket, and the handshake then waits for it until
its timeout (tried: DESIGN-NOTES.md, "TLS on the listeners").
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Final

from mcpbalancer.dataplane.client import ClientConnection
from mcpbalancer.dataplane.listener_tls import ServerTls, peer_subject
from mcpbalancer.dataplane.tls import tls_problem

if TYPE_CHECKING:
    from mcpbalancer.dataplane.plane import DataPlane

log = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL: Final = 1.0  # seconds between log lines about failed handshakes
ACCEPT_RETRY: Final = 0.1  # seconds before accepting again after accept() failed
BACKLOG: Final = 1024  # as the plain listeners' create_server


class TlsEndpoint:
    """One TLS listener's current server TLS (swapped by a reload) and its failure log."""

    def __init__(self, address: str, tls: ServerTls) -> None:
        self.address = address
        self.tls = tls
        self._logged_at = float("-inf")
        self._unlogged = 0  # failures since the last line

    def failed(self, plane: DataPlane, reason: str, why: str, peer: str) -> None:
        plane.metrics.tls_handshake_failed(reason)
        now = time.monotonic()
        if now - self._logged_at < FAILURE_LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more since the last line)" if self._unlogged else ""
        log.info("TLS handshake from %s on %s failed (%s): %s%s", peer, self.address, reason, why, more)
        self._logged_at, self._unlogged = now, 0


class TlsListener:
    """A TLS listener: its sockets, an accept loop on each, and a handshake task per connection.

    Like an asyncio.Server to the composition root: `sockets`, `close()`, `wait_closed()`."""

    def __init__(self, plane: DataPlane, endpoint: TlsEndpoint, sockets: list[socket.socket]) -> None:
        self.plane = plane
        self.endpoint = endpoint
        self.sockets = sockets
        self._accepting = [plane.loop.create_task(self._accept(sock)) for sock in sockets]

    @classmethod
    def open(
        cls, plane: DataPlane, endpoint: TlsEndpoint, host: str, port: int, *, reuse_port: bool
    ) -> TlsListener:
        """Bind and listen as create_server does (OSError when it cannot), then accept."""
        return cls(plane, endpoint, listening_sockets(host, port, reuse_port=reuse_port))

    def close(self) -> None:
        for task in self._accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = self.plane.loop
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # out of file descriptors, say: the next accept may work
                log.warning("accepting on %s failed: %s", self.endpoint.address, exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            self._admit(conn, peer)

    def _admit(self, conn: socket.socket, peer: object) -> None:
        plane = self.plane
        if len(plane.connections) + len(plane.handshakes) >= plane.limits.connections:
            plane.refuse_connection()  # counted and logged as a plain one; no HTTP before TLS
            conn.close()
            return
        task = plane.loop.create_task(self._shake(conn, _peer(peer)))
        plane.handshakes.add(task)
        task.add_done_callback(plane.handshakes.discard)

    async def _shake(self, conn: socket.socket, peer: str) -> None:
        plane, endpoint = self.plane, self.endpoint
        tls = endpoint.tls  # the one in force now: a reload after this does not change it
        try:
            await plane.loop.connect_accepted_socket(
                lambda: TlsConnection(plane, tls.verifies_clients),
                conn,
                ssl=tls.context,
                ssl_handshake_timeout=plane.limits.head_timeout,
            )
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as exc:  # every way a handshake fails: counted and logged, never raised
            conn.close()
            endpoint.failed(plane, failure_reason(exc), _why(exc), peer)


class TlsConnection(ClientConnection):
    """A ClientConnection made once its TLS handshake is done: it reads the client certificate's
    subject once, before any request (with client_ca only). Plain connections are ClientConnection
    itself and pay nothing for this."""

    tls = True

    def __init__(self, plane: DataPlane, verifies_clients: bool) -> None:
        super().__init__(plane)
        self._verifies = verifies_clients

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._verifies:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            self.client_subject = peer_subject(der)
        super().connection_made(transport)


def listening_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """The listening sockets of host:port, one per address it resolves to, as asyncio binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def failure_reason(exc: BaseException) -> str:
    """A TLS_FAILURE_REASONS label for what ended a handshake."""
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        return "certificate" if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason else "protocol"
    if isinstance(exc, ConnectionError | EOFError):
        return "closed"
    return "other"


def _why(exc: BaseException) -> str:
    return tls_problem(exc, handshake=True) or str(exc) or type(exc).__name__


def _peer(address: object) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else "unknown"
