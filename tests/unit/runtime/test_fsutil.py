"""SafeDir's writes: temporary names that never collide with anybody's file."""
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
