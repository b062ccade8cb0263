"""The report folder's writer: overlays, predictions.csv, JSON files, cams.npz, gallery pages.

Every file is written to a temporary name in its folder, fsynced and renamed, in the order a
reader can trust: overlays first, then the CSV and the manifest, the gallery last, so an
index.html never points at an overlay that is not there.
"""
from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from batchcam import records as rowlib
from batchcam.cam.overlay import RenderedOverlay
from batchcam.errors import UsageError
from batchcam.records import Row
from batchcam.report import review as reviewlib
from batchcam.report.changes import RUNS, parse_runs
from batchcam.report.lock import MARKER, STATE_DIR, report_id
from batchcam.runtime.fsutil import SafeDir

LOG = "batchcam.log"
FOLDERS = ("", "overlays", "gallery", STATE_DIR)
OUTPUTS = "outputs.json"  # in .batchcam/: the report files the last run wrote, so only those are ever removed
GALLERY_PAGE = re.compile(r"page-[0-9]+\.html")
# The only names outputs.json may give batchcam to remove: a report file, or a file directly in gallery/.
REPORT_FILE = re.compile(r"(predictions\.csv|manifest\.json|metrics\.json|cams\.npz|index\.html"
                         r"|gallery/(?!\.\.?$)[^/\x00]+)")


class ReportFolder:
    """Owns REPORT: creates it and writes every file inside it, and nothing outside it.

    Every file is opened relative to REPORT's folder without following links (``fsutil.SafeDir``):
    a link planted in place of ``overlays/`` or ``gallery/`` is replaced by a real folder, one in
    place of a file by the new file, and nothing is written through either. Only files batchcam
    wrote are ever removed: overlays that the row store or the journal names, and report files listed
    in ``.batchcam/outputs.json`` by the run before.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._folders: dict[str, SafeDir] = {}
        self._opening = threading.Lock()
        self._previous: set[str] | None = None
        self._written: set[str] = set()

    def prepare(self) -> None:
        self._folder("overlays")

    def close(self) -> None:
        for folder in self._folders.values():
            folder.close()
        self._folders.clear()

    def _folder(self, name: str) -> SafeDir:
        """REPORT itself (``""``), its state folder or one of its sub-folders, opened once."""
        if name not in FOLDERS:
            raise ValueError(f"{name!r} is not one of the report's folders")
        with self._opening:
            if name not in self._folders:
                if name == "":
                    self._folders[name] = SafeDir.open(self.path, create=True)
                else:
                    root = self._folders.get("") or self._folders.setdefault("", SafeDir.open(self.path, create=True))
                    self._folders[name] = root.subdir(name, replace_link=name != STATE_DIR)
            return self._folders[name]

    def _split(self, name: str) -> tuple[SafeDir, str]:
        folder, _, base = name.rpartition("/")
        return self._folder(folder), base

    def state(self) -> SafeDir:
        return self._folder(STATE_DIR)

    def remove_unreferenced_overlays(self, rows: Sequence[Row], written: set[str]) -> int:
        """Delete the overlays batchcam wrote (``written``: named by the row store or the journal)
        that no row refers to any more (files gone or changed, a killed run's). Anything else in
        ``overlays/`` stays: batchcam did not create it."""
        keep = {name for row in rows if row.overlay for name in (row.overlay, row.thumb, row.original)}
        overlays = self._folder("overlays")
        removed = 0
        for name in sorted(written - keep):
            folder, base = name.rpartition("/")[0], name.rpartition("/")[2]
            if folder == "overlays" and overlays.is_file(base) and overlays.unlink(base):
                removed += 1
        return removed

    def write_overlay(self, overlay: str, rendered: RenderedOverlay) -> None:
        folder = self._folder("overlays")
        for name, data in ((overlay, rendered.overlay_jpeg), (rowlib.thumb_path(overlay), rendered.thumb_jpeg),
                           (rowlib.original_path(overlay), rendered.original_jpeg)):
            folder.write_bytes(name.rpartition("/")[2], data)

    def write_csv(self, rows: Sequence[Row], class_names: Sequence[str]) -> None:
        self._folder("overlays").fsync()
        with self._folder("").atomic_write("predictions.csv", "w", encoding="utf-8", newline="") as f:
            rowlib.write_csv(f, rows, class_names)
        self._written.add("predictions.csv")

    def write_json(self, name: str, data: dict) -> None:
        with self._folder("").atomic_write(name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        self._written.add(name)

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the report (never through a link); None when missing or unreadable."""
        text = self._folder("").read_text(name)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None

    def report_id(self) -> str:
        """The identity the gallery keys its stored review decisions by (kept across runs)."""
        return report_id(self.state().read_bytes(MARKER))

    def read_reviews(self) -> list[reviewlib.Review]:
        return reviewlib.read_stored(self._folder("").read_text(reviewlib.REVIEWS))

    def write_reviews(self, reviews: Sequence[reviewlib.Review]) -> None:
        """``reviews.csv``, replaced atomically. Not listed in outputs.json: no run ever removes it."""
        with self._folder("").atomic_write(reviewlib.REVIEWS, "w", encoding="utf-8", newline="") as f:
            reviewlib.write_reviews(f, reviews)

    def read_runs(self) -> list[dict]:
        return parse_runs(self._folder("").read_text(RUNS))

    def append_run(self, record: dict) -> None:
        """One line more in ``runs.jsonl`` for a completed run. The small file is copied with the line
        added and renamed over the old one, so a backup's hard link to it keeps its copy as it was,
        and a kill leaves the old file or the new one; a link there is replaced, never followed."""
        root = self._folder("")
        before = root.read_text(RUNS) or ""
        if before and not before.endswith("\n"):
            before += "\n"  # a torn line of an older version stays on its own line
        root.write_bytes(RUNS, (before + json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        root.fsync()

    def read_text(self, name: str) -> str | None:
        folder, base = self._split(name)
        return folder.read_text(base)

    def read_scan(self) -> tuple[dict, list[Row], list[str]]:
        """The last scan's manifest, rows and class names, for the commands that work on a finished
        report (evaluate, review); UsageError (exit 2) when they are missing or not a scan's."""
        manifest = self.read_json("manifest.json")
        text = self.read_text("predictions.csv")
        if manifest is None or text is None:
            raise UsageError(f"REPORT {self.path} holds no complete scan (manifest.json and predictions.csv)")
        try:
            class_names = [str(name) for name in manifest["model"]["class_names"]]
            return manifest, rowlib.read_csv(io.StringIO(text, newline=""), class_names), class_names
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UsageError(f"REPORT {self.path}: manifest.json or predictions.csv is not a scan's "
                             f"({type(e).__name__}: {e})") from None

    def remove_stale(self, name: str) -> None:
        """Remove a report file the previous run wrote and this one did not (metrics.json without labels)."""
        folder, base = self._split(name)
        if name in self.previous_outputs() and folder.is_file(base):
            folder.unlink(base)

    def has_overlays(self, row: Row) -> bool:
        if not row.ok:
            return True
        overlays = self._folder("overlays")
        return all(overlays.is_file(name.rpartition("/")[2]) for name in (row.overlay, row.thumb, row.original))

    def read_cams(self) -> dict[str, np.ndarray]:
        """The previous run's raw maps by row path (reused rows keep theirs); empty when absent or unreadable."""
        data = self._folder("").read_bytes("cams.npz")
        if data is None:
            return {}
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as saved:
                return {key: saved[key] for key in saved.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return {}

    def write_cams(self, cams: dict[str, np.ndarray]) -> None:
        """``cams.npz``: one array per row path, written member by member, so a path is only ever a
        key (``np.savez(**cams)`` would take a file named ``file`` or ``allow_pickle`` for its own
        arguments)."""
        with self._folder("").atomic_write("cams.npz", "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for key, cam in cams.items():
                    with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(cam), allow_pickle=False)
        self._written.add("cams.npz")

    def write_gallery(self, pages: dict[str, str]) -> None:
        """Write the gallery's files (relative name -> text), index.html last, so the entry page
        never links to a page that is not there yet; then delete the gallery files the previous
        run wrote and this one did not (gallery/page-N.html beyond the new last page)."""
        for name in sorted(pages, key=lambda n: n == "index.html"):
            folder, base = self._split(name)
            with folder.atomic_write(base, "w", encoding="utf-8") as f:
                f.write(pages[name])
            self._written.add(name)
        for name in sorted(self.previous_outputs() - set(pages)):
            if name == "index.html" or name.startswith("gallery/"):
                self.remove_stale(name)
        for folder in {name.rpartition("/")[0] for name in pages}:
            self._folder(folder).fsync()

    def previous_outputs(self) -> set[str]:
        """What the previous run wrote, from ``.batchcam/outputs.json``; for a report of batchcam 0.1,
        which kept no such list, the names only batchcam gives (metrics.json, gallery/page-N.html)."""
        if self._previous is None:
            text = self.state().read_text(OUTPUTS)
            try:
                listed = set(json.loads(text)["files"]) if text is not None else self._legacy_outputs()
            except (ValueError, KeyError, TypeError):
                listed = self._legacy_outputs()
            self._previous = {name for name in listed if isinstance(name, str) and REPORT_FILE.fullmatch(name)}
        return self._previous

    def _legacy_outputs(self) -> set[str]:
        root = self._folder("")
        pages = set()
        if root.lstat("gallery") is not None and not root.is_link("gallery"):
            pages = {f"gallery/{name}" for name in self._folder("gallery").names() if GALLERY_PAGE.fullmatch(name)}
        return {"metrics.json", *pages}

    def save_outputs(self) -> None:
        """Record what this run wrote, and what the runs before wrote that is still there (cams.npz
        of an earlier --save-cams run, the CSV when evaluate rewrote only metrics and pages), so
        later runs remove only batchcam's files."""
        still_there = {name for name in self.previous_outputs() - self._written if self.exists(name)}
        files = sorted(self._written | still_there)
        self.state().write_bytes(OUTPUTS, (json.dumps({"files": files}, indent=1) + "\n").encode())
        self._folder("").fsync()

    def exists(self, name: str) -> bool:
        folder, base = name.rpartition("/")[0], name.rpartition("/")[2]
        root = self._folder("")
        if folder and (root.lstat(folder) is None or root.is_link(folder)):
            return False
        return self._folder(folder).is_file(base)


def open_log(report: Path) -> IO:
    """``REPORT/batchcam.log`` opened for appending; a link planted there is replaced, never followed."""
    with SafeDir.open(report) as folder:
        return folder.open_append(LOG, encoding="utf-8", errors="backslashreplace")


