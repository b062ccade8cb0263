"""batchcam.model.checkpoint: the classifier, its checkpoint format, and what a checkpoint may (not) contain."""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
from torch import nn

from batchcam.errors import CheckpointError
from batchcam.model.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    build_model,
    load_checkpoint,
    model_input,
    save_checkpoint,
)

CHECKPOINT_KEYS = {"format", "format_version", "class_names", "image_size", "mean", "std", "dropout",
                   "state_dict"}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """ResNet18 on a small shared CPU is many times faster with one intra-op thread."""


def _model(num_classes=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = build_model(num_classes, dropout)
    # Non-trivial BatchNorm statistics, so a round trip that lost the buffers would show.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _outputs(model, x):
    with torch.inference_mode():
        return model.eval()(x)


@pytest.fixture(scope="module")
def sample_input():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ build_model

def test_build_model_without_dropout_has_a_plain_linear_head():
    model = build_model(2)
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (512, 2)


def test_build_model_with_dropout_has_a_dropout_then_linear_head():
    model = build_model(3, dropout=0.5)
    assert isinstance(model.fc, nn.Sequential)
    dropout, linear = model.fc
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.5
    assert isinstance(linear, nn.Linear)
    assert (linear.in_features, linear.out_features) == (512, 3)


def test_build_model_outputs_one_logit_per_class(sample_input):
    assert _outputs(build_model(4), sample_input).shape == (2, 4)


# ------------------------------------------------------------------ checkpoint round trip

def test_checkpoint_round_trip_predicts_the_same(tmp_path, sample_input):
    model = _model(2)
    spec = ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=64, mean=(0.5, 0.4, 0.3),
                     std=(0.2, 0.25, 0.3))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, spec, training={"epochs": 1}, metrics={"accuracy": 0.5})

    loaded = load_checkpoint(path)

    assert loaded.spec == spec
    assert not loaded.model.training
    assert loaded.info == {"training": {"epochs": 1}, "metrics": {"accuracy": 0.5}}
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.path == path.resolve()
    assert torch.equal(_outputs(loaded.model, sample_input), _outputs(model, sample_input))


def test_checkpoint_round_trip_with_dropout_head_predicts_the_same(tmp_path, sample_input):
    model = _model(3, dropout=0.3)
    spec = ModelSpec(class_names=("a", "b", "c"), image_size=64, dropout=0.3)
    save_checkpoint(tmp_path / "m.pt", model, spec)

    loaded = load_checkpoint(tmp_path / "m.pt")

    assert isinstance(loaded.model.fc, nn.Sequential)
    assert loaded.spec.class_names == ("a", "b", "c")
    assert torch.equal(_outputs(loaded.model, sample_input), _outputs(model, sample_input))


