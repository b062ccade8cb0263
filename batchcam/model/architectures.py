"""The backbones batchcam builds, recognised from a state dict's key names and shapes.

Each architecture is torchvision's own (timm's plain ResNets have the same key names and compute
the same function), so a model batchcam runs computes exactly torchvision's forward pass. Only
DenseNet differs in form: torchvision applies its last ReLU as a function in ``forward``, where no
hook can reach it, so ``DenseNetForCam`` holds that ReLU as a module (``features.relu5``). It has
no parameters, so the state-dict keys are unchanged, and the numbers are the same.

Each architecture names its Grad-CAM target layer, the last feature map before global average
pooling (Selvaraju et al. pick the last convolutional layer: the best compromise between
high-level semantics and spatial detail):

| family | target layer | why |
|---|---|---|
| ResNet | ``layer4`` | the last residual stage, already ReLU'd |
| DenseNet | ``features.relu5`` | ``features.norm5`` after the ReLU torchvision applies in ``forward`` |
| EfficientNet | ``features.8`` | the last 1x1 convolution block (``features[-1]``), after its SiLU |

Recognition builds each candidate on the meta device (no memory, no initialisation) and compares
every key and shape of its backbone with the file's: the weights decide the architecture, never
the file's name or a flag.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torchvision import models
from torchvision.models.densenet import DenseNet
from torchvision.models.efficientnet import EfficientNet
from torchvision.models.resnet import ResNet

CHANNELS = (1, 3)   # a first convolution taking one (grayscale) or three (RGB) channels


class DenseNetForCam(DenseNet):
    """torchvision's DenseNet with its final ReLU and pooling as modules; the same forward pass.

    torchvision's ``forward`` is ``relu(features) -> adaptive_avg_pool2d -> flatten -> classifier``;
    here ``features`` ends with ``relu5`` and ``avgpool`` pools, so the post-ReLU activations (what the
    classifier really reads) are a module's output: the exact Grad-CAM path and pytorch-grad-cam
    both see them.
    """

    def __init__(self, growth_rate: int, block_config: tuple[int, int, int, int], num_init_features: int):
        super().__init__(growth_rate, block_config, num_init_features)
        self.features.add_module("relu5", nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str                        # "resnet", "densenet", "efficientnet"
    factory: Callable[[], nn.Module]   # the model with its ImageNet head, on the current default device
    stem: str                          # the first convolution
    head: str                          # the classifier batchcam replaces with the file's head
    target_layer: str                  # the documented Grad-CAM layer (see the module docstring)
    plain: Callable[[], nn.Module]     # torchvision's own class, for reference forward passes


def _densenet121() -> nn.Module:
    return DenseNetForCam(32, (6, 12, 24, 16), 64)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch for arch in (
        Architecture("resnet18", "resnet", models.resnet18, "conv1", "fc", "layer4", models.resnet18),
        Architecture("resnet34", "resnet", models.resnet34, "conv1", "fc", "layer4", models.resnet34),
        Architecture("resnet50", "resnet", models.resnet50, "conv1", "fc", "layer4", models.resnet50),
        Architecture("resnet101", "resnet", models.resnet101, "conv1", "fc", "layer4", models.resnet101),
        Architecture("densenet121", "densenet", _densenet121, "features.conv0", "classifier", "features.relu5",
                     models.densenet121),
        Architecture("efficientnet_b0", "efficientnet", models.efficientnet_b0, "features.0.0", "classifier",
                     "features.8", models.efficientnet_b0),
    )
}
# Keys torchvision renamed when '.' stopped being allowed in module names ('norm.1' -> 'norm1');
# old DenseNet checkpoints (CheXNet's among them) still have them, and torchvision remaps them too.
OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\."
                              r"(?:weight|bias|running_mean|running_var))$")


class NotRecognised(Exception):
    """The weights are no architecture batchcam builds (or not the declared one); a one-line reason."""


@dataclass(frozen=True)
class Backbone:
    """What the weights outside the head say: the architecture and its input channels."""

    architecture: Architecture
    channels: int
    width: int       # features the head reads (the pooled target layer's channels)


def known_names() -> str:
    return ", ".join(ARCHITECTURES)


def remap_old_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """'denselayerN.norm.1.weight' -> 'denselayerN.norm1.weight', as torchvision's own loader does."""
    renamed = {}
    for key, value in state.items():
        match = OLD_DENSENET_KEY.match(key)
        renamed[match.group(1) + match.group(2) if match else key] = value
    return renamed


def recognise_backbone(state: dict[str, torch.Tensor], declared: str | None = None) -> Backbone:
    """The architecture whose backbone has exactly the keys and shapes of ``state`` (head left out).

    ``declared`` (import-model --arch) must be that architecture; NotRecognised says which one the
    weights look like otherwise.
    """
    if declared is not None and declared not in ARCHITECTURES:
        raise NotRecognised(f"--arch {declared} is not an architecture batchcam builds ({known_names()})")
    found = [arch for arch in ARCHITECTURES.values() if _backbone_matches(arch, state)]
    if not found:
        raise NotRecognised(describe_unknown(state))
    arch = found[0]
    if declared is not None and declared != arch.name:
        raise NotRecognised(f"the weights are a {arch.name}'s, not a {declared}'s: drop --arch, or pass --arch "
                            f"{arch.name}")
    return Backbone(arch, stem_channels(arch, state), head_width(arch.name))


