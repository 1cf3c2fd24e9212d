"""Managed local backends: the processes of `command` backends, started, watched and stopped here.

Each managed backend is one child process. Its port is either picked by the proxy and put into the
command line (`{port}`), or, when the command has no `{port}`, chosen by the child itself (bind port
0) and announced as a line `READY <port>` on its stdout, which leaves no race between picking a port
and binding it. The instance is ready once its port answers HTTP (any status) while the child runs.

A child that exits is started again after a growing delay (0.5 s doubling to 30 s, back to 0.5 s once
an instance ran 30 s). While it is gone the backend is down, and it gets a new owner id (`name~token`,
see backends.py): the sessions bound to the old process no longer match any backend and answer 404,
with either store and without touching the store's other entries, and a session can never be sent
to a process that did not mint it.

Children run in a session (process group) of their own, so stopping one stops whatever it spawned:
SIGTERM to the group, SIGKILL after `stop_timeout`. On Linux each child also gets PR_SET_PDEATHSIG
(SIGKILL): if the proxy itself is killed, its children die with it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import string
import sys
from collections.abc import Iterable
from typing import Final

from mcpbalancer.config import BackendConfig
from mcpbalancer.errors import BackendStartError
from mcpbalancer.fleet.backends import OWNER_SEP, Backend, BackendSet
from mcpbalancer.observability.metrics import Metrics
from mcpbalancer.process.orphans import die_with_parent

log = logging.getLogger(__name__)

START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 5.0
PROBE_INTERVAL: Final = 0.1
PROBE_TIMEOUT: Final = 2.0
RESTART_DELAY: Final = (0.5, 30.0)  # first and longest delay before starting an exited child again
STABLE_AFTER: Final = 30.0  # a child that ran this long restarts after the first delay again
OUTPUT_LINES: Final = 20  # last lines of a child's output kept for error messages
_READY = b"READY "


def command_line(template: str, *, name: str, host: str, port: int) -> list[str]:
    """The argv of `template` (split like a shell, without one) with its placeholders filled in.

    `{python}`, and `python` or `python3` as the program, are the interpreter running the proxy,
    so a script runs with the packages installed next to mcpbalancer.
    """
    values = {"name": name, "host": host, "port": str(port), "python": sys.executable}
    argv = [word.format_map(values) for word in shlex.split(template)]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def uses_port(template: str) -> bool:
    """The command takes its port from the proxy (`{port}`), rather than announcing it."""
    return any(
        field == "port" for word in shlex.split(template) for _, field, _, _ in string.Formatter().parse(word)
    )


def free_port(host: str) -> int:
    """A port free right now. Another process may take it before the child binds it: the child then
    exits and is started again on another port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def answers_http(host: str, port: int) -> bool:
    """Something on host:port answers an HTTP request (with any status)."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    b"GET / HTTP/1.1\r\nHost: %b:%d\r\nConnection: close\r\n\r\n" % (host.encode(), port)
                )
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return line.startswith(b"HTTP/")


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ManagedInstance:
    """One child process behind one Backend, started again whenever it exits."""

    def __init__(
        self,
        backend: Backend,
        template: str,
        *,
        start_timeout: float,
        stop_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.template = template
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0  # successful restarts after an exit
        self.failed_starts = 0  # restart attempts that failed
        self._reaped = True  # the current process, if any, is reaped and its group swept
        self._output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._announced: asyncio.Future[int] | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        """Start the child and wait until it serves; BackendStartError (child stopped) otherwise."""
        backend = self.backend
        backend.up = False
        backend.owner_id = f"{backend.name}{OWNER_SEP}{secrets.token_hex(4)}"
        started = asyncio.get_running_loop().time()
        await self._spawn()
        try:
            async with asyncio.timeout(self.start_timeout):
                port = await self._wait_ready()
        except TimeoutError:
            await self._kill()
            raise self._failure(f"did not answer HTTP within {self.start_timeout:g}s") from None
        except BaseException:  # failed, or cancelled by stop(): leave no half-started child
            await self._kill()
            raise
        took = asyncio.get_running_loop().time() - started
        log.info("managed backend %s serving on port %d (pid %d, %.1fs)", backend.name, port, self.pid, took)
        backend.up = True

    def watch(self) -> None:
        """From now on, start the child again whenever it exits."""
        self._watch = asyncio.get_running_loop().create_task(self._restart_forever())

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL after `stop_timeout`; no restart after this."""
        self._stopping = True
        self.backend.up = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self.stop_timeout):
                    await process.wait()
            except TimeoutError:
                log.warning(
                    "managed backend %s ignored SIGTERM for %gs; killing it",
                    self.backend.name,
                    self.stop_timeout,
                )
        await self._kill()

    # -- starting ---------------------------------------------------------------------------------

    async def _spawn(self) -> None:
        backend = self.backend
        port = free_port(backend.host) if uses_port(self.template) else 0
        argv = command_line(self.template, name=backend.name, host=backend.host, port=port)
        backend.relocate(port)
        self._output.clear()
        self.process = None
        self._announced = asyncio.get_running_loop().create_future()
        try:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        except OSError as exc:
            raise BackendStartError(
                f"managed backend {backend.name}: cannot run {argv[0]!r}: {exc}"
            ) from None
        self._reaped = False
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            asyncio.get_running_loop().create_task(self._read(self.process.stdout, announces=True)),
            asyncio.get_running_loop().create_task(self._read(self.process.stderr, announces=False)),
        ]

    async def _wait_ready(self) -> int:
        process, backend = self.process, self.backend
        assert process is not None and self._announced is not None
        if backend.port == 0:
            exited = asyncio.ensure_future(process.wait())
            try:
                await asyncio.wait((self._announced, exited), return_when=asyncio.FIRST_COMPLETED)
            finally:
                exited.cancel()
            if not self._announced.done():
                raise self._failure(f"exited with status {process.returncode} before printing 'READY <port>'")
            backend.relocate(self._announced.result())
        while True:
            if process.returncode is not None:
                raise self._failure(f"exited with status {process.returncode} before serving")
            if await answers_http(backend.host, backend.port) and process.returncode is None:
                return backend.port
            await asyncio.sleep(PROBE_INTERVAL)

    async def _read(self, stream: asyncio.StreamReader, *, announces: bool) -> None:
        """Relay the child's output to the log, line by line; spot its `READY <port>` line."""
        name = self.backend.name
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream's limit: take it in pieces
                raw = await stream.read(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self._output.append(line)
            log.info("%s | %s", name, line)
            announced = self._announced
            if announces and announced is not None and not announced.done() and raw.startswith(_READY):
                with contextlib.suppress(ValueError):
                    announced.set_result(int(raw[len(_READY) :].split()[0]))

    def _failure(self, problem: str) -> BackendStartError:
        tail = "\n".join(f"  {line}" for line in self._output)
        backend = self.backend
        argv = command_line(self.template, name=backend.name, host=backend.host, port=backend.port)
        message = f"managed backend {backend.name} ({shlex.join(argv)}) {problem}"
        return BackendStartError(f"{message}; its last output:\n{tail}" if tail else message)

    async def _kill(self) -> None:
        """SIGKILL whatever is left of the child's process group, reap the child, end the readers."""
        process = self.process
        if process is None or self._reaped:
            return
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        self._reaped = True
        readers, self._readers = self._readers, []
        # A grandchild outside the group could hold the pipes open: do not wait on them for long.
        _, pending = await asyncio.wait(readers, timeout=1.0) if readers else (set(), set())
        for task in pending:
            task.cancel()

    # -- restarting -------------------------------------------------------------------------------

    async def _restart_forever(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY[0]
        while not self._stopping:
            began = loop.time()
            assert self.process is not None
            status = await self.process.wait()
            pid, lost = self.pid, self._gone()
            if self.metrics is not None:
                self.metrics.managed_exit(self.backend.name)
            await self._kill()  # also lets the readers take the child's last words
            tail = "".join(f"\n  {line}" for line in list(self._output)[-5:])
            log.warning(
                "managed backend %s (pid %s) exited with status %d; %d sessions lost; restarting%s",
                self.backend.name,
                pid,
                status,
                lost,
                f"; its last output:{tail}" if tail else "",
            )
            if loop.time() - began >= STABLE_AFTER:
                delay = RESTART_DELAY[0]
            while not self._stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY[1])
                try:
                    await self.start()
                except (BackendStartError, OSError) as exc:
                    self.failed_starts += 1
                    log.warning("%s; retrying in %gs", exc, delay)
                    continue
                self.restarts += 1
                break

    def _gone(self) -> int:
        """The child exited: its sessions are lost with it. Returns how many."""
        backend = self.backend
        backend.up = False
        # A token no session is bound to: the old sessions stop matching at once.
        backend.owner_id = f"{backend.name}{OWNER_SEP}{secrets.token_hex(4)}"
        lost, backend.sessions = backend.sessions, 0
        return lost


class ManagedBackends:
    """Every managed instance of one proxy."""

    def __init__(
        self,
        configs: Iterable[BackendConfig],
        backends: BackendSet,
        *,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        metrics: Metrics | None = None,
    ) -> None:
        self.instances: list[ManagedInstance] = []
        for config in configs:
            backend = backends.get(config.name)
            if config.command is not None and backend is not None:
                instance = ManagedInstance(
                    backend,
                    config.command,
                    start_timeout=start_timeout,
                    stop_timeout=stop_timeout,
                    metrics=metrics,
                )
                self.instances.append(instance)

    def __bool__(self) -> bool:
        return bool(self.instances)

    def pids(self) -> list[int]:
        return [i.pid for i in self.instances if i.pid is not None]

    async def start(self) -> None:
        """Start every instance (in parallel) and watch them; if one fails, stop all and raise."""
        results = await asyncio.gather(*(i.start() for i in self.instances), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        for instance in self.instances:
            instance.watch()

    async def stop(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.instances))
