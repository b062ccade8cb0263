"""train_model.py end to end on a tiny synthetic ImageFolder (CPU, 64 px, a few seconds per run)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import csv_rows, train_model_module
from PIL import Image

from batchcam.decode.imaging import resize_square
from batchcam.model.checkpoint import load_checkpoint, model_input
from batchcam.synthetic import generate, write_imagefolder

REPO = Path(__file__).resolve().parents[2]


train_model = train_model_module()

# Small and fast: 64 px inputs, batches of 4, no worker processes, random init (no download).
FAST = ["--batch-size", "4", "--image-size", "64", "--workers", "0", "--pretrained", "none",
        "--device", "cpu", "--seed", "0"]
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """ResNet18 on a small shared CPU is many times faster with one intra-op thread."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """25 images (train 17, val 4, test 4), png and jpg, 64-96 px; never modified by tests."""
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root, 24, seed=1, formats=("png", "jpg"), size_range=(64, 96))
    return root


@pytest.fixture
def data_copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset that a test may break."""
    return Path(shutil.copytree(dataset, tmp_path / "data"))


def run(argv) -> tuple[int, str, str]:
    """train_model.main in-process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train_model.main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def assert_one_line_error(code: int, stderr: str) -> str:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("train_model.py: error: ")
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One two-epoch run at the recipe's learning rate, shared by the checks below."""
    out = tmp_path_factory.mktemp("run")
    code, stdout, stderr = run(["--data", dataset, "--out", out, "--epochs", "2", "--lr", "1e-4", *FAST])
    return code, out, stdout, stderr


