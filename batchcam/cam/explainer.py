"""Class activation maps for a batch: an exact fast Grad-CAM, and pytorch-grad-cam for the rest.

Grad-CAM (Selvaraju et al., ICCV 2017) weights each channel k of the target layer's activations
A by the spatial mean of d score_c / d A_k. When the target layer (each architecture's documented
one, ``batchcam.model.architectures``: ResNet's ``layer4``, DenseNet's ``features.relu5``,
EfficientNet's ``features.8``) is followed only by global average pooling and a linear head
(Dropout is the identity at inference), that gradient is ``W[c, k] / (h * w)`` at every location,
so the map is ``relu(sum_k W[c, k] A_k) / (h * w)``: the same numbers, read off the forward pass
with no backward pass at all. That is the default path. pytorch-grad-cam remains the reference
(the tests compare the two) and computes every other method, and Grad-CAM itself for any other
head (an MLP), in batches.

Every method returns the raw, un-normalised low-resolution map (>= 0); normalising and upsampling
to an image's geometry is the overlay stage's job, done the same way for all methods.

The library's memory grows with the images it is given at once, so a batch goes to it in chunks
sized by ``LIBRARY_CALL_BUDGET`` (``library_chunk``): the gradient methods hold their chunk's
autograd graph; ScoreCAM upsamples every one of the K channels to the input size and masks the
input with each (K x 3 x H x W floats an image), so it takes one image at a time and puts its
masked copies through the model in inner batches sized by ``SCORECAM_INNER_BUDGET``. A chunk's
maps are the library's own for those images: no method mixes images of a batch.

The same forward pass also gives the temperature-scaled probabilities and the pooled target-layer
features that the out-of-distribution score reads (``batchcam.model.calibration``): no extra pass.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from batchcam.cam.backends import EagerForward, OnnxForward
from batchcam.config import CAM_METHODS, MEGABYTE
from batchcam.model.architectures import cam_layers, globally_pooled
from batchcam.model.calibration import scaled_probabilities

# Method name -> pytorch-grad-cam class name. The library is imported only when one is used: it
# pulls in OpenCV, matplotlib and scikit-learn (seconds of start-up the exact path does not need).
LIBRARY_METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
                   "xgradcam": "XGradCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM"}

LIBRARY_CALL_BUDGET = 512 * MEGABYTE   # what one pytorch-grad-cam call may allocate beyond the model
SCORECAM_INNER_BUDGET = 256 * MEGABYTE  # what one of ScoreCAM's inner forward passes may allocate
# What a pass holds per byte of an image's activations (every module's output, ``activation_bytes``),
# with a margin over what ResNet18/50 and DenseNet-121 were measured to hold: with gradients, the
# autograd graph keeps them all and the backward pass adds gradients; without, only a few are alive.
GRAPH_BYTES_PER_ACTIVATION_BYTE = 1.5
FORWARD_BYTES_PER_ACTIVATION_BYTE = 0.6
FLOAT_BYTES = 4


@dataclass
class CamBatch:
    probabilities: torch.Tensor  # (B, classes), float32 on the CPU, softmax(logits / temperature)
    targets: torch.Tensor        # (B,) class index each map explains
    cams: torch.Tensor           # (B, h, w) raw maps, float32 on the CPU, >= 0
    features: torch.Tensor       # (B, K) the pooled target-layer activations, float32 on the CPU
    logits: torch.Tensor         # (B, classes) before the temperature, float32 on the CPU (calibrate fits T on them)


def targets_for(logits: torch.Tensor, target: int | None) -> torch.Tensor:
    """The class each map explains: the predicted one, or the fixed ``target`` index."""
    if target is None:
        return logits.argmax(dim=1)
    return torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)


def from_forward(logits: torch.Tensor, activations: torch.Tensor, head_weight: torch.Tensor | None,
                 target: int | None, temperature: float) -> CamBatch:
    """Everything batchcam reads off one forward pass: its logits and its target layer's activations.

    ``head_weight`` (classes, K) gives the exact Grad-CAM maps; None leaves the maps empty for a
    library method to fill. Any backend that returns these two tensors explains the same way.
    """
    logits, activations = logits.float(), activations.float()
    targets = targets_for(logits, target)
    features = activations.mean((2, 3))
    if head_weight is None:
        cams = torch.empty(0)
    else:
        height, width = activations.shape[-2:]
        weights = head_weight.float()[targets]                                   # (B, K)
        cams = torch.einsum("bk,bkhw->bhw", weights, activations).clamp_(min=0).div_(height * width).cpu()
    return CamBatch(scaled_probabilities(logits, temperature).cpu(), targets.cpu(), cams, features.cpu(),
                    logits.cpu())


def target_layer_of(model: nn.Module) -> str:
    """The documented Grad-CAM target layer of a model batchcam builds (ValueError for others)."""
    return cam_layers(model)[0]


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The final Linear when the target layer is followed by avgpool -> [Dropout ->] Linear, else None."""
    if not globally_pooled(model):
        return None
    head = model.get_submodule(cam_layers(model)[1])
    if isinstance(head, nn.Sequential) and all(isinstance(m, (nn.Dropout, nn.Identity)) for m in head[:-1]):
        head = head[-1]
    return head if isinstance(head, nn.Linear) else None


