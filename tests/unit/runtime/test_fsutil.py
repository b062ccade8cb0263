"""SafeDir's writes: temporary names that never collide with anybody's file, and appends that keep
a file shared with a hard-link backup intact."""
from __future__ import annotations

import os

import pytest

from batchcam.runtime.fsutil import SafeDir, publish_new


def listing(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_file_at_the_old_temporary_name_survives_an_atomic_write(tmp_path):
    planted = tmp_path / f".report.csv.tmp{os.getpid()}"
    planted.write_bytes(b"someone's file")
    with SafeDir.open(tmp_path) as folder:
        folder.write_bytes("report.csv", b"new")
    assert listing(tmp_path) == {planted.name: b"someone's file", "report.csv": b"new"}


def test_a_failed_atomic_write_removes_only_its_own_temporary_file(tmp_path):
    planted = tmp_path / f".report.csv.tmp{os.getpid()}"
    planted.write_bytes(b"someone's file")
    (tmp_path / "report.csv").write_bytes(b"old")
    with SafeDir.open(tmp_path) as folder, pytest.raises(RuntimeError):
        with folder.atomic_write("report.csv", "wb") as f:
            f.write(b"half")
            raise RuntimeError("disk went away")
    assert listing(tmp_path) == {planted.name: b"someone's file", "report.csv": b"old"}


def test_publish_new_never_touches_a_file_at_the_old_temporary_name(tmp_path):
    planted = tmp_path / f".overlay.jpg.tmp{os.getpid()}"
    planted.write_bytes(b"someone's file")
    assert publish_new(tmp_path, "overlay.jpg", b"jpeg")
    assert listing(tmp_path) == {planted.name: b"someone's file", "overlay.jpg": b"jpeg"}


def test_appending_to_a_file_shared_with_a_backup_keeps_its_lines_and_leaves_the_backup_as_it_was(tmp_path):
    log, backup = tmp_path / "batchcam.log", tmp_path / "backup.log"
    log.write_text("line 1\nline 2\n")
    os.link(log, backup)
    with SafeDir.open(tmp_path) as folder, folder.open_append("batchcam.log", encoding="utf-8") as f:
        f.write("line 3\n")
    assert log.read_text() == "line 1\nline 2\nline 3\n"
    assert backup.read_text() == "line 1\nline 2\n"
    assert log.stat().st_nlink == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["backup.log", "batchcam.log"]


def test_a_folder_moved_away_or_replaced_is_no_longer_in_place(tmp_path):
    (tmp_path / "overlays").mkdir()
    with SafeDir.open(tmp_path) as report:
        overlays = report.subdir("overlays")
        assert overlays.in_place()
        (tmp_path / "overlays").rename(tmp_path / "moved")
        assert not overlays.in_place()
        (tmp_path / "overlays").mkdir()
        assert not overlays.in_place()
        overlays.close()
