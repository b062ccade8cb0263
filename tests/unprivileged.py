"""Running a command where file permissions hold, whoever runs the tests.

The tests run as root here, where ``chmod 000`` proves nothing. ``unprivileged_run`` starts a
subprocess whose capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
with prctl before exec, so exec cannot grant them back): it keeps root's uid, so it still owns and
writes the test's files, but a folder or file with mode 000 is closed to it. ``make_unreadable``
proves that it is, and fails the test (never passes it in silence) when the trick does not work.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PR_CAPBSET_DROP = 24                          # linux/prctl.h
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # linux/capability.h


PROBE = """import os, sys
try:
    (os.listdir if os.path.isdir(sys.argv[1]) else open)(sys.argv[1])
except PermissionError:
    print("unreadable")
else:
    print("readable")
"""


def drop_file_access_capabilities() -> None:
    """preexec_fn: the process about to exec loses the two capabilities that bypass file permissions."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability}) failed")


def unprivileged_run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` in a subprocess where file permissions hold, whoever runs the tests."""
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=drop_file_access_capabilities if os.geteuid() == 0 else None)


def make_unreadable(path: Path) -> None:
    """``chmod 000`` a folder or file, then prove it cannot be read where ``unprivileged_run`` runs."""
    path.chmod(0)
    probe = unprivileged_run([sys.executable, "-c", PROBE, str(path)], timeout=60)
    if probe.returncode != 0:
        pytest.fail(f"could not start a process without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: {probe.stderr}")
    assert probe.stdout.strip() == "unreadable", f"{path} is still readable without root's capabilities"
