"""report.changes: what a row's change is against the last run, and the summary's sentence."""
from __future__ import annotations

from batchcam.records import Row
from batchcam.report.changes import mark_changes, parse_runs, since_text


def row(path: str, sha: str, prediction: str = "NORMAL", status: str = "ok", first_seen: str = "") -> Row:
    return Row(path=path, status=status, prediction=prediction if status == "ok" else "", sha256=sha,
               first_seen=first_seen)


def test_new_changed_prediction_changed_or_nothing():
    before = {"same.png": row("same.png", "1", first_seen="2026-11-30T02:00:00+00:00"),
              "edited.png": row("edited.png", "1", first_seen="2026-11-30T02:00:00+00:00"),
              "flipped.png": row("flipped.png", "1", "NORMAL"),
              "broke.png": row("broke.png", "1", "NORMAL")}
    now = [row("same.png", "1"), row("edited.png", "2"), row("flipped.png", "1", "PNEUMONIA"),
           row("broke.png", "1", status="error"), row("added.png", "3")]
    counts = mark_changes(now, before, "2026-12-02T02:00:00+00:00")
    assert [r.change for r in now] == ["", "changed", "prediction changed", "prediction changed", "new"]
    assert [r.first_seen for r in now[:2]] == ["2026-11-30T02:00:00+00:00"] * 2
    assert now[4].first_seen == "2026-12-02T02:00:00+00:00"
    assert now[2].first_seen == "2026-12-02T02:00:00+00:00"   # a store of batchcam before first_seen existed
    assert counts == {"new": 1, "changed": 1, "prediction_changed": 2}


def test_since_text_and_runs_skip_torn_lines():
    runs = parse_runs('{"started_at": "2026-12-01T02:15:09+00:00"}\n{"started_at": "2026-12-0\n[1]\n')
    assert len(runs) == 1
    changes = {"new": 12, "changed": 0, "prediction_changed": 1}
    assert since_text(runs, changes) == "12 new images since the run of 2026-12-01 02:15, 1 prediction changed"
    assert since_text([], {"new": 1, "changed": 0, "prediction_changed": 0}) == (
        "1 new image: the first run recorded for this report")


def test_runs_and_reviews_are_never_written_through_a_planted_link(tmp_path):
    from batchcam.report.folder import ReportFolder
    from batchcam.report.review import Review

    report, victim = tmp_path / "report", tmp_path / "victim.txt"
    report.mkdir()
    victim.write_text("keep me")
    (report / "runs.jsonl").symlink_to(victim)
    (report / "reviews.csv").symlink_to(victim)
    folder = ReportFolder(report)
    try:
        folder.append_run({"started_at": "2026-12-02T02:00:00+00:00"})
        folder.write_reviews([Review("a.png", "0" * 64, "NORMAL", "0.9", "agree", "", "2026-12-02T08:00:00.000+00:00")])
        assert [run["started_at"] for run in folder.read_runs()] == ["2026-12-02T02:00:00+00:00"]
        assert [review.path for review in folder.read_reviews()] == ["a.png"]
    finally:
        folder.close()
    assert victim.read_text() == "keep me"
    assert not (report / "runs.jsonl").is_symlink() and not (report / "reviews.csv").is_symlink()