class CamExplainer:
    """Runs the model and a CAM method on batches. Use as ``with CamExplainer(...) as explainer:``.

    ``target`` is None for the predicted class, or a fixed class index. The fast exact path is
    used for ``gradcam`` whenever the head allows it (``exact`` tells which path is in use).
    ``autocast`` (CUDA only: ``torch.bfloat16`` or ``torch.float16``) runs the exact path's forward
    pass in that precision; the map itself is always computed in float32 from the activations.
    ``temperature`` (the checkpoint's) divides the logits of every reported probability.
    ``target_layer`` (a module path) defaults to the architecture's documented layer.
    ``forward`` is the exact path's model step (``batchcam.cam.backends``; default: eager PyTorch):
    whatever computes it, probabilities, features and maps are read off its logits and activations
    here (``from_forward``). The library methods always run eager PyTorch.
    """

    def __init__(self, model: nn.Module, method: str = "gradcam", target: int | None = None,
                 allow_exact: bool = True, autocast: torch.dtype | None = None, temperature: float = 1.0,
                 forward: EagerForward | OnnxForward | None = None, target_layer: str | None = None):
        if method not in LIBRARY_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
        self.model, self.method, self.target = model, method, target
        self.layer_name = target_layer or target_layer_of(model)
        self.layer = model.get_submodule(self.layer_name)
        self.head = linear_head(model)
        self.exact = allow_exact and method == "gradcam" and self.head is not None
        self.autocast = autocast
        self.temperature = temperature
        self.forward = forward if forward is not None and self.exact else EagerForward(model, self.layer, autocast)
        self._image_bytes: dict[tuple[int, ...], int] = {}  # activation_bytes per image shape

    def _activation_bytes(self, image_shape: tuple[int, ...]) -> int:
        """``activation_bytes`` of this model, measured once per image shape."""
        if image_shape not in self._image_bytes:
            self._image_bytes[image_shape] = activation_bytes(self.model, image_shape)
        return self._image_bytes[image_shape]

    @property
    def backend(self) -> str:
        """The model step in use (``eager``, ``onnx``); the library path always runs eager."""
        return self.forward.name

    def __enter__(self) -> "CamExplainer":
        self.forward.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.forward.__exit__(*exc)

    def __call__(self, x: torch.Tensor) -> CamBatch:
        if self.exact and self.head is not None:
            return self._exact(x, self.head)
        return self._library(x)

    def _exact(self, x: torch.Tensor, head: nn.Linear) -> CamBatch:
        logits, activations = self.forward(x)
        with torch.inference_mode():
            return from_forward(logits.to(x.device), activations.to(x.device), head.weight, self.target,
                                self.temperature)

    def _library(self, x: torch.Tensor) -> CamBatch:
        logits, activations = self.forward(x)
        with torch.inference_mode():
            batch = from_forward(logits, activations, None, self.target, self.temperature)
        image_bytes = self._activation_bytes(tuple(x.shape[1:]))
        chunk = library_chunk(self.method, tuple(x.shape), activations.shape[1], image_bytes)
        maps = [self._library_maps(x[start:start + chunk], batch.targets[start:start + chunk], image_bytes)
                for start in range(0, x.shape[0], chunk)]
        batch.cams = torch.from_numpy(np.concatenate(maps)).float()
        return batch

    def _library_maps(self, x: torch.Tensor, targets: torch.Tensor, image_bytes: int) -> np.ndarray:
        """The library's raw maps of a few images, one per image."""
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        silence_library_progress()
        method = _raw_map_capturing(getattr(pytorch_grad_cam, LIBRARY_METHODS[self.method]))
        # Targets for every image, always: a short list silently yields all-zero maps.
        wanted = [ClassifierOutputTarget(int(t)) for t in targets]
        with torch.enable_grad(), method(model=self.model, target_layers=[self.layer]) as cam:
            cam.batch_size = scorecam_inner_batch(image_bytes)  # read by ScoreCAM only
            cam(input_tensor=x.clone(), targets=wanted)
        raw = cam.raw_map
        if raw is None or raw.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.method} produced no map for this batch")
        return raw


