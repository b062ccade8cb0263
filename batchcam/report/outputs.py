"""A run's outputs published as one generation, in one place for the three commands that publish:
``scan`` (its CSV, manifest and maps with the gallery and metrics), ``evaluate`` and ``review``
(a finished report re-rendered under its lock: the gallery and metrics, the scan's files kept)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from batchcam.config import DEFAULT_PAGE_SIZE, resolve_positive
from batchcam.errors import ReportWriteError, UsageError
from batchcam.records import Row
from batchcam.report.folder import ReportFolder, json_content
from batchcam.report.gallery import Boxes, render_gallery
from batchcam.report.generations import Content
from batchcam.report.lock import ReportLock
from batchcam.report.review import Review
from batchcam.runtime.interrupt import InterruptGuard

KEPT = ("predictions.csv", "manifest.json", "cams.npz")   # the scan's files a re-rendering publishes again
T = TypeVar("T")


def publish_outputs(report: ReportFolder, rows: list[Row], class_names: Sequence[str], manifest: dict,
                    metrics: dict | None, page_size: int, positive: Sequence[int], *, decisions: dict[str, Review],
                    runs: Sequence[dict], stop: Callable[[], None], drawn: Boxes | None = None,
                    scan_files: Mapping[str, Content] | None = None) -> None:
    """Publish the gallery and metrics.json (none when ``metrics`` is None, as a scan without labels
    writes none) with ``scan_files`` (a scan's CSV, manifest and maps), or, re-rendering a finished
    report, with the scan's files of the last publication (``KEPT``). ``positive``: the classes the
    summary's probability histogram adds up (the binary metrics' positive set)."""
    files: dict[str, Content] = dict(render_gallery(rows, class_names, manifest, metrics, page_size, drawn,
                                                     reviews=decisions, runs=runs, positive=positive))
    if metrics is not None:
        files["metrics.json"] = json_content(metrics)
    if scan_files is None:
        report.publish(files, reuse=KEPT, stop=stop)
    else:
        report.publish({**files, **scan_files}, stop=stop)


def under_lock(report_path: Path, work: Callable[[ReportFolder, Callable[[], None]], T], unchanged: str) -> T:
    """``work(report, stop)`` on the finished report at ``report_path``, holding its lock (exit 75 while
    a scan runs) with SIGINT/SIGTERM deferred to ``stop()``; an OSError is exit 74, saying ``unchanged``."""
    try:
        with ReportLock(report_path) as lock, InterruptGuard() as guard:
            report = ReportFolder.of(lock)
            try:
                return work(report, guard.check)
            finally:
                report.close()
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise ReportWriteError(f"cannot write the report in {report_path}: {e.strerror or e}{where}; "
                               f"{unchanged}") from None


def page_size_of(manifest: dict) -> int:
    """The page size the scan used (its manifest's settings), so re-rendering keeps the pages; the default for
    a report written before manifests held their settings."""
    settings = manifest.get("settings")
    page_size = settings.get("page_size") if isinstance(settings, dict) else None
    if isinstance(page_size, int) and not isinstance(page_size, bool) and page_size >= 1:
        return page_size
    return DEFAULT_PAGE_SIZE


def positive_of(manifest: dict, class_names: Sequence[str]) -> tuple[int, ...]:
    """The classes a report's binary metrics score as positive (its manifest's settings, as the scan resolved
    ``--positive``), so re-rendering scores as the scan did; the default for a report written before
    manifests held them."""
    settings = manifest.get("settings")
    named = settings.get("positive") if isinstance(settings, dict) else None
    if isinstance(named, list) and named and all(isinstance(name, str) for name in named):
        try:
            return resolve_positive(named, class_names)
        except UsageError:
            pass
    return resolve_positive(None, class_names)
