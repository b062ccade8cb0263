"""The fast exact Grad-CAM against pytorch-grad-cam, the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM

from batchcam.cam.engine import LIBRARY_METHODS, CamEngine, linear_head
from batchcam.cam.overlay import normalise, upsample
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
    with CamEngine(model, "gradcam") as engine:
        assert engine.exact
        batch = engine(x)
    return np.stack([normalise(upsample(normalise(cam), SIZE, SIZE)).numpy() for cam in batch.cams])


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
    with CamEngine(model, "gradcam", target=0) as engine:
        batch = engine(x)
    actual = np.stack([normalise(upsample(normalise(c), SIZE, SIZE)).numpy() for c in batch.cams])
    assert batch.targets.tolist() == [0, 0, 0, 0]
    assert np.abs(actual - expected).max() < 1e-4


def test_exact_path_needs_no_gradients_and_removes_its_hook():
    model = build_model(2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with CamEngine(model, "gradcam") as engine:
        batch = engine(torch.randn(2, 3, SIZE, SIZE))
    assert batch.cams.shape == (2, 2, 2)
    assert (batch.cams >= 0).all()
    assert not model.layer4._forward_hooks


def test_library_methods_give_one_raw_map_per_image_and_release_their_hooks():
    model = build_model(2).eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    for method in LIBRARY_METHODS:
        with CamEngine(model, method, allow_exact=False) as engine:
            batch = engine(x)
        assert batch.cams.shape == (3, 2, 2), method
        assert torch.isfinite(batch.cams).all() and (batch.cams >= 0).all(), method
        assert torch.allclose(batch.probabilities.sum(1), torch.ones(3), atol=1e-5)
        assert not model.layer4._forward_hooks and not model.layer4._backward_hooks, method


def test_a_head_that_is_not_pool_plus_linear_falls_back_to_the_library():
    model = build_model(2).eval()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with CamEngine(model, "gradcam") as engine:
        assert not engine.exact
        batch = engine(torch.randn(2, 3, SIZE, SIZE))
    assert batch.cams.shape == (2, 2, 2)


def test_unknown_method_is_refused_with_the_list():
    with pytest.raises(ValueError, match="gradcam"):
        CamEngine(build_model(2), "nosuchcam")
