"""The result row of one image: what predictions.csv holds, how it is written and read, and the
names a file gets in the report (its displayed path, its overlays). Imports nothing heavy."""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BASE_COLUMNS = ("path", "status", "error", "prediction", "confidence")
TAIL_COLUMNS = ("label", "correct", "cam_target", "cam_peak_x", "cam_peak_y", "overlay", "width",
                "height", "sha256", "model_sha256")
# Beyond the contract, after its columns: the explanation checks (batchcam.checks.attention).
CHECK_COLUMNS = ("attention_outside", "attention_flag", "faith_drop_top", "faith_drop_random")
STATUSES = ("ok", "error", "skipped")   # skipped: read, but not what the model is for (decode.selection)
# Then how far the image lies from the training images (batchcam.model.calibration); empty when the
# checkpoint has no statistics.
OOD_COLUMNS = ("ood_score", "ood_flag")
# What changed since the last completed run (report.changes).
CHANGE_COLUMNS = ("first_seen", "change")
CHANGES = ("new", "changed", "prediction changed")  # "": same file, same prediction as the last run
ATTENTION_THRESHOLD = 0.55    # attention_flag when more than this share of the heat is off the lungs


def attention_flag(share: float | None) -> bool | None:
    """The gallery's "heat outside the lungs" mark: most of the heat lies off the estimated lung fields."""
    return None if share is None else share > ATTENTION_THRESHOLD


@dataclass
class Row:
    path: str
    status: str                     # "ok", "error" or "skipped" (STATUSES)
    error: str = ""
    prediction: str = ""
    confidence: float | None = None
    probabilities: list[float] = field(default_factory=list)  # checkpoint class order
    label: str = ""
    cam_target: str = ""
    cam_peak_x: int | None = None
    cam_peak_y: int | None = None
    overlay: str = ""
    width: int | None = None
    height: int | None = None
    sha256: str = ""
    model_sha256: str = ""
    attention_outside: float | None = None   # share of the heat off the lungs (attention.py)
    faith_drop_top: float | None = None      # only with --faithfulness
    faith_drop_random: float | None = None
    ood_score: float | None = None           # Mahalanobis distance to the nearest class mean
    ood_flag: bool | None = None             # beyond the checkpoint's threshold: unlike the training images
    first_seen: str = ""     # start of the run that first saw this path (ISO 8601, UTC)
    change: str = ""         # one of CHANGES, or "" (report.changes)
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
    def correct(self) -> bool | None:
        return None if not (self.ok and self.label) else self.label == self.prediction

    @property
    def attention_flag(self) -> bool | None:
        return attention_flag(self.attention_outside)

    @property
    def thumb(self) -> str:
        return thumb_path(self.overlay) if self.overlay else ""

    @property
    def original(self) -> str:
        return original_path(self.overlay) if self.overlay else ""


def status_counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows per status, every status present (manifest ``counts``; exit code 3 only for ``error``)."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


def columns(class_names: Sequence[str]) -> list[str]:
    """The contract's columns in order, with one p_<CLASS> column per class after confidence."""
    return [*BASE_COLUMNS, *(f"p_{name}" for name in class_names), *TAIL_COLUMNS, *CHECK_COLUMNS, *OOD_COLUMNS,
            *CHANGE_COLUMNS]


def to_csv_dict(row: Row, class_names: Sequence[str]) -> dict[str, str]:
    values = {"path": row.path, "status": row.status, "error": one_line(row.error), "prediction": row.prediction,
              "confidence": _number(row.confidence), "label": row.label,
              "correct": "" if row.correct is None else str(row.correct).lower(), "cam_target": row.cam_target,
              "cam_peak_x": _number(row.cam_peak_x), "cam_peak_y": _number(row.cam_peak_y),
              "overlay": row.overlay, "width": _number(row.width), "height": _number(row.height),
              "sha256": row.sha256, "model_sha256": row.model_sha256,
              "attention_outside": _number(row.attention_outside),
              "attention_flag": "" if row.attention_flag is None else str(row.attention_flag).lower(),
              "faith_drop_top": _number(row.faith_drop_top), "faith_drop_random": _number(row.faith_drop_random),
              "ood_score": _number(row.ood_score), "ood_flag": _boolean(row.ood_flag),
              "first_seen": row.first_seen, "change": row.change}
    for name, p in zip(class_names, row.probabilities or [None] * len(class_names)):
        values[f"p_{name}"] = _number(p)
    return values


def from_csv_dict(values: dict[str, str], class_names: Sequence[str]) -> Row:
    probabilities = [float(values[f"p_{n}"]) for n in class_names] if values.get(f"p_{class_names[0]}") else []
    return Row(path=values["path"], status=values["status"], error=values.get("error", ""),
               prediction=values.get("prediction", ""), confidence=_float(values.get("confidence")),
               probabilities=probabilities, label=values.get("label", ""), cam_target=values.get("cam_target", ""),
               cam_peak_x=_int(values.get("cam_peak_x")), cam_peak_y=_int(values.get("cam_peak_y")),
               overlay=values.get("overlay", ""), width=_int(values.get("width")), height=_int(values.get("height")),
               sha256=values.get("sha256", ""), model_sha256=values.get("model_sha256", ""),
               attention_outside=_float(values.get("attention_outside")),
               faith_drop_top=_float(values.get("faith_drop_top")),
               faith_drop_random=_float(values.get("faith_drop_random")),
               ood_score=_float(values.get("ood_score")), ood_flag=_parse_boolean(values.get("ood_flag")),
               first_seen=values.get("first_seen") or "", change=values.get("change") or "")


def write_csv(stream: io.TextIOBase, rows: Iterable[Row], class_names: Sequence[str]) -> None:
    writer = csv.DictWriter(stream, fieldnames=columns(class_names), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(to_csv_dict(row, class_names))


def read_csv(stream: io.TextIOBase, class_names: Sequence[str]) -> list[Row]:
    return [from_csv_dict(values, class_names) for values in csv.DictReader(stream)]


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


def one_line(text: str) -> str:
    return " ".join(text.split())


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


def _number(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def _boolean(value: bool | None) -> str:
    return "" if value is None else str(value).lower()


def _parse_boolean(text: str | None) -> bool | None:
    return None if not text else text == "true"


def _float(text: str | None) -> float | None:
    return float(text) if text else None


def _int(text: str | None) -> int | None:
    return int(text) if text else None
