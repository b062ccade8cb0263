"""One run per report folder.

The lock is a POSIX record lock (``fcntl.lockf``) on ``REPORT/.batchcam/lock``. Unlike ``flock``,
a record lock belongs to the process, not to the open file: forked DataLoader workers do not
inherit it, and the kernel drops it the instant the process dies, so a run killed with SIGKILL
(even while its workers linger) never leaves a lock that needs cleaning up by hand.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

STATE_DIR = ".batchcam"


class ReportLocked(Exception):
    """Another batchcam run holds this report's lock (exit 75)."""


class ReportLock:
    def __init__(self, report: Path):
        self.path = Path(report) / STATE_DIR / "lock"
        self.fd: int | None = None
        self.created: list[Path] = []  # folders this run made, deepest last

    def __enter__(self) -> "ReportLock":
        missing = [folder for folder in (self.path.parent, *self.path.parent.parents) if not folder.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing[::-1]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise ReportLocked(f"another batchcam run is writing {self.path.parent.parent} "
                                   f"(lock held: {self.path})") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None

    def forget_new_report(self) -> None:
        """Undo a brand-new REPORT: a run refused for its configuration leaves no trace behind."""
        if not self.created:
            return
        self.path.unlink(missing_ok=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                return  # something else is in it now: leave it
