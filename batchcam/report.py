"""The report folder's writers: overlays, predictions.csv, manifest.json, metrics.json, cams.npz.

Every file is written to a temporary name in its folder, fsynced and renamed, in the order a
reader can trust: overlays first, then the CSV and the manifest, the gallery last, so an
index.html never points at an overlay that is not there.
"""
from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

import batchcam
from batchcam import rows as rowlib
from batchcam.attention import ATTENTION_THRESHOLD, BORDER_MARGIN, REMOVED_FRACTION
from batchcam.fsutil import atomic_write, fsync_dir, write_bytes_atomic
from batchcam.metrics import classification_metrics
from batchcam.model import LoadedModel
from batchcam.overlay import RenderedOverlay
from batchcam.rows import Row

SCHEMA_VERSION = 1


class ReportWriteError(Exception):
    """REPORT could not be written (disk full, permissions): exit 74, the previous report intact."""


class ReportFolder:
    """Owns REPORT: creates it and writes every file inside it, and nothing outside it.

    Files are replaced by rename, which replaces a planted symbolic link instead of following it;
    a symbolic link planted in place of ``overlays/`` is removed rather than written through.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def prepare(self) -> None:
        overlays = self.path / "overlays"
        if overlays.is_symlink():
            overlays.unlink()
        overlays.mkdir(parents=True, exist_ok=True)

    def remove_unreferenced_overlays(self, rows: Sequence[Row]) -> int:
        """Delete overlays no row refers to any more (files gone, changed, or a killed run's)."""
        keep = {name for row in rows if row.overlay for name in (row.overlay, row.thumb, row.original)}
        removed = 0
        for entry in os.scandir(self.path / "overlays"):
            if f"overlays/{entry.name}" not in keep and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def write_overlay(self, overlay: str, rendered: RenderedOverlay) -> None:
        write_bytes_atomic(self.path / overlay, rendered.overlay_jpeg)
        write_bytes_atomic(self.path / rowlib.thumb_path(overlay), rendered.thumb_jpeg)
        write_bytes_atomic(self.path / rowlib.original_path(overlay), rendered.original_jpeg)

    def write_csv(self, rows: Sequence[Row], class_names: Sequence[str]) -> None:
        fsync_dir(self.path / "overlays")
        with atomic_write(self.path / "predictions.csv", "w", encoding="utf-8", newline="") as f:
            rowlib.write_csv(f, rows, class_names)

    def write_json(self, name: str, data: dict) -> None:
        with atomic_write(self.path / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def has_overlays(self, row: Row) -> bool:
        return not row.ok or all((self.path / name).is_file() for name in (row.overlay, row.thumb, row.original))

    def read_cams(self) -> dict[str, np.ndarray]:
        """The previous run's raw maps (reused rows keep theirs); empty when absent or unreadable."""
        try:
            with np.load(self.path / "cams.npz") as saved:
                return {key: saved[key] for key in saved.files}
        except (OSError, ValueError, KeyError):
            return {}

    def write_cams(self, cams: dict[str, np.ndarray]) -> None:
        with atomic_write(self.path / "cams.npz", "wb") as f:
            np.savez_compressed(f, **cams)

    def write_gallery(self, pages: dict[str, str]) -> None:
        """Write the gallery's files (relative name -> text), index.html last, so the entry page
        never links to a page that is not there yet; then delete the pages a previous, longer run
        left in the gallery's own folders (gallery/page-N.html beyond the new last page).

        A symbolic link planted in place of such a folder is removed rather than written through.
        """
        folders = {(self.path / name).parent for name in pages} - {self.path}
        for folder in folders:
            if folder.is_symlink():
                folder.unlink()
            folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(pages, key=lambda n: n == "index.html"):
            with atomic_write(self.path / name, "w", encoding="utf-8") as f:
                f.write(pages[name])
        for folder in folders:
            for stale in folder.glob("*.html"):
                if stale.relative_to(self.path).as_posix() not in pages:
                    stale.unlink()
            fsync_dir(folder)
        fsync_dir(self.path)


def label_for(relpath: str, class_names: Sequence[str]) -> str:
    """The true class when the file's parent folder is named like a class (case-insensitive)."""
    parts = relpath.split("/")
    if len(parts) < 2:
        return ""
    parent = parts[-2].lower()
    return next((name for name in class_names if name.lower() == parent), "")


def scan_metrics(rows: Sequence[Row], class_names: Sequence[str]) -> dict | None:
    """Classification metrics when labels are known, with the explanation checks' summaries.

    The attention summary rides along with the classification metrics; the faithfulness averages
    (asked for with --faithfulness) are written even when no label is known.
    """
    labelled = [row for row in rows if row.ok and row.label]
    faithfulness = faithfulness_summary(rows)
    if not labelled:
        return {"faithfulness": faithfulness} if faithfulness else None
    index = {name: i for i, name in enumerate(class_names)}
    metrics = classification_metrics([index[r.label] for r in labelled], [index[r.prediction] for r in labelled],
                                     np.array([r.probabilities for r in labelled]), class_names)
    metrics["attention"] = attention_summary(rows)
    if faithfulness:
        metrics["faithfulness"] = faithfulness
    return metrics


def attention_summary(rows: Sequence[Row]) -> dict:
    shares = [row.attention_outside for row in rows if row.ok and row.attention_outside is not None]
    return {"region": f"off the estimated lung fields, and the border band ({BORDER_MARGIN:.0%} of each side)",
            "threshold": ATTENTION_THRESHOLD,
            "n": len(shares), "flagged": sum(share > ATTENTION_THRESHOLD for share in shares),
            "mean_outside": round(float(np.mean(shares)), 6) if shares else None}


def faithfulness_summary(rows: Sequence[Row]) -> dict | None:
    """Average probability drops (top 20% of the map removed vs a random region), or None."""
    measured = [row for row in rows if row.ok and row.faith_drop_top is not None]
    if not measured:
        return None
    top = np.array([row.faith_drop_top for row in measured])
    random = np.array([row.faith_drop_random for row in measured])
    return {"n": len(measured), "removed_fraction": REMOVED_FRACTION, "fill": "image mean",
            "mean_drop_top": round(float(top.mean()), 6), "mean_drop_random": round(float(random.mean()), 6),
            "top_beats_random": round(float(np.mean(top > random)), 6)}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "grad-cam", "pillow", "numpy", "jinja2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def manifest(*, root: Path, argv: Sequence[str], loaded: LoadedModel, cam: dict, device: str, counts: dict,
             started_at: str, finished_at: str, seconds: float) -> dict:
    spec = loaded.spec
    return {
        "schema_version": SCHEMA_VERSION,
        "batchcam_version": batchcam.__version__,
        "started_at": started_at,
        "finished_at": finished_at,
        "root": str(root.resolve()),
        "args": list(argv),
        "model": {"path": str(loaded.path), "name": loaded.path.name, "sha256": loaded.sha256, "arch": spec.arch,
                  "class_names": list(spec.class_names), "image_size": spec.image_size, "mean": list(spec.mean),
                  "std": list(spec.std), "dropout": spec.dropout, "demo": loaded.demo},
        "cam": cam,
        "device": device,
        "versions": library_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "counts": counts,
        "timings": {"seconds": round(seconds, 3),
                    "images_per_second": round(counts.get("processed", 0) / seconds, 3) if seconds > 0 else None},
    }
