"""The model-randomisation test for the heatmaps (Adebayo et al.,
"Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the model must change when the model's weights are destroyed. On a deep copy
of the model, the layers are re-initialised from the top down, cascading from the head through the
backbone's stages of its architecture (``CASCADES``: a ResNet's ``fc``, ``layer4`` ... ``layer1``,
then the stem ``conv1``/``bn1``; a DenseNet's classifier, then each dense block with the transition
below it; an EfficientNet's classifier, then its feature stages), with a fixed seed; after each step
the maps of a sample of images are computed again with ``CamExplainer``'s Grad-CAM on the model's
target layer (the exact path reads the head's weights, so re-initialising the head already changes
the map; an MLP head goes through pytorch-grad-cam), for the class each image's original map
explained. Each randomised map is compared with the original by Spearman's
rank correlation over the map's cells (a flat map shares no ranking with anything: 0). Maps that
pass the check decorrelate quickly (below 0.5 once layer4 is randomised is what batchcam's tests
demand of the demo model). ``batchcam sanity`` (commands/sanity.py) samples the images and
writes the results.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from batchcam.cam.explainer import CamExplainer
from batchcam.checks.metrics import _average_ranks
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.checkpoint import LoadedModel, model_input

# Each family's modules, from the head down, re-initialised one step at a time (the head is the architecture's).
CASCADES = {
    "resnet": (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1")),
    "densenet": (("features.norm5", "features.denseblock4"), ("features.transition3", "features.denseblock3"),
                 ("features.transition2", "features.denseblock2"), ("features.transition1", "features.denseblock1"),
                 ("features.conv0", "features.norm0")),
    "efficientnet": (("features.8",), ("features.7",), ("features.6", "features.5"), ("features.4", "features.3"),
                     ("features.2", "features.1"), ("features.0",)),
}
SEED = 0


@dataclass
class SanityResult:
    steps: list[str]                    # "original", "fc", "fc+layer4", ...
    cascade: tuple[tuple[str, ...], ...]  # the modules re-initialised at each step
    correlations: dict[str, list[float]]  # step -> per-image Spearman correlation with the original
    paths: list[str]
    maps: dict[str, torch.Tensor]       # step -> (N, h, w) raw maps

    def mean(self, step: str) -> float:
        return float(np.mean(self.correlations[step]))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either map is flat."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and reset its BatchNorm statistics), seeded."""
    torch.manual_seed(seed)
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
            sub.reset_running_stats()


def cascade_of(loaded: LoadedModel) -> tuple[tuple[str, ...], ...]:
    """The randomisation steps of ``loaded``'s architecture: its head, then its stages from the top down."""
    architecture = ARCHITECTURES[loaded.spec.arch]
    return ((architecture.head,), *CASCADES[architecture.family])


def maps_for(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, classes: int,
             target_layer: str) -> torch.Tensor:
    """Grad-CAM maps of each image for its given target class (one pass per class)."""
    maps = None
    for c in range(classes):
        chosen = targets == c
        if not chosen.any():
            continue
        with CamExplainer(model, "gradcam", target=c, target_layer=target_layer) as explainer:
            cams = explainer(x[chosen.to(x.device)]).cams
        if maps is None:
            maps = torch.zeros(x.shape[0], *cams.shape[1:])
        maps[chosen] = cams
    if maps is None:
        raise ValueError(f"no image has a target class below {classes}: nothing to explain")
    return maps


def cascading_randomisation(loaded: LoadedModel, views: torch.Tensor, device: torch.device, paths: list[str],
                            seed: int = SEED) -> SanityResult:
    """The test itself on a batch of model views (uint8, (N, size, size)) of the images at ``paths``:
    each step of the architecture's cascade (``cascade_of``) re-initialised in turn on a copy of the
    model, every map on the model's target layer compared with the original by Spearman's rank
    correlation."""
    model = copy.deepcopy(loaded.model).to(device).eval()
    x = model_input(views.to(device), loaded.spec)
    classes = len(loaded.spec.class_names)
    layer = loaded.target_layer
    with CamExplainer(model, target_layer=layer) as explainer:
        targets = explainer(x).targets
    original = maps_for(model, x, targets, classes, layer)
    steps, maps, correlations, done = ["original"], {"original": original}, {"original": [1.0] * len(paths)}, []
    cascade = cascade_of(loaded)
    for depth, names in enumerate(cascade):
        for name in names:
            randomise(model.get_submodule(name), seed + depth)
        done.append("+".join(names))
        step = "+".join(done)
        steps.append(step)
        maps[step] = maps_for(model, x, targets, classes, layer)
        correlations[step] = [spearman(a.numpy(), b.numpy()) for a, b in zip(original, maps[step])]
    return SanityResult(steps, cascade, correlations, paths, maps)

