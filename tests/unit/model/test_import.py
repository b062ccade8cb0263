"""batchcam.model.importing: what needs a declaration becomes a self-describing checkpoint that scans with
no flags, equal to a plain PyTorch forward pass on the declared preprocessing."""
from __future__ import annotations

import copy
import sys
import types
import warnings

import pytest
import torch
from torch import nn

from batchcam.errors import CheckpointError, UsageError
from batchcam.model.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, load_model
from batchcam.model.importing import Declaration, import_model
from batchcam.resources import DEMO_MODEL
from tests.unit.model.user_models import (
    SIZE,
    Preprocessing,
    assert_equals_reference,
    untrained_weights,
    user_model,
    write_xray_pngs,
)

SMALL = Preprocessing(size=SIZE)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Small models on a small shared CPU are faster with one intra-op thread."""


@pytest.fixture(scope="module")
def xrays(tmp_path_factory):
    return write_xray_pngs(tmp_path_factory.mktemp("xrays"), count=4)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory, xrays):
    """A whole model saved with torch.save(model), its head an MLP ending with a Softmax."""
    head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3), nn.Softmax(dim=1))
    user = user_model("resnet18", head, pre=SMALL, split_on=xrays)
    path = tmp_path_factory.mktemp("pickled") / "whole.pt"
    torch.save(user, path)
    return user, path


def test_a_whole_pickled_model_is_refused_by_the_loader_in_one_line_naming_trust_pickle(pickled):
    _, path = pickled
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(path)
    assert str(refusal.value) == (
        f"{path}: holds pickled Python objects (torchvision.models.resnet.ResNet), such as a whole model saved with "
        "torch.save(model); loading them runs code. If you trust the file: batchcam import-model "
        f"{path} --out MODEL.pt --trust-pickle")


def test_import_refuses_a_pickled_model_without_trust_pickle_and_writes_nothing(pickled, tmp_path):
    _, path = pickled
    with pytest.raises(CheckpointError, match="--trust-pickle$"):
        import_model(path, tmp_path / "out.pt", Declaration(classes=("NORMAL", "BACTERIA", "VIRUS")))
    assert not (tmp_path / "out.pt").exists()


def test_import_with_trust_pickle_keeps_the_weights_and_structure_and_scans_like_the_source(pickled, tmp_path,
                                                                                             xrays):
    user, path = pickled
    report = import_model(path, tmp_path / "model.pt",
                          Declaration(classes=("NORMAL", "BACTERIA", "VIRUS"), input_size=SIZE, trust_pickle=True))

    assert report.source_kind == "a pickled model (torchvision.models.resnet.ResNet)"
    assert report.network.head_description == "fc = Sequential(Linear(512, 64), ReLU, Dropout, Linear(64, 3))"
    assert report.inferred == ()                   # the modules named the head's layers
    assert report.probe.against == "the source model" and report.probe.max_difference <= 1e-4
    lines = report.lines()
    assert lines[0] == f"read {path}: a pickled model (torchvision.models.resnet.ResNet)"
    assert "classes: NORMAL, BACTERIA, VIRUS" in lines
    assert f"wrote {tmp_path / 'model.pt'} (sha256 {report.sha256[:16]})" == lines[-1]
    raw = torch.load(tmp_path / "model.pt", weights_only=True)   # a plain checkpoint now: no pickled objects
    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION

    loaded = load_checkpoint(tmp_path / "model.pt")

    assert loaded.assumptions == () and loaded.assumption_notice() is None
    said = []
    load_model(tmp_path / "model.pt", said.append)
    assert said == []
    assert loaded.spec.class_names == ("NORMAL", "BACTERIA", "VIRUS")
    assert_equals_reference(loaded, _logits_of(user), xrays, SMALL, exact=False)


def _logits_of(user: nn.Module) -> nn.Module:
    """The source without its final Softmax: the same probabilities, as logits the reference softmaxes."""
    logits = copy.deepcopy(user)
    logits.fc = logits.fc[:-1]
    return logits


def test_a_pickled_model_under_a_container_key_with_class_names_is_imported(tmp_path, xrays):
    user = user_model("resnet18", pre=SMALL, split_on=xrays)
    torch.save({"epoch": 9, "model": nn.DataParallel(user), "class_names": ["NORMAL", "PNEUMONIA"]},
               tmp_path / "ckpt.pt")

    report = import_model(tmp_path / "ckpt.pt", tmp_path / "model.pt", Declaration(input_size=SIZE, trust_pickle=True))

    assert report.spec.class_names == ("NORMAL", "PNEUMONIA") and "class names" not in " ".join(report.defaults)
    assert_equals_reference(load_checkpoint(tmp_path / "model.pt"), user, xrays, SMALL, exact=True)


def test_a_pickled_model_whose_forward_is_not_torchvisions_is_refused_by_the_probe(tmp_path):
    module = types.ModuleType("someone_notebook")

    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = user_model("resnet18", pre=SMALL)

        def forward(self, x):
            return self.net(x * 2)   # a step torchvision's resnet18 does not take

    Doubling.__module__, Doubling.__qualname__ = module.__name__, "Doubling"  # as if defined in that module
    module.Doubling = Doubling
    sys.modules[module.__name__] = module
    try:
        torch.save(Doubling(), tmp_path / "custom.pt")
        with pytest.raises(CheckpointError) as refusal:
            import_model(tmp_path / "custom.pt", tmp_path / "model.pt", Declaration(input_size=SIZE, trust_pickle=True))
    finally:
        del sys.modules[module.__name__]
    assert "the rebuilt resnet18 does not reproduce the source model's outputs (probabilities differ by up to " in \
        str(refusal.value)
    assert str(refusal.value).endswith("batchcam cannot run it exactly")
    assert not (tmp_path / "model.pt").exists()


def test_a_pickled_model_whose_class_is_not_importable_is_refused_saying_what_to_save_instead(tmp_path):
    module = types.ModuleType("gone_notebook")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    Net.__module__, Net.__qualname__ = module.__name__, "Net"
    module.Net = Net
    sys.modules[module.__name__] = module
    try:
        torch.save(Net(), tmp_path / "net.pt")
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(CheckpointError) as refusal:
        import_model(tmp_path / "net.pt", tmp_path / "model.pt", Declaration(trust_pickle=True))
    assert str(refusal.value) == (
        f"{tmp_path / 'net.pt'}: the pickled model needs code that is not importable here (module gone_notebook: a "
        "class defined in a notebook, say); save its weights instead (torch.save(model.state_dict(), FILE)) or a "
        "TorchScript file (torch.jit.script(model).save(FILE))")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_file_is_refused_by_the_loader_without_a_warning_and_imported(tmp_path, xrays, how, capfd):
    user = user_model("resnet18", nn.Linear(512, 1), pre=SMALL, split_on=xrays)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(user) if how == "script" else torch.jit.trace(user, torch.randn(1, 3, SIZE, SIZE))
        scripted.save(str(tmp_path / "model.ts"))
    capfd.readouterr()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as refusal:
            load_checkpoint(tmp_path / "model.ts")
    assert str(refusal.value) == (f"{tmp_path / 'model.ts'}: a TorchScript model; read it once into a batchcam "
                                  f"checkpoint: batchcam import-model {tmp_path / 'model.ts'} --out MODEL.pt")
    assert not caught and capfd.readouterr().err == ""

    report = import_model(tmp_path / "model.ts", tmp_path / "model.pt", Declaration(input_size=SIZE))

    assert report.source_kind == "a TorchScript model" and report.probe.against == "the source model"
    assert report.network.single_logit and report.exact_cam
    assert_equals_reference(load_checkpoint(tmp_path / "model.pt"), user, xrays, SMALL, exact=True)


def test_a_one_channel_model_imported_with_mean_and_std_half_equals_its_grayscale_reference(tmp_path, xrays):
    gray = Preprocessing(size=SIZE, channels=1, mean=(0.5,), std=(0.5,))
    user = user_model("resnet18", channels=1, pre=gray, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "gray.pth")

    report = import_model(tmp_path / "gray.pth", tmp_path / "model.pt",
                          Declaration(channels=1, mean=(0.5,), std=(0.5,), input_size=SIZE))

    loaded = load_checkpoint(tmp_path / "model.pt")
    assert (loaded.spec.channels, loaded.spec.mean, loaded.spec.std) == (1, (0.5,), (0.5,))
    assert report.probe.against == "torchvision's resnet18 with the same weights"
    assert_equals_reference(loaded, user, xrays, gray, exact=True)


def test_center_crop_is_torchvisions_evaluation_transform(tmp_path, xrays):
    crop = Preprocessing(size=SIZE, resize="center-crop")
    user = user_model("resnet18", pre=crop, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")

    import_model(tmp_path / "model.pth", tmp_path / "model.pt", Declaration(resize="center-crop", input_size=SIZE))

    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.spec.resize == "center-crop"
    assert_equals_reference(loaded, user, xrays, crop, exact=True)


def test_three_classes_declared_with_classes(tmp_path, xrays):
    user = user_model("resnet18", outputs=3, pre=SMALL, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "three.pth")

    report = import_model(tmp_path / "three.pth", tmp_path / "model.pt",
                          Declaration(classes=("NORMAL", "BACTERIA", "VIRUS"), input_size=SIZE))

    assert report.defaults == ("resize squash", "ImageNet mean/std")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.spec.class_names == ("NORMAL", "BACTERIA", "VIRUS") and loaded.assumptions == ()
    assert_equals_reference(loaded, user, xrays, SMALL, exact=True)


def test_a_wrong_arch_is_refused_naming_the_architecture_the_weights_are(tmp_path):
    torch.save(untrained_weights(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as refusal:
        import_model(tmp_path / "model.pth", tmp_path / "model.pt", Declaration(arch="resnet50"))
    assert str(refusal.value) == (f"{tmp_path / 'model.pth'}: the weights are a resnet18's, not a resnet50's: drop "
                                  "--arch, or pass --arch resnet18")
    assert not (tmp_path / "model.pt").exists()


def test_three_outputs_without_classes_are_refused_asking_for_them(tmp_path):
    torch.save(untrained_weights(outputs=3), tmp_path / "three.pth")
    with pytest.raises(CheckpointError, match="a head with 3 outputs and no class names: declare them with --classes "
                                              "A,B,C$"):
        import_model(tmp_path / "three.pth", tmp_path / "model.pt")


def test_declared_channels_must_fit_the_first_convolution(tmp_path):
    torch.save(untrained_weights(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="first convolution takes 3 channel.*--channels 1 does not fit it"):
        import_model(tmp_path / "model.pth", tmp_path / "model.pt", Declaration(channels=1, mean=(0.5,), std=(0.5,)))


@pytest.mark.parametrize("declaration,message", [
    (Declaration(arch="vgg16"), "--arch vgg16: choose one of resnet18, resnet34"),
    (Declaration(classes=("A",)), "--classes: at least two distinct"),
    (Declaration(classes=("A", "A")), "--classes: at least two distinct"),
    (Declaration(mean=(0.5,)), "--mean and --std are declared together"),
    (Declaration(mean=(0.5, 0.5), std=(0.5, 0.5)), "--mean: one value, or three"),
    (Declaration(mean=(0.5,), std=(0.0,)), "--std: positive values"),
    (Declaration(resize="crop"), "--resize crop: choose one of squash, center-crop"),
    (Declaration(input_size=8), "--input-size 8: 16..4096 pixels"),
    (Declaration(channels=2), "--channels 2: 1 or 3"),
])
def test_declarations_that_can_never_be_right_are_usage_errors(tmp_path, declaration, message):
    with pytest.raises(UsageError, match=message):
        import_model(tmp_path / "absent.pt", tmp_path / "model.pt", declaration)


def test_reimporting_a_calibrated_checkpoint_keeps_its_calibration_unless_the_preprocessing_changes(tmp_path):
    demo = load_checkpoint(DEMO_MODEL)
    assert demo.ood is not None and demo.temperature != 1.0

    same = import_model(DEMO_MODEL, tmp_path / "same.pt")
    kept = load_checkpoint(tmp_path / "same.pt")
    assert same.defaults == () and same.notes == ()
    assert kept.temperature == demo.temperature and kept.ood is not None
    assert kept.spec == demo.spec

    cropped = import_model(DEMO_MODEL, tmp_path / "crop.pt", Declaration(resize="center-crop"))
    assert cropped.notes == ("calibration left out: the preprocessing or the classes changed (batchcam calibrate "
                             "fits it again)",)
    dropped = load_checkpoint(tmp_path / "crop.pt")
    assert dropped.temperature == 1.0 and dropped.ood is None and dropped.spec.resize == "center-crop"
