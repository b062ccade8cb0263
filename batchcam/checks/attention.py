"""Checks on a single map: where its heat lies, and whether the model needs what it highlights.

Attention outside the lungs
    ``attention_outside`` is the share of the displayed heat (the map as the overlay shows it:
    min-max normalised, upsampled bilinearly) that lies off the lung fields estimated from the image
    by ``batchcam.decode.lungs`` (two dark fields inside the body either side of the mediastinum,
    convex-hulled, grown by 6% of the side, the middle of the mediastinum and the air around the
    body left out). When the image does not look like a frontal chest film the estimate is
    refused and ``attention_outside`` is empty (the reason goes to the run's log): no region is
    guessed, as a fixed border band would mislabel a film whose lungs reach its edge.
    ``attention_flag`` is raised above ``ATTENTION_THRESHOLD`` (55%), when most of the heat is off
    the lungs. Measured on synthetic images: the demo model's maps put 22-46% of their heat
    outside; a model that learnt a corner-marker shortcut puts 56-66% there; the grown lung fields
    cover 36-55% of an image, so a map spread evenly puts 45-64% outside, around the threshold.
    On pydicom-data's real CR chest film the demo model's heat, on both lungs, is 37% outside.

Faithfulness (``scan --faithfulness``)
    Per image, the drop in the target class's probability when the hottest ``REMOVED_FRACTION``
    (20%) of the model input's pixels (by the map upsampled to the input) are replaced by the
    image's own mean (mean-fill: no new edges, no blur kernel to choose), and the drop when a
    random axis-aligned rectangle of the same area is replaced the same way. A faithful map's top
    region matters more than a random one: ``faith_drop_top > faith_drop_random`` on average. Cost:
    two extra forward passes per batch (no backward pass).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from batchcam.cam.overlay import min_max_scaled, upsample
from batchcam.decode.lungs import LUNG_GRID

REMOVED_FRACTION = 0.20       # share of the input removed by the faithfulness test


def heat_grid(cam: torch.Tensor, width: int, height: int, longest: int = 256) -> torch.Tensor:
    """The displayed heat (normalised, upsampled) on a grid with the image's aspect ratio.

    Bilinear upsampling scales both axes independently, so shares of regions defined relative to
    the image are the same on this grid as at full resolution, up to the grid's rounding.
    """
    scale = min(1.0, longest / max(width, height))
    rows, columns = max(1, round(height * scale)), max(1, round(width * scale))
    return upsample(min_max_scaled(cam.float()), rows, columns)


def energy_share(heat: torch.Tensor, region: torch.Tensor) -> float | None:
    """Share of the heat's sum inside ``region`` (a bool mask of the same shape); None for no heat."""
    total = float(heat.sum())
    return None if total <= 0 else float(heat[region].sum()) / total


def attention_outside(cam: torch.Tensor, lung_fields: np.ndarray | None) -> float | None:
    """Share of the displayed heat off the lung fields (see the module's docstring); None without them.

    ``lung_fields`` is ``batchcam.decode.lungs.estimate_lung_fields(...).fields`` of the image. Both
    the fields and the map live in coordinates relative to the image.
    """
    if lung_fields is None:
        return None
    heat = upsample(min_max_scaled(cam.float()), LUNG_GRID, LUNG_GRID)
    return energy_share(heat, ~torch.from_numpy(lung_fields))


def top_region(cams: torch.Tensor, size: int, fraction: float = REMOVED_FRACTION) -> torch.Tensor:
    """(B, size, size) bool: the hottest ``fraction`` of each map upsampled to the model input."""
    maps = torch.nn.functional.interpolate(cams[:, None].float(), size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0].flatten(1)
    count = max(1, round(fraction * size * size))
    order = torch.argsort(maps, dim=1, descending=True, stable=True)[:, :count]
    region = torch.zeros_like(maps, dtype=torch.bool)
    region.scatter_(1, order, True)
    return region.view(-1, size, size)


def random_region(batch: int, size: int, seeds: list[int], fraction: float = REMOVED_FRACTION) -> torch.Tensor:
    """(B, size, size) bool: a rectangle of the same area as ``top_region`` at a seeded random place.

    A square when it fits; each image's seed makes the place reproducible run to run.
    """
    side = min(size, max(1, round(np.sqrt(fraction) * size)))
    other = min(size, max(1, round(fraction * size * size / side)))
    region = torch.zeros(batch, size, size, dtype=torch.bool)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(seed)
        y, x = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - other + 1))
        region[i, y:y + side, x:x + other] = True
    return region


def mean_fill(x: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Replace the region of each image (all channels) by that image's per-channel mean."""
    means = x.mean(dim=(2, 3), keepdim=True)
    mask = region[:, None].to(x.device)
    return torch.where(mask, means.expand_as(x), x)


def seed_of(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:8], "little")


def faithfulness(model: nn.Module, x: torch.Tensor, cams: torch.Tensor, targets: torch.Tensor,
                 probabilities: torch.Tensor, seeds: list[int],
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops of the target class's probability (original - removed) for the top and a random region.

    ``x`` is the normalised batch the maps were computed on; two extra forward passes, batched.
    ``temperature`` must be the one ``probabilities`` were scaled with, so both sides compare.
    """
    size = x.shape[-1]
    top = top_region(cams, size)
    random = random_region(x.shape[0], size, seeds)
    with torch.inference_mode():
        removed = torch.cat([mean_fill(x, top), mean_fill(x, random)])
        logits = model(removed.contiguous(memory_format=torch.channels_last)).float()
        p = torch.softmax(logits / temperature, 1).cpu()
    index = torch.arange(x.shape[0])
    original = probabilities[index, targets]
    batch = x.shape[0]
    return original - p[:batch][index, targets], original - p[batch:][index, targets]
