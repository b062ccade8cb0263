"""A DataLoader worker's lifetime, tied to the run's: what every decoding worker does first."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker set-up: tie each worker's life to the run's.

    Ctrl-C reaches the whole process group, but only the main process decides how a run stops (it
    finishes the batch in flight and saves), so workers ignore SIGINT. And a worker must not
    outlive a run killed with SIGKILL: blocked on a full queue nobody reads, it would stay forever,
    so on Linux the kernel is asked to kill it when its parent dies. Bind ``parent_pid`` with
    ``functools.partial(worker_init, os.getpid())``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers then rely on torch's own parent check
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
