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

from batchcam.cli import main
from batchcam.model.checkpoint import ModelSpec, build_model, save_checkpoint
from batchcam.synthetic import generate
from conftest import TINY_SIZE, lock_held_elsewhere, write_xrays

REPO = Path(__file__).resolve().parents[2]
EXPORT_HEADER = "path,sha256,prediction,confidence,decision,note,reviewed_at\n"


def scan(root: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["scan", str(root), "--out", str(out), "--model", str(model), "--workers", "0", "--quiet", *extra])


def read_rows(report: Path) -> dict[str, dict]:
    with open(report / "predictions.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def export_line(row: dict, decision: str, note: str, at: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([row["path"], row["sha256"], row["prediction"], row["confidence"],
                                                   decision, note, at])
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
    assert scan(root, out, tiny_model) == 0
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
    rows = read_rows(report)
    first, second = sorted(rows)[:2]
    export = write_export(tmp_path / "review.csv", [
        export_line(rows[first], "disagree", 'looks "normal", to me', "2026-12-02T08:00:00.000Z"),
        export_line(rows[second], "agree", "", "2026-12-02T08:01:00.000Z")])
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
    gallery = (report / "index.html").read_text() + (report / "gallery" / "rows.js").read_text()
    assert 'data-review="disagree"' in gallery and "looks &#34;normal&#34;, to me" in gallery
    assert '"disagree","looks \\"normal\\", to me"' in gallery


def test_a_later_decision_wins_and_an_earlier_one_changes_nothing(report, tmp_path):
    rows = read_rows(report)
    path = sorted(rows)[0]
    at = ("2026-12-02T08:00:00Z", "2026-12-02T09:00:00Z", "2026-12-02T07:00:00Z")
    for name, decision, when in (("one", "agree", at[0]), ("two", "disagree", at[1]), ("three", "unsure", at[2])):
        export = write_export(tmp_path / f"{name}.csv", [export_line(rows[path], decision, name, when)])
        assert main(["review", str(report), "--import", str(export)]) == 0
    assert [(r["decision"], r["note"]) for r in stored_reviews(report)] == [("disagree", "two")]


@pytest.mark.parametrize("case", ["another report", "wrong columns", "path not in report", "bad decision",
                                  "bad sha256", "not utf-8", "empty"])
def test_bad_input_is_refused_with_its_reason_and_changes_nothing(report, tmp_path, capsys, case):
    rows = read_rows(report)
    good = export_line(rows[sorted(rows)[0]], "agree", "", "2026-12-02T08:00:00Z")
    export = tmp_path / "review.csv"
    if case == "another report":
        write_export(export, [good.replace(sorted(rows)[0], "elsewhere/x.png")])
        reason = "is not a review of this report"
    elif case == "wrong columns":
        export.write_text("path,verdict\nNORMAL/img00.png,agree\n")
        reason = "missing column(s) sha256, prediction, confidence, decision, note, reviewed_at"
    elif case == "path not in report":
        write_export(export, [good, good.replace(sorted(rows)[0], "NORMAL/gone.png")])
        reason = "names 1 path(s) not in this report: 'NORMAL/gone.png'"
    elif case == "bad decision":
        write_export(export, [good.replace(",agree,", ",maybe,")])
        reason = "decision 'maybe' is not one of agree, disagree, unsure"
    elif case == "bad sha256":
        write_export(export, [good.replace(rows[sorted(rows)[0]]["sha256"], "abc")])
        reason = "sha256 'abc' is not 64 lowercase hex digits"
    elif case == "not utf-8":
        export.write_bytes(EXPORT_HEADER.encode() + b"\xff\xfe,,\n")
        reason = "is not UTF-8 text"
    else:
        write_export(export, [])
        reason = "holds no decisions"
    write_export(tmp_path / "good.csv", [good])
    assert main(["review", str(report), "--import", str(tmp_path / "good.csv")]) == 0   # reviews.csv exists
    before = report_state(report)
    capsys.readouterr()
    assert main(["review", str(report), "--import", str(export)]) == 2
    assert reason in capsys.readouterr().err
    assert report_state(report) == before


def test_import_needs_a_batchcam_report_and_waits_for_no_lock(report, tmp_path, capsys):
    rows = read_rows(report)
    export = write_export(tmp_path / "review.csv",
                          [export_line(rows[sorted(rows)[0]], "agree", "", "2026-12-02T08:00:00Z")])
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
    assert scan(root, out, tiny_model) == 0
    rows = read_rows(out)
    gone = files[0].relative_to(root).as_posix()
    export = write_export(tmp_path / "review.csv", [export_line(rows[gone], "disagree", "", "2026-12-02T08:00:00Z")])
    assert main(["review", str(out), "--import", str(export)]) == 0
    files[0].unlink()
    assert scan(root, out, tiny_model) == 0
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

    assert scan(root, out, pneumonia_model) == 0
    first = read_rows(out)
    assert {row["change"] for row in first.values()} == {"new"}
    first_started = json.loads((out / "manifest.json").read_text())["started_at"]
    assert {row["first_seen"] for row in first.values()} == {first_started}

    # run 2: a new file and a changed file
    added = root / "NORMAL" / "added.png"
    generate(10, "NORMAL", (160, 128)).image.save(added)
    changed = files[1]
    generate(11, "PNEUMONIA", (160, 128)).image.save(changed)
    assert scan(root, out, pneumonia_model) == 0
    second = read_rows(out)
    changes = {path: row["change"] for path, row in second.items()}
    assert changes == {"NORMAL/added.png": "new", changed.relative_to(root).as_posix(): "changed",
                       files[0].relative_to(root).as_posix(): "", files[2].relative_to(root).as_posix(): ""}
    second_manifest = json.loads((out / "manifest.json").read_text())
    assert second["NORMAL/added.png"]["first_seen"] == second_manifest["started_at"]
    assert second[changed.relative_to(root).as_posix()]["first_seen"] == first_started
    assert second_manifest["changes"] == {"since": first_started, "new": 1, "changed": 1, "prediction_changed": 0}

    # run 3: another model re-scores everything; every prediction flips to NORMAL
    assert scan(root, out, other_checkpoint(tmp_path / "normal.pt")) == 0
    third = read_rows(out)
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
