"""The model-randomisation test for the heatmaps (Adebayo et al.,
"Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the model must change when the model's weights are destroyed. On a deep copy
of the model, the layers are re-initialised from the top down, cascading (``fc``, then ``layer4``,
``layer3``, ``layer2``, ``layer1``, then the stem ``conv1``/``bn1``), with a fixed seed; after each
step the maps of a sample of images are computed again with the exact Grad-CAM of ``CamExplainer``
(which reads the fc weights, so re-initialising fc already changes the map), for the class each
image's original map explained. Each randomised map is compared with the original by Spearman's
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
from batchcam.errors import UsageError
from batchcam.model.checkpoint import LoadedModel, model_input

CASCADE = (("fc",), ("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1"))
SEED = 0


@dataclass
class SanityResult:
    steps: list[str]                    # "original", "fc", "fc+layer4", ...
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


def maps_for(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, classes: int) -> torch.Tensor:
    """Exact Grad-CAM maps of each image for its given target class (one pass per class)."""
    maps = None
    for c in range(classes):
        chosen = targets == c
        if not chosen.any():
            continue
        with CamExplainer(model, "gradcam", target=c) as explainer:
            if not explainer.exact:
                raise UsageError("the sanity check needs a ResNet head of avgpool -> Linear (exact Grad-CAM)")
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
    each step of ``CASCADE`` re-initialised in turn on a copy of the model, every map compared with
    the original by Spearman's rank correlation."""
    model = copy.deepcopy(loaded.model).to(device).eval()
    x = model_input(views.to(device), loaded.spec)
    classes = len(loaded.spec.class_names)
    with CamExplainer(model) as explainer:
        targets = explainer(x).targets
    original = maps_for(model, x, targets, classes)
    steps, maps, correlations, done = ["original"], {"original": original}, {"original": [1.0] * len(paths)}, []
    for depth, names in enumerate(CASCADE):
        for name in names:
            randomise(getattr(model, name), seed + depth)
        done.append("+".join(names))
        step = "+".join(done)
        steps.append(step)
        maps[step] = maps_for(model, x, targets, classes)
        correlations[step] = [spearman(a.numpy(), b.numpy()) for a, b in zip(original, maps[step])]
    return SanityResult(steps, correlations, paths, maps)
