"""report.store's plan: which rows are reused, which files processed, which rows kept unread."""
from __future__ import annotations

from pathlib import Path

from batchcam.records import Row
from batchcam.report.store import PlannedFile, make_plan


def row(path: str, size: int = 10) -> Row:
    return Row(path=path, status="ok", size=size, mtime_ns=1, sha256=path)


def planned(path: str, size: int = 10) -> PlannedFile:
    return PlannedFile(path, Path(path), size, 1)


def test_rows_under_an_unlisted_folder_are_kept_and_only_those():
    previous = {p: row(p) for p in ("a/x.png", "a/deep/y.png", "ab/z.png", "b/w.png", "top.png")}
    plan = make_plan([planned("b/w.png", size=11), planned("top.png")], previous, full=False,
                     row_is_complete=lambda r: True, unlisted=["a"])
    assert sorted(r.path for r in plan.kept) == ["a/deep/y.png", "a/x.png"]      # not ab/z.png: gone
    assert sorted(r.path for r in plan.reuse) == ["a/deep/y.png", "a/x.png", "top.png"]
    assert [p.relpath for p in plan.process] == ["b/w.png"]


def test_kept_rows_come_from_this_runs_settings_first_then_from_the_last_run_even_with_full():
    mine = row("a/x.png")
    older_x, older_y = (Row(path=p, status="ok", model_sha256="another model") for p in ("a/x.png", "a/y.png"))
    plan = make_plan([], {"a/x.png": mine}, full=True, row_is_complete=lambda r: False, unlisted=["a"],
                     last_run={"a/x.png": older_x, "a/y.png": older_y})
    assert plan.kept == [mine, older_y] and plan.process == []


def test_without_unlisted_folders_vanished_rows_are_dropped():
    plan = make_plan([planned("b.png")], {"a/x.png": row("a/x.png"), "b.png": row("b.png")}, full=False,
                     row_is_complete=lambda r: True)
    assert plan.kept == [] and [r.path for r in plan.reuse] == ["b.png"]
