"""`workers: N`: one supervisor process and N worker processes sharing the listen port.

Each worker is a whole, ordinary mcpbalancer (`python -m mcpbalancer ... --worker-index K`) whose
listener is bound with SO_REUSEPORT: the kernel spreads new connections over the workers' accept
queues, and the workers share sessions through the Redis store. The supervisor only starts, watches
and signals them; it never touches a request.

- **Ready.** A worker writes one byte on a pipe (`--ready-fd`) once it listens and handles signals;
  the pipe's end of file before that byte means it failed at start-up.
- **Start-up.** A worker that fails its first start stops everything: the supervisor exits 1, as a
  single process that cannot start does. Later, a worker that exits is started again after a growing
  delay (0.5 s doubling to 30 s, back to 0.5 s once a worker ran 30 s); when no worker is serving
  and each of them failed its last GIVE_UP_AFTER starts, the supervisor gives up and exits 1.
- **Signals.** SIGTERM and SIGINT are forwarded to every worker (each runs its graceful shutdown);
  a worker still alive `shutdown_timeout` + KILL_GRACE seconds later is killed. SIGHUP is forwarded
  to every serving worker, and to a starting one once it is ready (it may have read the file first).
- **Orphans.** Workers get PR_SET_PDEATHSIG(SIGTERM): a supervisor killed with SIGKILL takes its
  workers with it, through their graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from typing import Final

from mcpbalancer.config import Config, admin_of_worker, host_port, load_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.process.orphans import die_with_parent

log = logging.getLogger(__name__)

READY: Final = b"R"
# The key of the access log's session tags, one for all workers (hex), so that a session's lines
# carry the same tag whichever worker wrote them.
SESSION_TAG_KEY_ENV: Final = "MCPBALANCER_SESSION_TAG_KEY"
RESTART_DELAY: Final = (0.5, 30.0)  # first and longest delay before starting an exited worker again
STABLE_AFTER: Final = 30.0  # a worker that ran this long restarts after the first delay again
GIVE_UP_AFTER: Final = 3  # failed starts in a row of every worker, with none serving
START_TIMEOUT: Final = 60.0  # a worker not ready by then is killed (a failed start)
KILL_GRACE: Final = 5.0  # seconds past `shutdown_timeout` a stopping worker gets before SIGKILL
_STOPPED_BY: Final = (0, -signal.SIGTERM, -signal.SIGINT)  # exit statuses of a clean stop

# (worker index, fd of the ready pipe) -> the worker's argv.
WorkerCommand = Callable[[int, int], list[str]]


def check_listen(host: str, port: int) -> None:
    """Raise OSError when host:port cannot be bound, before any worker is started.

    Bound without SO_REUSEPORT, so that a port another process listens on (with SO_REUSEPORT too,
    e.g. a second mcpbalancer of the same user) is refused instead of silently shared.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio binds
            sock.bind(address)


def announce_ready(fd: int) -> None:
    """In a worker: tell the supervisor it is serving."""
    # A supervisor gone already (a broken pipe) has sent us SIGTERM through PR_SET_PDEATHSIG.
    with contextlib.suppress(OSError):
        os.write(fd, READY)
    os.close(fd)


def describe_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


@dataclasses.dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    serving: bool = False
    runs: int = 0
    failed_starts: int = 0  # in a row
    reloads: int = 0  # the supervisor's reload count this worker has been sent (or read itself)
    stop_status: int | None = None  # how its process ended after the stop


