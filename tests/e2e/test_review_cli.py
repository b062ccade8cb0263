"""``batchcam review REPORT --import review.csv`` and what a scan records about changes since the
last run, through the command line on real scans of tiny synthetic folders."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import page_cards, rows_by_path, scan

from batchcam.cli import main
from batchcam.model.checkpoint import ModelSpec, build_model, save_checkpoint
from batchcam.synthetic import generate
from conftest import TINY_SIZE, lock_held_elsewhere, write_xrays

REPO = Path(__file__).resolve().parents[2]
EXPORT_HEADER = "path,sha256,prediction,confidence,decision,note,reviewed_at,report_id\n"


def report_id(report: Path) -> str:
    return json.loads((report / "manifest.json").read_text())["report_id"]


def export_line(row: dict, decision: str, note: str, at: str, of: Path) -> str:
    """One line of the gallery's export of the report ``of``."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([row["path"], row["sha256"], row["prediction"], row["confidence"],
                                                   decision, note, at, report_id(of)])
    return out.getvalue()


def report_state(report: Path) -> dict[str, bytes]:
    """Every file of the report, with its bytes (the lock file's pid aside)."""
    return {str(p.relative_to(report)): p.read_bytes() for p in sorted(report.rglob("*"))
            if p.is_file() and p.name != "lock"}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("review") / "xrays"
    write_xrays(root, count=4)
    out = root.parent / "report"
    assert scan(root, out, tiny_model, "--quiet") == 0
    return out


@pytest.fixture
def report(scanned, tmp_path) -> Path:
    """A fresh copy of the scanned report for each test (the lock, state folder and links included)."""
    import shutil

    copy = tmp_path / "report"
    shutil.copytree(scanned, copy, symlinks=True)
    return copy


def write_export(path: Path, lines: list[str]) -> Path:
    path.write_text(EXPORT_HEADER + "".join(lines), encoding="utf-8")
    return path


