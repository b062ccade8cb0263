"""A lung-field estimate from the image alone, for ``attention_outside``.

No trained segmenter: the classical radiograph heuristic. On a chest film the lungs are the dark
(air-filled) regions *inside* the body, while the air around the body is dark and touches the
image's edge. So, on a coarse ``LUNG_GRID`` x ``LUNG_GRID`` copy of the model's view:

1. split dark from bright with Otsu's threshold;
2. drop the dark pixels 4-connected to the image's edge (the air around the patient);
3. keep each remaining dark region of at least ``MIN_REGION`` of the image and replace it by its
   convex hull, so a consolidation that makes part of a lung bright (pneumonia) stays inside it;
4. grow the result by ``LUNG_MARGIN`` of the side: a layer4 map has 7 x 7 cells, each about 14%
   of the side, so its heat cannot hug the lung's outline closer than that.

The estimate is refused (``None``) when its area is implausible for two lungs (outside
``PLAUSIBLE_AREA``): a film cropped so tightly that the lungs touch the edge, an inverted image,
a non-chest image. The caller then falls back to the border band. Coordinates are relative to the
image: the model's view is the whole image squashed to a square, so shares measured on this grid
are the shares on the image.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LUNG_GRID = 64                  # the estimate's resolution, cells per side
MIN_REGION = 0.005              # smallest dark region kept, share of the image
LUNG_MARGIN = 0.06              # growth of the lung fields, share of the side
PLAUSIBLE_AREA = (0.08, 0.75)   # the grown fields' share of the image outside which the estimate is refused


def estimate_lung_fields(view: np.ndarray) -> np.ndarray | None:
    """(LUNG_GRID, LUNG_GRID) bool mask of the grown lung fields of a uint8 grayscale image, or None."""
    gray = F.adaptive_avg_pool2d(torch.from_numpy(np.array(view, dtype=np.float32))[None, None], LUNG_GRID)[0, 0]
    dark = (gray <= otsu_threshold(gray)).numpy()
    fields = np.zeros_like(dark)
    for region in inner_regions(dark):
        if region.mean() >= MIN_REGION:
            fields |= convex_hull_mask(region)
    grown = dilate(fields, round(LUNG_MARGIN * LUNG_GRID))
    low, high = PLAUSIBLE_AREA
    return grown if low <= float(grown.mean()) <= high else None


def otsu_threshold(gray: torch.Tensor) -> float:
    """The grey level that best separates two classes (maximal between-class variance)."""
    histogram = torch.bincount(gray.round().clamp(0, 255).long().flatten(), minlength=256).double()
    p = histogram / histogram.sum()
    weight = torch.cumsum(p, 0)
    mean = torch.cumsum(p * torch.arange(256, dtype=torch.float64), 0)
    between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight)).clamp_min(1e-12)
    return float(torch.argmax(between))


def inner_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a bool mask that do not touch the image's edge, one mask each.

    One labelling serves both steps: the regions touching the edge (the air around the body) are
    the ones dropped, the others are the candidate lungs.
    """
    labels = region_labels(mask)
    on_edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return [labels == label for label in np.setdiff1d(np.unique(labels[mask]), on_edge)]


def region_labels(mask: np.ndarray) -> np.ndarray:
    """Each pixel of ``mask`` labelled with the smallest flat index of its 4-connected region; -1 off it.

    Labels spread along whole rows, then whole columns, of ``mask`` at a time (each run of
    consecutive pixels takes its smallest label), until nothing changes: as many sweeps as a path
    through the region has turns, not as many as it has pixels.
    """
    big = mask.size
    labels = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        before = labels
        labels = _spread_along_runs(_spread_along_runs(labels, mask).T, mask.T).T
        if np.array_equal(labels, before):
            return np.where(mask, labels, -1)


def _spread_along_runs(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Every run of consecutive mask pixels in a row takes the smallest label in it."""
    flat_mask = mask.ravel()
    starts = flat_mask.copy()
    starts[1:] &= ~flat_mask[:-1]
    starts[::mask.shape[1]] = flat_mask[::mask.shape[1]]    # a run never continues into the next row
    run = np.cumsum(starts) - 1
    smallest = np.full(int(starts.sum()), mask.size)
    np.minimum.at(smallest, run[flat_mask], labels.ravel()[flat_mask])
    spread = labels.ravel().copy()
    spread[flat_mask] = smallest[run[flat_mask]]
    return spread.reshape(labels.shape)


def convex_hull_mask(region: np.ndarray) -> np.ndarray:
    """The pixels inside the convex hull of a region's pixel centres (Andrew's monotone chain)."""
    rows_used = np.flatnonzero(region.any(axis=1))
    left = region[rows_used].argmax(axis=1)
    right = region.shape[1] - 1 - region[rows_used, ::-1].argmax(axis=1)
    # each row's leftmost and rightmost pixels: the same hull as all the pixels, far fewer points
    points = sorted(set(zip(left.tolist(), rows_used.tolist())) | set(zip(right.tolist(), rows_used.tolist())))
    if len(points) < 3:
        return region.copy()
    hull = np.array(_half_hull(points) + _half_hull(points[::-1]))
    (x0, y0), (x1, y1) = hull.T[:, :, None, None], np.roll(hull, -1, axis=0).T[:, :, None, None]
    rows, columns = np.indices(region.shape)
    inside = ((x1 - x0) * (rows - y0) - (y1 - y0) * (columns - x0) >= 0).all(axis=0)
    return inside | region


def _half_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One chain of the hull, turning counter-clockwise, without its last point."""
    chain: list[tuple[int, int]] = []
    for p in points:
        while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
            chain.pop()
        chain.append(p)
    return chain[:-1]


def _cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by ``radius`` pixels (a square structuring element)."""
    if radius <= 0:
        return mask.copy()
    size = 2 * radius + 1
    grown = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], size, stride=1, padding=radius)
    return grown[0, 0].numpy() > 0