class Supervisor:
    """`await run()` starts the workers and keeps them running until a stop; the exit status."""

    def __init__(
        self,
        config: Config,
        command: WorkerCommand,
        *,
        adjust: Callable[[Config], Config] | None = None,
        restart_delay: tuple[float, float] = RESTART_DELAY,
        stable_after: float = STABLE_AFTER,
        start_timeout: float = START_TIMEOUT,
        give_up_after: int = GIVE_UP_AFTER,
        kill_grace: float = KILL_GRACE,
    ) -> None:
        self.config = config
        self._command = command
        self._adjust = adjust
        self._restart_delay = restart_delay
        self._stable_after = stable_after
        self._start_timeout = start_timeout
        self._give_up_after = give_up_after
        self._kill_grace = kill_grace
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._stopping = asyncio.Event()
        self._failed = False
        self._reloads = 0
        self._all_served = False
        self._kill_timer: asyncio.TimerHandle | None = None
        self._env = {**os.environ, SESSION_TAG_KEY_ENV: secrets.token_hex(16)}

    @property
    def serving(self) -> tuple[int, ...]:
        """Indexes of the workers ready and running."""
        return tuple(w.index for w in self._workers if w.serving)

    async def run(self) -> int:
        self._announce()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await asyncio.gather(*(self._keep(w) for w in self._workers))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        return 1 if self._failed else self._stop_status()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every worker gracefully (forwarding `sig`); SIGKILL those that outlast the grace."""
        if not self._stopping.is_set():
            log.info("%s: stopping %d workers", signal.Signals(sig).name, len(self._workers))
            self._stopping.set()
            grace = self.config.shutdown_timeout + self._kill_grace
            self._kill_timer = asyncio.get_running_loop().call_later(grace, self._kill_all, grace)
        self._signal_all(sig, serving_only=False)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration file (see the module docstring)."""
        self._reloads += 1
        log.info("SIGHUP: reloading %s in every worker", self.config.source)
        self._signal_all(signal.SIGHUP, serving_only=True)
        # The supervisor's copy is only used for the stop grace; the workers log a bad file.
        with contextlib.suppress(ConfigError):
            new = load_config(self.config.source)
            self.config = self._adjust(new) if self._adjust is not None else new

    def _announce(self) -> None:
        config, n = self.config, len(self._workers)
        admin = ""
        if config.admin is not None:
            ports = (admin_of_worker(config, i) for i in range(n))
            admin = "; admin: " + ", ".join(
                f"worker {i} on {_address(a)}" for i, a in enumerate(ports) if a is not None
            )
        listen = host_port(config.listen_host, config.listen_port)
        log.info("starting %d workers on %s (SO_REUSEPORT)%s", n, listen, admin)
        if config.admin is None and config.metrics.enabled:
            log.warning(
                "no `admin` listener: %s on %s answers for whichever worker took the connection, with "
                "that worker's counts only; set `admin` to scrape every worker (port + worker index)",
                config.metrics.path,
                listen,
            )
        if config.failover == "replay" and config.store == "memory":
            log.warning(
                "`failover: replay` with workers and the memory store: a session is replayed only by "
                "the worker that saw its initialize; its requests reaching another worker answer 404 "
                "when the owner is gone (a Redis `store` shares the replay records)"
            )

    # -- one worker's life --------------------------------------------------------------------------

    async def _keep(self, worker: _Worker) -> None:
        delay = self._restart_delay[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            status, was_ready = await self._run_once(worker)
            if self._stopping.is_set():
                worker.stop_status = status
                return
            if not was_ready and worker.runs == 1:
                self._fail(f"worker {worker.index} failed at start-up ({describe_status(status)})")
                return
            worker.failed_starts = 0 if was_ready else worker.failed_starts + 1
            if self._crash_loop():
                self._fail(f"no worker serving, each failed its last {self._give_up_after} starts")
                return
            if time.monotonic() - started >= self._stable_after:
                delay = self._restart_delay[0]
            log.warning(
                "worker %d exited unexpectedly (%s); starting it again in %gs",
                worker.index,
                describe_status(status),
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._restart_delay[1])

    async def _run_once(self, worker: _Worker) -> tuple[int, bool]:
        """Start the worker and wait for its exit: (exit status, whether it became ready)."""
        read_fd, write_fd = os.pipe()
        worker.runs += 1
        worker.reloads = self._reloads  # it reads the file as it starts
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(worker.index, write_fd),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env,
                pass_fds=(write_fd,),
                preexec_fn=die_with_parent(signal.SIGTERM),
            )
        except OSError as exc:
            log.error("cannot start worker %d: %s", worker.index, exc)
            os.close(read_fd)
            return 1, False
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the worker holds the only write end: its exit is our end of file
        worker.process = process
        if self._stopping.is_set():  # a stop came while it was being spawned
            process.send_signal(signal.SIGTERM)
        ready = await self._wait_ready(worker, process, read_fd)
        if ready:
            self._serving(worker, process.pid)
        status = await process.wait()
        worker.process, worker.serving = None, False
        return status, ready

    async def _wait_ready(self, worker: _Worker, process: asyncio.subprocess.Process, fd: int) -> bool:
        loop = asyncio.get_running_loop()
        byte: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            if not byte.done():
                try:
                    byte.set_result(os.read(fd, 1))
                except OSError:
                    byte.set_result(b"")

        loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(self._start_timeout):
                return await byte == READY
        except TimeoutError:
            log.error("worker %d not ready after %gs; killing it", worker.index, self._start_timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            return False
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def _serving(self, worker: _Worker, pid: int) -> None:
        worker.serving = True
        admin = admin_of_worker(self.config, worker.index)
        where = "" if admin is None else f", admin on {_address(admin)}"
        log.info("worker %d serving (pid %d%s)", worker.index, pid, where)
        if worker.reloads < self._reloads:  # a SIGHUP came while it started
            worker.reloads = self._reloads
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if not self._all_served and all(w.serving for w in self._workers):
            self._all_served = True
            log.info(
                "%d workers serving on %s",
                len(self._workers),
                host_port(self.config.listen_host, self.config.listen_port),
            )

    # -- all workers ----------------------------------------------------------------------------------

    def _signal_all(self, sig: int, *, serving_only: bool) -> None:
        for worker in self._workers:
            if worker.process is None or worker.process.returncode is not None:
                continue
            if serving_only and not worker.serving:
                continue
            if sig == signal.SIGHUP:
                worker.reloads = self._reloads
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)

    def _kill_all(self, grace: float) -> None:
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                log.warning("worker %d still running %gs after the stop; killing it", worker.index, grace)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()

    def _crash_loop(self) -> bool:
        return not any(w.serving for w in self._workers) and all(
            w.failed_starts >= self._give_up_after for w in self._workers
        )

    def _fail(self, reason: str) -> None:
        log.error("%s; stopping", reason)
        self._failed = True
        self.stop(signal.SIGTERM)

    def _stop_status(self) -> int:
        unclean = [w for w in self._workers if w.stop_status not in (None, *_STOPPED_BY)]
        for worker in unclean:
            assert worker.stop_status is not None
            log.warning("worker %d stopped with %s", worker.index, describe_status(worker.stop_status))
        return 1 if unclean else 0


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return host_port(host, port) if port else f"a free port of {host}"
