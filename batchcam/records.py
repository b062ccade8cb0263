"""The result row of one image and its schema: each column of predictions.csv declared once, on
the field (or the derived property) it is written from, and how a file is named in the report (its
displayed path, its overlays). Imports nothing heavy.

Everything that lists columns derives them from ``SCHEMA`` when it runs (``batchcam.schema``): the
CSV writer and reader here, ``batchcam.read_report``'s dtypes, predict's and serve's JSON
(``reported``), the gallery's data and its cards' attributes (``shown``), and the row format that
keys the reuse of rows (``ROW_FORMAT``). Adding a column is one declaration here plus the code that
computes its value.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchcam.schema import (
    Choice,
    ClassName,
    CsvColumn,
    Flag,
    Integer,
    Number,
    Schema,
    Shown,
    Text,
    Time,
    column,
    derived,
)
from batchcam.schema import one_line as one_line  # the CSV's form of a reason, shared with report.review

STATUSES = ("ok", "error", "skipped")   # skipped: read, but not what the model is for (decode.selection)
CHANGES = ("new", "changed", "prediction changed")  # "": same file, same prediction as the last run
ATTENTION_THRESHOLD = 0.55    # attention_flag when more than this share of the heat is off the lungs
# Changes in how a value is computed that the declarations cannot show (the overlay rendering, the
# lung-field estimate, ...): bump it with them. Any change to a declaration changes ROW_FORMAT by itself.
ROW_COMPUTATION = 5   # 5: issue 15


def attention_flag(share: float | None) -> bool | None:
    """The gallery's "heat outside the lungs" mark: most of the heat lies off the estimated lung fields."""
    return None if share is None else share > ATTENTION_THRESHOLD


@dataclass
class Row:
    """One image's result. The contract's columns come first, in the contract's order; then the
    explanation checks (batchcam.checks.attention), how far the image lies from the training images
    (batchcam.model.calibration; empty when the checkpoint has no statistics) and what changed since
    the last completed run (report.changes)."""

    path: str = field(metadata=column(Text(), reported="file", shown=Shown()))
    status: str = field(metadata=column(Choice(STATUSES), reported=True, shown=Shown("status")))
    error: str = field(default="", metadata=column(Text(one_line=True), reported=True, shown=Shown()))
    prediction: str = field(default="", metadata=column(ClassName(), reported=True, shown=Shown("pred")))
    confidence: float | None = field(default=None, metadata=column(Number(), reported=True,
                                                                   shown=Shown("conf", digits=4)))
    probabilities: list[float] = field(default_factory=list,            # checkpoint class order
                                       metadata=column(Number(), per_class="p_", reported=True))
    label: str = field(default="", metadata=column(ClassName(), shown=Shown("label")))
    cam_target: str = field(default="", metadata=column(ClassName(), reported=True))
    cam_peak_x: int | None = field(default=None, metadata=column(Integer(), reported=True))
    cam_peak_y: int | None = field(default=None, metadata=column(Integer(), reported=True))
    overlay: str = field(default="", metadata=column(Text(), shown=Shown()))
    width: int | None = field(default=None, metadata=column(Integer(), reported=True))
    height: int | None = field(default=None, metadata=column(Integer(), reported=True))
    sha256: str = field(default="", metadata=column(Text(), reported=True, shown=Shown("sha")))
    model_sha256: str = field(default="", metadata=column(Text()))
    # share of the heat off the lungs (attention.py)
    attention_outside: float | None = field(default=None, metadata=column(Number(), shown=Shown(digits=4)))
    faith_drop_top: float | None = field(default=None, metadata=column(Number()))   # only with --faithfulness
    faith_drop_random: float | None = field(default=None, metadata=column(Number()))
    # Mahalanobis distance to the nearest class mean; beyond the checkpoint's threshold: unlike the training images
    ood_score: float | None = field(default=None, metadata=column(Number(), reported=True, shown=Shown(digits=2)))
    ood_flag: bool | None = field(default=None, metadata=column(Flag(), reported=True, shown=Shown()))
    # start of the run that first saw this path (ISO 8601, UTC); one of CHANGES, or "" (report.changes)
    first_seen: str = field(default="", metadata=column(Time(), shown=Shown("first-seen")))
    change: str = field(default="", metadata=column(Choice(CHANGES), shown=Shown("change")))
    # Not CSV columns: what the incremental store needs to decide whether the row can be reused.
    relpath: str = ""        # the file's own relative path (``path`` may be an escaped form of it)
    size: int = -1           # bytes, as read
    mtime_ns: int = -1
    transient: bool = False  # an error that may not happen again (file changed or vanished mid-scan)
    selection: str = ""      # a DICOM's: the key of the --select rule that scored or skipped it

    def __post_init__(self) -> None:
        self.relpath = self.relpath or self.path

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    @derived(Flag(), after="label", shown=Shown("correct"))
    def correct(self) -> bool | None:
        return None if not (self.ok and self.label) else self.label == self.prediction

    @property
    @derived(Flag(), after="attention_outside", shown=Shown())
    def attention_flag(self) -> bool | None:
        return attention_flag(self.attention_outside)

    @property
    def thumb(self) -> str:
        return thumb_path(self.overlay) if self.overlay else ""

    @property
    def original(self) -> str:
        return original_path(self.overlay) if self.overlay else ""


