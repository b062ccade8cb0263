"""scan end to end, in-process through main(): files, rows, exit codes."""
from __future__ import annotations

import html.parser
import json

import numpy as np
import pytest
import torch
from helpers import read_rows, scan
from PIL import Image

from batchcam.cli import main
from conftest import tiny_checkpoint, write_xrays


def test_scan_writes_every_report_file_and_returns_0(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "report"
    assert scan(xray_folder, out, tiny_model) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == ["NORMAL/img00.png", "NORMAL/img02.png",
                                         "PNEUMONIA/img01.png", "PNEUMONIA/img03.png"]
    for r in rows:
        assert r["status"] == "ok" and r["prediction"] in ("NORMAL", "PNEUMONIA")
        probs = [float(r["p_NORMAL"]), float(r["p_PNEUMONIA"])]
        assert abs(sum(probs) - 1) < 1e-4 and float(r["confidence"]) == max(probs)
        assert r["label"] == r["path"].split("/")[0]
        assert r["correct"] == ("true" if r["label"] == r["prediction"] else "false")
        assert (r["width"], r["height"]) == ("160", "128")
        assert 0 <= int(r["cam_peak_x"]) < 160 and 0 <= int(r["cam_peak_y"]) < 128
        assert (out / r["overlay"]).is_file()
        assert Image.open(out / r["overlay"]).size == (160, 128)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"found": 4, "processed": 4, "reused": 0, "ok": 4, "error": 0, "skipped": 0}
    assert manifest["model"]["class_names"] == ["NORMAL", "PNEUMONIA"] and manifest["cam"]["exact_fast_path"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and sum(map(sum, metrics["confusion_matrix"])) == 4
    assert (out / "index.html").is_file()


def test_csv_columns_follow_the_contract_order(xray_folder, tiny_model, tmp_path):
    scan(xray_folder, tmp_path / "r", tiny_model)
    header = (tmp_path / "r" / "predictions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[:17] == ["path", "status", "error", "prediction", "confidence", "p_NORMAL", "p_PNEUMONIA",
                           "label", "correct", "cam_target", "cam_peak_x", "cam_peak_y", "overlay", "width",
                           "height", "sha256", "model_sha256"]
    # the explanation checks come after the contract's columns, then the OOD columns, what changed last
    assert header[17:21] == ["attention_outside", "attention_flag", "faith_drop_top", "faith_drop_random"]
    assert header[21:23] == ["ood_score", "ood_flag"]
    assert header[-2:] == ["first_seen", "change"]


def test_bad_files_become_their_own_error_rows_and_good_rows_keep_their_predictions(tiny_model, tmp_path):
    good = tmp_path / "good"
    write_xrays(good, count=3)
    assert scan(good, tmp_path / "alone", tiny_model, "--batch-size", "2") == 0
    alone = {r["path"]: r for r in read_rows(tmp_path / "alone")}

    mixed = tmp_path / "mixed"
    write_xrays(mixed, count=3)
    (mixed / "NORMAL" / "a_empty.png").write_bytes(b"")
    (mixed / "NORMAL" / "b_text.png").write_text("this is not an image\n")
    jpeg = mixed / "PNEUMONIA" / "c_truncated.jpg"
    Image.open(mixed / "NORMAL" / "img00.png").convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:600])
    assert scan(mixed, tmp_path / "out", tiny_model, "--batch-size", "2") == 3

    rows = {r["path"]: r for r in read_rows(tmp_path / "out")}
    assert len(rows) == 6
    for name in ("NORMAL/a_empty.png", "NORMAL/b_text.png", "PNEUMONIA/c_truncated.jpg"):
        assert rows[name]["status"] == "error" and rows[name]["error"] and not rows[name]["prediction"]
    assert "empty" in rows["NORMAL/a_empty.png"]["error"]
    for path, row in alone.items():
        assert rows[path]["status"] == "ok"
        assert rows[path]["prediction"] == row["prediction"]
        assert float(rows[path]["confidence"]) == pytest.approx(float(row["confidence"]), abs=1e-5)
        assert (rows[path]["cam_peak_x"], rows[path]["cam_peak_y"]) == (row["cam_peak_x"], row["cam_peak_y"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["error"] == 3 and manifest["counts"]["ok"] == 3


def test_paths_with_commas_quotes_and_non_ascii_round_trip_through_the_csv(tiny_model, tmp_path):
    root = tmp_path / "root"
    name = 'Ünïcödé, "quoted" 肺.png'
    (root / "sub dir").mkdir(parents=True)
    Image.new("L", (80, 90), 128).save(root / "sub dir" / name)
    assert scan(root, tmp_path / "out", tiny_model) == 0
    rows = read_rows(tmp_path / "out")
    assert [r["path"] for r in rows] == [f"sub dir/{name}"]
    assert (tmp_path / "out" / rows[0]["overlay"]).is_file()


def test_same_file_name_in_two_folders_gets_two_overlays(tiny_model, tmp_path):
    root = tmp_path / "root"
    for folder in ("a", "b"):
        (root / folder).mkdir(parents=True)
        Image.new("L", (64, 64), 100 if folder == "a" else 200).save(root / folder / "x.png")
    scan(root, tmp_path / "out", tiny_model)
    overlays = [r["overlay"] for r in read_rows(tmp_path / "out")]
    assert len(set(overlays)) == 2


def test_discovery_is_recursive_case_insensitive_skips_hidden_and_the_report(tiny_model, tmp_path):
    root = tmp_path / "root"
    (root / "deep" / "er").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel, fmt in (("A.PNG", "PNG"), ("deep/b.JpEg", "JPEG"), ("deep/er/c.tif", "TIFF"),
                     (".d.png", "PNG"), (".hidden/e.png", "PNG")):
        Image.new("L", (40, 40), 90).save(root / rel, format=fmt)
    (root / "notes.txt").write_text("not a candidate")
    out = root / "report"
    assert scan(root, out, tiny_model) == 0
    assert [r["path"] for r in read_rows(out)] == ["A.PNG", "deep/b.JpEg", "deep/er/c.tif"]
    assert scan(root, out, tiny_model) == 0  # the report inside ROOT is not scanned itself
    assert [r["path"] for r in read_rows(out)] == ["A.PNG", "deep/b.JpEg", "deep/er/c.tif"]


def test_symlink_loops_are_followed_once(tiny_model, tmp_path):
    root = tmp_path / "root"
    write_xrays(root, count=2)
    (root / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)
    assert scan(root, tmp_path / "out", tiny_model) == 0
    assert len(read_rows(tmp_path / "out")) == 2


def test_sixteen_bit_and_oriented_images_decode_faithfully(tiny_model, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    ramp = (np.linspace(0, 40000, 50 * 70).reshape(50, 70)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "sixteen.png")
    rotated = Image.new("L", (100, 60), 50)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated.save(root / "rotated.jpg", exif=exif.tobytes())
    assert scan(root, tmp_path / "out", tiny_model) == 0
    rows = {r["path"]: r for r in read_rows(tmp_path / "out")}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == ("60", "100")
    from batchcam.decode.imaging import decode_grayscale
    gray = np.asarray(decode_grayscale((root / "sixteen.png").read_bytes()).gray)
    assert gray.max() == round(40000 / 65535 * 255) and gray.min() == 0  # scaled, not clipped white


def test_save_cams_writes_raw_low_resolution_maps_keyed_by_path(xray_folder, tiny_model, tmp_path):
    assert scan(xray_folder, tmp_path / "out", tiny_model, "--save-cams") == 0
    with np.load(tmp_path / "out" / "cams.npz") as cams:
        assert sorted(cams.files) == sorted(r["path"] for r in read_rows(tmp_path / "out"))
        assert all(cams[k].shape == (2, 2) and (cams[k] >= 0).all() for k in cams.files)


@pytest.mark.parametrize("method", ["gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam"])
def test_every_library_method_runs_batched_through_scan(method, tiny_model, tmp_path):
    root = tmp_path / "root"
    write_xrays(root, count=3, size=(96, 72))
    assert scan(root, tmp_path / "out", tiny_model, "--cam", method, "--batch-size", "2", "--save-cams") == 0
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    with np.load(tmp_path / "out" / "cams.npz") as cams:
        assert all(cams[r["path"]].shape == (2, 2) for r in rows)
    assert all(Image.open(tmp_path / "out" / r["overlay"]).size == (96, 72) for r in rows)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["cam"]["method"] == method


def test_target_class_is_explained_for_every_image(xray_folder, tiny_model, tmp_path):
    assert scan(xray_folder, tmp_path / "out", tiny_model, "--target", "pneumonia") == 0
    assert {r["cam_target"] for r in read_rows(tmp_path / "out")} == {"PNEUMONIA"}


@pytest.mark.parametrize("args, message", [
    (["--target", "COVID"], "--target"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "tpu"], "--device"),
])
def test_configuration_errors_exit_2_and_write_nothing(args, message, xray_folder, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_root_empty_root_and_bad_model_exit_2(tmp_path, tiny_model, capsys):
    assert scan(tmp_path / "nope", tmp_path / "o1", tiny_model) == 2
    (tmp_path / "empty").mkdir()
    assert scan(tmp_path / "empty", tmp_path / "o2", tiny_model) == 2
    assert "no image files" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    write_xrays(tmp_path / "imgs", count=1)
    assert scan(tmp_path / "imgs", tmp_path / "o3", bad) == 2
    assert str(bad) in capsys.readouterr().err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_asking_for_cuda_without_a_gpu_exits_2(xray_folder, tiny_model, tmp_path, capsys):
    assert scan(xray_folder, tmp_path / "out", tiny_model, "--device", "cuda") == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_usage_errors_from_argparse_exit_2(capsys):
    assert main(["scan"]) == 2
    assert main(["frobnicate"]) == 2


class ElementCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_gallery_escapes_hostile_file_names(tiny_model, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    name = "<img src=x onerror=alert(1)>.png"
    Image.new("L", (64, 64), 120).save(root / name)
    assert scan(root, tmp_path / "out", tiny_model) == 0
    page = ElementCollector()
    page.feed((tmp_path / "out" / "index.html").read_text(encoding="utf-8"))
    assert not any("onerror" in attrs for _, attrs in page.elements)
    assert not any(tag == "img" and attrs.get("src") == "x" for tag, attrs in page.elements)
    assert any(name in text for text in page.text)


def test_demo_model_is_used_and_announced_without_model(xray_folder, tmp_path, capsys):
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    assert "demo model" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["demo"] is True and manifest["model"]["image_size"] == 224


def test_checkpoint_with_dropout_head_scans_with_the_exact_path(xray_folder, tmp_path):
    model = tiny_checkpoint(tmp_path / "dropout.pt", dropout=0.3)
    assert scan(xray_folder, tmp_path / "out", model) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["cam"]["exact_fast_path"] is True


def test_decoding_in_worker_processes_gives_the_same_rows(xray_folder, tiny_model, tmp_path):
    scan(xray_folder, tmp_path / "a", tiny_model)
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "b"), "--model", str(tiny_model),
                 "--workers", "2", "--batch-size", "3"]) == 0
    def without_first_seen(rows):  # two reports, two first runs: only their start times differ
        return [{k: v for k, v in row.items() if k != "first_seen"} for row in rows]
    assert without_first_seen(read_rows(tmp_path / "a")) == without_first_seen(read_rows(tmp_path / "b"))
