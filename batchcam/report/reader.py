"""A finished report as a pandas DataFrame (``batchcam.read_report``); pandas is imported only here.

The manifest and the CSV are read from the one generation ``.batchcam/current`` names, resolved
once (and again only when a run switched and removed it while they were read), so the two always
belong to one run; nothing is read through a link, and a ``current`` that does not name one of
batchcam's generation folders is refused.
"""
from __future__ import annotations

import csv
import errno
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from batchcam.records import csv_dtypes
from batchcam.report.generations import open_published
from batchcam.report.review import DECISIONS, formula_unescaped
from batchcam.runtime.fsutil import SafeDir
from batchcam.schema import CsvColumn

if TYPE_CHECKING:
    import pandas as pd

REVIEWS = "reviews.csv"
READ_TRIES = 5      # runs that switch generations this often while one report is read: give up


def read_report(report: str | Path) -> pd.DataFrame:
    """``REPORT/predictions.csv`` with proper dtypes, and the manifest in ``.attrs["manifest"]``.

    Each column gets the dtype its declaration in ``batchcam.records.Row`` gives it: paths, reasons,
    overlay names and hashes stay strings exactly as written (never parsed as numbers or NaN);
    status, the class columns and ``change`` are categoricals (classes in the model's order);
    ``correct``, ``attention_flag`` and ``ood_flag`` are nullable booleans; numbers are floats or
    nullable integers; ``first_seen`` is a UTC time. A column the schema does not know stays a string.
    When ``reviews.csv`` exists, each row gets its file's current decision: ``decision``
    (categorical), ``note`` and ``reviewed_at`` (empty, NA and NaT where none; a decision about
    other bytes of the same path is not joined).
    """
    import pandas as pd

    report = Path(report)
    with SafeDir.open(report) as folder:
        manifest, text = published_manifest_and_csv(folder)
        reviews = folder.read_text(REVIEWS)
    class_names = list(manifest["model"]["class_names"])
    reader = csv.DictReader(io.StringIO(text, newline=""))
    frame = pd.DataFrame(list(reader), columns=list(reader.fieldnames or ()), dtype="string")
    dtypes = csv_dtypes(class_names)
    for name in frame.columns:
        if name in dtypes:
            frame[name] = typed(frame[name], dtypes[name])
    if reviews is not None:
        frame = join_reviews(frame, reviews)
    frame.attrs["manifest"] = manifest
    return frame


def typed(cells: pd.Series, column: CsvColumn) -> pd.Series:
    """A column of CSV cells (strings) as its declared dtype; an empty cell is NA."""
    import pandas as pd

    values = cells.replace("", None)
    if column.dtype == "float64":
        return pd.to_numeric(values, errors="coerce").astype("float64")
    if column.dtype == "Int64":
        return pd.to_numeric(values, errors="coerce").astype("Int64")
    if column.dtype == "boolean":
        return cells.map({"true": True, "false": False, "": pd.NA}).astype("boolean")
    if column.dtype == "category":
        return pd.Series(pd.Categorical(values, categories=list(column.categories)), index=cells.index)
    if column.dtype == "datetime":
        return pd.to_datetime(values, utc=True, format="ISO8601")
    return cells


def published_manifest_and_csv(folder: SafeDir) -> tuple[dict, str]:
    """The manifest (parsed) and the CSV text of one publication of the report open at ``folder``."""
    for _ in range(READ_TRIES):
        published = open_published(folder)
        source = published or folder
        try:
            text = source.read_text("manifest.json")
            manifest = None if text is None else json.loads(text)
            rows = source.read_text("predictions.csv")
        finally:
            if published is not None:
                published.close()
        if manifest is not None and rows is not None:
            return manifest, rows
        if published is None:
            break  # no generations: nothing switched, the files are just not there
    raise FileNotFoundError(errno.ENOENT, "no report here (manifest.json and predictions.csv)", str(folder.path))


def join_reviews(frame: pd.DataFrame, text: str) -> pd.DataFrame:
    """Left join of the current decisions in ``reviews.csv`` (``text``; same path, same sha256) onto
    the rows, order kept."""
    import pandas as pd

    reader = csv.DictReader(io.StringIO(text, newline=""))
    reviews = pd.DataFrame(list(reader), columns=list(reader.fieldnames or ()), dtype="string")
    reviews = reviews.loc[reviews["decision"].isin(DECISIONS), ["path", "sha256", "decision", "note", "reviewed_at"]]
    reviews = reviews.drop_duplicates(["path", "sha256"], keep="last")
    joined = frame.merge(reviews, on=["path", "sha256"], how="left", validate="many_to_one")
    joined["decision"] = pd.Categorical(joined["decision"], categories=DECISIONS)
    joined["note"] = joined["note"].fillna("").map(formula_unescaped).astype("string")  # as the reviewer wrote it
    joined["reviewed_at"] = pd.to_datetime(joined["reviewed_at"], utc=True, format="ISO8601")
    joined.index = frame.index
    return joined

