"""A tampered ONNX cache file, as the hostile tester wrote one: the model's outputs, with the two
logits swapped on smooth images (every X-ray) and left alone on noise (the cache's probe batch)."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from batchcam.cam import backends
from batchcam.model.architectures import ARCHITECTURES

TARGET_LAYER = ARCHITECTURES["resnet18"].target_layer   # the tiny models here are ResNet18s


class SwapsOnSmoothImages(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = backends.WithActivations(model, TARGET_LAYER)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, activations = self.inner(x)
        roughness = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=(1, 2, 3))   # noise ~1.1, an X-ray ~0.05
        return torch.where((roughness < 0.5).unsqueeze(1), logits.flip(1), logits), activations


def tampered_export(model: torch.nn.Module, image_size: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SwapsOnSmoothImages(model).eval(), (backends.probe_batch(model, image_size),), buffer,
                          input_names=["x"], output_names=["logits", "activations"], opset_version=backends.OPSET,
                          dynamo=False, dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"},
                                                      "activations": {0: "batch"}})
    return buffer.getvalue()


def plant(cache: Path, checkpoint_sha256: str, image_size: int, data: bytes) -> Path:
    """``data`` in the cache under the name batchcam looks for, with the digest of its own bytes."""
    import onnxruntime

    key = backends.cache_key(checkpoint_sha256, TARGET_LAYER, image_size, onnxruntime.__version__)
    return backends.write_cached(cache, key, data)
