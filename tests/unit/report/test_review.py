"""report.review: the exported review.csv checked row by row, merging (later wins), states, counts."""
from __future__ import annotations

import hashlib

import pytest

from batchcam.errors import UsageError
from batchcam.records import Row
from batchcam.report.review import (
    FILE_CHANGED,
    FILE_GONE,
    Review,
    check_belongs,
    current_decisions,
    mark_states,
    merge,
    parse_export,
    review_summary,
    with_review,
)

CLASSES = ("NORMAL", "PNEUMONIA")
SHA = {name: hashlib.sha256(name.encode()).hexdigest() for name in "abcx"}
HEADER = "path,sha256,prediction,confidence,decision,note,reviewed_at\n"


def review(path: str, sha: str, decision: str, at: str, note: str = "") -> Review:
    return Review(path, SHA[sha], "NORMAL", "0.9", decision, note, at)


def rows() -> list[Row]:
    return [Row(path="a.png", status="ok", prediction="NORMAL", sha256=SHA["a"]),
            Row(path="b.png", status="ok", prediction="PNEUMONIA", sha256=SHA["b"]),
            Row(path="c.png", status="error", sha256=SHA["c"])]


def test_parse_export_normalises_times_to_utc_and_notes_to_one_line():
    text = HEADER + f'a.png,{SHA["a"]},NORMAL,0.9,agree,"two\nlines",2026-12-02T09:00:00.5+01:00\n'
    [parsed] = parse_export(text, "review.csv", CLASSES)
    assert parsed.reviewed_at == "2026-12-02T08:00:00.500+00:00" and parsed.note == "two lines"


@pytest.mark.parametrize(("line", "reason"), [
    (f'a.png,{SHA["a"]},CAT,0.9,agree,,2026-12-02T08:00:00Z', "prediction 'CAT' is not a class of this report"),
    (f'a.png,{SHA["a"]},NORMAL,1.5,agree,,2026-12-02T08:00:00Z', "confidence 1.5 is not within 0..1"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,yesterday', "reviewed_at 'yesterday' is not an ISO 8601 time"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,2026-12-02T08:00:00', "has no time zone"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree', "wrong number of fields"),
])
def test_parse_export_names_the_line_and_the_problem(line, reason):
    with pytest.raises(UsageError, match="line 2: ") as raised:
        parse_export(HEADER + line + "\n", "review.csv", CLASSES)
    assert reason in str(raised.value)


def test_merge_keeps_the_later_decision_per_path_and_bytes():
    stored = [review("a.png", "a", "agree", "2026-12-02T08:00:00.000+00:00"),
              review("b.png", "b", "unsure", "2026-12-02T10:00:00.000+00:00")]
    imported = [review("a.png", "a", "disagree", "2026-12-02T09:00:00.000+00:00"),
                review("b.png", "b", "agree", "2026-12-02T07:00:00.000+00:00"),
                review("a.png", "x", "agree", "2026-12-01T07:00:00.000+00:00")]     # other bytes: its own key
    merged = merge(stored, imported)
    assert [(r.path, r.sha256 == SHA["a"], r.decision) for r in merged] == [
        ("a.png", False, "agree"), ("a.png", True, "disagree"), ("b.png", False, "unsure")]


def test_states_and_current_decisions_follow_the_report_as_it_is_now():
    marked = mark_states([review("a.png", "a", "agree", "t"), review("b.png", "x", "agree", "t"),
                          review("gone.png", "c", "agree", "t")], rows())
    assert [r.state for r in marked] == ["", FILE_CHANGED, FILE_GONE]
    assert list(current_decisions(marked, rows())) == ["a.png"]


def test_check_belongs_refuses_another_reports_csv_and_unknown_paths():
    with pytest.raises(UsageError, match="is not a review of this report"):
        check_belongs([review("other/a.png", "a", "agree", "t")], rows(), "review.csv")
    with pytest.raises(UsageError, match="names 1 path"):
        check_belongs([review("a.png", "a", "agree", "t"), review("z.png", "a", "agree", "t")], rows(), "review.csv")
    check_belongs([review("a.png", "a", "agree", "t")], rows(), "review.csv")


def test_summary_counts_and_agreement_by_predicted_class():
    decisions = {"a.png": review("a.png", "a", "disagree", "t"), "b.png": review("b.png", "b", "agree", "t"),
                 "c.png": review("c.png", "c", "unsure", "t")}
    summary = review_summary(rows(), decisions)
    assert summary["counts"] == {"reviewed": 3, "agree": 1, "disagree": 1, "unsure": 1, "not_reviewed": 0}
    assert summary["agreement"]["overall"] == 0.5
    assert summary["agreement"]["by_predicted_class"] == {
        "NORMAL": {"agree": 0, "disagree": 1, "unsure": 0, "agreement": 0.0},
        "PNEUMONIA": {"agree": 1, "disagree": 0, "unsure": 0, "agreement": 1.0}}
    assert with_review(None, rows(), {}) is None
    assert with_review(None, rows(), decisions)["review"] == summary
    assert "agreement" not in review_summary(rows(), {})
