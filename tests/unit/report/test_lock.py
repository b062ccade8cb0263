"""The lock is taken on the file at REPORT/.batchcam/lock, whatever replaces it or links to it."""
from __future__ import annotations

import fcntl
import os

from batchcam.report import lock as locklib
from batchcam.report.lock import LOCK, STATE_DIR, ReportLock


def test_a_lock_file_replaced_between_open_and_lock_is_locked_again_at_its_name(tmp_path, monkeypatch):
    report = tmp_path / "report"
    with ReportLock(report):
        pass
    lockf, locked = fcntl.lockf, []

    def replace_the_file_then_lock(fd, operation, *args):
        if not locked:  # another process put a new lock file in place after this one opened the old
            (report / STATE_DIR / "new").write_text("")
            os.replace(report / STATE_DIR / "new", report / STATE_DIR / LOCK)
        locked.append(os.fstat(fd).st_ino)
        return lockf(fd, operation, *args)

    monkeypatch.setattr(locklib.fcntl, "lockf", replace_the_file_then_lock)
    with ReportLock(report) as held:
        assert os.fstat(held.fd).st_ino == os.stat(report / STATE_DIR / LOCK).st_ino
    assert len(locked) == 2 and locked[0] != locked[1]


def test_a_lock_file_with_another_name_is_locked_in_place_and_left_as_it_is(tmp_path):
    report = tmp_path / "report"
    with ReportLock(report):
        pass
    backup = tmp_path / "lock-in-a-backup"
    backup.write_text("12345\n")
    os.unlink(report / STATE_DIR / LOCK)
    os.link(backup, report / STATE_DIR / LOCK)
    with ReportLock(report) as held:
        assert os.path.samestat(os.fstat(held.fd), os.stat(backup))
    assert backup.read_text() == "12345\n"
