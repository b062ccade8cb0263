"""``batchcam sanity ROOT``: the model-randomisation test for the heatmaps (Adebayo et al.,
"Sanity Checks for Saliency Maps", NeurIPS 2018).

A map that explains the model must change when the model's weights are destroyed. On a deep copy
of the model, the layers are re-initialised from the top down, cascading from the head through the
backbone's stages of its architecture (``CASCADES``: a ResNet's ``fc``, ``layer4`` ... ``layer1``,
then the stem ``conv1``/``bn1``; a DenseNet's classifier, then each dense block with the transition
below it; an EfficientNet's classifier, then its feature stages), with a fixed seed; after each step
the maps of a sample of images are computed again with ``CamEngine``'s Grad-CAM on the model's
target layer (the exact path reads the head's weights, so re-initialising the head already changes
the map; an MLP head goes through pytorch-grad-cam), for the class each
image's original map explained. Each randomised map is compared with the original by Spearman's
rank correlation over the map's cells (a flat map shares no ranking with anything: 0). Maps that
pass the check decorrelate quickly (below 0.5 once layer4 is randomised is what batchcam's tests
demand of the demo model). Writes ``sanity.md`` (a table of layer -> mean correlation),
``sanity.json`` and ``sanity.png`` (the maps of a few images per step) into ``--out``.
"""
from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from batchcam.cam import overlay as overlays
from batchcam.cam.engine import CamEngine
from batchcam.checks.metrics import _average_ranks
from batchcam.config import DEFAULT_MAX_FILE_BYTES, DEFAULT_SANITY_SAMPLE
from batchcam.decode.dataset import Sample, collate_samples, decode_sample
from batchcam.decode.discover import Candidate, discover
from batchcam.errors import UsageError
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.checkpoint import LoadedModel, normalize
from batchcam.runtime.bounded import FileTooLarge, read_file_bounded
from batchcam.runtime.devices import resolve_device
from batchcam.runtime.fsutil import SafeDir

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
FIGURE_IMAGES = 4      # rows of the figure
FIGURE_CELL = 96       # px per map in the figure


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
        with CamEngine(model, "gradcam", target=c, target_layer=target_layer) as engine:
            cams = engine(x[chosen.to(x.device)]).cams
        if maps is None:
            maps = torch.zeros(x.shape[0], *cams.shape[1:])
        maps[chosen] = cams
    if maps is None:
        raise ValueError(f"no image has a target class below {classes}: nothing to explain")
    return maps


def sample_files(root: Path, count: int, seed: int = SEED) -> list[Candidate]:
    candidates = discover(root).candidates
    if not candidates:
        raise UsageError(f"no image files under {root}")
    if len(candidates) <= count:
        return list(candidates)
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(chosen)]


def read_and_decode(candidate: Candidate, image_size: int, resize: str = "squash") -> Sample:
    """A sampled file decoded; one that cannot be read (a broken link, say) is an error sample, left out."""
    try:
        data = read_file_bounded(Path(candidate.path), DEFAULT_MAX_FILE_BYTES)
    except (OSError, FileTooLarge) as e:
        return Sample(relpath=candidate.relpath, error=f"cannot read file: {getattr(e, 'strerror', None) or e}")
    return decode_sample(candidate.relpath, data, image_size, resize=resize)


def sanity_check(loaded: LoadedModel, root: Path, sample: int = DEFAULT_SANITY_SAMPLE, device: str = "auto",
                 seed: int = SEED) -> SanityResult:
    if sample < 1:
        raise UsageError(f"--sample must be at least 1, got {sample}")
    if not root.is_dir():
        raise UsageError(f"ROOT {root} is not a folder")
    where = resolve_device(device)
    samples = [read_and_decode(c, loaded.spec.image_size, loaded.spec.resize) for c in sample_files(root, sample, seed)]
    samples, views = collate_samples([s for s in samples if s.ok])
    if views is None:
        raise UsageError(f"none of the sampled images under {root} could be decoded")
    model = copy.deepcopy(loaded.model).to(where).eval()
    x = normalize(views.to(where), loaded.spec)
    classes = len(loaded.spec.class_names)
    layer = loaded.target_layer
    with CamEngine(model, target_layer=layer) as engine:
        targets = engine(x).targets
    original = maps_for(model, x, targets, classes, layer)
    steps, maps, correlations, done = ["original"], {"original": original}, {"original": [1.0] * len(samples)}, []
    cascade = cascade_of(loaded)
    for depth, names in enumerate(cascade):
        for name in names:
            randomise(model.get_submodule(name), seed + depth)
        done.append("+".join(names))
        step = "+".join(done)
        steps.append(step)
        maps[step] = maps_for(model, x, targets, classes, layer)
        correlations[step] = [spearman(a.numpy(), b.numpy()) for a, b in zip(original, maps[step])]
    return SanityResult(steps, cascade, correlations, [s.relpath for s in samples], maps)


def write_sanity(result: SanityResult, out: Path, model_name: str) -> None:
    """``sanity.md``, ``sanity.json`` and ``sanity.png`` in ``out`` (made when missing), each written
    atomically relative to the folder's descriptor: a link planted at one of these names is replaced,
    never written through."""
    lines = ["# Sanity check: cascading model randomisation", "",
             f"Model `{model_name}`, {len(result.paths)} images; layers re-initialised from the top down "
             "(Adebayo et al., NeurIPS 2018). Spearman rank correlation of each image's exact Grad-CAM map "
             "with its original map; maps that depend on the learned weights fall towards 0.", "",
             "| randomised | mean correlation | min | max |", "|---|---|---|---|"]
    for step in result.steps[1:]:
        values = result.correlations[step]
        lines.append(f"| {step} | {np.mean(values):.3f} | {np.min(values):.3f} | {np.max(values):.3f} |")
    lines += ["", "![maps per randomisation step](sanity.png)", ""]
    summary = {"model": model_name, "images": result.paths, "steps": result.steps[1:],
               "mean_correlation": {s: round(result.mean(s), 6) for s in result.steps[1:]},
               "correlations": {s: [round(v, 6) for v in result.correlations[s]] for s in result.steps[1:]}}
    png = io.BytesIO()
    figure(result).save(png, format="PNG")
    with SafeDir.open(out, create=True) as folder:
        folder.write_bytes("sanity.md", "\n".join(lines).encode("utf-8"))
        folder.write_bytes("sanity.json", json.dumps(summary, indent=2).encode("utf-8"))
        folder.write_bytes("sanity.png", png.getvalue())


def figure(result: SanityResult) -> Image.Image:
    """A grid: one row per image (up to FIGURE_IMAGES), one column per step, maps in jet colours."""
    shown = min(FIGURE_IMAGES, len(result.paths))
    header = 28
    image = Image.new("RGB", (FIGURE_CELL * len(result.steps), header + FIGURE_CELL * shown), "white")
    draw = ImageDraw.Draw(image)
    for column, step in enumerate(result.steps):
        label = "+".join(result.cascade[column - 1]) if column else "original"
        draw.text((column * FIGURE_CELL + 4, 2), f"+{label}" if column > 1 else label, fill="black")
        if column:
            draw.text((column * FIGURE_CELL + 4, 14), f"rho {result.mean(step):.2f}", fill="black")
        for row in range(shown):
            levels = overlays.heat_levels(result.maps[step][row], FIGURE_CELL, FIGURE_CELL)
            levels.putpalette(overlays.JET_LUT.tobytes())
            image.paste(levels.convert("RGB"), (column * FIGURE_CELL, header + row * FIGURE_CELL))
    return image
