"""predict in-process through main(): table and JSON output, overlays, exit codes, agreement with scan."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rows_by_path
from PIL import Image

from batchcam.cli import main
from conftest import write_xrays


def predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def xrays(tmp_path) -> list[Path]:
    return write_xrays(tmp_path / "xrays", count=3)


def test_table_has_a_header_and_one_row_per_file_in_order(xrays, tiny_model, capsys):
    code, out, err = predict(capsys, *map(str, xrays), "--model", str(tiny_model))
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["file", "prediction", "confidence", "p_NORMAL", "p_PNEUMONIA"]
    assert [line.split()[0] for line in lines] == [p.as_posix() for p in xrays]
    for line in lines:
        _, prediction, confidence, p_normal, p_pneumonia = line.split()
        assert prediction in ("NORMAL", "PNEUMONIA")
        assert abs(float(p_normal) + float(p_pneumonia) - 1) < 2e-3
        assert float(confidence) == max(float(p_normal), float(p_pneumonia))
    assert "3 files, 3 ok, 0 error" in err


def test_json_lines_carry_prediction_probabilities_and_cam_peak(xrays, tiny_model, capsys):
    code, out, _ = predict(capsys, *map(str, xrays), "--model", str(tiny_model), "--json")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["file"] for r in records] == [p.as_posix() for p in xrays]
    for record in records:
        assert record["status"] == "ok" and record["error"] is None and record["overlay"] is None
        assert set(record["probabilities"]) == {"NORMAL", "PNEUMONIA"}
        assert record["prediction"] == max(record["probabilities"], key=record["probabilities"].get)
        assert record["confidence"] == pytest.approx(max(record["probabilities"].values()))
        assert (record["width"], record["height"]) == (160, 128)
        assert 0 <= record["cam_peak_x"] < 160 and 0 <= record["cam_peak_y"] < 128
        assert len(record["sha256"]) == 64


def test_out_writes_each_overlay_at_the_image_geometry_and_says_where(xrays, tiny_model, tmp_path, capsys):
    out_dir = tmp_path / "overlays"
    code, out, err = predict(capsys, *map(str, xrays), "--model", str(tiny_model), "--out", str(out_dir), "--json")
    assert code == 0
    written = [Path(json.loads(line)["overlay"]) for line in out.splitlines()]
    assert sorted(written) == sorted(out_dir.iterdir()) and len(set(written)) == 3
    for path in written:
        assert Image.open(path).size == (160, 128)
    assert f"overlays in {out_dir}" in err


def test_table_shows_the_overlay_column_only_with_out(xrays, tiny_model, tmp_path, capsys):
    _, out, _ = predict(capsys, str(xrays[0]), "--model", str(tiny_model), "--out", str(tmp_path / "o"))
    header, line = out.splitlines()
    assert header.split()[-1] == "overlay"
    assert Path(line.split()[-1]).is_file()


def test_a_bad_file_among_good_ones_gives_exit_3_and_the_others_keep_their_predictions(xrays, tiny_model,
                                                                                         tmp_path, capsys):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    missing = tmp_path / "missing.png"
    _, alone, _ = predict(capsys, *map(str, xrays), "--model", str(tiny_model), "--json")
    files = [str(xrays[0]), str(garbage), str(xrays[1]), str(missing), str(xrays[2])]
    code, out, err = predict(capsys, *files, "--model", str(tiny_model), "--json")
    assert code == 3
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in records] == ["ok", "error", "ok", "error", "ok"]
    good = [r for r in records if r["status"] == "ok"]
    expected = [json.loads(line)["confidence"] for line in alone.splitlines()]
    assert [r["confidence"] for r in good] == pytest.approx(expected)
    assert f"{garbage.as_posix()}: not a supported image" in err
    assert f"{missing.as_posix()}: cannot read file" in err
    assert "5 files, 3 ok, 2 error" in err


def test_a_folder_argument_is_an_error_that_points_to_scan(xrays, tiny_model, capsys):
    code, out, err = predict(capsys, str(xrays[0]), str(xrays[0].parent), "--model", str(tiny_model))
    assert code == 3
    assert "is a folder (use scan for folders)" in err
    assert out.splitlines()[-1].split()[1] == "error"


def test_a_16_bit_png_predicts_like_its_8_bit_twin(xrays, tiny_model, tmp_path, capsys):
    eight = Image.open(xrays[1])
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.asarray(eight, dtype=np.uint16) * 257).save(sixteen)  # 8-bit v -> 16-bit 257 v
    assert Image.open(sixteen).mode == "I;16"
    code, out, _ = predict(capsys, str(xrays[1]), str(sixteen), "--model", str(tiny_model), "--json")
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert second["confidence"] == pytest.approx(first["confidence"], abs=1e-5)
    assert (second["cam_peak_x"], second["cam_peak_y"]) == (first["cam_peak_x"], first["cam_peak_y"])


def test_predict_agrees_with_scan_on_the_same_files(xrays, tiny_model, tmp_path, capsys):
    root = xrays[0].parents[1]
    assert main(["scan", str(root), "--out", str(tmp_path / "report"), "--model", str(tiny_model),
                 "--workers", "0"]) == 0
    scanned = rows_by_path(tmp_path / "report")
    capsys.readouterr()
    _, out, _ = predict(capsys, *map(str, xrays), "--model", str(tiny_model), "--json")
    for record in map(json.loads, out.splitlines()):
        row = scanned[Path(record["file"]).relative_to(root).as_posix()]
        assert record["prediction"] == row["prediction"]
        assert record["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-6)
        assert (record["cam_peak_x"], record["cam_peak_y"]) == (int(row["cam_peak_x"]), int(row["cam_peak_y"]))
        assert record["sha256"] == row["sha256"]


def test_without_model_the_demo_model_is_used_and_announced(xrays, capsys):
    code, _, err = predict(capsys, str(xrays[0]))
    assert code == 0
    assert "demo model" in err and "not for clinical use" in err


@pytest.mark.parametrize("extra, message", [
    (["--model", "no/such/model.pt"], "--model no/such/model.pt does not exist"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--target", "COVID"], "--target 'COVID' is neither"),
])
def test_usage_errors_exit_2_with_one_line(xrays, tiny_model, capsys, extra, message):
    args = [str(xrays[0]), "--model", str(tiny_model), *extra]
    code, out, err = predict(capsys, *args)
    assert code == 2 and out == ""
    assert message in err


def test_out_that_is_a_file_exits_2(xrays, tiny_model, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, _, err = predict(capsys, str(xrays[0]), "--model", str(tiny_model), "--out", str(tmp_path / "taken"))
    assert code == 2 and "is not a folder" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_cuda_exits_2(xrays, tiny_model, capsys):
    code, _, err = predict(capsys, str(xrays[0]), "--model", str(tiny_model), "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_no_file_is_a_usage_error(capsys):
    code, _, _ = predict(capsys)
    assert code == 2