def stem_channels(arch: Architecture, state: dict[str, torch.Tensor]) -> int:
    return int(state[f"{arch.stem}.weight"].shape[1])


def _backbone_matches(arch: Architecture, state: dict[str, torch.Tensor]) -> bool:
    stem = state.get(f"{arch.stem}.weight")
    if not isinstance(stem, torch.Tensor) or stem.ndim != 4 or stem.shape[1] not in CHANNELS:
        return False
    channels = int(stem.shape[1])
    found = {k: tuple(v.shape) for k, v in state.items() if not _is_head_key(arch, k)}
    required = {k: shape for k, shape in found.items() if not _optional(k)}
    optional = set(found) - set(required)
    return required == backbone_shapes(arch.name, channels) and optional <= optional_keys(arch.name, channels)


def _is_head_key(arch: Architecture, key: str) -> bool:
    return key.startswith(arch.head + ".")


def _optional(key: str) -> bool:
    """BatchNorm's step counter: absent from old checkpoints, and BatchNorm fills it in itself."""
    return key.endswith("num_batches_tracked")


@cache
def backbone_shapes(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    """Every backbone key of ``name`` with ``channels`` input channels, and its shape (built on meta)."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = build_backbone(arch, channels)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not _is_head_key(arch, k) and not _optional(k)}


@cache
def optional_keys(name: str, channels: int) -> frozenset[str]:
    """The backbone's BatchNorm step counters (a file may lack them, but not hold others)."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = build_backbone(arch, channels)
    return frozenset(k for k in model.state_dict() if not _is_head_key(arch, k) and _optional(k))


@cache
def head_width(name: str) -> int:
    """How many pooled features ``name``'s head reads."""
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        head = arch.factory().get_submodule(arch.head)
    linear = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    return int(linear.in_features)


def build_backbone(arch: Architecture, channels: int, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
    """``arch`` with its first convolution taking ``channels`` channels; its ImageNet head still in place."""
    model = (factory or arch.factory)()
    if channels != 3:
        stem = model.get_submodule(arch.stem)
        if not isinstance(stem, nn.Conv2d):
            raise TypeError(f"{arch.name}'s stem {arch.stem} is a {type(stem).__name__}, not a Conv2d")
        sizes = (stem.kernel_size, stem.stride, stem.padding, stem.dilation)
        conv = nn.Conv2d(channels, stem.out_channels, *sizes, stem.groups, bias=stem.bias is not None)  # type: ignore[arg-type]  # torch types a built Conv2d's sizes tuple[int, ...], its arguments pairs
        replace_module(model, arch.stem, conv)
    return model


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def describe_unknown(state: dict[str, torch.Tensor]) -> str:
    """What the weights look like when they are no architecture batchcam builds (one line, no key dump)."""
    known = f"batchcam builds {known_names()}"
    if "conv1.weight" in state and any(k.startswith("layer4.") for k in state):
        blocks = [len({m.group(1) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
        kind = "bottleneck" if any(re.match(r"layer\d\.\d+\.conv3\.weight$", k) for k in state) else "basic"
        return f"weights of a ResNet with {', '.join(map(str, blocks))} {kind} blocks per stage, not one {known}"
    if any(k.startswith("features.denseblock") for k in state):
        layers = [len({m.group(1) for k in state if (m := re.match(rf"features\.denseblock{i}\.denselayer(\d+)\.", k))})
                  for i in range(1, 5)]
        return f"weights of a DenseNet with {', '.join(map(str, layers))} layers per block, not one {known}"
    if "features.0.0.weight" in state and any(".block." in k for k in state):
        return f"weights of an EfficientNet other than the one {known}"
    first = next(iter(state), None)
    shape = "x".join(map(str, state[first].shape)) if first is not None else ""
    return (f"weights of no architecture batchcam builds ({len(state)} tensors, the first '{first}' {shape}); "
            f"{known}")


def cam_layers(model: nn.Module) -> tuple[str, str]:
    """(target layer, head) module paths of a model batchcam builds, or of torchvision's ResNet or EfficientNet.

    A plain torchvision DenseNet has no module for its last ReLU (see ``DenseNetForCam``), so it has
    no documented layer; ValueError for it and any other model.
    """
    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    if isinstance(inner, ResNet):
        return "layer4", "fc"
    if isinstance(inner, DenseNetForCam):
        return "features.relu5", "classifier"
    if isinstance(inner, EfficientNet):
        return f"features.{len(inner.features) - 1}", "classifier"
    raise ValueError(f"no documented Grad-CAM target layer for a {type(inner).__name__}: pass the layer's name")


def globally_pooled(model: nn.Module) -> bool:
    """Whether the target layer's output reaches the head only through 1x1 global average pooling."""
    try:
        cam_layers(model)
    except ValueError:
        return False
    pool = getattr(model, "avgpool", None)
    return isinstance(pool, nn.AdaptiveAvgPool2d) and _pair(pool.output_size) == (1, 1)


def _pair(size: int | None | tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    return size if isinstance(size, tuple) else (size, size)

