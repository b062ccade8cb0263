"""A finished report as a pandas DataFrame (``batchcam.read_report``); pandas is imported only here."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from batchcam.report.review import formula_unescaped

if TYPE_CHECKING:
    import pandas as pd

STATUSES = ("ok", "error", "skipped")
FLOATS = ("confidence", "attention_outside", "faith_drop_top", "faith_drop_random", "ood_score")
INTEGERS = ("cam_peak_x", "cam_peak_y", "width", "height")
BOOLEANS = ("correct", "attention_flag", "ood_flag")
CLASS_COLUMNS = ("prediction", "label", "cam_target")
CHANGES = ("new", "changed", "prediction changed")      # batchcam.records.CHANGES
DECISIONS = ("agree", "disagree", "unsure")             # batchcam.report.review.DECISIONS
REVIEWS = "reviews.csv"


def read_report(report: str | Path) -> pd.DataFrame:
    """``REPORT/predictions.csv`` with proper dtypes, and the manifest in ``.attrs["manifest"]``.

    Paths, reasons, overlay names and hashes stay strings exactly as written (never parsed as
    numbers or NaN); status, the class columns and ``change`` are categoricals (classes in the
    model's order); ``correct``, ``attention_flag`` and ``ood_flag`` are nullable booleans; numbers
    are floats or nullable integers; ``first_seen`` is a UTC time. When ``reviews.csv`` exists, each
    row gets its file's current decision: ``decision`` (categorical), ``note`` and ``reviewed_at``
    (empty, NA and NaT where none; a decision about other bytes of the same path is not joined).
    """
    import pandas as pd

    report = Path(report)
    manifest = json.loads((report / "manifest.json").read_text(encoding="utf-8"))
    class_names = list(manifest["model"]["class_names"])
    with open(report / "predictions.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        frame = pd.DataFrame(list(reader), columns=reader.fieldnames, dtype="string")
    for column in frame.columns:
        if column in FLOATS or column.startswith("p_"):
            frame[column] = pd.to_numeric(frame[column].replace("", None), errors="coerce").astype("float64")
        elif column in INTEGERS:
            frame[column] = pd.to_numeric(frame[column].replace("", None), errors="coerce").astype("Int64")
        elif column in BOOLEANS:
            frame[column] = frame[column].map({"true": True, "false": False, "": pd.NA}).astype("boolean")
        elif column == "status":
            frame[column] = pd.Categorical(frame[column], categories=STATUSES)
        elif column in CLASS_COLUMNS:
            frame[column] = pd.Categorical(frame[column].replace("", None), categories=class_names)
        elif column == "change":
            frame[column] = pd.Categorical(frame[column].replace("", None), categories=CHANGES)
        elif column == "first_seen":
            frame[column] = pd.to_datetime(frame[column].replace("", None), utc=True, format="ISO8601")
    if (report / REVIEWS).is_file():
        frame = join_reviews(frame, report / REVIEWS)
    frame.attrs["manifest"] = manifest
    return frame


def join_reviews(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Left join of the current decisions (same path, same sha256) onto the rows, order kept."""
    import pandas as pd

    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        reviews = pd.DataFrame(list(reader), columns=reader.fieldnames, dtype="string")
    reviews = reviews.loc[reviews["decision"].isin(DECISIONS), ["path", "sha256", "decision", "note", "reviewed_at"]]
    reviews = reviews.drop_duplicates(["path", "sha256"], keep="last")
    joined = frame.merge(reviews, on=["path", "sha256"], how="left", validate="many_to_one")
    joined["decision"] = pd.Categorical(joined["decision"], categories=DECISIONS)
    joined["note"] = joined["note"].fillna("").map(formula_unescaped).astype("string")  # as the reviewer wrote it
    joined["reviewed_at"] = pd.to_datetime(joined["reviewed_at"], utc=True, format="ISO8601")
    joined.index = frame.index
    return joined

