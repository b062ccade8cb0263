"""One run per report folder, and only in a folder that is batchcam's own.

The lock is a POSIX record lock (``fcntl.lockf``) on ``REPORT/.batchcam/lock``. Unlike ``flock``,
a record lock belongs to the process, not to the open file: forked DataLoader workers do not
inherit it, and the kernel drops it the instant the process dies, so a run killed with SIGKILL
(even while its workers linger) never leaves a lock that needs cleaning up by hand.

An existing lock file is never replaced, whatever its link count: a hard-link backup (``cp -al``,
rsnapshot) gives it a second name, and a run that replaced it would lock a file of its own and run
beside the run holding the old one. Once locked, the run checks that the file it locked is still the
one at the name, and locks again otherwise.

A report is marked as batchcam's by ``REPORT/.batchcam/report.json``, written when the folder is
first claimed, and by nothing else (a stray lock or row store is not a mark). batchcam refuses to
write into an existing, non-empty folder without that mark (someone's web site, ROOT itself, a
folder holding only a ``.batchcam/lock``): a scan replaces the report's pages and deletes overlays
it no longer needs, and in a folder it does not own those could be anybody's files.

The lock's folder descriptors (REPORT and its state folder) are opened once and shared with the
writers (``report.folder.ReportFolder.of``), so the run writes into the folders it locked.
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
CURRENT = "current"        # the link to the published generation (report.generations)
ROW_STORE = "rows.jsonl"   # batchcam 0.1 kept one too, but wrote no mark
LOCK_TRIES = 5             # a lock file replaced between open and lock this often: something is racing us


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
    if is_report(report):
        current = state / CURRENT
        if os.path.lexists(current) and not current.is_symlink():
            return (f"{current} is not a link: this report was copied without its links (cp -rL, say). Copy it "
                    f"with cp -a, or remove {current} to scan into it again (its files in REPORT are kept)")
        return None
    if not any(os.scandir(report)):
        return None
    if (state / MARKER).is_symlink():
        return (f"{state / MARKER} is a symbolic link; batchcam reads its mark only from a regular file and will "
                "not follow a link: remove the link (and put the report's report.json back), or choose another --out")
    if (state / ROW_STORE).is_file():
        return (f"--out {report} has a batchcam row store but no {STATE_DIR}/{MARKER}, the only mark of a batchcam "
                f"report: a report of batchcam 0.1, or a folder that only looks like one. If it is your batchcam "
                f"0.1 report, mark it (echo '{{}}' > '{state / MARKER}'); otherwise choose another --out")
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
    """A batchcam report: its state folder is a real folder holding the marker, a regular file."""
    state = Path(report) / STATE_DIR
    marker = state / MARKER
    return (not state.is_symlink() and state.is_dir() and not marker.is_symlink() and marker.is_file())


class ReportLock:
    """Claims REPORT (refusing a folder that is not batchcam's) and holds its lock while open.

    ``root`` is the scanned folder, when there is one, so a report inside it never swallows it.
    """

    def __init__(self, report: Path, root: Path | None = None):
        self.report = Path(report)
        self.root = root
        self.path = self.report / STATE_DIR / LOCK
        self.fd: int | None = None
        self.folder: SafeDir | None = None  # REPORT, opened once
        self.state: SafeDir | None = None   # REPORT/.batchcam, opened once, never through a link
        self.created: list[Path] = []  # folders this run made, deepest last
        self.marked = False            # the marker was written by this run

    def __enter__(self) -> "ReportLock":
        problem = claim_problem(self.report, self.root)
        if problem:
            raise NotOurFolder(problem)
        missing = [folder for folder in (self.report / STATE_DIR, self.report, *self.report.parents)
                   if not folder.exists()]
        try:
            self.folder = SafeDir.open(self.report, create=True)
            self.state = state = self.folder.subdir(STATE_DIR, replace_link=False)
            self.created = missing[::-1]
            self.fd = self._lock(state)
        except BaseException:
            self._close_folders()
            raise
        self._mark(state)
        return self

    def _lock(self, state: SafeDir) -> int:
        """Lock the file at ``.batchcam/lock``: the one at the name once locked, not one replaced meanwhile."""
        for _ in range(LOCK_TRIES):
            fd = state.open_lock_file(LOCK)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise ReportLocked(f"another batchcam run is writing {self.report} "
                                       f"(lock held: {self.path})") from None
                raise
            if state.same_file(LOCK, fd):
                if os.fstat(fd).st_nlink == 1:  # the pid, for people; a lock shared with a backup is left as it is
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)
        raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(self.path))

    def _mark(self, state: SafeDir) -> None:
        if state.is_file(MARKER):
            return
        claimed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        marker = {"tool": "batchcam", "format": 1, "claimed_at": claimed_at, "id": uuid.uuid4().hex[:16]}
        state.write_bytes(MARKER, (json.dumps(marker) + "\n").encode())
        self.marked = True

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the record lock
            self.fd = None
        self._close_folders()

    def _close_folders(self) -> None:
        for folder in (self.state, self.folder):
            if folder is not None:
                folder.close()
        self.state = self.folder = None

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
