"""The Python load drivers: session creation, closed-loop load (the fallback when wrk is missing),
paced latency, first-event latency and idle SSE streams.

Sessions carry the port their requests go to: the proxy's, or for the direct floor the port of the
stub that owns them, so every driver serves both.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from httpclient import HttpConnection, Response, StreamConnection, get_stream, post

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    owner: str  # the X-Backend that answered initialize
    port: int  # where this session's requests are sent


@dataclass(slots=True)
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    bad_status: int = 0
    bad_affinity: int = 0
    socket_errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.bad_status + self.bad_affinity + self.socket_errors

    def add(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.seconds = max(self.seconds, other.seconds)
        self.bad_status += other.bad_status
        self.bad_affinity += other.bad_affinity
        self.socket_errors += other.socket_errors


@dataclass(slots=True)
class Latencies:
    """Samples in milliseconds, and the answers that were not a 2xx from the right backend."""

    samples: list[float] = field(default_factory=list)
    errors: int = 0

    def percentile(self, q: float) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def check(response: Response, session: Session, result: LoadResult) -> None:
    if not 200 <= response.status < 300:
        result.bad_status += 1
    if response.backend is None or response.backend.decode() != session.owner:
        result.bad_affinity += 1


# -- sessions -------------------------------------------------------------------------------------


async def create_sessions(ports: Sequence[int], count: int, concurrency: int = 64) -> list[Session]:
    """POST `count` initializes, round robin over `ports`; raise if any fails."""
    created: list[Session] = []
    turn = itertools.count()

    async def worker(port: int) -> None:
        conn = await HttpConnection.open(port)
        request = post(f"{HOST}:{port}", b"/mcp", None)
        try:
            while next(turn) < count:
                response = await conn.request(request)
                if response.status != 200 or response.sid is None or response.backend is None:
                    raise RuntimeError(f"initialize via port {port} answered {response.status}")
                created.append(Session(response.sid.decode(), response.backend.decode(), port))
        finally:
            conn.close()

    workers = [worker(ports[i % len(ports)]) for i in range(min(concurrency, count))]
    await asyncio.gather(*workers)
    return created


def by_port(sessions: Sequence[Session]) -> dict[int, list[Session]]:
    groups: dict[int, list[Session]] = {}
    for session in sessions:
        groups.setdefault(session.port, []).append(session)
    return groups


def _requests(sessions: Sequence[Session], sse: bool) -> list[tuple[Session, bytes]]:
    target = b"/mcp?sse=1" if sse else b"/mcp"
    return [(s, post(f"{HOST}:{s.port}", target, s.sid)) for s in sessions]


# -- closed-loop load (fallback for wrk) ----------------------------------------------------------


async def closed_loop(
    sessions: Sequence[Session], duration: float, connections: int, sse: bool = False
) -> LoadResult:
    """`connections` keep-alive connections, each sending its next request as soon as one is answered."""
    result = LoadResult()
    prepared = [_requests(group, sse) for group in by_port(sessions).values()]  # once, shared
    deadline = time.perf_counter() + duration

    async def worker(index: int) -> None:
        group = prepared[index % len(prepared)]
        conn = await HttpConnection.open(group[0][0].port)
        try:
            for session, request in itertools.islice(itertools.cycle(group), index, None):
                if time.perf_counter() >= deadline:
                    return
                check(await conn.request(request), session, result)
                result.requests += 1
        except OSError:
            result.socket_errors += 1
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    result.seconds = time.perf_counter() - started
    return result


# -- paced latency --------------------------------------------------------------------------------


class _Pool:
    """Idle keep-alive connections per port, opened on demand."""

    def __init__(self) -> None:
        self._idle: dict[int, list[HttpConnection]] = {}
        self.opened = 0

    async def take(self, port: int) -> HttpConnection:
        idle = self._idle.setdefault(port, [])
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        self.opened += 1
        return await HttpConnection.open(port)

    def give(self, port: int, conn: HttpConnection) -> None:
        self._idle.setdefault(port, []).append(conn)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


async def paced(sessions: Sequence[Session], rate: float, duration: float) -> Latencies:
    """Open-loop load at `rate` req/s; latency from send to the end of the answer."""
    out = Latencies()
    pool = _Pool()
    prepared = itertools.cycle(_requests(sessions, sse=False))
    in_flight: set[asyncio.Task[None]] = set()

    async def one(session: Session, request: bytes) -> None:
        conn = await pool.take(session.port)
        try:
            response = await conn.request(request)
        except OSError:
            out.errors += 1
            return
        pool.give(session.port, conn)
        out.samples.append((response.done_at - response.sent_at) * 1000)
        if not 200 <= response.status < 300 or (response.backend or b"").decode() != session.owner:
            out.errors += 1

    for due in _schedule(rate, duration):
        await _sleep_until(due)
        task = asyncio.create_task(one(*next(prepared)))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    pool.close()
    return out


def _schedule(rate: float, duration: float) -> Iterator[float]:
    start = time.perf_counter()
    for i in range(int(rate * duration)):
        yield start + i / rate


async def _sleep_until(due: float) -> None:
    delay = due - time.perf_counter()
    if delay > 0.0005:
        await asyncio.sleep(delay)


# -- first event of a streamed POST ---------------------------------------------------------------


async def first_event(sessions: Sequence[Session], samples: int, hold_ms: int) -> Latencies:
    """Sequential streamed POSTs whose stream stays open `hold_ms` after its first event; latency
    from send to the first body byte (the event), which a buffering proxy would delay."""
    out = Latencies()
    pool = _Pool()
    target = b"/mcp?sse=1&hold=%d" % hold_ms
    for session in itertools.islice(itertools.cycle(sessions), samples):
        conn = await pool.take(session.port)
        response = await conn.request(post(f"{HOST}:{session.port}", target, session.sid))
        pool.give(session.port, conn)
        if response.status != 200 or (response.backend or b"").decode() != session.owner:
            out.errors += 1
            continue
        out.samples.append((response.first_body_at - response.sent_at) * 1000)
    pool.close()
    return out


# -- idle streams ---------------------------------------------------------------------------------


class StreamFleet:
    """Many open GET streams, one per session; relay delays are kept only while recording."""

    def __init__(self) -> None:
        self.streams: list[StreamConnection] = []
        self.delays_ms: list[float] = []
        self.recording = False
        self.failed = 0
        self._owners: list[str] = []

    def _on_event(self, delay_ns: int) -> None:
        if self.recording:
            self.delays_ms.append(delay_ns / 1e6)

    async def open(self, sessions: Sequence[Session], batch: int = 100) -> None:
        """One stream per session; a stream that fails, or comes from a backend other than the
        session's owner, counts as failed."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(sessions), batch):
            part = sessions[start : start + batch]
            made = await asyncio.gather(
                *(
                    loop.create_connection(lambda: StreamConnection(self._on_event), HOST, s.port)
                    for s in part
                )
            )
            for (transport, stream), session in zip(made, part, strict=True):
                transport.write(get_stream(f"{HOST}:{session.port}", b"/mcp", session.sid))
                self.streams.append(stream)
                self._owners.append(session.owner)
        results = await asyncio.gather(*(s.opened for s in self.streams), return_exceptions=True)
        checks = zip(results, self.streams, self._owners, strict=True)
        self.failed = sum(
            1
            for r, s, owner in checks
            if isinstance(r, BaseException) or (s.backend or b"").decode() != owner
        )

    async def record(self, seconds: float) -> Latencies:
        self.delays_ms = []
        self.recording = True
        await asyncio.sleep(seconds)
        self.recording = False
        lost = sum(1 for s in self.streams if s.lost)
        return Latencies(self.delays_ms, errors=self.failed + lost)

    async def close(self) -> None:
        for stream in self.streams:
            stream.close()
        self.streams = []
        await asyncio.sleep(0.2)  # let the proxies see the closes before the next measurement
