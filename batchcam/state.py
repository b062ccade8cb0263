"""What makes re-runs incremental and crash-safe: the row store in ``REPORT/.batchcam/``.

``rows.jsonl`` holds every row of the last complete run; ``journal.jsonl`` collects the rows of
the run in progress, appended and fsynced batch by batch. A run killed at any instant leaves at
most a torn last journal line (ignored on reading), so the next run redoes only the batches that
were in flight. A row is reused when its file's size and mtime_ns and the run's settings (model
sha256, CAM method, target, preprocessing) are unchanged, and its overlay files still exist.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

from batchcam.discover import Candidate
from batchcam.fsutil import atomic_write
from batchcam.lock import STATE_DIR
from batchcam.rows import Row

ROW_FORMAT = 4  # bump whenever a row's meaning or the overlay rendering changes


@dataclass(frozen=True)
class Settings:
    """Everything besides the file itself that a row depends on."""

    model_sha256: str
    cam: str
    target: str
    target_layer: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    faithfulness: bool = False
    heat_scale: str = "image"
    precision: str = "fp32"      # of the forward pass (autocast dtype)
    decode: str = "cpu"          # "gpu": the batched decoder's pixels differ slightly from Pillow's
    overlay_size: int = 512
    row_format: int = ROW_FORMAT

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedFile:
    """A candidate with the size and mtime seen at discovery (the plan's view of the file)."""

    relpath: str
    path: Path
    size: int
    mtime_ns: int


@dataclass
class Plan:
    reuse: list[Row]
    process: list[PlannedFile]


def stat_candidates(candidates: Sequence[Candidate]) -> list[PlannedFile]:
    planned = []
    for candidate in candidates:
        try:
            stat = os.stat(candidate.path)
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime_ns = -1, -1  # read fails later and becomes an error row
        planned.append(PlannedFile(candidate.relpath, candidate.path, size, mtime_ns))
    return planned


def make_plan(files: Sequence[PlannedFile], previous: dict[str, Row], *, full: bool,
              row_is_complete: Callable[[Row], bool]) -> Plan:
    """Split the files into rows to reuse and files to process; rows of vanished files are dropped."""
    reuse, process = [], []
    for planned in files:
        row = None if full else previous.get(planned.relpath)
        if (row is not None and not row.transient and row.size == planned.size
                and row.mtime_ns == planned.mtime_ns and row_is_complete(row)):
            reuse.append(row)
        else:
            process.append(planned)
    return Plan(reuse=reuse, process=process)


class RowStore:
    def __init__(self, report: Path, settings_key: str):
        self.folder = Path(report) / STATE_DIR
        self.settings_key = settings_key
        self._journal = None

    @property
    def rows_path(self) -> Path:
        return self.folder / "rows.jsonl"

    @property
    def journal_path(self) -> Path:
        return self.folder / "journal.jsonl"

    def load(self) -> dict[str, Row]:
        """Rows of the last complete run, then of an interrupted one, made with these settings."""
        rows: dict[str, Row] = {}
        for path in (self.rows_path, self.journal_path):
            for row in self._read(path):
                rows[row.relpath] = row
        return rows

    def __enter__(self) -> "RowStore":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def append(self, rows: Iterable[Row]) -> None:
        """Journal finished rows durably: after this returns, a crash does not lose them."""
        lines = "".join(self._line(row) for row in rows)
        if lines:
            self._journal.write(lines)
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def commit(self, rows: Sequence[Row]) -> None:
        """The run is complete: its rows become the store, and the journal is emptied."""
        with atomic_write(self.rows_path, "w", encoding="utf-8") as f:
            f.writelines(self._line(row) for row in rows)
        self._journal.truncate(0)
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def _line(self, row: Row) -> str:
        return json.dumps({"settings": self.settings_key, "row": asdict(row)}) + "\n"

    def _read(self, path: Path) -> Iterable[Row]:
        names = {f.name for f in fields(Row)}
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if record.get("settings") == self.settings_key:
                    yield Row(**{k: v for k, v in record["row"].items() if k in names})
            except (ValueError, TypeError, KeyError, AttributeError):
                continue  # a torn last line from a killed run, or a record of another format
