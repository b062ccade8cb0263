"""report.review: the exported review.csv checked row by row, merging (later wins), states, counts."""
from __future__ import annotations

import hashlib
import io

import pytest

from batchcam.errors import UsageError
from batchcam.records import Row
from batchcam.report.review import (
    FILE_CHANGED,
    FILE_GONE,
    Review,
    check_belongs,
    current_decisions,
    formula_escaped,
    formula_unescaped,
    mark_states,
    merge,
    parse_export,
    read_stored,
    review_summary,
    with_report_values,
    with_review,
    write_reviews,
)

CLASSES = ("NORMAL", "PNEUMONIA")
SHA = {name: hashlib.sha256(name.encode()).hexdigest() for name in "abcx"}
HEADER = "path,sha256,prediction,confidence,decision,note,reviewed_at,report_id\n"
REPORT_ID = "r1"


def review(path: str, sha: str, decision: str, at: str, note: str = "") -> Review:
    return Review(path, SHA[sha], "NORMAL", "0.9", decision, note, at)


def rows() -> list[Row]:
    return [Row(path="a.png", status="ok", prediction="NORMAL", sha256=SHA["a"]),
            Row(path="b.png", status="ok", prediction="PNEUMONIA", sha256=SHA["b"]),
            Row(path="c.png", status="error", sha256=SHA["c"])]


def test_parse_export_normalises_times_to_utc_and_notes_to_one_line():
    text = HEADER + f'a.png,{SHA["a"]},NORMAL,0.9,agree,"two\nlines",2026-12-02T09:00:00.5+01:00,r1\n'
    [parsed] = parse_export(text, "review.csv", CLASSES, REPORT_ID)
    assert parsed.reviewed_at == "2026-12-02T08:00:00.500+00:00" and parsed.note == "two lines"


@pytest.mark.parametrize(("line", "reason"), [
    (f'a.png,{SHA["a"]},CAT,0.9,agree,,2026-12-02T08:00:00Z,r1', "prediction 'CAT' is not a class of this report"),
    (f'a.png,{SHA["a"]},NORMAL,1.5,agree,,2026-12-02T08:00:00Z,r1', "confidence 1.5 is not within 0..1"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,yesterday,r1', "reviewed_at 'yesterday' is not an ISO 8601 time"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,2026-12-02T08:00:00,r1', "has no time zone"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,0001-01-01T00:00:00+23:59,r1', "is out of range in UTC"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree,,9999-12-31T23:59:59-00:01,r1', "is out of range in UTC"),
    (f'a.png,{SHA["a"]},NORMAL,0.9,agree', "wrong number of fields"),
])
def test_parse_export_names_the_line_and_the_problem(line, reason):
    with pytest.raises(UsageError, match="line 2: ") as raised:
        parse_export(HEADER + line + "\n", "review.csv", CLASSES, REPORT_ID)
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


def test_an_export_of_another_report_or_of_no_report_is_refused():
    line = f'a.png,{SHA["a"]},NORMAL,0.9,agree,,2026-12-02T08:00:00Z,'
    with pytest.raises(UsageError, match="was exported from another report .report_id 'r2'; this report's is 'r1'"):
        parse_export(HEADER + line + "r2\n", "review.csv", CLASSES, REPORT_ID)
    with pytest.raises(UsageError, match="no report_id column"):
        parse_export(HEADER.replace(",report_id", "") + line[:-1] + "\n", "review.csv", CLASSES, REPORT_ID)


@pytest.mark.parametrize("note", ["=1+1", "+1", "-1", "@A1", "\tx", "\rx", "'already quoted", "''", "plain", ""])
def test_formula_escaping_is_undone_exactly(note):
    escaped = formula_escaped(note)
    assert not escaped.startswith(("=", "+", "-", "@", "\t", "\r"))
    assert formula_unescaped(escaped) == note


def test_stored_notes_round_trip_and_stored_times_compare_whatever_was_hand_edited():
    stored = [review("a.png", "a", "agree", "2026-12-02T08:00:00.000+00:00", note="=cmd|' /C calc'!A0"),
              review("b.png", "b", "agree", "2026-12-02T08:00:00", note="@SUM(1)")]
    text = io.StringIO()
    write_reviews(text, stored)
    assert "'=cmd" in text.getvalue() and "'@SUM" in text.getvalue()
    back = read_stored(text.getvalue())
    assert [r.note for r in back] == ["=cmd|' /C calc'!A0", "@SUM(1)"]
    assert back[1].reviewed_at == "2026-12-02T08:00:00.000+00:00"       # a naive time is taken as UTC
    garbage = [review("a.png", "a", "agree", "not a time"), review("a.png", "a", "unsure", "0001-01-01T00:00:00+23:59")]
    later = review("a.png", "a", "disagree", "2026-12-02T09:00:00.000+00:00")
    assert merge(garbage, [later]) == [later]


def test_prediction_and_confidence_come_from_the_report():
    report_rows = [Row(path="a.png", status="ok", prediction="NORMAL", confidence=0.75, sha256=SHA["a"])]
    [same] = with_report_values([review("a.png", "a", "agree", "t")], report_rows, "review.csv")
    assert (same.prediction, same.confidence) == ("NORMAL", "0.750000")
    [other_bytes] = with_report_values([review("a.png", "x", "agree", "t")], report_rows, "review.csv")
    assert (other_bytes.prediction, other_bytes.confidence) == ("", "")
    judged_otherwise = Review("a.png", SHA["a"], "PNEUMONIA", "0.9", "agree", "", "t")
    with pytest.raises(UsageError, match="prediction 'PNEUMONIA', but the report predicts 'NORMAL'"):
        with_report_values([judged_otherwise], report_rows, "review.csv")
