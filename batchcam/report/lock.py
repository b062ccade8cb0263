"""One run per report folder, and only in a folder that is batchcam's own.

The lock is a POSIX record lock (``fcntl.lockf``) on ``REPORT/.batchcam/lock``. Unlike ``flock``,
a record lock belongs to the process, not to the open file: forked DataLoader workers do not
inherit it, and the kernel drops it the instant the process dies, so a run killed with SIGKILL
(even while its workers linger) never leaves a lock that needs cleaning up by hand.

A report is marked as batchcam's by ``REPORT/.batchcam/report.json``, written when the folder is
first claimed. batchcam refuses to write into an existing, non-empty folder without that mark
(someone's web site, ROOT itself): a scan deletes the overlays and pages it no longer needs, and
in a folder it does not own those could be anybody's files.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

from batchcam.errors import NotOurFolder, ReportLocked
from batchcam.runtime.fsutil import SafeDir

STATE_DIR = ".batchcam"
MARKER = "report.json"
LOCK = "lock"
# Files that mark a report written before the marker existed (batchcam 0.1's row store and lock).
LEGACY_MARKS = ("rows.jsonl", "journal.jsonl", LOCK)


def claim_problem(report: Path, root: Path | None = None) -> str | None:
    """Why batchcam must not write into ``report`` (scanning ``root``), or None when it may.

    It may write into a missing or empty folder, or a batchcam report. Never into ROOT itself or a
    folder holding ROOT: the report's own files would be scanned, and its clean-up would reach the
    X-rays.
    """
    report = Path(report)
    if root is not None:
        real_root, real_report = Path(root).resolve(), report.resolve()
        if real_root == real_report:
            return f"--out {report} is ROOT itself: choose a report folder outside the X-rays"
        if real_root.is_relative_to(real_report):
            return f"--out {report} contains ROOT {root}: choose a report folder outside the X-rays"
    if not report.is_dir():
        return None  # missing: made new; a file in the way fails later as an unwritable report (exit 74)
    state = report / STATE_DIR
    if state.is_symlink():
        return (f"{state} is a symbolic link; batchcam keeps its state only in a real folder and will not "
                "write through a link: remove the link, or choose another --out")
    if is_report(report) or not any(os.scandir(report)):
        return None
    return (f"--out {report} is a folder with other files in it and not a batchcam report (no "
            f"{STATE_DIR}/{MARKER}); batchcam writes only into a new or empty folder or a report of its own")


def report_id(marker: bytes | None) -> str:
    """The report's identity, kept across runs (the gallery keys its review decisions by it): the
    marker's ``id``, or for a marker written before ids existed, a digest of the marker itself."""
    try:
        found = json.loads(marker or b"{}").get("id")
    except (ValueError, AttributeError):
        found = None
    if isinstance(found, str) and found.isalnum():
        return found
    return hashlib.sha256(marker or b"").hexdigest()[:16]


def is_report(report: Path) -> bool:
    """A batchcam report: its state folder is a real folder with the marker (or a 0.1 row store)."""
    state = Path(report) / STATE_DIR
    if state.is_symlink() or not state.is_dir():
        return False
    return any((state / name).is_file() and not (state / name).is_symlink() for name in (MARKER, *LEGACY_MARKS))


class ReportLock:
    """Claims REPORT (refusing a folder that is not batchcam's) and holds its lock while open.

    ``root`` is the scanned folder, when there is one, so a report inside it never swallows it.
    """

    def __init__(self, report: Path, root: Path | None = None):
        self.report = Path(report)
        self.root = root
        self.path = self.report / STATE_DIR / LOCK
        self.fd: int | None = None
        self.state: SafeDir | None = None
        self.created: list[Path] = []  # folders this run made, deepest last
        self.marked = False            # the marker was written by this run

    def __enter__(self) -> "ReportLock":
        problem = claim_problem(self.report, self.root)
        if problem:
            raise NotOurFolder(problem)
        missing = [folder for folder in (self.report / STATE_DIR, self.report, *self.report.parents)
                   if not folder.exists()]
        with SafeDir.open(self.report, create=True) as report:
            self.state = report.subdir(STATE_DIR, replace_link=False)
        self.created = missing[::-1]
        fd = self.state.open_rw(LOCK)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            self._close_state()
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise ReportLocked(f"another batchcam run is writing {self.report} (lock held: {self.path})") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        self._mark()
        return self

    def _mark(self) -> None:
        if self.state.is_file(MARKER):
            return
        claimed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        marker = {"tool": "batchcam", "format": 1, "claimed_at": claimed_at, "id": uuid.uuid4().hex[:16]}
        self.state.write_bytes(MARKER, (json.dumps(marker) + "\n").encode())
        self.marked = True

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None
        self._close_state()

    def _close_state(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    def forget_new_report(self) -> None:
        """Undo a brand-new claim: a run refused for its configuration leaves no trace behind."""
        if not self.marked or self.state is None:
            return
        self.state.unlink(MARKER)
        if self.created:
            self.state.unlink(LOCK)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                return  # something else is in it now: leave it
