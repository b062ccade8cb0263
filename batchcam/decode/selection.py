"""Which DICOM films the model is for: frontal chest radiographs, told by the file's own tags.

A DICOM file says what it holds: ``Modality`` (CR, DX, CT, MR, US, ...), ``BodyPartExamined``
and ``ViewPosition``. These are coded strings, never identifiers, and nothing else is read for the
decision. The rule itself (``config.Selection``: ``--select``, ``--modalities``, ``--views``) is
applied here, once the tags are read and before any pixel is decoded, so a skipped CT series costs a
header read. Files without tags (JPEG, PNG, ...) are always scored; the OOD flag protects those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchcam.config import DICOM_CODE, Selection

if TYPE_CHECKING:  # pydicom is imported only where a DICOM is read
    from pydicom.dataset import Dataset

SELECTION_TAGS = ("Modality", "BodyPartExamined", "ViewPosition")
# A BodyPartExamined naming the chest contains one of these (CHEST, THORAX, LUNG, CHESTABDOMEN, ...).
CHEST_WORDS = ("CHEST", "THORA", "LUNG")
VIEW_KINDS = {"PA": "frontal", "AP": "frontal", "LL": "lateral", "RL": "lateral", "LLD": "decubitus",
              "RLD": "decubitus", "LAO": "oblique", "RAO": "oblique", "LPO": "oblique", "RPO": "oblique"}


@dataclass(frozen=True)
class Acquisition:
    """The three tags, upper-cased and stripped; "" when absent."""

    modality: str = ""
    body_part: str = ""
    view: str = ""


def acquisition_of(ds: Dataset) -> Acquisition:
    """The tags of a pydicom data set (read with ``SELECTION_TAGS`` among its specific tags)."""
    return Acquisition(*(_code(ds, keyword) for keyword in SELECTION_TAGS))


def skip_reason(acquisition: Acquisition, selection: Selection) -> str | None:
    """Why this film is not scored under ``selection`` (one line for the ``error`` column), or None."""
    if selection.everything:
        return None
    modality = acquisition.modality
    if modality not in selection.modalities:
        shown = f"Modality {quoted(modality)}" if modality else "no Modality"
        return f"not a chest radiograph: {shown}"
    part = acquisition.body_part
    if part and not any(word in part for word in CHEST_WORDS):
        return f"not a chest radiograph: BodyPartExamined {quoted(part)}"
    view = acquisition.view
    if view and selection.views is not None and view not in selection.views:
        return f"{VIEW_KINDS.get(view, 'unselected')} view (ViewPosition {quoted(view)})"
    return None


def quoted(code: str) -> str:
    """A tag value as a reason may show it: a well-formed code as it is, anything else not at all."""
    return code if DICOM_CODE.fullmatch(code) else "(not a DICOM code)"


def _code(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed element reads as absent's opposite: present and unusable
        return "?"
    if value is None:
        return ""
    if not isinstance(value, str):  # several values (CS is single-valued here) or undecodable bytes
        value = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else "?"
    return " ".join(value.split()).upper()
