"""Discovery as a hostile night sees it: a folder that cannot be listed, REPORT reached through a
link or a bind mount, a FIFO swapped in for a file between its stat and its open.

The tests run as root here, where ``chmod 000`` proves nothing: the scans that must meet an
unreadable folder run without root's file-access capabilities (``tests/unprivileged.py``), and each
first checks that the folder really cannot be listed in such a process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, rows_by_path, scan, scan_argv, scan_command

from conftest import write_xrays
from tests.unprivileged import make_unreadable, unprivileged_run


def overlay_files(report: Path) -> list[str]:
    return sorted(path.name for path in (report / "overlays").iterdir())


# ---- a folder that cannot be listed is not a folder that is gone -----------------------------

def test_an_unlistable_folder_keeps_its_rows_and_overlays_says_so_and_exits_3(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=4)
    assert scan(root, out, tiny_model, "--quiet") == 0
    before, overlays_before = rows_by_path(out), overlay_files(out)
    pneumonia = sorted(path for path in before if path.startswith("PNEUMONIA/"))
    assert len(pneumonia) == 2

    make_unreadable(root / "PNEUMONIA")
    try:
        night = unprivileged_run(scan_command(root, out, tiny_model, "--quiet"))
    finally:
        (root / "PNEUMONIA").chmod(0o755)
    assert night.returncode == 3, night.stderr
    assert "cannot list folder PNEUMONIA: Permission denied" in night.stderr
    assert "1 folder(s) not listed (2 rows kept as they were)" in night.stdout
    during = rows_by_path(out)
    assert sorted(during) == sorted(before)
    for path in pneumonia:   # kept as they were: same prediction, overlay, first_seen; not new
        assert {**during[path], "change": ""} == {**before[path], "change": ""} and during[path]["change"] == ""
    assert overlay_files(out) == overlays_before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unlisted"] == {"folders": ["PNEUMONIA"], "rows_kept": 2}
    assert manifest["counts"]["found"] == 2
    assert "warning: cannot list folder PNEUMONIA: Permission denied" in (out / "batchcam.log").read_text()

    assert scan(root, out, tiny_model, "--quiet") == 0          # readable again: nothing is new, nothing recomputed
    after = rows_by_path(out)
    assert {path: row["change"] for path, row in after.items()} == dict.fromkeys(before, "")
    assert {path: row["first_seen"] for path, row in after.items()} == {p: r["first_seen"] for p, r in before.items()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unlisted"] == {"folders": [], "rows_kept": 0} and manifest["counts"]["processed"] == 0


def test_an_unlistable_folder_keeps_rows_made_with_other_settings_too(tmp_path, tiny_model):
    """Other settings (another --overlay-size) the night the folder is unreadable: its rows cannot be
    recomputed, so the old ones stay, with their overlays; the others are made again."""
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=4)
    assert scan(root, out, tiny_model, "--quiet") == 0
    before = rows_by_path(out)
    make_unreadable(root / "NORMAL")
    try:
        night = unprivileged_run(scan_command(root, out, tiny_model, "--overlay-size", "256", "--quiet"))
    finally:
        (root / "NORMAL").chmod(0o755)
    assert night.returncode == 3, night.stderr
    during = rows_by_path(out)
    assert [during[p]["overlay"] for p in sorted(before) if p.startswith("NORMAL/")] == \
        [before[p]["overlay"] for p in sorted(before) if p.startswith("NORMAL/")]
    assert all((out / during[p]["overlay"]).is_file() for p in during)
    assert all(during[p]["overlay"] != before[p]["overlay"] for p in during if p.startswith("PNEUMONIA/"))
    assert json.loads((out / "manifest.json").read_text())["unlisted"] == {"folders": ["NORMAL"], "rows_kept": 2}


def test_a_root_that_cannot_be_listed_is_exit_2_and_report_untouched(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=2)
    assert scan(root, out, tiny_model, "--quiet") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"}
    make_unreadable(root)
    try:
        night = unprivileged_run(scan_command(root, out, tiny_model, "--quiet"))
    finally:
        root.chmod(0o755)
    assert night.returncode == 2, night.stderr
    assert f"batchcam: error: ROOT {root}: cannot list ROOT: Permission denied; no image file found elsewhere" \
        in night.stderr and "nothing was changed" in night.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "lock"} == before


# ---- REPORT is never scanned, however it is reached ------------------------------------------

def test_a_link_in_root_to_the_reports_overlays_is_never_scanned(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=2)
    assert scan(root, out, tiny_model, "--quiet") == 0
    (root / "alias").symlink_to(out / "overlays", target_is_directory=True)
    (root / "whole").symlink_to(out, target_is_directory=True)
    counts = []
    for _ in range(3):
        assert scan(root, out, tiny_model, "--quiet") == 0
        counts.append(len(overlay_files(out)))
        assert sorted(rows_by_path(out)) == ["NORMAL/img00.png", "PNEUMONIA/img01.png"]
    assert counts == [6, 6, 6]


def test_a_bind_mount_of_report_inside_root_is_never_scanned(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=2)
    assert scan(root, out, tiny_model, "--quiet") == 0
    mountpoint = root / "mounted"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(out), str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here (mount --bind: {mounted.stderr.strip() or mounted.returncode}); "
                    "the link test covers the identity check")
    try:
        for _ in range(2):
            assert scan(root, out, tiny_model, "--quiet") == 0
            assert sorted(rows_by_path(out)) == ["NORMAL/img00.png", "PNEUMONIA/img01.png"]
        assert len(overlay_files(out)) == 6
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


# ---- nothing discovery opens can block ---------------------------------------------------------

FIFO_SWAP = textwrap.dedent("""
    import os, sys
    from batchcam.cli import main
    from batchcam.decode import discover

    looked_at = discover._not_regular

    def look_then_swap(path):
        found = looked_at(path)
        if os.path.basename(path) == "IM0001":
            os.unlink(path)
            os.mkfifo(path)     # the file became a FIFO after it was looked at, before it is opened
        return found

    discover._not_regular = look_then_swap
    sys.exit(main(sys.argv[1:]))
""")


def test_a_fifo_swapped_in_during_discovery_never_blocks_the_scan(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=2)
    (root / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    try:
        run = subprocess.run([sys.executable, "-c", FIFO_SWAP, *scan_argv(root, out, tiny_model, "--quiet")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the scan blocked on a FIFO swapped in during discovery")
    assert (root / "IM0001").is_fifo()
    assert run.returncode == 0, run.stderr
    assert "skipped IM0001: not a regular file" in run.stderr
    assert sorted(rows_by_path(out)) == ["NORMAL/img00.png", "PNEUMONIA/img01.png"]
