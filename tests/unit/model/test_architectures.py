"""Every architecture batchcam builds: recognised from its weights' keys and shapes, computing exactly
torchvision's forward pass on real images, with its documented target layer and Grad-CAM equal to
pytorch-grad-cam's there."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torchvision import models

from batchcam.errors import CheckpointError
from batchcam.model.architectures import ARCHITECTURES, NotRecognised, backbone_shapes, recognise_backbone
from batchcam.model.checkpoint import DEFAULT_IMAGE_SIZE, LoadedModel, load_checkpoint
from tests.unit.model.user_models import (
    SIZE,
    Preprocessing,
    assert_equals_reference,
    cam_reference,
    user_model,
    write_xray_pngs,
)

# The networks are compared at 64 px (they are fully convolutional with global pooling, so the size
# changes nothing they compute); a plain state dict's 224 px preprocessing is test_user_checkpoints' part.
PRE = Preprocessing(size=SIZE)


def at_test_size(loaded: LoadedModel) -> LoadedModel:
    assert loaded.spec.image_size == DEFAULT_IMAGE_SIZE
    loaded.spec = replace(loaded.spec, image_size=SIZE)
    return loaded


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Large models on a small shared CPU are faster with one intra-op thread."""


@pytest.fixture(scope="module")
def xrays(tmp_path_factory):
    return write_xray_pngs(tmp_path_factory.mktemp("xrays"), count=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, xrays):
    """``saved(arch)``: (user model with a Linear head, path of its plain state dict), built once per module."""
    built = {}
    folder = tmp_path_factory.mktemp("models")

    def make(arch: str):
        if arch not in built:
            user = user_model(arch, pre=PRE, split_on=xrays)
            path = folder / f"{arch}.pth"
            torch.save(user.state_dict(), path)
            built[arch] = user, path
        return built[arch]

    return make


def _width(arch: str) -> int:
    return {"resnet18": 512, "resnet34": 512, "densenet121": 1024, "efficientnet_b0": 1280}.get(arch, 2048)


@pytest.mark.parametrize("arch,target_layer", [
    ("resnet34", "layer4"), ("resnet50", "layer4"), ("resnet101", "layer4"),
    ("densenet121", "features.relu5"), ("efficientnet_b0", "features.8"),
])
def test_each_architecture_loads_from_a_plain_state_dict_exactly_with_its_documented_layer(saved, xrays, arch,
                                                                                           target_layer):
    user, path = saved(arch)

    loaded = at_test_size(load_checkpoint(path))

    assert loaded.network.arch == loaded.spec.arch == arch
    assert loaded.target_layer == target_layer
    assert loaded.network.describe() == f"weights of {'an' if arch[0] == 'e' else 'a'} {arch}, 2 outputs"
    assert_equals_reference(loaded, user, xrays, PRE, exact=True, cam_reference=cam_reference(user, arch))


@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "efficientnet_b0"])
def test_an_mlp_head_on_each_backbone_goes_through_pytorch_grad_cam(tmp_path, xrays, arch):
    head = nn.Sequential(nn.Linear(_width(arch), 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    user = user_model(arch, head, pre=PRE, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "mlp.pth")

    loaded = at_test_size(load_checkpoint(tmp_path / "mlp.pth"))

    assert_equals_reference(loaded, user, xrays, PRE, exact=False, cam_reference=cam_reference(user, arch))


def test_old_densenet_key_names_are_remapped_as_torchvision_does(saved, xrays):
    """CheXNet-era checkpoints: 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight', under a prefix."""
    user, _ = saved("densenet121")
    old = {}
    for key, value in user.state_dict().items():
        if key.endswith("num_batches_tracked"):  # BatchNorm had no step counter then
            continue
        for new, was in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"), ("conv2", "conv.2")):
            if ".denselayer" in key:
                key = key.replace(f".{new}.", f".{was}.")
        old[f"module.densenet121.{key}"] = value
    assert any(".norm.1." in key for key in old)
    path = saved("densenet121")[1].with_name("chexnet-style.pth.tar")
    torch.save({"epoch": 30, "state_dict": old}, path)

    loaded = at_test_size(load_checkpoint(path))

    assert loaded.network.arch == "densenet121"
    assert_equals_reference(loaded, user, xrays, PRE, exact=True, cam_reference=cam_reference(user, "densenet121"))


def test_the_densenet_batchcam_runs_computes_torchvisions_forward_exactly(saved):
    user, path = saved("densenet121")
    loaded = load_checkpoint(path)
    plain = models.densenet121()
    plain.classifier = nn.Linear(1024, 2)
    plain.load_state_dict(user.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), plain.eval()(x))
    assert set(loaded.model.state_dict()) == set(plain.state_dict())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_architecture_is_recognised_from_its_own_keys_and_no_other(name, channels):
    state = {k: torch.empty(shape, device="meta") for k, shape in backbone_shapes(name, channels).items()}
    head = ARCHITECTURES[name].head
    state[f"{head}.weight"] = torch.empty(2, 8, device="meta")
    backbone = recognise_backbone(state)
    assert (backbone.architecture.name, backbone.channels) == (name, channels)


def test_the_first_convolutions_channels_decide_the_input_channels(tmp_path):
    user = user_model("resnet18", channels=1, pre=Preprocessing(channels=1, mean=(0.5,), std=(0.5,)))
    assert recognise_backbone(user.state_dict()).channels == 1


def test_a_declared_architecture_that_the_weights_are_not_is_refused_naming_theirs(saved):
    user, _ = saved("resnet34")
    with pytest.raises(NotRecognised, match="^the weights are a resnet34's, not a resnet18's: drop --arch, or "
                                            "pass --arch resnet34$"):
        recognise_backbone(user.state_dict(), "resnet18")


def test_a_resnet_batchcam_does_not_build_is_described_not_dumped(tmp_path):
    with torch.device("meta"):
        resnet152 = models.resnet152()
    path = tmp_path / "r152.pth"
    torch.save({k: torch.zeros(1) for k in resnet152.state_dict()}, path)  # the keys tell; shapes cannot match
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(path)
    message = str(refusal.value)
    assert message == (f"{path}: weights of a ResNet with 3, 8, 36, 3 bottleneck blocks per stage, not one batchcam "
                       f"builds {', '.join(ARCHITECTURES)}")


def test_a_state_dict_of_something_else_is_refused_with_its_first_key_only(tmp_path):
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict(), tmp_path / "mlp.pth")
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(tmp_path / "mlp.pth")
    assert str(refusal.value) == (f"{tmp_path / 'mlp.pth'}: weights of no architecture batchcam builds (4 tensors, "
                                  f"the first '0.weight' 8x4); batchcam builds {', '.join(ARCHITECTURES)}")
