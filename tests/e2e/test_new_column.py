"""A column is one declaration: declared on the row (here on a subclass standing in for an edit of
records.Row), it reaches the CSV of a scan, read_report's dtypes, predict --json and the gallery's
data without a change anywhere else."""
from __future__ import annotations

import json

import pytest
from helpers import manifest, page_data, read_rows, records, rows_script, scan

import batchcam
from batchcam import records as rowlib
from batchcam.cli import main
from batchcam.records import Row
from batchcam.schema import Number, Schema, Shown, derived


class WithMargin(Row):
    @property
    @derived(Number(4), after="ood_flag", reported=True, shown=Shown("margin", digits=3))
    def margin(self) -> float | None:
        """How far the top probability lies above the next one."""
        if not self.probabilities:
            return None
        top, second = sorted(self.probabilities, reverse=True)[:2]
        return top - second


@pytest.fixture
def declared(monkeypatch):
    monkeypatch.setattr(rowlib, "SCHEMA", Schema(WithMargin))


def margin(probabilities: list[float]) -> float:
    top, second = sorted(probabilities, reverse=True)[:2]
    return top - second


def test_a_declared_column_reaches_the_csv_read_report_predict_and_the_gallery(declared, xray_folder, tiny_model,
                                                                                 tmp_path, capsys):
    out = tmp_path / "report"
    (xray_folder / "NORMAL" / "broken.png").write_bytes(b"not an image")
    assert scan(xray_folder, out, tiny_model, "--quiet") == 3
    rows = read_rows(out)
    header = list(rows[0])
    assert header[header.index("ood_flag") + 1] == "margin"
    classes = manifest(out)["model"]["class_names"]
    for row in rows:
        if row["status"] == "ok":
            assert float(row["margin"]) == pytest.approx(margin([float(row[f"p_{c}"]) for c in classes]), abs=1e-4)
        else:
            assert row["margin"] == ""

    frame = batchcam.read_report(out)
    assert frame["margin"].dtype == "float64" and frame["margin"].isna().sum() == 1

    shown = records(rows_script(out))
    assert [r["margin"] for r in shown] == [None if r["margin"] == "" else pytest.approx(float(r["margin"]), abs=1e-3)
                                            for r in rows]
    assert all(r["margin"] is None or r["margin"] == round(r["margin"], 3) for r in shown)   # as declared
    page = page_data((out / "index.html").read_text(encoding="utf-8"))
    assert "margin" in page["columns"] and page["attributes"]["margin"] == "margin"

    capsys.readouterr()
    assert main(["predict", str(xray_folder / "NORMAL" / "img00.png"), "--model", str(tiny_model), "--json"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["margin"] == pytest.approx(margin(list(record["probabilities"].values())))
    assert list(record)[list(record).index("ood_flag") + 1] == "margin"