def test_help_works_when_python_strips_docstrings():
    """``python -OO`` sets ``__doc__`` to None: the description once came from the module docstring."""
    done = subprocess.run([sys.executable, "-OO", str(REPO / "train_model.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ResNet18" in done.stdout


# ------------------------------------------------------------------ a normal run

def test_training_run_exits_zero_and_reports_test_metrics(trained):
    code, out, stdout, stderr = trained
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "classes ['NORMAL', 'PNEUMONIA']" in stdout
    assert "epoch 1/2" in stdout and "epoch 2/2" in stdout
    assert "test: accuracy" in stdout
    assert str(out / "model.pt") in stdout


def test_trained_checkpoint_loads_and_predicts(trained):
    _, out, _, _ = trained
    loaded = load_checkpoint(out / "model.pt")
    assert loaded.spec.class_names == ("NORMAL", "PNEUMONIA")
    assert loaded.spec.image_size == 64
    assert loaded.info["training"]["epochs"] == 2
    assert loaded.info["training"]["pretrained"] == "none"

    gray = torch.tensor(resize_square(generate(123, "PNEUMONIA", (90, 80)).image, 64))[None]
    with torch.inference_mode():
        probabilities = torch.softmax(loaded.model(model_input(gray, loaded.spec)), 1)
    assert probabilities.shape == (1, 2)
    assert torch.isfinite(probabilities).all()
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_trained_checkpoint_holds_the_best_epochs_weights(trained):
    _, out, _, _ = trained
    final = torch.load(out / "model.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert final["state_dict"].keys() == best["state_dict"].keys()
    assert all(torch.equal(final["state_dict"][k], best["state_dict"][k]) for k in best["state_dict"])
    assert final["metrics"]["best_epoch"] == best["metrics"]["epoch"]


def test_epochs_csv_has_one_row_per_epoch(trained):
    _, out, _, _ = trained
    rows = csv_rows(out / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert {"train_loss", "val_loss", "val_accuracy", "val_auc", "seconds", "skipped"} <= set(row)
        assert float(row["train_loss"]) > 0 and float(row["val_loss"]) > 0
        assert 0 <= float(row["val_accuracy"]) <= 1
        assert int(row["skipped"]) == 0


def test_test_metrics_json_has_the_classification_metrics(trained):
    _, out, _, _ = trained
    metrics = json.loads((out / "test_metrics.json").read_text())
    for name in METRIC_NAMES:
        assert name in metrics, name
    assert 0 <= metrics["accuracy"] <= 1
    assert metrics["n"] == 4  # the test/ split: round(24 * 0.15) images
    assert metrics["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert metrics["positive_classes"] == ["PNEUMONIA"]
    assert np.asarray(metrics["confusion_matrix"]).sum() == 4
    assert metrics["best_epoch"] in (1, 2)
    assert metrics["loss"] > 0
    # the checkpoint carries the same test metrics
    assert load_checkpoint(out / "model.pt").info["metrics"]["test"] == metrics


def test_training_ends_with_statistics_a_temperature_and_ece_before_and_after(trained):
    _, out, stdout, _ = trained
    loaded = load_checkpoint(out / "model.pt")
    assert loaded.ood is not None and loaded.ood.means.shape == (2, 512)
    assert loaded.ood.images == loaded.info["training"]["images"]["train"]
    assert loaded.temperature > 0 and np.isfinite(loaded.ood.threshold)
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["temperature"] == pytest.approx(loaded.temperature)
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_unscaled"] <= 1 and metrics["ece_bins"] == 15
    assert "calibration: temperature" in stdout and "ECE before -> after scaling" in stdout


def test_learning_curve_png_is_written(trained):
    _, out, _, _ = trained
    with Image.open(out / "learning_curve.png") as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100


def test_training_loss_goes_down_on_a_small_memorisable_set(trained):
    # 15 training images, seeded: at lr 1e-4 the loss falls every epoch (at lr 1e-3 with batches of
    # four it jumps about under BatchNorm, which makes a two-epoch check flaky).
    _, out, _, _ = trained
    losses = [float(r["train_loss"]) for r in csv_rows(out / "epochs.csv")]
    assert losses[1] < losses[0], losses


# ------------------------------------------------------------------ dropout comparison and resume

def test_compare_dropout_writes_a_two_row_comparison(dataset, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, stderr = run(["--data", dataset, "--out", out, "--epochs", "1", "--compare-dropout", "0.5",
                                *FAST])
    assert code == 0, stderr

    rows = csv_rows(out / "comparison.csv")
    assert [float(r["dropout"]) for r in rows] == [0.0, 0.5]
    for row in rows:
        assert int(row["best_epoch"]) == 1
        assert {f"test_{n}" for n in METRIC_NAMES} <= set(row)

    md = (out / "comparison.md").read_text().strip().splitlines()
    assert len(md) == 4  # header, separator, two rows
    assert md[0].startswith("| dropout |")
    assert md[2].startswith("| 0.0 |") and md[3].startswith("| 0.5 |")

    assert not isinstance(load_checkpoint(out / "dropout_0" / "model.pt").model.fc, torch.nn.Sequential)
    with_dropout = load_checkpoint(out / "dropout_0.5" / "model.pt")
    assert with_dropout.spec.dropout == 0.5
    assert isinstance(with_dropout.model.fc, torch.nn.Sequential)
    assert "== dropout 0.0 ==" in stdout and "== dropout 0.5 ==" in stdout


def test_resume_continues_after_the_last_finished_epoch(dataset, tmp_path):
    out = tmp_path / "resumed"
    code, _, stderr = run(["--data", dataset, "--out", out, "--epochs", "1", *FAST])
    assert code == 0, stderr
    first = csv_rows(out / "epochs.csv")
    assert len(first) == 1

    code, stdout, stderr = run(["--data", dataset, "--out", out, "--epochs", "2", "--resume", *FAST])

    assert code == 0, stderr
    assert "resuming after epoch 1" in stdout
    assert "epoch 1/2" not in stdout and "epoch 2/2" in stdout
    rows = csv_rows(out / "epochs.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0] == first[0]  # the first epoch is kept, not retrained
    assert load_checkpoint(out / "model.pt").info["training"]["epochs"] == 2


def test_resume_without_a_previous_run_is_a_one_line_error(dataset, tmp_path):
    code, _, stderr = run(["--data", dataset, "--out", tmp_path / "fresh", "--epochs", "1", "--resume", *FAST])
    line = assert_one_line_error(code, stderr)
    assert "last.pt" in line


# ------------------------------------------------------------------ bad data and options

def test_missing_test_split_is_a_one_line_error(data_copy):
    shutil.rmtree(data_copy / "test")
    code, _, stderr = run(["--data", data_copy, "--out", data_copy.parent / "out", "--epochs", "1", *FAST])
    line = assert_one_line_error(code, stderr)
    assert "test/" in line


def test_missing_train_split_is_a_one_line_error(data_copy):
    shutil.rmtree(data_copy / "train")
    code, _, stderr = run(["--data", data_copy, "--out", data_copy.parent / "out", "--epochs", "1", *FAST])
    line = assert_one_line_error(code, stderr)
    assert "train/" in line


@pytest.mark.parametrize("class_dir", ["train/NORMAL", "test/PNEUMONIA"])
def test_empty_class_folder_is_a_one_line_error(data_copy, class_dir):
    folder = data_copy / class_dir
    for path in folder.iterdir():
        path.unlink()
    code, _, stderr = run(["--data", data_copy, "--out", data_copy.parent / "out", "--epochs", "1", *FAST])
    line = assert_one_line_error(code, stderr)
    assert str(folder) in line
    assert "no images" in line


def test_unavailable_imagenet_weights_suggest_pretrained_none(dataset, tmp_path, monkeypatch):
    import torch.hub
    import torchvision.models._api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    # Both names of the download function: nothing may reach the network or the hub cache.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    argv = ["--data", dataset, "--out", tmp_path / "out", "--epochs", "1", *FAST]
    argv[argv.index("--pretrained") + 1] = "imagenet"

    code, _, stderr = run(argv)

    line = assert_one_line_error(code, stderr)
    assert "--pretrained none" in line
    assert "URLError" in line


def test_unreadable_training_image_is_skipped_and_training_completes(data_copy):
    broken = data_copy / "train" / "NORMAL" / "train_broken.png"
    broken.write_bytes(b"this is not a PNG at all")
    out = data_copy.parent / "out"

    code, _, stderr = run(["--data", data_copy, "--out", out, "--epochs", "1", *FAST])

    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "skipped" in stderr
    assert "train_broken.png" in stderr
    rows = csv_rows(out / "epochs.csv")
    assert int(rows[0]["skipped"]) == 1
    assert (out / "model.pt").is_file()
    load_checkpoint(out / "model.pt")


def test_training_reads_dicom_films_with_scans_selection_rule(data_copy):
    pytest.importorskip("pydicom", reason="DICOM support (the dicom extra) is not installed")
    from tests.dicom_films import dicom_film

    normal = data_copy / "train" / "NORMAL"
    (normal / "train_chest.dcm").write_bytes(dicom_film(Modality="DX", BodyPartExamined="CHEST", ViewPosition="PA"))
    (normal / "train_ct.dcm").write_bytes(dicom_film(Modality="CT"))
    out = data_copy.parent / "out"

    code, _, stderr = run(["--data", data_copy, "--out", out, "--epochs", "1", *FAST])

    assert code == 0, stderr
    assert int(csv_rows(out / "epochs.csv")[0]["skipped"]) == 1  # the CT; the chest film was trained on
    assert "skipped 1 DICOM film(s) that scan would not score (--select)" in stderr
    assert "train_ct.dcm: not a chest radiograph: Modality CT" in stderr

    code, _, stderr = run(["--data", data_copy, "--out", data_copy.parent / "all", "--epochs", "1", *FAST,
                           "--select", "all"])
    assert code == 0, stderr
    assert int(csv_rows(data_copy.parent / "all" / "epochs.csv")[0]["skipped"]) == 0


def test_a_bad_selection_option_is_a_one_line_error(dataset, tmp_path):
    code, _, stderr = run(["--data", dataset, "--out", tmp_path / "out", "--select", "all", "--views", "LL"])
    assert "--select all scores every file" in assert_one_line_error(code, stderr)


def test_a_positive_class_the_data_lacks_is_a_one_line_error_before_anything_is_written(dataset, tmp_path):
    code, _, stderr = run(["--data", dataset, "--out", tmp_path / "out", "--positive", "VIRUS"])
    assert "--positive VIRUS: not one of the classes (NORMAL, PNEUMONIA)" in assert_one_line_error(code, stderr)
    assert not (tmp_path / "out").exists()


def test_the_test_metrics_score_the_positive_class_given(dataset, tmp_path):
    """--positive NORMAL turns the binary metrics around: NORMAL's recall is the sensitivity."""
    out = tmp_path / "out"
    code, _, stderr = run(["--data", dataset, "--out", out, "--epochs", "1", "--positive", "normal", *FAST])
    assert code == 0, stderr
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["positive_classes"] == ["NORMAL"]
    assert metrics["sensitivity"] == metrics["per_class"]["NORMAL"]["recall"] is not None
    assert metrics["specificity"] == metrics["per_class"]["PNEUMONIA"]["recall"] is not None