SCHEMA = Schema(Row)
# What keys the reuse of stored rows (report.store.Settings): the declarations' digest and the computation.
ROW_FORMAT = f"{ROW_COMPUTATION}-{SCHEMA.digest}"


def status_counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per status, every status present (manifest ``counts``; exit code 3 only for ``error``)."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


# ---- what derives from the schema (each reads SCHEMA when called) ---------------------------------

def columns(class_names: Sequence[str]) -> list[str]:
    """The CSV's columns in order, with one p_<CLASS> column per class after confidence."""
    return SCHEMA.csv_names(class_names)


def to_csv_dict(row: Row, class_names: Sequence[str]) -> dict[str, str]:
    return SCHEMA.to_csv(row, class_names)


def from_csv_dict(values: Mapping[str, str | None], class_names: Sequence[str]) -> Row:
    return SCHEMA.from_csv(values, class_names)


def write_csv(stream: io.TextIOBase, rows: Iterable[Row], class_names: Sequence[str]) -> None:
    writer = csv.DictWriter(stream, fieldnames=columns(class_names), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(to_csv_dict(row, class_names))


def read_csv(stream: io.TextIOBase, class_names: Sequence[str]) -> list[Row]:
    return [from_csv_dict(values, class_names) for values in csv.DictReader(stream)]


def csv_dtypes(class_names: Sequence[str]) -> dict[str, CsvColumn]:
    """Each CSV column's pandas dtype, by name (batchcam.read_report)."""
    return SCHEMA.csv_dtypes(class_names)


def reported(row: Row, class_names: Sequence[str]) -> dict[str, Any]:
    """The fields ``predict --json`` and serve's ``POST /api/predict`` report for a file."""
    return SCHEMA.reported(row, class_names)


def shown_columns() -> list[str]:
    """The row's columns in the gallery's data, in order."""
    return [column.name for column in SCHEMA.shown]


def shown_values(row: Row) -> list[Any]:
    """The row's values for the gallery's data, in the order of ``shown_columns``."""
    return SCHEMA.shown_values(row)


def shown_attributes() -> dict[str, str]:
    """Shown column -> the name of the card's data attribute carrying it (``data-<name>``)."""
    return SCHEMA.attributes()


def overlay_path(relpath: str, version: str = "") -> str:
    """A safe, unique overlay name: readable stem + hash of the whole relative path and ``version``.

    Two files called image.png in different folders differ in the hash; nothing in the name can
    leave overlays/ or need escaping. ``version`` (scan passes the file's sha256 and the settings)
    gives a changed file a new overlay name, so a run never overwrites an overlay that the
    previous report's pages still show.
    """
    stem = relpath.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:60] or "image"
    identity = relpath.encode("utf-8", "surrogateescape") + b"\0" + version.encode()
    digest = hashlib.sha256(identity).hexdigest()[:12]
    return f"overlays/{safe}-{digest}.jpg"


def thumb_path(overlay: str) -> str:
    return overlay[: -len(".jpg")] + ".thumb.jpg"


def original_path(overlay: str) -> str:
    """The displayed X-ray without heat (a JPEG copy: the source may be 16-bit or DICOM)."""
    return overlay[: -len(".jpg")] + ".orig.jpg"


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_path(relpath: str) -> str:
    """The form of a relative path shown in predictions.csv, the gallery and the logs; one per file.

    A POSIX file name is bytes and may hold anything but ``/`` and NUL; the report is UTF-8 text
    read by people, spreadsheets and scripts. So a name of printable characters without a backslash
    (any script, spaces, quotes, commas, ``#?%``) is kept as it is, and any other is written with
    Python-style escapes: a byte that is not UTF-8 as ``\\xNN`` (NN >= 80), a control character as
    ``\\n``, ``\\r``, ``\\t`` or ``\\xNN`` (NN < 80), another invisible or layout character (a bidi
    override, a zero-width space, U+2028) as ``\\uNNNN``, and a backslash doubled. Names shown as
    they are hold no backslash and escaped ones always do, so no two files share a displayed path:
    ``path`` is a key (cams.npz, the gallery) as unique as the file.
    """
    if relpath.isprintable() and "\\" not in relpath:
        return relpath
    return "".join(_display_char(char) for char in relpath)


def _display_char(char: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
