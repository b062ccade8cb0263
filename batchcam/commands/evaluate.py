"""``batchcam evaluate REPORT --boxes BOXES.csv``: score a finished report's heatmaps against
ground-truth boxes, then publish a new generation of the report (under its lock) with the new
metrics.json and gallery, and the scan's own CSV, manifest and maps."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batchcam.checks.localisation import Boxes, localisation, read_boxes
from batchcam.config import DEFAULT_PAGE_SIZE
from batchcam.errors import ReportWriteError, UsageError
from batchcam.report.folder import ReportFolder, json_content, published_but
from batchcam.report.gallery import render_gallery
from batchcam.report.generations import Content
from batchcam.report.lock import ReportLock
from batchcam.report.review import current_decisions
from batchcam.report.summary import scan_metrics
from batchcam.runtime.interrupt import InterruptGuard

KEPT = ("predictions.csv", "manifest.json", "cams.npz")   # the scan's files a re-rendering publishes again


def evaluate(report_path: Path, boxes_path: Path, warn=print) -> dict:
    """Score REPORT against the boxes, update metrics.json and the gallery; return the results.

    Raises UsageError for a folder that holds no report or a boxes file that cannot be read,
    NotOurFolder for a folder batchcam did not write, ReportWriteError when REPORT cannot be written.
    """
    report_path = Path(report_path)
    if not (report_path / "predictions.csv").is_file() or not (report_path / "manifest.json").is_file():
        raise UsageError(f"REPORT {report_path} holds no scan report (predictions.csv and manifest.json)")
    boxes = read_boxes(Path(boxes_path))
    try:
        with ReportLock(report_path) as lock, InterruptGuard() as guard:
            report = ReportFolder.of(lock)
            try:
                return _evaluate_locked(report, boxes, boxes_path, warn, guard.check)
            finally:
                report.close()
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise ReportWriteError(f"cannot write the report in {report_path}: {e.strerror or e}{where}; "
                               "the previous report is unchanged") from None


def _evaluate_locked(report: ReportFolder, boxes: Boxes, boxes_path: Path, warn, stop) -> dict:
    report_path = report.path
    manifest, rows, class_names = report.read_scan()
    cams = report.read_cams() if report.exists("cams.npz") else None
    if cams is None:
        warn(f"{report_path}/cams.npz is missing (scan with --save-cams): reporting the pointing game only")
    results = localisation(rows, boxes, cams, str(boxes_path))
    if not results["n"]:
        warn(f"no ok image of {report_path} has a box in {boxes_path}")
    metrics = report.read_json("metrics.json")
    if not isinstance(metrics, dict):
        if report.read_text("metrics.json") is not None:
            warn(f"{report_path / 'metrics.json'} is unreadable; computing it again from predictions.csv")
        metrics = scan_metrics(rows, class_names) or {}
    metrics["localisation"] = results
    drawn: dict[str, Sequence[Sequence[float]]] = {row.path: found for row in rows if (found := boxes.for_row(row))}
    decisions = current_decisions(report.read_reviews(), rows)
    files: dict[str, Content] = dict(render_gallery(rows, class_names, manifest, metrics, page_size_of(manifest),
                                                    drawn, reviews=decisions, runs=report.read_runs()))
    files["metrics.json"] = json_content(metrics)
    report.publish(files, reuse=KEPT, stop=stop)
    try:
        report.tidy()
    except OSError as e:
        raise published_but(report_path, e) from None
    return results


def page_size_of(manifest: dict) -> int:
    """The page size the scan used (its manifest's settings), so re-rendering keeps the pages; the default for
    a report written before manifests held their settings."""
    settings = manifest.get("settings")
    page_size = settings.get("page_size") if isinstance(settings, dict) else None
    if isinstance(page_size, int) and not isinstance(page_size, bool) and page_size >= 1:
        return page_size
    return DEFAULT_PAGE_SIZE
