"""train_model.py --pretrained FILE reads the user's model through batchcam's library, as scan --model
does: any architecture it recognises, a batchcam checkpoint's own preprocessing (channels, mean/std,
resize) kept, the head replaced for the dataset's classes; the checkpoint it writes scans."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from helpers import train_model_module
from torch import nn
from torchvision import models

from batchcam.cli import main
from batchcam.model.checkpoint import load_checkpoint
from batchcam.synthetic import write_imagefolder

REPO = Path(__file__).resolve().parents[2]
FAST = ["--batch-size", "4", "--image-size", "64", "--workers", "0", "--device", "cpu", "--seed", "0",
        "--epochs", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Small models on a small shared CPU are faster with one intra-op thread."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root, 24, seed=1, formats=("png",), size_range=(64, 96))
    return root


def quietly(function, argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = function([str(a) for a in argv])
    return code, err.getvalue()


def test_a_one_channel_checkpoint_is_fine_tuned_with_its_own_normalisation_and_scans(dataset, tmp_path):
    torch.manual_seed(0)
    gray = models.resnet18()
    gray.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    gray.fc = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 3))   # another task's head
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    code, err = quietly(main, ["import-model", tmp_path / "gray.pth", "--out", tmp_path / "gray.pt", "--channels",
                               "1", "--mean", "0.5", "--std", "0.5", "--classes", "A,B,C", "--input-size", "64"])
    assert code == 0, err

    code, err = quietly(train_model_module().main, ["--data", dataset, "--out", tmp_path / "run", "--pretrained",
                                              tmp_path / "gray.pt", *FAST])

    assert code == 0, err
    trained = load_checkpoint(tmp_path / "run" / "model.pt")
    assert (trained.spec.arch, trained.spec.channels, trained.spec.mean, trained.spec.std) == \
        ("resnet18", 1, (0.5,), (0.5,))
    assert trained.spec.class_names == ("NORMAL", "PNEUMONIA")
    assert trained.network.head_description == "fc = Linear(512, 2)"
    code, err = quietly(main, ["scan", dataset / "test", "--out", tmp_path / "report", "--model",
                               tmp_path / "run" / "model.pt", "--workers", "0", "--quiet"])
    assert code == 0, err


@pytest.mark.slow
def test_an_efficientnet_state_dict_is_fine_tuned_as_an_efficientnet_saying_what_it_assumed(dataset, tmp_path):
    torch.manual_seed(0)
    model = models.efficientnet_b0()
    model.classifier[1] = nn.Linear(1280, 2)
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, tmp_path / "effnet.pth")

    code, err = quietly(train_model_module().main, ["--data", dataset, "--out", tmp_path / "run", "--pretrained",
                                              tmp_path / "effnet.pth", "--dropout", "0.2", *FAST])

    assert code == 0, err
    assert "assumed" in err and "import-model" in err
    trained = load_checkpoint(tmp_path / "run" / "model.pt")
    assert trained.spec.arch == "efficientnet_b0" and trained.target_layer == "features.8"
    assert trained.network.head_description == "classifier = Sequential(Dropout, Linear(1280, 2))"


def test_torchvisions_imagenet_file_with_its_1000_unnamed_outputs_is_a_backbone_to_fine_tune(dataset, tmp_path):
    """What the offline advice says to pass: torchvision's resnet18-f37072fd.pth, a plain state dict whose
    1000 outputs have no names; the head is replaced, so none are needed."""
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")

    code, err = quietly(train_model_module().main, ["--data", dataset, "--out", tmp_path / "run", "--pretrained",
                                              tmp_path / "resnet18-f37072fd.pth", *FAST])

    assert code == 0, err
    trained = load_checkpoint(tmp_path / "run" / "model.pt")
    assert trained.spec.class_names == ("NORMAL", "PNEUMONIA") and trained.network.outputs == 2


def test_a_pretrained_file_that_is_not_a_model_is_one_line(dataset, tmp_path):
    (tmp_path / "notes.pt").write_text("not a model")

    code, err = quietly(train_model_module().main, ["--data", dataset, "--out", tmp_path / "run", "--pretrained",
                                              tmp_path / "notes.pt", *FAST])

    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_model.py: error: ") and "not a PyTorch model" in lines[0]
