"""The CAM engine on every architecture batchcam builds: its documented target layer, the exact path
wherever the head is global average pooling plus one Linear, pytorch-grad-cam in batches otherwise,
hooks released, and pooled features of any width for the OOD statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision import models

from batchcam.cam.backends import EagerForward, WithActivations, make_forward
from batchcam.cam.explainer import CamExplainer, linear_head, target_layer_of
from batchcam.cam.overlay import min_max_scaled, upsample
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.calibration import fit_ood
from batchcam.model.heads import HeadLayout
from batchcam.model.network import Network, build_network
from tests.unit.model.user_models import Preprocessing, probe_images, seeded

SIZE = 64
WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "densenet121": 1024,
          "efficientnet_b0": 1280}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Large models on a small shared CPU are faster with one intra-op thread."""


def built(arch: str, head: HeadLayout = HeadLayout.bare_linear(), outputs: int = 2, seed: int = 0,
          plain: bool = False) -> nn.Module:
    """batchcam's module for ``arch`` (or with ``plain`` torchvision's own, a single logit kept), seeded weights,
    BatchNorm statistics of synthetic X-rays, and a head of ``outputs``."""
    torch.manual_seed(seed)
    reference = seeded(ARCHITECTURES[arch].plain(), probe_images(Preprocessing()))
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(ARCHITECTURES[arch].head + ".")}
    head_name = ARCHITECTURES[arch].head
    widths = [WIDTHS[arch], 16, outputs]
    linears = head.linear_positions
    for index, position in enumerate(linears):
        prefix = f"{head_name}.{head.prefix(position)}"
        in_features = widths[0] if index == 0 else widths[1]
        out_features = outputs if index == len(linears) - 1 else widths[1]
        state[f"{prefix}weight"] = torch.randn(out_features, in_features) * 0.05
        state[f"{prefix}bias"] = torch.randn(out_features) * 0.05
    return build_network(Network(arch, 3, head, outputs, ""), state, plain=plain)


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_has_its_documented_target_layer_and_the_exact_path(arch):
    model = built(arch)
    assert target_layer_of(model) == ARCHITECTURES[arch].target_layer
    assert linear_head(model) is not None
    with CamExplainer(model) as engine:
        assert engine.exact and engine.layer_name == ARCHITECTURES[arch].target_layer


@pytest.mark.parametrize("arch", ["resnet50", "densenet121", "efficientnet_b0"])
def test_the_exact_path_equals_pytorch_grad_cam_on_the_target_layer_and_releases_its_hook(arch, x):
    model = built(arch)
    layer = model.get_submodule(ARCHITECTURES[arch].target_layer)
    with CamExplainer(model) as engine:
        batch = engine(x)
    assert not layer._forward_hooks
    with GradCAM(model=model, target_layers=[layer]) as cam:
        expected = cam(input_tensor=x.clone(), targets=None)
    actual = np.stack([min_max_scaled(upsample(min_max_scaled(c), SIZE, SIZE)).numpy() for c in batch.cams])
    assert np.abs(actual - expected).max() <= 1e-4
    assert batch.features.shape == (len(x), WIDTHS[arch])


def test_an_mlp_head_runs_pytorch_grad_cam_on_the_whole_batch(x):
    head = HeadLayout(("linear", "relu", "dropout", "linear"))
    model = built("densenet121", head)
    assert linear_head(model) is None
    with CamExplainer(model) as engine:
        assert not engine.exact
        batch = engine(x)
    assert batch.cams.shape == (len(x), 2, 2) and (batch.cams >= 0).all()
    layer = model.get_submodule("features.relu5")
    assert not layer._forward_hooks and not layer._backward_hooks
    with GradCAM(model=model, target_layers=[layer]) as cam:
        expected = cam(input_tensor=x.clone(), targets=None)
    actual = np.stack([min_max_scaled(upsample(min_max_scaled(c), SIZE, SIZE)).numpy() for c in batch.cams])
    assert np.abs(actual - expected).max() <= 1e-4


def test_a_single_logit_is_two_logits_giving_the_sigmoid_at_any_temperature_and_both_classes_grad_cam(x):
    model, logit = built("resnet18", outputs=1), built("resnet18", outputs=1, plain=True)
    assert logit.fc.out_features == 1 and model.fc.out_features == 2
    assert torch.equal(model.fc.weight[0], -model.fc.weight[1]) and model.fc.weight.abs().sum() > 0
    with torch.inference_mode():
        z = logit(x)[:, 0]
    for temperature in (1.0, 1.7):
        with CamExplainer(model, temperature=temperature) as engine:
            batch = engine(x)
        assert torch.allclose(batch.probabilities[:, 1], torch.sigmoid(z / temperature), atol=1e-6)
        assert torch.allclose(batch.probabilities.sum(1), torch.ones(len(x)), atol=1e-6)
    for target, score in ((1, ClassifierOutputTarget(0)), (0, lambda output: -output[0])):
        with CamExplainer(model, target=target) as engine:
            ours = engine(x).cams
        with GradCAM(model=logit, target_layers=[logit.layer4]) as cam:   # of z, and of -z for the first class
            expected = cam(input_tensor=x.clone(), targets=[score] * len(x))
        actual = np.stack([min_max_scaled(upsample(min_max_scaled(c), SIZE, SIZE)).numpy() for c in ours])
        assert np.abs(actual - expected).max() <= 1e-4, target


def test_a_plain_torchvision_densenet_has_no_documented_layer():
    with pytest.raises(ValueError, match="no documented Grad-CAM target layer for a DenseNet"):
        target_layer_of(models.densenet121())
    assert linear_head(models.densenet121()) is None


def test_an_explicit_target_layer_is_used(x):
    model = built("resnet18")
    with CamExplainer(model, target_layer="layer3", allow_exact=False) as engine:
        batch = engine(x)
    assert engine.layer is model.layer3
    assert batch.cams.shape == (len(x), 4, 4)


def test_the_backends_find_a_dotted_target_layer(x):
    model = built("densenet121")
    forward = make_forward("eager", model, "features.relu5", "ab" * 32, SIZE)
    assert isinstance(forward, EagerForward) and forward.layer is model.features.relu5
    with forward:
        logits, activations = forward(x)
    exported_logits, exported_activations = WithActivations(model, "features.relu5")(x)
    assert torch.allclose(logits, exported_logits, atol=1e-6)
    assert torch.allclose(activations, exported_activations, atol=1e-6)
    assert activations.shape == (len(x), 1024, 2, 2) and (activations >= 0).all()


def test_the_onnx_backend_runs_a_densenet_through_its_dotted_layer(private_model_cache, x):
    pytest.importorskip("onnxruntime")
    model = built("densenet121")
    forward = make_forward("onnx", model, "features.relu5", "cd" * 32, SIZE, explicit=True)
    with CamExplainer(model, forward=forward) as onnx, CamExplainer(model) as eager:
        assert onnx.backend == "onnx"
        assert (onnx(x).probabilities - eager(x).probabilities).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["densenet121", "efficientnet_b0", "resnet50"])
def test_ood_statistics_fit_pooled_features_of_any_width(arch):
    model = built(arch, outputs=3)
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with CamExplainer(model) as engine:
        batch = engine(images)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    statistics = fit_ood(batch.features[:6], labels[:6], batch.features[6:], 3)
    assert statistics.means.shape == (3, WIDTHS[arch])
    distances = statistics.distances(batch.features)
    assert distances.shape == (8,) and torch.isfinite(distances).all()