def stored_reviews(report: Path) -> list[dict]:
    with open(report / "reviews.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_import_merges_decisions_into_reviews_csv_metrics_and_the_gallery(report, tmp_path, capsys):
    rows = rows_by_path(report)
    first, second = sorted(rows)[:2]
    export = write_export(tmp_path / "review.csv", [
        export_line(rows[first], "disagree", 'looks "normal", to me', "2026-12-02T08:00:00.000Z", report),
        export_line(rows[second], "agree", "", "2026-12-02T08:01:00.000Z", report)])
    assert main(["review", str(report), "--import", str(export)]) == 0
    assert "imported 2 decisions" in capsys.readouterr().out
    stored = stored_reviews(report)
    assert [(r["path"], r["decision"], r["note"], r["state"]) for r in stored] == [
        (first, "disagree", 'looks "normal", to me', ""), (second, "agree", "", "")]
    assert stored[0]["reviewed_at"] == "2026-12-02T08:00:00.000+00:00"
    review = json.loads((report / "metrics.json").read_text())["review"]
    assert review["counts"] == {"reviewed": 2, "agree": 1, "disagree": 1, "unsure": 0, "not_reviewed": 2}
    assert review["agreement"]["overall"] == 0.5
    by_class = review["agreement"]["by_predicted_class"]
    assert sum(tally["disagree"] for tally in by_class.values()) == 1
    shown = {card["path"]: card for card in page_cards((report / "index.html").read_text(encoding="utf-8"))}
    assert (shown[first]["decision"], shown[first]["note"]) == ("disagree", 'looks "normal", to me')
    assert '"disagree","looks \\"normal\\", to me"' in (report / "gallery" / "rows.js").read_text()


def test_a_later_decision_wins_and_an_earlier_one_changes_nothing(report, tmp_path):
    rows = rows_by_path(report)
    path = sorted(rows)[0]
    at = ("2026-12-02T08:00:00Z", "2026-12-02T09:00:00Z", "2026-12-02T07:00:00Z")
    for name, decision, when in (("one", "agree", at[0]), ("two", "disagree", at[1]), ("three", "unsure", at[2])):
        export = write_export(tmp_path / f"{name}.csv", [export_line(rows[path], decision, name, when, report)])
        assert main(["review", str(report), "--import", str(export)]) == 0
    assert [(r["decision"], r["note"]) for r in stored_reviews(report)] == [("disagree", "two")]


@pytest.fixture(scope="module")
def other_report(scanned, tiny_model) -> Path:
    """Another report of the very same folder: same paths, same bytes, another report_id."""
    other = scanned.parent / "other-report"
    assert scan(scanned.parent / "xrays", other, tiny_model, "--quiet") == 0
    assert report_id(other) != report_id(scanned)
    return other


def flipped(prediction: str) -> str:
    return "NORMAL" if prediction == "PNEUMONIA" else "PNEUMONIA"


@pytest.mark.parametrize("case", ["paths of another folder", "another report of the same folder", "no report_id",
                                  "wrong columns", "path not in report", "bad decision", "bad sha256", "not utf-8",
                                  "empty", "time beyond UTC", "another prediction"])
def test_bad_input_is_refused_with_its_reason_and_changes_nothing(report, other_report, tmp_path, capsys, case):
    rows = rows_by_path(report)
    first = rows[sorted(rows)[0]]
    good = export_line(first, "agree", "", "2026-12-02T08:00:00Z", report)
    export = tmp_path / "review.csv"
    if case == "paths of another folder":
        write_export(export, [good.replace(sorted(rows)[0], "elsewhere/x.png")])
        reason = "is not a review of this report"
    elif case == "another report of the same folder":
        write_export(export, [export_line(first, "agree", "", "2026-12-02T08:00:00Z", other_report)])
        reason = f"was exported from another report (report_id {report_id(other_report)!r}; this report's is " \
                 f"{report_id(report)!r}): import it into the report it came from"
    elif case == "no report_id":
        export.write_text(EXPORT_HEADER.replace(",report_id", "") + good.rsplit(",", 1)[0] + "\n")
        reason = "does not say which report it was exported from (no report_id column"
    elif case == "wrong columns":
        export.write_text("path,verdict\nNORMAL/img00.png,agree\n")
        reason = "missing column(s) sha256, prediction, confidence, decision, note, reviewed_at, report_id"
    elif case == "path not in report":
        write_export(export, [good, good.replace(sorted(rows)[0], "NORMAL/gone.png")])
        reason = "names 1 path(s) not in this report: 'NORMAL/gone.png'"
    elif case == "bad decision":
        write_export(export, [good.replace(",agree,", ",maybe,")])
        reason = "decision 'maybe' is not one of agree, disagree, unsure"
    elif case == "bad sha256":
        write_export(export, [good.replace(first["sha256"], "abc")])
        reason = "sha256 'abc' is not 64 lowercase hex digits"
    elif case == "not utf-8":
        export.write_bytes(EXPORT_HEADER.encode() + b"\xff\xfe,,\n")
        reason = "is not UTF-8 text"
    elif case == "empty":
        write_export(export, [])
        reason = "holds no decisions"
    elif case == "time beyond UTC":
        write_export(export, [export_line(first, "agree", "", "0001-01-01T00:00:00+23:59", report)])
        reason = "line 2: reviewed_at '0001-01-01T00:00:00+23:59' is out of range in UTC"
    else:
        write_export(export, [export_line({**first, "prediction": flipped(first["prediction"])}, "agree", "",
                                          "2026-12-02T08:00:00Z", report)])
        reason = (f"{first['path']!r}: prediction {flipped(first['prediction'])!r}, but the report predicts "
                  f"{first['prediction']!r} for these bytes")
    write_export(tmp_path / "good.csv", [good])
    assert main(["review", str(report), "--import", str(tmp_path / "good.csv")]) == 0   # reviews.csv exists
    before = report_state(report)
    capsys.readouterr()
    assert main(["review", str(report), "--import", str(export)]) == 2
    said = capsys.readouterr().err
    assert said.startswith("batchcam: error: ") and said.count("\n") == 1 and reason in said, said
    assert report_state(report) == before


def test_a_naive_time_hand_edited_into_reviews_csv_does_not_break_later_imports(report, tmp_path):
    rows = rows_by_path(report)
    path = sorted(rows)[0]
    first = write_export(tmp_path / "one.csv", [export_line(rows[path], "agree", "", "2026-12-02T08:00:00Z", report)])
    assert main(["review", str(report), "--import", str(first)]) == 0
    stored = (report / "reviews.csv").read_text(encoding="utf-8")
    (report / "reviews.csv").write_text(stored.replace("2026-12-02T08:00:00.000+00:00", "2026-12-02T08:00:00"),
                                        encoding="utf-8")
    later = write_export(tmp_path / "two.csv", [export_line(rows[path], "disagree", "", "2026-12-02T09:00:00Z",
                                                            report)])
    assert main(["review", str(report), "--import", str(later)]) == 0
    assert [(r["decision"], r["reviewed_at"]) for r in stored_reviews(report)] == [
        ("disagree", "2026-12-02T09:00:00.000+00:00")]
    earlier = write_export(tmp_path / "three.csv", [export_line(rows[path], "unsure", "", "2026-12-02T07:00:00Z",
                                                                report)])
    (report / "reviews.csv").write_text(stored.replace("2026-12-02T08:00:00.000+00:00", "2026-12-02T08:00:00"),
                                        encoding="utf-8")
    assert main(["review", str(report), "--import", str(earlier)]) == 0    # the naive 08:00 is taken as UTC
    assert [(r["decision"], r["reviewed_at"]) for r in stored_reviews(report)] == [
        ("agree", "2026-12-02T08:00:00.000+00:00")]


FORMULAS = ["=HYPERLINK(\"http://x\",\"click\")", "+1+1", "-2+3", "@SUM(A1)", "'quoted already", "plain note"]


def test_notes_starting_like_a_formula_are_stored_as_text_and_read_back_as_written(report, tmp_path):
    import batchcam

    rows = rows_by_path(report)
    paths = sorted(rows)
    export = write_export(tmp_path / "review.csv", [
        export_line(rows[path], "agree", note, f"2026-12-02T08:0{i}:00Z", report)
        for i, (path, note) in enumerate(zip(paths, FORMULAS))])
    assert main(["review", str(report), "--import", str(export)]) == 0
    with open(report / "reviews.csv", newline="", encoding="utf-8") as f:
        cells = {row["path"]: row["note"] for row in csv.DictReader(f)}
    assert [cells[path] for path in paths] == ["'" + note for note in FORMULAS[:4]]
    frame = batchcam.read_report(report)
    assert list(frame.set_index("path").loc[paths, "note"]) == FORMULAS[:4]
    rows_js = (report / "gallery" / "rows.js").read_text(encoding="utf-8")
    assert json.dumps("=HYPERLINK(\"http://x\",\"click\")") in rows_js and "'=HYPERLINK" not in rows_js


def test_prediction_and_confidence_are_the_reports_not_the_csvs(report, tmp_path):
    rows = rows_by_path(report)
    path = sorted(rows)[0]
    export = write_export(tmp_path / "review.csv", [export_line({**rows[path], "confidence": "0.01"}, "agree", "",
                                                                "2026-12-02T08:00:00Z", report)])
    assert main(["review", str(report), "--import", str(export)]) == 0
    [stored] = stored_reviews(report)
    assert (stored["prediction"], stored["confidence"]) == (rows[path]["prediction"], rows[path]["confidence"])


def test_an_unlabelled_report_keeps_no_metrics_json_when_no_imported_decision_is_about_its_files_as_they_are(
        tmp_path, tiny_model):
    """Decisions about older bytes of its files only: nothing to count, and metrics.json was written as null."""
    root = tmp_path / "unlabelled"
    root.mkdir()
    for seed in range(2):
        generate(seed, "NORMAL", (160, 128)).image.save(root / f"img{seed}.png")
    report = tmp_path / "report"
    assert scan(root, report, tiny_model) == 0
    assert not (report / "metrics.json").exists()
    rows = rows_by_path(report)
    older_bytes = {**rows[sorted(rows)[0]], "sha256": "0" * 64}
    export = write_export(tmp_path / "review.csv", [export_line(older_bytes, "agree", "", "2026-12-02T08:00:00Z",
                                                                report)])
    assert main(["review", str(report), "--import", str(export)]) == 0
    assert [r["sha256"] for r in stored_reviews(report)] == ["0" * 64]
    assert not (report / "metrics.json").exists()


def test_import_needs_a_batchcam_report_and_waits_for_no_lock(report, tmp_path, capsys):
    rows = rows_by_path(report)
    export = write_export(tmp_path / "review.csv",
                          [export_line(rows[sorted(rows)[0]], "agree", "", "2026-12-02T08:00:00Z", report)])
    foreign = tmp_path / "site"
    foreign.mkdir()
    (foreign / "predictions.csv").write_text("path\n")
    assert main(["review", str(foreign), "--import", str(export)]) == 2
    assert "is not a batchcam report" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["predictions.csv"]

    before = report_state(report)
    with lock_held_elsewhere(report):
        run = subprocess.run([sys.executable, "-m", "batchcam", "review", str(report), "--import", str(export)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 75, run.stderr
    assert "another batchcam run is writing" in run.stderr
    assert report_state(report) == before


def test_decisions_on_files_gone_are_kept_and_marked_by_the_next_scan(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    files = write_xrays(root, count=3)
    assert scan(root, out, tiny_model, "--quiet") == 0
    rows = rows_by_path(out)
    gone = files[0].relative_to(root).as_posix()
    export = write_export(tmp_path / "review.csv",
                          [export_line(rows[gone], "disagree", "", "2026-12-02T08:00:00Z", out)])
    assert main(["review", str(out), "--import", str(export)]) == 0
    files[0].unlink()
    assert scan(root, out, tiny_model, "--quiet") == 0
    assert [(r["path"], r["state"]) for r in stored_reviews(out)] == [(gone, "file gone")]
    assert json.loads((out / "metrics.json").read_text())["review"]["counts"]["reviewed"] == 0


def other_checkpoint(path: Path) -> Path:
    """A second tiny model whose head favours the other class of most images."""
    torch.manual_seed(1)
    model = build_model(2, 0.0).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([5.0, -5.0]))      # NORMAL for every image
    save_checkpoint(path, model, ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=TINY_SIZE))
    return path


def test_change_tracking_across_three_runs_new_file_changed_file_and_a_model_change(tmp_path):
    root, out = tmp_path / "xrays", tmp_path / "report"
    files = write_xrays(root, count=3)
    pneumonia_model = tmp_path / "pneumonia.pt"
    torch.manual_seed(0)
    model = build_model(2, 0.0).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([-5.0, 5.0]))      # PNEUMONIA for every image
    save_checkpoint(pneumonia_model, model, ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=TINY_SIZE))

    assert scan(root, out, pneumonia_model, "--quiet") == 0
    first = rows_by_path(out)
    assert {row["change"] for row in first.values()} == {"new"}
    first_started = json.loads((out / "manifest.json").read_text())["started_at"]
    assert {row["first_seen"] for row in first.values()} == {first_started}

    # run 2: a new file and a changed file
    added = root / "NORMAL" / "added.png"
    generate(10, "NORMAL", (160, 128)).image.save(added)
    changed = files[1]
    generate(11, "PNEUMONIA", (160, 128)).image.save(changed)
    assert scan(root, out, pneumonia_model, "--quiet") == 0
    second = rows_by_path(out)
    changes = {path: row["change"] for path, row in second.items()}
    assert changes == {"NORMAL/added.png": "new", changed.relative_to(root).as_posix(): "changed",
                       files[0].relative_to(root).as_posix(): "", files[2].relative_to(root).as_posix(): ""}
    second_manifest = json.loads((out / "manifest.json").read_text())
    assert second["NORMAL/added.png"]["first_seen"] == second_manifest["started_at"]
    assert second[changed.relative_to(root).as_posix()]["first_seen"] == first_started
    assert second_manifest["changes"] == {"since": first_started, "new": 1, "changed": 1, "prediction_changed": 0}

    # run 3: another model re-scores everything; every prediction flips to NORMAL
    assert scan(root, out, other_checkpoint(tmp_path / "normal.pt"), "--quiet") == 0
    third = rows_by_path(out)
    assert {row["change"] for row in third.values()} == {"prediction changed"}
    assert {row["prediction"] for row in third.values()} == {"NORMAL"}
    assert third["NORMAL/added.png"]["first_seen"] == second_manifest["started_at"]
    assert third[files[0].relative_to(root).as_posix()]["first_seen"] == first_started

    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [run["counts"]["new"] for run in runs] == [3, 1, 0]
    assert [run["counts"]["prediction_changed"] for run in runs] == [0, 0, 4]
    assert runs[2]["model_sha256"] == hashlib.sha256((tmp_path / "normal.pt").read_bytes()).hexdigest()
    assert runs[0]["model_sha256"] == runs[1]["model_sha256"] != runs[2]["model_sha256"]
    assert runs[2]["cam"]["method"] == "gradcam"
    index = (out / "index.html").read_text()
    assert "0 new images since the run of " + second_manifest["started_at"][:16].replace("T", " ") in index
    assert "4 predictions changed" in index and index.count('<tr><td>20') == 3      # the last runs table
