"""The lung-field estimate behind attention_outside: right on synthetic films, refused when implausible."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchcam.decode.imaging import resize_square
from batchcam.decode.lungs import LUNG_GRID, convex_hull_mask, estimate_lung_fields
from batchcam.synthetic import generate


def pooled(mask: np.ndarray) -> np.ndarray:
    """A full-resolution mask on the estimate's grid (cells at least half covered)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (torch.nn.functional.adaptive_avg_pool2d(tensor, LUNG_GRID)[0, 0] > 0.5).numpy()


@pytest.mark.parametrize("label", ["NORMAL", "PNEUMONIA"])
def test_the_grown_fields_cover_the_true_lungs_and_little_else(label):
    for seed in range(70_000, 70_008):
        xray = generate(seed, label, (500 + 40 * (seed % 5), 640))
        fields = estimate_lung_fields(resize_square(xray.image, 224))
        assert fields is not None
        lungs = pooled(xray.lungs)
        assert (fields & lungs).sum() >= 0.9 * lungs.sum()         # consolidations stay inside
        assert fields.mean() < 0.6 and not fields[0].any() and not fields[:, 0].any()


def test_an_image_without_enclosed_dark_regions_has_no_estimate():
    assert estimate_lung_fields(np.full((224, 224), 128, dtype=np.uint8)) is None
    gradient = np.tile(np.linspace(0, 255, 224, dtype=np.float32), (224, 1)).astype(np.uint8)
    assert estimate_lung_fields(gradient) is None                   # the dark half touches the edge


def test_the_convex_hull_fills_a_bite_out_of_a_region():
    region = np.zeros((12, 12), dtype=bool)
    region[2:10, 2:10] = True
    region[4:8, 6:10] = False        # a bite from the right side, as a bright consolidation makes
    hull = convex_hull_mask(region)
    assert hull[2:10, 2:10].all() and hull.sum() == 64