def test_half_checkpoint_is_smaller_and_predicts_nearly_the_same(tmp_path, sample_input):
    model = _model(2)
    spec = ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=64)
    save_checkpoint(tmp_path / "full.pt", model, spec)
    save_checkpoint(tmp_path / "half.pt", model, spec, half=True)

    raw = torch.load(tmp_path / "half.pt", weights_only=True)
    assert raw["state_dict"]["conv1.weight"].dtype == torch.float16
    assert raw["state_dict"]["bn1.num_batches_tracked"].dtype == torch.int64
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size

    loaded = load_checkpoint(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    expected = _outputs(model, sample_input)
    assert torch.allclose(_outputs(loaded.model, sample_input), expected, atol=1e-2, rtol=0)


def test_saved_checkpoint_is_a_plain_dict_loadable_with_weights_only(tmp_path):
    spec = ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=96, dropout=0.25)
    path = tmp_path / "model.pt"
    save_checkpoint(path, _model(2, dropout=0.25), spec)

    raw = torch.load(path, weights_only=True)

    assert type(raw) is dict
    assert CHECKPOINT_KEYS <= set(raw)
    assert raw["format"] == FORMAT
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert raw["image_size"] == 96
    assert raw["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert raw["std"] == pytest.approx(list(IMAGENET_STD))
    assert raw["dropout"] == 0.25
    assert type(raw["state_dict"]) is dict
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    assert "fc.1.weight" in raw["state_dict"]


def test_save_checkpoint_leaves_no_temporary_file_behind(tmp_path):
    save_checkpoint(tmp_path / "model.pt", _model(2), ModelSpec(class_names=("x", "y")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# ------------------------------------------------------------------ files that must be refused

class _Payload:
    """Unpickling this would create ``marker``: proof that the file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("payload", [_Payload, _SystemPayload], ids=["open", "os.system"])
def test_pickled_object_is_refused_without_running_it(tmp_path, writer, payload):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"format": FORMAT, "state_dict": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)

    assert str(path) in str(excinfo.value)
    assert not marker.exists()


@pytest.mark.parametrize("text", ["not a checkpoint\n", "hello world\n", "a,b,c\n1,2,3\n"],
                         ids=["not-a-checkpoint", "hello-world", "csv"])
def test_text_file_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert str(path) in str(excinfo.value)


def test_empty_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        load_checkpoint(path)


def test_missing_file_is_refused_naming_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_checkpoint_whose_weights_do_not_fit_its_class_names_is_refused(tmp_path):
    path = tmp_path / "three.pt"
    save_checkpoint(path, _model(3), ModelSpec(class_names=("a", "b", "c")))
    raw = torch.load(path, weights_only=True)
    raw["class_names"] = ["a", "b"]  # the head still has three outputs
    torch.save(raw, path)

    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)

    message = str(excinfo.value)
    assert str(path) in message
    assert "2 classes" in message


def test_checkpoint_of_an_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "future.pt"
    save_checkpoint(path, _model(2), ModelSpec(class_names=("a", "b")))
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="future.pt.*version"):
        load_checkpoint(path)


def test_dict_of_tensors_that_is_not_a_resnet_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_checkpoint(path)


# ------------------------------------------------------------------ bare state dicts (the notebook's format)

@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "dataparallel-prefix"])
def test_bare_state_dict_loads_with_the_notebook_defaults(tmp_path, sample_input, prefix):
    model = _model(2)
    path = tmp_path / "notebook.pth"
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, path)

    loaded = load_checkpoint(path)

    assert loaded.spec.class_names == ("NORMAL", "PNEUMONIA")
    assert loaded.spec.image_size == 224
    assert loaded.spec.mean == IMAGENET_MEAN
    assert loaded.spec.std == IMAGENET_STD
    assert loaded.info.get("plain_state_dict") is True
    assert torch.equal(_outputs(loaded.model, sample_input), _outputs(model, sample_input))


def test_bare_state_dict_with_a_dropout_head_loads(tmp_path, sample_input):
    model = _model(2, dropout=0.5)
    torch.save(model.state_dict(), tmp_path / "dropout.pth")
    loaded = load_checkpoint(tmp_path / "dropout.pth")
    assert isinstance(loaded.model.fc, nn.Sequential)
    assert torch.equal(_outputs(loaded.model, sample_input), _outputs(model, sample_input))


def test_bare_state_dict_with_other_than_two_outputs_is_refused(tmp_path):
    path = tmp_path / "three.pth"
    torch.save(build_model(3).state_dict(), path)
    with pytest.raises(CheckpointError, match="three.pth.*3"):
        load_checkpoint(path)


# ------------------------------------------------------------------ preprocessing

def test_normalize_turns_a_uint8_batch_into_three_normalised_channels():
    gray = torch.tensor([[[0, 255], [128, 51]], [[255, 255], [0, 0]]], dtype=torch.uint8)  # (2, 2, 2)
    spec = ModelSpec(class_names=("a", "b"))

    x = model_input(gray, spec)

    assert x.shape == (2, 3, 2, 2)
    assert x.dtype == torch.float32
    for c in range(3):
        expected = (gray.float() / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[:, c], expected, atol=1e-6)
    assert x[0, 0, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[0] / IMAGENET_STD[0], abs=1e-6)
    assert x[0, 2, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2], abs=1e-6)


def test_normalize_uses_the_checkpoints_own_mean_and_std():
    gray = torch.full((1, 3, 4), 102, dtype=torch.uint8)  # 102 / 255 = 0.4
    spec = ModelSpec(class_names=("a", "b"), mean=(0.4, 0.2, 0.0), std=(1.0, 0.5, 0.4))
    x = model_input(gray, spec)
    assert x.shape == (1, 3, 3, 4)
    assert torch.allclose(x[0, 0], torch.zeros(3, 4), atol=1e-6)
    assert torch.allclose(x[0, 1], torch.full((3, 4), 0.4), atol=1e-6)
    assert torch.allclose(x[0, 2], torch.full((3, 4), 1.0), atol=1e-6)


def test_normalize_does_not_modify_its_input():
    gray = torch.full((1, 2, 2), 200, dtype=torch.uint8)
    model_input(gray, ModelSpec(class_names=("a", "b")))
    assert torch.equal(gray, torch.full((1, 2, 2), 200, dtype=torch.uint8))


def test_model_spec_rejects_fewer_than_two_or_duplicate_classes():
    with pytest.raises(ValueError):
        ModelSpec(class_names=("only",))
    with pytest.raises(ValueError):
        ModelSpec(class_names=("a", "a"))
