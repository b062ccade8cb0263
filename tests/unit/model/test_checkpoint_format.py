"""Checkpoint format 2 records everything a scan needs (architecture, head, channels, resize, mean/std,
classes); format 1 stays readable; a calibrated plain state dict keeps what was assumed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from batchcam.errors import CheckpointError
from batchcam.model.calibration import OodStatistics
from batchcam.model.checkpoint import (
    FORMAT,
    ModelSpec,
    build_model,
    load_checkpoint,
    model_input,
    save_calibrated,
    save_checkpoint,
)
from batchcam.resources import DEMO_MODEL
from tests.unit.model.user_models import user_model

V2_KEYS = {"format", "format_version", "arch", "class_names", "image_size", "resize", "channels", "mean", "std",
           "dropout", "head", "training", "metrics", "state_dict"}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """ResNet18 on a small shared CPU is faster with one intra-op thread."""


def test_a_checkpoint_written_now_is_format_2_with_every_field_in_plain_types(tmp_path):
    spec = ModelSpec(class_names=("a", "b", "c"), image_size=64)
    save_checkpoint(tmp_path / "m.pt", build_model(3, dropout=0.5), spec)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(raw) == V2_KEYS
    assert (raw["format"], raw["format_version"], raw["arch"]) == (FORMAT, 2, "resnet18")
    assert (raw["resize"], raw["channels"]) == ("squash", 3)
    assert raw["head"] == {"layers": ["dropout", "linear"], "sequential": True}


def test_the_bundled_format_1_demo_model_still_loads_with_nothing_assumed():
    loaded = load_checkpoint(DEMO_MODEL)
    assert torch.load(DEMO_MODEL, weights_only=True)["format_version"] == 1
    assert (loaded.spec.arch, loaded.spec.channels, loaded.spec.resize) == ("resnet18", 3, "squash")
    assert loaded.assumptions == () and loaded.source == "a batchcam checkpoint (format 1)"
    assert loaded.target_layer == "layer4" and loaded.ood is not None


def test_a_format_1_checkpoint_with_a_dropout_head_loads(tmp_path):
    model = build_model(2, dropout=0.3).eval()
    torch.save({"format": FORMAT, "format_version": 1, "arch": "resnet18", "class_names": ["NORMAL", "PNEUMONIA"],
                "image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dropout": 0.3,
                "training": {}, "metrics": {}, "state_dict": model.state_dict()}, tmp_path / "v1.pt")
    loaded = load_checkpoint(tmp_path / "v1.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), model(x))


def test_a_recorded_head_that_the_weights_do_not_fit_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model(2), ModelSpec(class_names=("a", "b")))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["head"] = {"layers": ["dropout", "linear"], "sequential": True}
    torch.save(raw, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m\.pt: weights of a resnet18 with a head batchcam cannot run: the "
                                              r"weights of fc do not fit its recorded layers$"):
        load_checkpoint(tmp_path / "m.pt")


def test_a_recorded_architecture_the_weights_are_not_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.pt", build_model(2), ModelSpec(class_names=("a", "b")))
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    raw["arch"] = "resnet34"
    torch.save(raw, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="the weights are a resnet18's, not a resnet34's"):
        load_checkpoint(tmp_path / "m.pt")


def _ood(features: int) -> OodStatistics:
    return OodStatistics(means=torch.zeros(2, features), precision=torch.eye(features), threshold=3.0,
                         percentiles={"99.5": 3.0}, shrinkage=0.1, images=10)


def test_calibrating_a_plain_state_dict_writes_format_2_keeping_what_was_assumed(tmp_path):
    head = nn.Sequential(nn.Linear(512, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 1))
    torch.manual_seed(0)
    user = user_model("resnet18", head)
    torch.save({f"module.{k}": v for k, v in user.state_dict().items()}, tmp_path / "plain.pth")
    before = load_checkpoint(tmp_path / "plain.pth")

    save_calibrated(tmp_path / "plain.pth", tmp_path / "calibrated.pt", 1.5, _ood(512))

    after = load_checkpoint(tmp_path / "calibrated.pt")
    assert after.source == "a batchcam checkpoint (format 2)"
    assert after.assumptions == before.assumptions and len(after.assumptions) == 3
    assert after.temperature == 1.5 and after.ood.means.shape == (2, 512)
    assert after.network == before.network
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(after.model(x), before.model(x))


def test_normalize_gives_one_channel_for_a_one_channel_model():
    gray = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = model_input(gray, ModelSpec(class_names=("a", "b"), channels=1, mean=(0.5,), std=(0.5,)))
    assert x.shape == (1, 1, 2, 2)
    assert torch.allclose(x[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]), atol=1e-6)


@pytest.mark.parametrize("fields,message", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"channels": 1}, "mean and std must have 1 value"),
    ({"resize": "crop"}, "resize must be one of squash, center-crop"),
    ({"std": (0.2, 0.0, 0.2)}, "std values must be positive"),
])
def test_a_model_spec_that_cannot_be_right_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(class_names=("a", "b"), **fields)
