"""What makes re-runs incremental and crash-safe: the row store in ``REPORT/.batchcam/``.

``rows.jsonl`` holds every row of the last complete run; ``journal.jsonl`` collects the rows of
the run in progress, appended and fsynced batch by batch. A run killed at any instant leaves at
most a torn last journal line (ignored on reading), so the next run redoes only the batches that
were in flight. A row is reused when its file's size and mtime_ns and the run's settings (the model
and every option that affects rows: ``settings_key``) are unchanged, and its overlay files still exist.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from batchcam.config import ScanConfig
from batchcam.decode.discover import Candidate
from batchcam.options import row_settings
from batchcam.records import ROW_FORMAT, Row, original_path, thumb_path
from batchcam.runtime.fsutil import SafeDir

ROWS, JOURNAL = "rows.jsonl", "journal.jsonl"
ROW_FIELDS = {f.name for f in fields(Row)}


def settings_key(config: ScanConfig, resolved: Mapping[str, Any]) -> str:
    """The key a run's rows are stored under: everything besides the file itself that a row depends on.

    That is every option that ``affects_rows`` (``options.row_settings``; ``resolved`` gives the values
    the run resolved, the model as what it contributes) and the row format. A DICOM row also records
    the ``--select`` rule that decided it (``make_plan``).
    """
    text = json.dumps({**row_settings(config, resolved), "row_format": ROW_FORMAT}, sort_keys=True)
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
    kept: list[Row] = field(default_factory=list)  # of ``reuse``: rows under folders that could not be listed


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
              row_is_complete: Callable[[Row], bool], selection: str = "", unlisted: Sequence[str] = (),
              last_run: dict[str, Row] | None = None) -> Plan:
    """Split the files into rows to reuse and files to process; rows of vanished files are dropped.

    A DICOM's row was decided by a ``--select`` rule (``Row.selection``): under another rule
    (``selection``, the rule's key) it is decided again; rows of files without tags are not.

    A folder that could not be listed (``unlisted``, relative to ROOT; ``.`` is ROOT) is not a
    folder that is gone: the rows of files under it are kept as they were (``Plan.kept``, also in
    ``reuse``), from ``previous`` or else from the ``last_run`` whatever its settings, even with
    ``full``, since their files cannot be read again now.
    """
    reuse, process = [], []
    for planned in files:
        row = None if full else previous.get(planned.relpath)
        if (row is not None and not row.transient and row.size == planned.size
                and row.mtime_ns == planned.mtime_ns and row.selection in ("", selection)
                and row_is_complete(row)):
            reuse.append(row)
        else:
            process.append(planned)
    kept = rows_under(unlisted, {planned.relpath for planned in files}, previous, last_run or {})
    return Plan(reuse=reuse + kept, process=process, kept=kept)


def rows_under(folders: Sequence[str], found: set[str], *sources: dict[str, Row]) -> list[Row]:
    """Rows of files under ``folders`` that discovery did not find, each from the first source holding it."""
    if not folders:
        return []
    prefixes = tuple("" if folder in (".", "") else folder.rstrip("/") + "/" for folder in folders)
    kept: dict[str, Row] = {}
    for source in sources:
        for relpath, row in source.items():
            if relpath not in found and relpath not in kept and relpath.startswith(prefixes):
                kept[relpath] = row
    return list(kept.values())


class RowStore:
    """The row store in ``REPORT/.batchcam/`` (``state``, opened without following links).

    The journal also announces the overlay names of each batch before they are written, so the
    overlays of a run killed mid-batch are still known as batchcam's and removed by the next run.
    """

    def __init__(self, state: SafeDir, settings_key: str):
        self.state = state
        self.settings_key = settings_key
        self._journal: IO[str] | None = None

    def load(self) -> dict[str, Row]:
        """Rows of the last complete run, then of an interrupted one, made with these settings."""
        rows: dict[str, Row] = {}
        for name in (ROWS, JOURNAL):
            for record in self._records(name):
                row = self._row(record)
                if row is not None:
                    rows[row.relpath] = row
        return rows

    def last_run(self) -> dict[str, Row]:
        """Rows of the last complete run, whatever their settings: what ``report.changes`` compares with."""
        rows: dict[str, Row] = {}
        for record in self._records(ROWS):
            row = self._any_row(record)
            if row is not None:
                rows[row.relpath] = row
        return rows

    def written_overlays(self) -> set[str]:
        """Every overlay file batchcam wrote that the store or the journal knows of, whatever the settings."""
        names: set[str] = set()
        for name in (ROWS, JOURNAL):
            for record in self._records(name):
                announced = record.get("overlays")
                overlays = announced if isinstance(announced, list) else [record.get("row", {}).get("overlay")]
                for overlay in overlays:
                    if isinstance(overlay, str) and overlay.startswith("overlays/") and overlay.endswith(".jpg"):
                        names.update((overlay, thumb_path(overlay), original_path(overlay)))
        return names

    @property
    def journal(self) -> IO[str]:
        if self._journal is None:
            raise ValueError("the row store's journal is open only inside its with block")
        return self._journal

    def __enter__(self) -> "RowStore":
        self._journal = self.state.open_append(JOURNAL, encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def announce(self, overlays: Iterable[str]) -> None:
        """Say which overlays are about to be written (flushed, not fsynced: a kill cannot lose it,
        and a power cut at worst leaves a few files that are never removed)."""
        names = [name for name in overlays if name]
        if names:
            self.journal.write(json.dumps({"overlays": names}) + "\n")
            self.journal.flush()

    def append(self, rows: Iterable[Row]) -> None:
        """Journal finished rows durably: after this returns, a crash does not lose them."""
        lines = "".join(self._line(row) for row in rows)
        if lines:
            self.journal.write(lines)
            self.journal.flush()
            os.fsync(self.journal.fileno())

    def commit(self, rows: Sequence[Row]) -> None:
        """The run is complete: its rows become the store, and an empty journal replaces the old one
        (by rename, not truncation: a backup's hard link to the journal keeps its copy)."""
        with self.state.atomic_write(ROWS, "w", encoding="utf-8") as f:
            f.writelines(self._line(row) for row in rows)
        self.state.fsync()  # the new rows.jsonl is on disk before the journal that led to it is emptied
        self.state.write_bytes(JOURNAL, b"")
        self.state.fsync()

    def _line(self, row: Row) -> str:
        return json.dumps({"settings": self.settings_key, "row": asdict(row)}) + "\n"

    def _row(self, record: dict) -> Row | None:
        if record.get("settings") != self.settings_key:
            return None
        return self._any_row(record)

    @staticmethod
    def _any_row(record: dict) -> Row | None:
        try:
            return Row(**{k: v for k, v in record["row"].items() if k in ROW_FIELDS})
        except (TypeError, KeyError, AttributeError):
            return None  # a record of another format

    def _records(self, name: str) -> Iterable[dict]:
        text = self.state.read_text(name)
        for line in (text or "").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line from a killed run
            if isinstance(record, dict):
                yield record
