"""batchcam.read_report: predictions.csv as a typed DataFrame, paths kept exactly."""
from __future__ import annotations

import hashlib
import json

import pandas as pd

import batchcam
from batchcam.records import Row, write_csv
from batchcam.report.review import Review, write_reviews

CLASSES = ("NORMAL", "PNEUMONIA")


def write_report(folder, rows):
    folder.mkdir()
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        write_csv(f, rows, CLASSES)
    (folder / "manifest.json").write_text(json.dumps({"model": {"class_names": list(CLASSES)}, "counts": {"ok": 2}}))


def test_read_report_types_every_column_and_keeps_paths_and_the_manifest(tmp_path):
    rows = [Row(path="NORMAL/001.png", status="ok", prediction="PNEUMONIA", confidence=0.9, probabilities=[0.1, 0.9],
                label="NORMAL", cam_target="PNEUMONIA", cam_peak_x=3, cam_peak_y=4, overlay="overlays/a.jpg",
                width=10, height=12, sha256="00ab", attention_outside=0.7),
            Row(path="nan", status="error", error="cannot decode image: truncated PNG", sha256="0e12"),
            Row(path="007.png", status="ok", prediction="NORMAL", confidence=0.6, probabilities=[0.6, 0.4],
                cam_target="NORMAL", cam_peak_x=0, cam_peak_y=0, overlay="overlays/b.jpg", width=5, height=5)]
    write_report(tmp_path / "r", rows)
    frame = batchcam.read_report(tmp_path / "r")
    assert list(frame["path"]) == ["NORMAL/001.png", "nan", "007.png"]  # never parsed as NaN or a number
    assert list(frame["sha256"]) == ["00ab", "0e12", ""]
    assert isinstance(frame["status"].dtype, pd.CategoricalDtype)
    assert list(frame["status"].cat.categories) == ["ok", "error", "skipped"]
    assert list(frame["prediction"].cat.categories) == list(CLASSES)
    assert frame["prediction"].isna().tolist() == [False, True, False]
    assert frame["correct"].dtype == "boolean" and frame["correct"].tolist()[0] is False
    assert pd.isna(frame["correct"].iloc[2]) and frame["attention_flag"].tolist()[0] is True
    assert frame["confidence"].dtype == "float64" and frame["p_PNEUMONIA"].iloc[0] == 0.9
    assert frame["width"].dtype == "Int64" and pd.isna(frame["width"].iloc[1])
    assert frame.attrs["manifest"]["counts"] == {"ok": 2}
    confusion = pd.crosstab(frame["label"], frame["prediction"])
    assert confusion.loc["NORMAL", "PNEUMONIA"] == 1


def test_pandas_is_imported_only_by_read_report():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import sys, batchcam, batchcam.cli, batchcam.commands.scan\n"
                          "print('pandas' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


def test_read_report_joins_the_current_decisions_and_types_the_change_columns(tmp_path):
    sha = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("a", "b", "c", "old")}
    rows = [Row(path="NORMAL/a.png", status="ok", prediction="NORMAL", confidence=0.8, probabilities=[0.8, 0.2],
                sha256=sha["a"], first_seen="2026-12-01T02:15:00+00:00", change=""),
            Row(path="b.png", status="ok", prediction="PNEUMONIA", confidence=0.7, probabilities=[0.3, 0.7],
                sha256=sha["b"], first_seen="2026-12-02T02:15:00+00:00", change="new"),
            Row(path="c.png", status="error", error="cannot decode image", sha256=sha["c"],
                first_seen="2026-12-02T02:15:00+00:00", change="prediction changed")]
    write_report(tmp_path / "r", rows)
    with open(tmp_path / "r" / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        write_reviews(f, [
            Review("NORMAL/a.png", sha["old"], "NORMAL", "0.8", "agree", "earlier bytes",
                   "2026-11-30T08:00:00.000+00:00", "file changed"),
            Review("b.png", sha["b"], "PNEUMONIA", "0.7", "disagree", 'a, "quoted" note',
                   "2026-12-02T08:00:00.000+00:00"),
            Review("gone.png", sha["c"], "NORMAL", "", "unsure", "", "2026-12-01T08:00:00.000+00:00", "file gone")])
    frame = batchcam.read_report(tmp_path / "r")
    assert list(frame["path"]) == ["NORMAL/a.png", "b.png", "c.png"] and len(frame) == 3
    assert list(frame["decision"].cat.categories) == ["agree", "disagree", "unsure"]
    assert frame["decision"].isna().tolist() == [True, False, True]        # a's decision is about other bytes
    assert frame["decision"].iloc[1] == "disagree" and frame["note"].tolist() == ["", 'a, "quoted" note', ""]
    assert isinstance(frame["reviewed_at"].dtype, pd.DatetimeTZDtype) and pd.isna(frame["reviewed_at"].iloc[0])
    assert frame["reviewed_at"].iloc[1] == pd.Timestamp("2026-12-02T08:00:00Z")
    assert list(frame["change"].cat.categories) == ["new", "changed", "prediction changed"]
    assert frame["change"].tolist()[1:] == ["new", "prediction changed"] and pd.isna(frame["change"].iloc[0])
    assert frame["first_seen"].iloc[0] == pd.Timestamp("2026-12-01T02:15:00Z")
    disagreements = frame[frame["decision"] == "disagree"]
    assert list(disagreements["path"]) == ["b.png"]


def test_read_report_without_reviews_has_no_decision_columns(tmp_path):
    write_report(tmp_path / "r", [Row(path="a.png", status="ok", prediction="NORMAL", confidence=0.9,
                                      probabilities=[0.9, 0.1])])
    assert "decision" not in batchcam.read_report(tmp_path / "r").columns
