"""A finished report as a pandas DataFrame (``batchcam.read_report``); pandas is imported only here."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

STATUSES = ("ok", "error", "skipped")
FLOATS = ("confidence", "attention_outside", "faith_drop_top", "faith_drop_random", "ood_score")
INTEGERS = ("cam_peak_x", "cam_peak_y", "width", "height")
BOOLEANS = ("correct", "attention_flag", "ood_flag")
CLASS_COLUMNS = ("prediction", "label", "cam_target")


def read_report(report: str | Path) -> pd.DataFrame:
    """``REPORT/predictions.csv`` with proper dtypes, and the manifest in ``.attrs["manifest"]``.

    Paths, reasons, overlay names and hashes stay strings exactly as written (never parsed as
    numbers or NaN); status and the class columns are categoricals (classes in the model's order);
    ``correct``, ``attention_flag`` and ``ood_flag`` are nullable booleans; numbers are floats or nullable integers.
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
    frame.attrs["manifest"] = manifest
    return frame