def library_chunk(method: str, input_shape: tuple[int, ...], channels: int, image_bytes: int) -> int:
    """Images per pytorch-grad-cam call, so that one call stays within ``LIBRARY_CALL_BUDGET``.

    ``input_shape`` is the batch's (B, C, H, W), ``channels`` the target layer's K, ``image_bytes``
    an image's activations (``activation_bytes``). ScoreCAM holds (C + 2) x K x H x W floats an image:
    K masked copies of the input, the K upsampled masks and one temporary while they are normalised
    (it cannot take less than one image). The other methods hold their autograd graph.
    """
    batch, colours, height, width = input_shape
    per_image: float
    if method == "scorecam":
        per_image = (colours + 2) * channels * height * width * FLOAT_BYTES
    else:
        per_image = GRAPH_BYTES_PER_ACTIVATION_BYTE * image_bytes
    return max(1, min(batch, int(LIBRARY_CALL_BUDGET // per_image)))


def scorecam_inner_batch(image_bytes: int) -> int:
    """Masked copies per ScoreCAM forward pass, within ``SCORECAM_INNER_BUDGET``."""
    return max(1, int(SCORECAM_INNER_BUDGET // (FORWARD_BYTES_PER_ACTIVATION_BYTE * image_bytes)))


def activation_bytes(model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """The bytes of every module's output for one image of ``image_shape`` (C, H, W): what a pass
    through ``model`` allocates for its activations, whatever the architecture."""
    total = 0

    def add(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: no compilation for this pass
    leaves = [module for module in model.modules() if not any(True for _ in module.children())]
    hooks = [module.register_forward_hook(add) for module in leaves]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


T = TypeVar("T")


def _no_bar(iterable: Iterable[T], *args: object, **kwargs: object) -> Iterable[T]:
    return iterable


def silence_library_progress() -> None:
    """pytorch-grad-cam's ScoreCAM draws a tqdm bar on stderr for every image, whatever batchcam's
    --quiet and whether stderr is a terminal. batchcam's own progress (runtime/console.py) already
    counts the images, so the library's bars are turned off by replacing its module's ``tqdm``."""
    from pytorch_grad_cam import score_cam

    score_cam.tqdm = SimpleNamespace(tqdm=_no_bar)


def _raw_map_capturing(method_class: type) -> type:
    """A subclass of a pytorch-grad-cam method that keeps the raw low-resolution map.

    The library normalises each map and resizes it to the input size before returning it; batchcam
    wants the raw map (for --save-cams and for one upsampling to each image's own geometry), so
    this replaces the per-layer step with the library's own ``get_cam_image`` and skips the resize.
    """

    class RawMapCapturing(method_class):
        raw_map: np.ndarray | None = None

        def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets: list, eigen_smooth: bool
                                  ) -> list[np.ndarray]:
            grads = self.activations_and_grads.gradients
            activations = self.activations_and_grads.activations[0].cpu().data.numpy()
            gradients = grads[0].cpu().data.numpy() if grads else None
            layer_cam = self.get_cam_image(input_tensor, self.target_layers[0], targets, activations,
                                           gradients, eigen_smooth)
            self.raw_map = np.maximum(layer_cam, 0).astype(np.float32)
            return [self.raw_map[:, None, :]]

    RawMapCapturing.__name__ = f"RawMap{method_class.__name__}"
    return RawMapCapturing
