"""Processes the benchmark starts, and what it reads about them from /proc.

Every child goes through a Supervisor, which kills them all at the end (also on Ctrl-C or an
exception) and asks the kernel to kill them should this process die first (PR_SET_PDEATHSIG).
CPU pinning is a `taskset -c N` prefix when the machine has two cores or more (N + 1 for a proxy
with N workers: the proxy gets CPU 0 and CPUs 2..N, the load side keeps CPU 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROXY_CPU = 0
LOAD_CPU = 1
_PR_SET_PDEATHSIG = 1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def pinning_available(workers: int = 1) -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= workers + 1


def proxy_cpus(workers: int) -> str:
    """The `taskset -c` list of a proxy with `workers` processes: CPU 0, then 2, 3, ... (1 is the load's)."""
    others = "" if workers == 1 else ",2" if workers == 2 else f",2-{workers}"
    return f"{PROXY_CPU}{others}"


class Supervisor:
    """Starts children, remembers them, and stops every one of them in `stop_all`."""

    def __init__(self, logdir: Path, pin: bool) -> None:
        self.logdir = logdir
        self.pin = pin
        self._children: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: Sequence[str], cpu: int | str | None, stdout: int | None = None
    ) -> Child:
        """Start `argv` pinned to `cpu` (a CPU or a taskset list); stdout goes to its log unless
        `stdout` is PIPE or DEVNULL."""
        prefix = ["taskset", "-c", str(cpu)] if self.pin and cpu is not None else []
        path = self.logdir / f"{name}.log"
        log = path.open("wb")
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdout=log if stdout is None else stdout,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        log.close()
        self._children.append(proc)
        return Child(name, proc, path)

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        _terminate(child.proc, timeout)
        if child.proc in self._children:
            self._children.remove(child.proc)

    def stop_all(self) -> None:
        for proc in reversed(self._children):
            _terminate(proc, 3.0)
        self._children.clear()


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            detail = "".join(f"\n  {line}" for line in tail)
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} ({self.log}):{detail}")

    def read_ready_port(self, timeout: float = 10.0) -> int:
        """Wait for the `READY <port>` line the stub prints."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if selector.select(max(0.0, deadline - time.monotonic())):
                    line = self.proc.stdout.readline().decode().strip()
                    if line.startswith("READY "):
                        return int(line.split()[1])
                    self.check_alive()
        raise TimeoutError(f"{self.name} did not print READY within {timeout}s")

    def wait_port(self, port: int, timeout: float = 10.0) -> None:
        """Poll until `port` accepts a connection (no sleep-and-hope)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} is not listening on {port} after {timeout}s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free right now."""
    for _ in range(100):
        first = free_port()
        socks = [socket.socket() for _ in range(count)]
        try:
            for k, sock in enumerate(socks):
                sock.bind(("127.0.0.1", first + k))
        except (OSError, OverflowError):
            continue
        finally:
            for sock in socks:
                sock.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


# -- /proc ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuTimes:
    user: float
    system: float

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)

    @property
    def total(self) -> float:
        return self.user + self.system


def cpu_times(pid: int) -> CpuTimes:
    """utime and stime of `pid` in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = _stat_fields(pid)
    return CpuTimes(int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS)


def tree_cpu_times(pid: int) -> CpuTimes:
    """cpu_times of `pid` and its live children: a proxy with workers is a supervisor and N
    workers. (A worker restarted during a run loses what its first process used.)"""
    total = cpu_times(pid)
    for child in children(pid):
        with contextlib.suppress(OSError):
            times = cpu_times(child)
            total = CpuTimes(total.user + times.user, total.system + times.system)
    return total


def tree_rss_kib(pid: int) -> int:
    return rss_kib(pid) + sum(rss_kib(child) for child in children(pid))


def children(pid: int) -> list[int]:
    """Live children of `pid`, from /proc/<n>/stat (field 4 is the parent)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = _stat_fields(int(entry))
                if int(fields[1]) == pid and fields[0] != "Z":
                    found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: index 11 is utime (field 14), 13 cutime."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def core_busy() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU since boot, from /proc/stat; busy excludes idle and iowait."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            cores[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return cores


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu: int) -> float:
    busy = after[cpu][0] - before[cpu][0]
    total = after[cpu][1] - before[cpu][1]
    return busy / total if total else 0.0


def machine_busy_seconds() -> float:
    return sum(busy for busy, _ in core_busy().values()) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU used by this process, its reaped children (wrk runs) and its live children (stubs,
    proxies, Redis): what the benchmark itself spends, to tell it apart from other load."""
    fields = _stat_fields(os.getpid())
    total = sum(int(f) for f in fields[11:15]) / _CLOCK_TICKS
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    total += tree_cpu_times(int(pid)).total  # a proxy's workers included
    return total


async def other_cores(window: float) -> float:
    """CPU, in cores, that processes the benchmark did not start used during `window` seconds."""
    machine, own = machine_busy_seconds(), own_cpu_seconds()
    await asyncio.sleep(window)
    return max(0.0, (machine_busy_seconds() - machine - (own_cpu_seconds() - own)) / window)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def command_version(argv: Sequence[str]) -> str:
    """First line a `--version`-like command prints, or "not installed"."""
    if shutil.which(argv[0]) is None:
        return "not installed"
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"
