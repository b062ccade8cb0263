"""A lung-field estimate from the image alone, for ``attention_outside``; refused when the image
does not look like a frontal chest film.

No trained segmenter: the classical radiograph heuristic, made to hold on real films (collimation
borders, shoulders, air above them, 15-bit MONOCHROME1 windowed to 8 bits) and to say no to
anything else. On a frontal chest film the lungs are two dark (air-filled) fields *inside* the
body, one on each side of a bright mediastinum and spine, with their apices in the upper third and
the bright diaphragm below them. Even bands along the border (a collimator's shadow, padding) are
set aside first (``exposed_field``): the body's surroundings end where the exposed field does.
Then, on a coarse ``LUNG_GRID`` x ``LUNG_GRID`` copy of that field:

1. sweep a dark/bright threshold over ``LEVELS`` (shares of the image counted dark), from the
   most to the least: at each, the dark regions 4-connected to the image's edge are the air around
   the body (or a lung that leaks into it through the neck; a lower threshold cuts it free);
2. keep the other dark regions that are shaped like a lung (``LUNG_AREA``, ``MIN_LUNG_HEIGHT``,
   apex above ``APEX_BELOW``, bottom above ``BOTTOM_BELOW``, ``MIN_SOLIDITY``);
3. take the first level with a left-right pair of them whose apices are level, whose sizes are
   comparable, whose gap is near the middle and brighter than both by ``MIN_MIDLINE_CONTRAST``
   of the image's grey range (the mediastinum); none at any level: the estimate is refused;
4. each lung is the convex hull of its region and of the smaller dark pieces around it (a bright
   consolidation, pneumonia, splits a lung), grown by ``LUNG_MARGIN`` of the side (a layer4 map
   has 7 x 7 cells, each about 14% of the side, so its heat cannot hug the lung's outline closer
   than that), but never into the air around the body, and never over the middle half of the gap
   between the two lungs (the spine and mediastinum stay outside).

A refusal carries a one-line reason; the caller leaves ``attention_outside`` empty and logs it
(no border-band fallback, which mislabels a film whose lungs reach the edge). Coordinates are
relative to the image: the model's view is the whole image squashed to a square, so shares measured
on this grid are the shares on the image.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

LUNG_GRID = 48                  # the estimate's resolution, cells per side
LEVELS = (0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15)  # shares of the image counted dark
MIN_GREY_RANGE = 40.0           # 2nd to 98th percentile, grey levels; below it nothing is a radiograph
FLAT_SPREAD = 0.025             # a border line varying less (std, share of the grey range) is no anatomy
MIN_FIELD = 0.5                 # the exposed field's shorter side, share of the image's
LUNG_AREA = (0.025, 0.35)       # one lung's region, share of the image
MIN_LUNG_HEIGHT = 0.25          # share of the image's height
APEX_BELOW = 0.35               # a lung's top lies above this height (share, from the top)
BOTTOM_BELOW = 0.93             # ...and its bottom above this one: the diaphragm is below it
MIN_SOLIDITY = 0.5              # region / its convex hull: a lung is one compact field
APEX_SPREAD = 0.15              # the two apices' heights differ by at most this share
MIN_AREA_RATIO = 0.3            # the smaller lung's region is at least this share of the larger
MIDLINE = (0.3, 0.7)            # where the gap between the lungs may lie, share of the width
MIN_MIDLINE_CONTRAST = 0.25     # the gap's brightness above the lungs', share of the grey range
PIECE_AREA = 0.003              # smallest dark piece joined to a lung, share of the image
PIECE_REACH = 0.08              # a piece's box comes at most this close to the lung's box
LUNG_MARGIN = 0.06              # growth of the lung fields, share of the side

NOT_A_RADIOGRAPH = "no lung fields: too little contrast for a radiograph"
MOSTLY_BORDER = "no lung fields: the image is mostly an even border"
NO_LUNG_PAIR = ("no lung fields: no pair of dark fields left and right of a brighter midline, "
                "as a frontal chest film has")


@dataclass(frozen=True)
class LungEstimate:
    """The grown lung fields, a (LUNG_GRID, LUNG_GRID) bool mask, or None and the reason why not."""

    fields: np.ndarray | None
    refusal: str = ""


@dataclass
class _Region:
    """A dark region at one threshold, with the measures the lung tests use (shares of the image)."""

    mask: np.ndarray
    area: float
    top: float
    bottom: float
    left: float
    right: float
    centre_x: float
    centre_y: float
    mean: float

    @classmethod
    def of(cls, mask: np.ndarray, gray: np.ndarray) -> "_Region":
        n = mask.shape[0]
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        ys, xs = np.nonzero(mask)
        return cls(mask, float(mask.mean()), rows[0] / n, (rows[-1] + 1) / n, columns[0] / n,
                   (columns[-1] + 1) / n, (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n, float(gray[mask].mean()))

    @cached_property
    def hull(self) -> np.ndarray:
        return convex_hull_mask(self.mask)

    def looks_like_a_lung(self) -> bool:
        return (LUNG_AREA[0] <= self.area <= LUNG_AREA[1] and self.bottom - self.top >= MIN_LUNG_HEIGHT
                and self.top <= APEX_BELOW and self.bottom <= BOTTOM_BELOW
                and self.mask.sum() >= MIN_SOLIDITY * self.hull.sum())

    def reaches(self, piece: "_Region") -> bool:
        """Whether another region's box comes within ``PIECE_REACH`` of this one's."""
        return (piece.left - PIECE_REACH <= self.right and self.left - PIECE_REACH <= piece.right
                and piece.top - PIECE_REACH <= self.bottom and self.top - PIECE_REACH <= piece.bottom)


def estimate_lung_fields(view: np.ndarray) -> LungEstimate:
    """The grown lung fields of a uint8 grayscale image, or a refusal (see the module's docstring)."""
    half = _half_size(view)
    low, high = np.percentile(half, (2, 98))
    if high - low < MIN_GREY_RANGE:
        return LungEstimate(None, NOT_A_RADIOGRAPH)
    top, bottom, left, right = exposed_field(half, FLAT_SPREAD * (high - low))
    if min(bottom - top, right - left) < MIN_FIELD * min(half.shape):
        return LungEstimate(None, MOSTLY_BORDER)
    field = estimate_in_field(half[top:bottom, left:right], high - low)
    if field is None:
        return LungEstimate(None, NO_LUNG_PAIR)
    return LungEstimate(_placed(field, (top, bottom, left, right), half.shape))


def _half_size(view: np.ndarray) -> np.ndarray:
    """The view averaged over 2 x 2 pixels (float): plenty for a 48-cell grid, and a quarter of the work."""
    pixels = torch.from_numpy(np.array(view, dtype=np.float32))[None, None]
    if min(view.shape) < 2 * LUNG_GRID:
        return pixels[0, 0].numpy()
    return F.avg_pool2d(pixels, 2, ceil_mode=True)[0, 0].numpy()


def exposed_field(pixels: np.ndarray, flat: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image without its flat border rows and columns.

    A collimator's shadow, or padding, is a band of even grey along the border (the image's
    edge is then not where the body's surroundings end); a row or column whose standard deviation
    is under ``flat`` grey levels holds no anatomy.
    """
    def varied_span(lines: np.ndarray) -> tuple[int, int]:
        varied = np.flatnonzero(lines.std(axis=1) >= flat)
        return (int(varied[0]), int(varied[-1]) + 1) if varied.size else (0, 0)

    (top, bottom), (left, right) = varied_span(pixels), varied_span(pixels.T)
    return top, bottom, left, right


def estimate_in_field(pixels: np.ndarray, grey_range: float) -> np.ndarray | None:
    """The grown lung fields of the exposed field on a ``LUNG_GRID`` grid, or None: steps 1-4."""
    gray = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(pixels))[None, None], LUNG_GRID)[0, 0].numpy()
    for threshold in np.quantile(gray, LEVELS):
        labels = region_labels(gray <= threshold)
        regions = [_Region.of(labels == label, gray) for label in _inner_labels(labels, PIECE_AREA)]
        seeds = [region for region in regions if region.area >= LUNG_AREA[0] / 2]  # pieces add at most as much
        lungs = [lung for lung in (_with_pieces(seed, regions, gray) for seed in seeds) if lung.looks_like_a_lung()]
        pair = _lung_pair(lungs, gray, grey_range)
        if pair is not None:
            return _grown_fields(pair, air=np.isin(labels, _edge_labels(labels)))
    return None


def _placed(field: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The field's mask put back at its place in the whole image, on a ``LUNG_GRID`` grid.

    Each cell of the whole image's grid takes the field's cell under its centre (off the field: no lung).
    """
    top, bottom, left, right = box
    centres = (np.arange(LUNG_GRID) + 0.5) / LUNG_GRID
    rows = np.floor((centres * shape[0] - top) / (bottom - top) * LUNG_GRID).astype(int)
    columns = np.floor((centres * shape[1] - left) / (right - left) * LUNG_GRID).astype(int)
    inside = ((rows >= 0) & (rows < LUNG_GRID))[:, None] & ((columns >= 0) & (columns < LUNG_GRID))[None, :]
    return inside & field[rows.clip(0, LUNG_GRID - 1)][:, columns.clip(0, LUNG_GRID - 1)]


def _lung_pair(lungs: list[_Region], gray: np.ndarray, grey_range: float) -> tuple[_Region, _Region] | None:
    """The largest (left, right) pair that sits as two lungs do, or None."""
    pairs = [(left, right) for left in lungs for right in lungs
             if left.centre_x < 0.5 < right.centre_x and _sits_as_lungs(left, right, gray, grey_range)]
    return max(pairs, key=lambda pair: pair[0].area + pair[1].area, default=None)


def _sits_as_lungs(left: _Region, right: _Region, gray: np.ndarray, grey_range: float) -> bool:
    """Level apices, comparable sizes, a gap near the middle that is brighter than both lungs."""
    level = abs(left.top - right.top) <= APEX_SPREAD
    comparable = min(left.area, right.area) >= MIN_AREA_RATIO * max(left.area, right.area)
    if not (level and comparable and MIDLINE[0] <= (left.right + right.left) / 2 <= MIDLINE[1]):
        return False
    gap = gap_between(left.mask, right.mask)
    if not gap.any():
        return False
    lungs_mean = (left.mean * left.area + right.mean * right.area) / (left.area + right.area)
    return float(gray[gap].mean()) - lungs_mean >= MIN_MIDLINE_CONTRAST * grey_range


def _with_pieces(region: _Region, regions: list[_Region], gray: np.ndarray) -> _Region:
    """The region joined by the smaller dark pieces around it on its side of the image.

    A bright consolidation (pneumonia) can split a lung in two; its apex then belongs to a piece.
    The pieces together stay smaller than the region: a field of many small dark patches (a test
    pattern, speckle) is no lung.
    """
    pieces = [piece for piece in regions
              if piece.area < region.area and (piece.centre_x < 0.5) == (region.centre_x < 0.5)
              and region.reaches(piece)]
    if not pieces or sum(piece.area for piece in pieces) > region.area:
        return region
    return _Region.of(np.logical_or.reduce([region.mask, *(piece.mask for piece in pieces)]), gray)


def _grown_fields(pair: tuple[_Region, _Region], air: np.ndarray) -> np.ndarray:
    """Both lungs hulled and grown, minus the air around the body and the middle of their gap."""
    hulls = [lung.hull for lung in pair]
    grown = dilate(hulls[0] | hulls[1], round(LUNG_MARGIN * LUNG_GRID))
    return grown & ~air & ~_middle_half(gap_between(*hulls))


def gap_between(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """In each row holding both masks: the cells strictly between ``left``'s last and ``right``'s first."""
    columns = np.arange(left.shape[1])
    both = np.any(left, axis=1) & np.any(right, axis=1)
    left_end = left.shape[1] - 1 - left[:, ::-1].argmax(axis=1)
    right_start = right.argmax(axis=1)
    return both[:, None] & (columns > left_end[:, None]) & (columns < right_start[:, None])


def _middle_half(gap: np.ndarray) -> np.ndarray:
    """Each row's gap without its outer quarters: what growing the lungs may not cover."""
    columns = np.arange(gap.shape[1])
    width = gap.sum(axis=1)
    start = gap.argmax(axis=1) + width // 4
    end = gap.argmax(axis=1) + width - width // 4
    return gap & (columns >= start[:, None]) & (columns < end[:, None])


def _edge_labels(labels: np.ndarray) -> np.ndarray:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return np.unique(edge[edge > 0])


def _inner_labels(labels: np.ndarray, min_share: float) -> np.ndarray:
    """Labels of the regions of at least ``min_share`` of the image that do not touch its edge."""
    counts = np.bincount(labels.ravel())
    counts[0] = 0  # the background
    return np.setdiff1d(np.flatnonzero(counts >= max(1, min_share * labels.size)), _edge_labels(labels))


def region_labels(mask: np.ndarray) -> np.ndarray:
    """Each pixel of ``mask`` labelled 1, 2, ... by its 4-connected region, in the order the
    regions' first pixels come row by row; 0 off the mask."""
    return ndimage.label(mask)[0]


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
    top, bottom = rows_used[0], rows_used[-1] + 1
    first, last = int(left.min()), int(right.max()) + 1
    rows, columns = np.ogrid[top:bottom, first:last]    # the hull stays inside the region's box
    filled = region.copy()
    filled[top:bottom, first:last] |= ((x1 - x0) * (rows - y0) - (y1 - y0) * (columns - x0) >= 0).all(axis=0)
    return filled


def _half_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """One chain of the hull, turning counter-clockwise, without its last point."""
    chain: list[tuple[int, int]] = []
    for x, y in points:
        while len(chain) >= 2:
            (ox, oy), (ax, ay) = chain[-2], chain[-1]
            if (ax - ox) * (y - oy) - (ay - oy) * (x - ox) > 0:    # a left turn: the chain stays convex
                break
            chain.pop()
        chain.append((x, y))
    return chain[:-1]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by ``radius`` pixels (a square structuring element)."""
    if radius <= 0:
        return mask.copy()
    size = 2 * radius + 1
    grown = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], size, stride=1, padding=radius)
    return grown[0, 0].numpy() > 0
