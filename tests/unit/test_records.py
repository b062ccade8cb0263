"""The row's schema (batchcam.records, batchcam.schema): every column declared once and everything
that lists columns derived from the declarations; the row format follows them."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import pytest

import batchcam
from batchcam import records
from batchcam.cli import build_parser
from batchcam.config import ScanConfig
from batchcam.options import from_values
from batchcam.records import ROW_COMPUTATION, ROW_FORMAT, SCHEMA, Row, columns, read_csv, reported, write_csv
from batchcam.report import store
from batchcam.schema import (
    COLUMN,
    Choice,
    ClassName,
    Flag,
    Integer,
    Kind,
    Number,
    Schema,
    Shown,
    Text,
    Time,
    column,
    derived,
)

THREE = ("NORMAL", "PNEUMONIA", "COVID-19")     # nothing may assume two classes
CONTRACT = ["path", "status", "error", "prediction", "confidence", "p_NORMAL", "p_PNEUMONIA", "p_COVID-19", "label",
            "correct", "cam_target", "cam_peak_x", "cam_peak_y", "overlay", "width", "height", "sha256",
            "model_sha256"]


def sample(kind: Kind, class_names=THREE):
    """A value of every kind that is not its empty value, with what a CSV writer must quote."""
    if isinstance(kind, Choice):
        return kind.choices[-1]
    if isinstance(kind, ClassName):
        return class_names[-1]
    if isinstance(kind, Time):
        return "2026-12-01T02:03:04+00:00"
    return {Text: 'a, "quoted"\u00e9 value', Number: 0.123456, Integer: 42, Flag: True}[type(kind)]


def full_row() -> Row:
    """A row with every stored column set."""
    values: dict[str, Any] = {}
    for declared in SCHEMA.columns:
        if declared.stored:
            one = sample(declared.kind)
            values[declared.name] = [one] * len(THREE) if declared.per_class else one
    return Row(**values)


def csv_text(rows, class_names=THREE) -> str:
    stream = io.StringIO()
    write_csv(stream, rows, class_names)
    return stream.getvalue()


# ---- one declaration per column ------------------------------------------------------------------

def test_the_csv_holds_the_contract_s_columns_first_then_the_checks_in_their_order():
    assert columns(THREE)[:len(CONTRACT)] == CONTRACT
    assert columns(THREE)[len(CONTRACT):] == ["attention_outside", "attention_flag", "faith_drop_top",
                                              "faith_drop_random", "ood_score", "ood_flag", "first_seen", "change"]


def test_every_stored_column_round_trips_through_the_csv_with_any_number_of_classes():
    for class_names in (THREE, ("NORMAL", "PNEUMONIA"), ("ONLY",)):
        row = full_row()
        row.probabilities = [0.25] * len(class_names)
        row.prediction = row.label = row.cam_target = class_names[-1]
        back = read_csv(io.StringIO(csv_text([row], class_names), newline=""), class_names)
        assert [asdict(r) for r in back] == [asdict(row)], class_names


def test_empty_columns_read_back_as_their_empty_values_and_derived_ones_are_computed():
    rows = [Row(path="bad.png", status="error", error="cannot decode\nimage:  truncated"),
            Row(path="a.png", status="ok", prediction="NORMAL", confidence=0.9, probabilities=[0.9, 0.05, 0.05],
                label="PNEUMONIA", attention_outside=0.6)]
    text = csv_text(rows)
    cells = [dict(zip(columns(THREE), line.split(","))) for line in text.splitlines()[1:]]
    assert cells[0]["error"] == "cannot decode image: truncated" and cells[0]["p_COVID-19"] == ""
    assert (cells[1]["correct"], cells[1]["attention_flag"], cells[1]["p_COVID-19"]) == ("false", "true", "0.050000")
    back = read_csv(io.StringIO(text, newline=""), THREE)
    assert back[0].probabilities == [] and back[0].confidence is None and back[0].correct is None
    assert back[1].correct is False and back[1].attention_flag is True


def test_a_required_column_missing_from_the_csv_is_an_error_not_an_empty_value():
    with pytest.raises(KeyError):
        records.from_csv_dict({"status": "ok"}, THREE)


def test_reported_fields_follow_the_csv_order_with_empty_text_as_none_and_probabilities_by_class():
    row = Row(path="x.png", status="ok", prediction="COVID-19", confidence=0.5, probabilities=[0.2, 0.3, 0.5],
              cam_target="COVID-19", width=4, height=3, sha256="ab", ood_score=1.5, ood_flag=False)
    assert reported(row, THREE) == {
        "file": "x.png", "status": "ok", "error": None, "prediction": "COVID-19", "confidence": 0.5,
        "probabilities": {"NORMAL": 0.2, "PNEUMONIA": 0.3, "COVID-19": 0.5}, "cam_target": "COVID-19",
        "cam_peak_x": None, "cam_peak_y": None, "width": 4, "height": 3, "sha256": "ab", "ood_score": 1.5,
        "ood_flag": False}
    assert reported(Row(path="y.png", status="error", error="bad"), THREE)["probabilities"] is None


def test_read_report_gives_each_column_the_dtype_of_its_declaration(tmp_path):
    report = tmp_path / "r"
    report.mkdir()
    rows = [full_row(), Row(path="b.png", status="error", error="bad")]
    (report / "predictions.csv").write_text(csv_text(rows), encoding="utf-8")
    (report / "manifest.json").write_text(json.dumps({"model": {"class_names": list(THREE)}}))
    frame = batchcam.read_report(report)
    expected = {"string": "string", "float64": "float64", "Int64": "Int64", "boolean": "boolean",
                "category": "category"}
    for name, declared in records.csv_dtypes(THREE).items():
        if declared.dtype == "datetime":
            assert isinstance(frame[name].dtype, pd.DatetimeTZDtype), name
        else:
            assert str(frame[name].dtype) == expected[declared.dtype], name
        if declared.dtype == "category":
            assert tuple(frame[name].cat.categories) == declared.categories, name
    assert tuple(frame["prediction"].cat.categories) == THREE and frame["p_COVID-19"].iloc[0] == 0.123456


def test_the_gallery_s_columns_and_the_card_s_attributes_come_from_the_declarations():
    assert records.shown_columns() == [c.name for c in SCHEMA.columns if c.shown is not None]
    assert records.shown_attributes() == {"status": "status", "prediction": "pred", "confidence": "conf",
                                          "label": "label", "correct": "correct", "sha256": "sha",
                                          "first_seen": "first-seen", "change": "change"}
    values = dict(zip(records.shown_columns(), records.shown_values(Row(path="a", status="ok", confidence=0.123456))))
    assert values["confidence"] == 0.1235 and values["path"] == "a"


# ---- declaring a column -------------------------------------------------------------------------

@dataclass
class Stored(Row):
    """A row with one more stored column: one declaration, nothing else."""
    entropy: float | None = field(default=None, metadata=column(Number(), reported=True, shown=Shown("entropy")))


class Derived(Row):
    """A row with one more derived column, computed from the probabilities."""

    @property
    @derived(Number(4), after="ood_flag", reported=True, shown=Shown("spread", digits=2))
    def spread(self) -> float | None:
        return max(self.probabilities) - min(self.probabilities) if self.probabilities else None


def test_one_declaration_on_a_field_adds_a_column_everywhere():
    schema = Schema(Stored)
    assert schema.csv_names(THREE)[-1] == "entropy"
    row = Stored(path="a.png", status="ok", probabilities=[0.5, 0.25, 0.25], entropy=1.25)
    cells = schema.to_csv(row, THREE)
    assert cells["entropy"] == "1.250000" and schema.from_csv(cells, THREE) == row
    assert schema.reported(row, THREE)["entropy"] == 1.25
    assert schema.csv_dtypes(THREE)["entropy"].dtype == "float64"
    assert schema.attributes()["entropy"] == "entropy" and schema.shown_values(row)[-1] == 1.25


def test_a_derived_column_sits_after_the_column_it_names_and_is_computed_not_read():
    schema = Schema(Derived)
    names = schema.csv_names(THREE)
    assert names[names.index("ood_flag") + 1] == "spread"
    row = Derived(path="a.png", status="ok", probabilities=[0.5, 0.25, 0.25])
    cells = schema.to_csv(row, THREE)
    assert cells["spread"] == "0.2500" and schema.from_csv(cells, THREE) == row
    assert schema.reported(row, THREE)["spread"] == 0.25 and schema.attributes()["spread"] == "spread"


def test_a_declaration_after_no_column_or_a_column_declared_twice_is_refused():
    class Misplaced(Row):
        @property
        @derived(Flag(), after="no_such_column")
        def lost(self) -> bool:
            return True

    with pytest.raises(ValueError, match="no_such_column"):
        Schema(Misplaced)

    class Twice(Row):
        @property
        @derived(Flag(), after="path")
        def status(self) -> str:       # type: ignore[override]  # a second declaration of a field's column
            return "ok"

    with pytest.raises(ValueError, match="twice"):
        Schema(Twice)


def test_field_metadata_holds_the_declaration_under_one_key():
    assert set(column(Text())) == {COLUMN}


# ---- the row format -------------------------------------------------------------------------------

def test_the_row_format_follows_every_declaration_and_the_computation_constant():
    assert ROW_FORMAT == f"{ROW_COMPUTATION}-{SCHEMA.digest}"
    assert Schema(Stored).digest != SCHEMA.digest and Schema(Derived).digest != SCHEMA.digest

    @dataclass
    class Rounder(Row):
        confidence: float | None = field(default=None, metadata=column(Number(4), reported=True))

    @dataclass
    class Renamed(Row):
        confidence: float | None = field(default=None, metadata=column(Number(), per_class="q_"))

    @dataclass
    class Bookkeeping(Row):
        attempts: int = 0        # no column, but the row store keeps it

    digests = {Schema(kind).digest for kind in (Row, Rounder, Renamed, Bookkeeping)}
    assert len(digests) == 4
    assert Schema(Row).digest == SCHEMA.digest       # the same declarations, the same digest


def test_the_row_format_is_the_same_in_every_process():
    probe = "from batchcam.records import ROW_FORMAT; print(ROW_FORMAT)"
    for seed in ("1", "2"):
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert run.stdout.strip() == ROW_FORMAT, run.stderr


def test_a_new_row_format_makes_a_new_settings_key_so_stored_rows_are_not_reused(monkeypatch):
    config = from_values(ScanConfig, vars(build_parser().parse_args(["scan", "root", "--out", "out"])))
    resolved = {"model": {"sha256": "m"}, "precision": "fp32", "target": "predicted"}
    key = store.settings_key(config, resolved)
    monkeypatch.setattr(store, "ROW_FORMAT", f"{ROW_COMPUTATION}-{Schema(Stored).digest}")
    assert store.settings_key(config, resolved) != key
