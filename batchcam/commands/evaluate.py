"""``batchcam evaluate REPORT --boxes BOXES.csv``: score a finished report's heatmaps against
ground-truth boxes, then publish a new generation of the report (under its lock) with the new
metrics.json and gallery, and the scan's own CSV, manifest and maps."""
from __future__ import annotations

from pathlib import Path

from batchcam.checks.localisation import Boxes, localisation, read_boxes
from batchcam.errors import UsageError
from batchcam.report.folder import ReportFolder, published_but
from batchcam.report.gallery import Boxes as DrawnBoxes
from batchcam.report.outputs import page_size_of, positive_of, publish_outputs, under_lock
from batchcam.report.review import current_decisions
from batchcam.report.summary import scan_metrics


def evaluate(report_path: Path, boxes_path: Path, warn=print) -> dict:
    """Score REPORT against the boxes, update metrics.json and the gallery; return the results.

    Raises UsageError for a folder that holds no report or a boxes file that cannot be read,
    NotOurFolder for a folder batchcam did not write, ReportWriteError when REPORT cannot be written.
    """
    report_path = Path(report_path)
    if not (report_path / "predictions.csv").is_file() or not (report_path / "manifest.json").is_file():
        raise UsageError(f"REPORT {report_path} holds no scan report (predictions.csv and manifest.json)")
    boxes = read_boxes(Path(boxes_path))
    return under_lock(report_path, lambda report, stop: _evaluate_locked(report, boxes, boxes_path, warn, stop),
                      "the previous report is unchanged")


def _evaluate_locked(report: ReportFolder, boxes: Boxes, boxes_path: Path, warn, stop) -> dict:
    report_path = report.path
    manifest, rows, class_names = report.read_scan()
    cams = report.read_cams() if report.exists("cams.npz") else None
    if cams is None:
        warn(f"{report_path}/cams.npz is missing (scan with --save-cams): reporting the pointing game only")
    model_block = manifest.get("model")
    results = localisation(rows, boxes, cams, str(boxes_path),
                           preprocessing=model_block if isinstance(model_block, dict) else None)
    if not results["n"]:
        warn(f"no ok image of {report_path} has a box in {boxes_path}")
    positive = positive_of(manifest, class_names)
    metrics = report.read_json("metrics.json")
    if not isinstance(metrics, dict):
        if report.read_text("metrics.json") is not None:
            warn(f"{report_path / 'metrics.json'} is unreadable; computing it again from predictions.csv")
        metrics = scan_metrics(rows, class_names, positive) or {}
    metrics["localisation"] = results
    drawn: DrawnBoxes = {row.path: found for row in rows if (found := boxes.for_row(row))}
    publish_outputs(report, rows, class_names, manifest, metrics, page_size_of(manifest), positive, drawn=drawn,
                    decisions=current_decisions(report.read_reviews(), rows), runs=report.read_runs(), stop=stop)
    try:
        report.tidy()
    except OSError as e:
        raise published_but(report_path, e) from None
    return results

