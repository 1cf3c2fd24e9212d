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
- **Control channels.** With `admin`, each worker serves its admin application on a unix socket of
  its own (CONTROL_SOCKET_ENV), in a directory only this user can enter, made at start and removed
  at exit. The supervisor's admin listener (control/cluster.py) asks every worker through them.
  Drains and undrains made through it are remembered until the next reload and handed to a worker
  that starts (ADMIN_DRAINS_ENV), or that was starting while they were made (`on_behind`), so that a
  restarted worker does not forget a drain the operator posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Final

from mcpbalancer.config import Config, host_port, load_config
from mcpbalancer.errors import ConfigError
from mcpbalancer.process.orphans import die_with_parent

log = logging.getLogger(__name__)

READY: Final = b"R"
# The key of the access log's session tags, one for all workers (hex), so that a session's lines
# carry the same tag whichever worker wrote them.
SESSION_TAG_KEY_ENV: Final = "MCPBALANCER_SESSION_TAG_KEY"
# The unix socket a worker serves its admin application on, for the supervisor only.
CONTROL_SOCKET_ENV: Final = "MCPBALANCER_CONTROL_SOCKET"
# The drains (true) and undrains (false) posted to the admin API since the last reload, as a JSON
# object by backend name: a worker applies them once it has read the file, before it serves.
ADMIN_DRAINS_ENV: Final = "MCPBALANCER_ADMIN_DRAINS"
RESTART_DELAY: Final = (0.5, 30.0)  # first and longest delay before starting an exited worker again
STABLE_AFTER: Final = 30.0  # a worker that ran this long restarts after the first delay again
GIVE_UP_AFTER: Final = 3  # failed starts in a row of every worker, with none serving
START_TIMEOUT: Final = 60.0  # a worker not ready by then is killed (a failed start)
KILL_GRACE: Final = 5.0  # seconds past `shutdown_timeout` a stopping worker gets before SIGKILL
_STOPPED_BY: Final = (0, -signal.SIGTERM, -signal.SIGINT)  # exit statuses of a clean stop

# (worker index, fd of the ready pipe) -> the worker's argv.
WorkerCommand = Callable[[int, int], list[str]]
# (running, reloaded) -> why the reloaded file cannot be applied without a restart, or None.
RestartOnly = Callable[[Config, Config], str | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Channel:
    """A worker as the admin listener sees it."""

    index: int
    run: int  # its start count: a new number is a new process (whose counters start from 0)
    alive: bool  # a process is running (serving, or starting)
    serving: bool
    socket: str | None  # its control channel; None without `admin`


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
    drains: int = 0  # the version of the admin drains this worker has been given
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
        restart_only: RestartOnly | None = None,
    ) -> None:
        self.config = config
        self._command = command
        self._adjust = adjust
        self._restart_only = restart_only
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
        self._control_dir: str | None = None  # made by run() when there is an admin listener
        self.admin_drains: dict[str, bool] = {}  # posted since the last reload: name -> drained
        self._drains = 0  # their version
        # Called with a worker's index when it became ready with older admin drains than the
        # current ones (it was starting while they were posted): the admin listener sends them.
        self.on_behind: Callable[[int], None] | None = None

    @property
    def serving(self) -> tuple[int, ...]:
        """Indexes of the workers ready and running."""
        return tuple(w.index for w in self._workers if w.serving)

    def control_socket(self, index: int) -> str | None:
        if self._control_dir is None:
            return None
        return os.path.join(self._control_dir, f"worker-{index}.sock")

    def channels(self) -> list[Channel]:
        return [
            Channel(w.index, w.runs, w.process is not None, w.serving, self.control_socket(w.index))
            for w in self._workers
        ]

    def begin_drain(self, name: str, drained: bool) -> list[Channel]:
        """An admin drain (or undrain) of `name`: remembered until the next reload; the serving
        workers, to send it to, are marked as having it."""
        self.admin_drains[name] = drained
        self._drains += 1
        return self._reached("drains", self._drains)

    def forget_drain(self, name: str) -> None:
        """No worker knew `name`: nothing to hand to the workers that start."""
        if self.admin_drains.pop(name, None) is not None:
            self._drains += 1

    def begin_reload(self) -> list[Channel]:
        """An admin reload: like SIGHUP, but the serving workers (returned) are sent it by the
        admin listener; a starting one gets SIGHUP once ready."""
        self._reloaded()
        return self._reached("reloads", self._reloads)

    def _reached(self, attribute: str, version: int) -> list[Channel]:
        serving = [w for w in self._workers if w.serving]
        for worker in serving:
            setattr(worker, attribute, version)
        reached = {w.index for w in serving}
        return [c for c in self.channels() if c.index in reached]

    async def run(self) -> int:
        if self.config.admin is not None:
            # mkdtemp makes it 0700: only this user (and root) reach the sockets in it.
            self._control_dir = tempfile.mkdtemp(prefix="mcpbalancer-")
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
            if self._control_dir is not None:
                shutil.rmtree(self._control_dir, ignore_errors=True)
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
        log.info("SIGHUP: reloading %s in every worker", self.config.source)
        self._reloaded()
        self._signal_all(signal.SIGHUP, serving_only=True)

    def _reloaded(self) -> None:
        self._reloads += 1
        # The supervisor's copy gives the stop grace and the admin tokens. The workers log a bad
        # file, or one that needs a restart; then nothing of it applies here either, and the admin
        # drains stay, as they stay in the workers.
        try:
            new = load_config(self.config.source)
            new = self._adjust(new) if self._adjust is not None else new
        except ConfigError:
            return
        if self._restart_only is not None and self._restart_only(self.config, new) is not None:
            return
        self.config = new
        self.admin_drains.clear()  # the file is the source of truth again
        self._drains += 1

    def _announce(self) -> None:
        config, n = self.config, len(self._workers)
        admin = ""
        if config.admin is not None:
            admin = f"; admin on {_address(config.admin)} for every worker"
        listen = host_port(config.listen_host, config.listen_port)
        log.info("starting %d workers on %s (SO_REUSEPORT)%s", n, listen, admin)
        if config.admin is None and config.metrics.enabled:
            log.warning(
                "no `admin` listener: %s on %s answers for whichever worker took the connection, with "
                "that worker's counts only; set `admin` for one page that sums every worker",
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
        worker.drains = self._drains  # and is given the admin drains
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(worker.index, write_fd),
                stdin=asyncio.subprocess.DEVNULL,
                env=self._worker_env(worker.index),
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

    def _worker_env(self, index: int) -> dict[str, str]:
        env = dict(self._env)
        socket_path = self.control_socket(index)
        if socket_path is not None:
            env[CONTROL_SOCKET_ENV] = socket_path
        if self.admin_drains:
            env[ADMIN_DRAINS_ENV] = json.dumps(self.admin_drains)
        return env

    def _serving(self, worker: _Worker, pid: int) -> None:
        worker.serving = True
        log.info("worker %d serving (pid %d)", worker.index, pid)
        if worker.reloads < self._reloads:  # a SIGHUP came while it started
            worker.reloads = self._reloads
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if worker.drains < self._drains:  # admin drains were posted while it started
            worker.drains = self._drains
            if self.on_behind is not None:
                self.on_behind(worker.index)
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
