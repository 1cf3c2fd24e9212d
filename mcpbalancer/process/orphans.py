"""Children that do not outlive the process that started them.

Linux's PR_SET_PDEATHSIG asks the kernel to send the child a signal when its parent dies, even of
SIGKILL, when no cleanup code of the parent can run. It is set between fork and exec (a
`preexec_fn`), survives the exec, and is tied to the thread that forked: spawn from the event loop
thread, never from an executor thread that may end. Elsewhere there is no such call and a killed
parent leaves its children running.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A preexec_fn that has the child get `signum` when this process dies; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec
