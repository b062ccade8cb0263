"""The report folder's writer: overlays, the run's generation of report files, the files kept
across runs (runs.jsonl, reviews.csv, batchcam.log).

Overlays are written into ``overlays/`` as a batch finishes (names versioned by content, never
rewritten); everything else a reader opens (index.html, gallery/, predictions.csv, manifest.json,
metrics.json, cams.npz) is published as one generation (``report.generations``) and switched to in
one rename, so a reader always finds one run's files.
"""
from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

import numpy as np

from batchcam import records as rowlib
from batchcam.cam.overlay import RenderedOverlay
from batchcam.errors import ReportWriteError, UsageError
from batchcam.records import Row
from batchcam.report import review as reviewlib
from batchcam.report.changes import RUNS, parse_runs
from batchcam.report.generations import Content, Generations, open_current
from batchcam.report.lock import MARKER, STATE_DIR, report_id
from batchcam.runtime.fsutil import SafeDir

if TYPE_CHECKING:
    from batchcam.report.lock import ReportLock

LOG = "batchcam.log"
FOLDERS = ("", "overlays", "gallery", STATE_DIR)


def csv_content(rows: Sequence[Row], class_names: Sequence[str]) -> Callable[[BinaryIO], None]:
    """predictions.csv, written straight into the generation's file."""
    def write(f: BinaryIO) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="", write_through=True)
        rowlib.write_csv(text, rows, class_names)
        text.flush()
        text.detach()
    return write


def json_content(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def cams_content(cams: dict[str, np.ndarray]) -> Callable[[BinaryIO], None]:
    """``cams.npz``: one array per row path, written member by member, so a path is only ever a key
    (``np.savez(**cams)`` would take a file named ``file`` or ``allow_pickle`` for its own arguments)."""
    def write(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, cam in cams.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(cam), allow_pickle=False)
    return write


def published_but(report: Path, error: OSError) -> ReportWriteError:
    """Exit 74 for a failure after the switch: the new report is in place, the rest is left to the next run."""
    where = f" ({error.filename})" if error.filename else ""
    return ReportWriteError(f"the new report in {report} is published, but tidying up after it failed: "
                            f"{error.strerror or error}{where}; the next run finishes it")


class ReportFolder:
    """Owns REPORT: creates it and writes every file inside it, and nothing outside it.

    Every file is opened relative to a folder descriptor without following links
    (``fsutil.SafeDir``); REPORT and its state folder are the lock's own descriptors (``of``), and
    ``overlays/`` and ``gallery/`` are opened once. Before anything is written into a folder held
    open, and before anything is removed, the folder is checked to be still the one at its name in
    REPORT (a folder moved out of REPORT during the run is never written to where it now lies).
    Only files batchcam wrote are ever removed: overlays that the row store or the journal names,
    and the recorded files of its own generations.
    """

    def __init__(self, path: Path, folder: SafeDir | None = None, state: SafeDir | None = None):
        self.path = Path(path)
        self._folders: dict[str, SafeDir] = {}
        self._borrowed = {name for name, held in (("", folder), (STATE_DIR, state)) if held is not None}
        if folder is not None:
            self._folders[""] = folder
        if state is not None:
            self._folders[STATE_DIR] = state
        self._opening = threading.Lock()
        self._published: SafeDir | None = None   # the current generation, resolved once for reading

    @classmethod
    def of(cls, lock: ReportLock) -> ReportFolder:
        """The report a held lock claimed, written through the very folders the lock opened."""
        return cls(lock.report, lock.folder, lock.state)

    def prepare(self) -> None:
        self._folder("overlays")

    def close(self) -> None:
        self._forget_published()
        for name, folder in self._folders.items():
            if name not in self._borrowed:
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

    def state(self) -> SafeDir:
        return self._folder(STATE_DIR)

    def check_in_place(self, *more: SafeDir) -> None:
        """FolderMoved (an OSError: exit 74) unless every folder held open, and ``more``, is still
        the folder at its name inside REPORT."""
        for folder in (*self._folders.values(), *more):
            folder.check_in_place()

    # ---- overlays ---------------------------------------------------------------------------------

    def write_overlay(self, overlay: str, rendered: RenderedOverlay) -> None:
        folder = self._folder("overlays")
        folder.check_in_place()
        for name, data in ((overlay, rendered.overlay_jpeg), (rowlib.thumb_path(overlay), rendered.thumb_jpeg),
                           (rowlib.original_path(overlay), rendered.original_jpeg)):
            folder.write_bytes(name.rpartition("/")[2], data)

    def has_overlays(self, row: Row) -> bool:
        if not row.ok:
            return True
        overlays = self._folder("overlays")
        return all(overlays.is_file(name.rpartition("/")[2]) for name in (row.overlay, row.thumb, row.original))

    def remove_unreferenced_overlays(self, rows: Sequence[Row], written: set[str]) -> int:
        """Delete the overlays batchcam wrote (``written``: named by the row store or the journal)
        that no row refers to any more (files gone or changed, a killed run's). Anything else in
        ``overlays/`` stays: batchcam did not create it."""
        keep = {name for row in rows if row.overlay for name in (row.overlay, row.thumb, row.original)}
        overlays = self._folder("overlays")
        self.check_in_place()
        removed = 0
        for name in sorted(written - keep):
            folder, base = name.rpartition("/")[0], name.rpartition("/")[2]
            if folder == "overlays" and overlays.is_file(base) and overlays.unlink(base):
                removed += 1
        return removed

    # ---- the published generation ---------------------------------------------------------------------

    def _published_folder(self) -> SafeDir:
        """The folder holding the report files of the last publication, resolved once: the current
        generation, or REPORT itself for a report written before generations. UsageError when
        ``.batchcam/current`` is not batchcam's."""
        if self._published is None:
            try:
                self._published = open_current(self.state()) or self._folder("")
            except ValueError as e:
                raise UsageError(f"REPORT {self.path}: {e}") from None
        return self._published

    def _forget_published(self) -> None:
        if self._published is not None and self._published is not self._folders.get(""):
            self._published.close()
        self._published = None

    def read_text(self, name: str) -> str | None:
        """A top-level report file of the last publication (never through a link); None when missing."""
        return self._published_folder().read_text(name)

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the last publication (never through a link); None when missing or unreadable."""
        text = self.read_text(name)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None

    def exists(self, name: str) -> bool:
        return self._published_folder().is_file(name)

    def read_scan(self) -> tuple[dict, list[Row], list[str]]:
        """The last scan's manifest, rows and class names, both from one publication, for the commands
        that work on a finished report (evaluate, review); UsageError (exit 2) when they are missing
        or not a scan's."""
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

    def read_cams(self) -> dict[str, np.ndarray]:
        """The last publication's raw maps by row path (reused rows keep theirs); empty when absent,
        unreadable, or when ``.batchcam/current`` is not batchcam's."""
        try:
            data = self._published_folder().read_bytes("cams.npz")
        except UsageError:
            return {}
        if data is None:
            return {}
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as saved:
                return {key: saved[key] for key in saved.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return {}

    # ---- publishing -------------------------------------------------------------------------------

    def _generations(self) -> Generations:
        return Generations(self._folder(""), self.state(), lambda: self._folder("gallery"))

    def publish(self, files: Mapping[str, Content], reuse: Iterable[str] = (),
                stop: Callable[[], None] = lambda: None) -> None:
        """Publish a new generation holding ``files`` (name -> content) and, linked from the last
        publication, those of the files named in ``reuse`` that it has: written in full, then
        switched to in one rename.

        ``stop()`` is called between files and before the switch; whatever it raises (a signal's
        Interrupted), or any failure before the switch, removes the new generation and leaves the
        report exactly as it was. Call ``tidy`` after it returns.
        """
        generations = self._generations()
        generations.tidy()
        generations.adopt_legacy()
        self._forget_published()
        reuse = [name for name in reuse if name not in files and self._published_folder().is_file(name)]
        new = generations.begin([*files, *reuse])
        try:
            for name in reuse:
                new.reuse(name, self._published_folder())
            new.make_empty()
            for name, content in files.items():
                stop()
                new.write(name, content)
            new.finish()
            stop()
            self.check_in_place(new.folder)
            generations.switch(new)
        except BaseException:
            generations.abandon(new)
            raise
        finally:
            self._forget_published()
        new.close()

    def tidy(self) -> None:
        """After ``publish``: remove the links the new generation does not need and the older generations."""
        self.check_in_place()
        self._generations().tidy()

    # ---- files kept across runs -----------------------------------------------------------------------

    def report_id(self) -> str:
        """The identity the gallery keys its stored review decisions by (kept across runs)."""
        return report_id(self.state().read_bytes(MARKER))

    def read_reviews(self) -> list[reviewlib.Review]:
        return reviewlib.read_stored(self._folder("").read_text(reviewlib.REVIEWS))

    def write_reviews(self, reviews: Sequence[reviewlib.Review]) -> None:
        """``reviews.csv``, replaced atomically; kept outside the generations, never removed by a run."""
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

    def open_log(self) -> IO:
        """``REPORT/batchcam.log`` opened for appending (``SafeDir.open_append``: a link planted there is
        replaced, never followed; a file shared with a backup is copied first)."""
        return self._folder("").open_append(LOG, encoding="utf-8", errors="backslashreplace")

