"""``batchcam review REPORT --import review.csv``: merge a reviewer's exported decisions into
``REPORT/reviews.csv`` under the report's lock, with a new generation of the report (metrics.json
and the gallery showing them, the scan's own CSV, manifest and maps), so everyone who opens the
report sees them, in any browser.

Everything is read and checked before the first write: a CSV of another report (its ``report_id``),
wrong columns, a bad row, a path not in the report or a prediction not the report's is refused with
its reason, and REPORT is left exactly as it was.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchcam.config import MAX_REVIEW_IMPORT_BYTES, shown
from batchcam.errors import NotOurFolder, ReportWriteError, UsageError
from batchcam.report import review as reviewlib
from batchcam.report.folder import ReportFolder, published_but
from batchcam.report.lock import MARKER, STATE_DIR, is_report
from batchcam.report.outputs import page_size_of, positive_of, publish_outputs, under_lock
from batchcam.report.summary import scan_metrics
from batchcam.runtime.bounded import read_input


@dataclass(frozen=True)
class ImportResult:
    imported: int
    stored: int          # decisions in reviews.csv after the merge
    current: int         # of those, about files as they are now
    marked: int          # kept, but their file changed or is gone


def import_reviews(report_path: Path, csv_path: Path) -> ImportResult:
    """Merge ``csv_path`` into ``report_path``'s reviews.csv; UsageError (exit 2) for bad input,
    NotOurFolder for a folder that is not a batchcam report, ReportLocked (exit 75) while a scan runs."""
    report_path = Path(report_path)
    if not is_report(report_path):
        raise NotOurFolder(f"{shown(report_path)} is not a batchcam report (no {STATE_DIR}/{MARKER}): "
                           "nothing was imported")
    text = read_export(Path(csv_path))
    return under_lock(report_path, lambda report, stop: _import_locked(report, text, shown(csv_path), stop),
                      "the report and reviews.csv are unchanged")


def read_export(path: Path) -> str:
    """The exported CSV as text, read bounded (``config.MAX_REVIEW_IMPORT_BYTES``) from a regular file only."""
    data = read_input(path, MAX_REVIEW_IMPORT_BYTES, "--import", "the review.csv the gallery exported")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"--import {shown(path)} is not UTF-8 text: not a gallery's review.csv") from None


def _import_locked(report: ReportFolder, text: str, source: str, stop: Callable[[], None]) -> ImportResult:
    """Check the import, publish the generation showing it, then write reviews.csv (after the switch:
    a failure or a signal before it leaves the report and reviews.csv as they were)."""
    manifest, rows, class_names = report.read_scan()
    imported = reviewlib.parse_export(text, source, class_names, report.report_id())
    reviewlib.check_belongs(imported, rows, source)
    imported = reviewlib.with_report_values(imported, rows, source)
    merged = reviewlib.mark_states(reviewlib.merge(report.read_reviews(), imported), rows)
    decisions = reviewlib.current_decisions(merged, rows)
    positive = positive_of(manifest, class_names)
    metrics = report.read_json("metrics.json")
    if not isinstance(metrics, dict):
        metrics = scan_metrics(rows, class_names, positive)
    metrics = reviewlib.with_review(metrics, rows, decisions)
    publish_outputs(report, rows, class_names, manifest, metrics, page_size_of(manifest), positive, decisions=decisions,
                    runs=report.read_runs(), stop=stop)
    try:
        report.write_reviews(merged)
    except OSError as e:
        raise ReportWriteError(f"the gallery of {report.path} shows the imported decisions, but "
                               f"{reviewlib.REVIEWS} could not be written: {e.strerror or e}; import again") from None
    try:
        report.tidy()
    except OSError as e:
        raise published_but(report.path, e) from None
    return ImportResult(imported=len(imported), stored=len(merged), current=len(decisions),
                        marked=sum(bool(review.state) for review in merged))
