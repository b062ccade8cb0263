"""The fast exact Grad-CAM against pytorch-grad-cam, the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from batchcam.cam.explainer import LIBRARY_METHODS, CamExplainer, linear_head
from batchcam.cam.overlay import min_max_scaled, upsample
from batchcam.model.checkpoint import build_model

SIZE = 64


def model_with_split_predictions(dropout: float, x: torch.Tensor) -> torch.nn.Module:
    """A random ResNet18 whose bias is shifted so the batch is predicted as both classes."""
    torch.manual_seed(1)
    model = build_model(2, dropout).eval()
    with torch.no_grad():
        logits = model(x)
        margin = logits[:, 1] - logits[:, 0]
        linear_head(model).bias[1] -= margin.median() + 1e-3
        assert len(set(model(x).argmax(1).tolist())) == 2
    return model


def library_gradcam(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        maps = cam(input_tensor=x, targets=None)
    return maps


def fast_gradcam_normalised(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with CamExplainer(model, "gradcam") as engine:
        assert engine.exact
        batch = engine(x)
    return np.stack([min_max_scaled(upsample(min_max_scaled(cam), SIZE, SIZE)).numpy() for cam in batch.cams])


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_exact_gradcam_equals_pytorch_grad_cam_on_mixed_predictions(dropout):
    torch.manual_seed(0)
    x = torch.randn(6, 3, SIZE, SIZE)
    model = model_with_split_predictions(dropout, x)
    expected = library_gradcam(model, x)
    actual = fast_gradcam_normalised(model, x)
    assert actual.shape == expected.shape == (6, SIZE, SIZE)
    assert np.abs(actual - expected).max() < 1e-4


def test_exact_gradcam_explains_a_fixed_target_class_like_the_library():
    torch.manual_seed(0)
    x = torch.randn(4, 3, SIZE, SIZE)
    model = model_with_split_predictions(0.0, x)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * 4)
    with CamExplainer(model, "gradcam", target=0) as engine:
        batch = engine(x)
    actual = np.stack([min_max_scaled(upsample(min_max_scaled(c), SIZE, SIZE)).numpy() for c in batch.cams])
    assert batch.targets.tolist() == [0, 0, 0, 0]
    assert np.abs(actual - expected).max() < 1e-4


def test_exact_path_needs_no_gradients_and_removes_its_hook():
    model = build_model(2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with CamExplainer(model, "gradcam") as engine:
        batch = engine(torch.randn(2, 3, SIZE, SIZE))
    assert batch.cams.shape == (2, 2, 2)
    assert (batch.cams >= 0).all()
    assert not model.layer4._forward_hooks


def test_library_methods_give_one_raw_map_per_image_and_release_their_hooks():
    model = build_model(2).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    for method in LIBRARY_METHODS:
        with CamExplainer(model, method, allow_exact=False) as engine:
            batch = engine(x)
        assert batch.cams.shape == (3, 2, 2), method
        assert torch.isfinite(batch.cams).all() and (batch.cams >= 0).all(), method
        assert torch.allclose(batch.probabilities.sum(1), torch.ones(3), atol=1e-5)
        assert not model.layer4._forward_hooks and not model.layer4._backward_hooks, method


def test_a_head_that_is_not_pool_plus_linear_falls_back_to_the_library():
    model = build_model(2).eval()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with CamExplainer(model, "gradcam") as engine:
        assert not engine.exact
        batch = engine(torch.randn(2, 3, SIZE, SIZE))
    assert batch.cams.shape == (2, 2, 2)


def test_unknown_method_is_refused_with_the_list():
    with pytest.raises(ValueError, match="gradcam"):
        CamExplainer(build_model(2), "nosuchcam")


class TinyNet(torch.nn.Module):
    """A CNN with a ResNet-like ``layer4`` of 8 channels: ScoreCAM needs 8 masked copies an image."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU())
        self.layer4 = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU())
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.layer4(self.stem(x))).flatten(1))


def library_maps_unchunked(model: torch.nn.Module, method: str, x: torch.Tensor, targets: list[int]) -> np.ndarray:
    """pytorch-grad-cam's own result for the whole batch at once (min-max scaled, at the input size)."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    method_class = getattr(pytorch_grad_cam, LIBRARY_METHODS[method])
    with method_class(model=model, target_layers=[model.layer4]) as cam:
        return cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(t) for t in targets])


@pytest.mark.parametrize("method", [m for m in LIBRARY_METHODS if m != "gradcam"])
def test_library_maps_computed_in_chunks_equal_the_librarys_unchunked_maps(method, monkeypatch):
    """One image a call, ScoreCAM's inner passes 3 masked copies each (the last 2): the same maps as
    the library's one call for the whole batch."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    from batchcam.cam import explainer as explainer_module

    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    model = TinyNet().eval()
    image_bytes = explainer_module.activation_bytes(model, (3, 32, 32))
    monkeypatch.setattr(explainer_module, "LIBRARY_CALL_BUDGET", 1)
    monkeypatch.setattr(explainer_module, "SCORECAM_INNER_BUDGET",
                        3 * explainer_module.FORWARD_BYTES_PER_ACTIVATION_BYTE * image_bytes)
    calls = []
    library_maps = explainer_module.CamExplainer._library_maps
    monkeypatch.setattr(explainer_module.CamExplainer, "_library_maps",
                        lambda self, chunk, *args: calls.append(len(chunk)) or library_maps(self, chunk, *args))
    with CamExplainer(model, method, allow_exact=False, target_layer="layer4") as engine:
        batch = engine(x)
    assert calls == [1, 1, 1, 1, 1]
    expected = library_maps_unchunked(model, method, x, batch.targets.tolist())
    actual = scale_cam_image(scale_cam_image(batch.cams.numpy(), (32, 32)))  # as the library aggregates its layer
    assert actual.shape == expected.shape == (5, 32, 32)
    assert np.abs(expected).max() > 0
    assert np.abs(actual - expected).max() < 1e-4


def test_library_chunks_keep_each_call_within_the_budget_whatever_the_architecture():
    """ScoreCAM on a 224 px batch of 32: one image a call (its K masked copies alone are 300 MB);
    the gradient methods: as many images as their autograd graphs fit, fewer for a deeper network."""
    import torchvision

    from batchcam.cam.explainer import LIBRARY_CALL_BUDGET, activation_bytes, library_chunk, scorecam_inner_batch

    shape = (32, 3, 224, 224)
    resnet18 = activation_bytes(build_model(2).eval(), shape[1:])
    resnet50 = activation_bytes(torchvision.models.resnet50(num_classes=2).eval(), shape[1:])
    assert 20 * 2**20 < resnet18 < resnet50 / 3
    assert library_chunk("scorecam", shape, 512, resnet18) == 1
    assert 1 < scorecam_inner_batch(resnet18) < 512
    assert 1 < library_chunk("gradcam++", shape, 512, resnet50) < library_chunk("gradcam++", shape, 512, resnet18) < 32
    assert library_chunk("gradcam++", shape, 512, resnet18) * 1.5 * resnet18 <= LIBRARY_CALL_BUDGET
    assert library_chunk("gradcam++", (2, 3, 64, 64), 512, resnet18 // 12) == 2
    assert scorecam_inner_batch(10**12) == 1
