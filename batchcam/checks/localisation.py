"""``batchcam evaluate REPORT --boxes BOXES.csv``: how well a scan's heatmaps localise ground truth.

Two measures, per image and over the run (Saporta et al., Nature Machine Intelligence 2022, use
both for chest X-ray saliency):

- the pointing game (Zhang et al., ECCV 2016): a hit when the map's hottest point (``cam_peak_x``,
  ``cam_peak_y`` of predictions.csv, in original pixels) lies inside any box of its image, edges
  included;
- the share of the displayed heat (min-max normalised map, upsampled bilinearly to the geometry of
  the part of the image the model saw, as the overlay shows it: the whole image, or a center-crop
  model's box) that lies inside the union of the image's boxes. This needs
  the raw maps, so REPORT must come from ``scan --save-cams`` (``cams.npz``); without them only
  the pointing game is reported, and the command says so.

Boxes files, recognised by their header row:

- generic: ``path,x0,y0,x1,y1`` with ``path`` relative to ROOT as in predictions.csv, corners in
  original pixels; several rows per path for several boxes;
- RSNA Pneumonia Detection: ``patientId,x,y,width,height,Target``, the patientId matched to the
  file name without its extension (anywhere under ROOT); ``Target`` 0 rows carry no box.

Only ok rows with at least one box are scored. The results go into metrics.json under
``localisation`` (its other keys kept) and into the gallery's summary; the gallery is re-rendered
with each image's boxes drawn over its large view. Run ``evaluate`` again after
a scan: a scan rewrites metrics.json.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchcam.checks.attention import energy_share, heat_grid
from batchcam.config import MAX_BOXES_BYTES, shown
from batchcam.decode.imaging import view_box
from batchcam.errors import UsageError
from batchcam.records import Row
from batchcam.runtime.bounded import read_input

GENERIC_COLUMNS = ("path", "x0", "y0", "x1", "y1")
RSNA_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels


@dataclass
class Boxes:
    format: str                     # "generic" or "rsna"
    by_key: dict[str, list[Box]]    # path (generic) or patientId (rsna) -> boxes; [] for Target 0

    def for_row(self, row: Row) -> list[Box] | None:
        """The row's boxes ([] when the file says "no box"), None when the file does not mention it."""
        key = row.path if self.format == "generic" else row.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return self.by_key.get(key)


def read_boxes(path: Path) -> Boxes:
    """Parse a boxes CSV (either format); UsageError with a one-line reason when it cannot.

    The file is read bounded (``config.MAX_BOXES_BYTES``) and must be a regular file: ``/dev/zero``
    or a FIFO is refused at once, never read or waited on.
    """
    data = read_input(path, MAX_BOXES_BYTES, "--boxes", "a boxes CSV file")
    source = shown(path)
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
        header = tuple(name.strip() for name in (reader.fieldnames or ()))
        if set(GENERIC_COLUMNS) <= set(header):
            return Boxes("generic", _read(reader, source, _generic_box, "path"))
        if set(RSNA_COLUMNS) <= set(header):
            return Boxes("rsna", _read(reader, source, _rsna_box, "patientId"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--boxes {source}: cannot read: {e}") from None
    raise UsageError(f"--boxes {source}: header must hold {','.join(GENERIC_COLUMNS)} or "
                     f"{','.join(RSNA_COLUMNS)}, got {','.join(header) or 'nothing'}")


def _read(reader: csv.DictReader[str], path: str, parse: Callable[[dict[str, str]], Box | None],
          key_column: str) -> dict[str, list[Box]]:
    boxes: dict[str, list[Box]] = {}
    for values in reader:
        if None in values:  # csv.DictReader's key for the fields beyond the header
            raise UsageError(f"--boxes {path}: line {reader.line_num}: more fields than the header has")
        values = {k.strip(): (v or "").strip() for k, v in values.items()}
        try:
            box = parse(values)
        except ValueError as e:
            raise UsageError(f"--boxes {path}: line {reader.line_num}: {e}") from None
        key = values[key_column]
        if not key:
            raise UsageError(f"--boxes {path}: line {reader.line_num}: empty {key_column}")
        boxes.setdefault(key, [])
        if box is not None:
            boxes[key].append(box)
    return boxes


def _number(values: dict[str, str], name: str) -> float:
    try:
        value = float(values[name])
    except ValueError:
        raise ValueError(f"{name} {values[name]!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"{name} {values[name]!r} is not a finite number")
    return value


def _generic_box(values: dict[str, str]) -> Box:
    x0, y0, x1, y1 = (_number(values, name) for name in GENERIC_COLUMNS[1:])
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box ({x0:g},{y0:g})-({x1:g},{y1:g}) has x1 < x0 or y1 < y0")
    return x0, y0, x1, y1


def _rsna_box(values: dict[str, str]) -> Box | None:
    if values["Target"] not in ("0", "1"):
        raise ValueError(f"Target {values['Target']!r} is neither 0 nor 1")
    if values["Target"] == "0":
        return None
    x, y, width, height = (_number(values, name) for name in RSNA_COLUMNS[1:5])
    if width < 0 or height < 0:
        raise ValueError("negative width or height")
    return x, y, x + width, y + height


def point_in_boxes(x: float, y: float, boxes: list[Box]) -> bool:
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def energy_in_boxes(cam: torch.Tensor, view: Box, boxes: list[Box]) -> float | None:
    """Share of the displayed heat inside the union of the boxes (pixel centres, original pixels); the map
    covers ``view``, the part of the image the model saw (all of it, or a center-crop model's box)."""
    left, top, right, bottom = view
    heat = heat_grid(cam, max(1, round(right - left)), max(1, round(bottom - top)))
    rows, columns = heat.shape
    ys = top + (torch.arange(rows, dtype=torch.float32) + 0.5) * (bottom - top) / rows
    xs = left + (torch.arange(columns, dtype=torch.float32) + 0.5) * (right - left) / columns
    region = torch.zeros(rows, columns, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        region |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return energy_share(heat, region)


def localisation(rows: list[Row], boxes: Boxes, cams: dict[str, np.ndarray] | None, boxes_file: str,
                 preprocessing: Mapping[str, Any] | None = None) -> dict:
    """Per-image and overall pointing game and energy share (see the module's docstring).

    ``preprocessing`` (the manifest's model block: ``image_size``, ``resize``) places each map on the part
    of its image the model saw; without it, or for ``squash``, a map covers the whole image.
    """
    model = preprocessing or {}
    size, resize = model.get("image_size"), model.get("resize", "squash")
    images: list[dict[str, object]] = []
    hits, energies = 0, []
    for row in rows:
        row_boxes = boxes.for_row(row)
        if not row.ok or not row_boxes or row.cam_peak_x is None or row.cam_peak_y is None:
            continue
        energy = None
        if cams is not None and row.path in cams and row.width is not None and row.height is not None:
            view = (view_box(row.width, row.height, size, resize) if isinstance(size, int) and resize == "center-crop"
                    else (0.0, 0.0, float(row.width), float(row.height)))
            energy = energy_in_boxes(torch.from_numpy(np.asarray(cams[row.path], dtype=np.float32)), view,
                                     row_boxes)
        hit = point_in_boxes(row.cam_peak_x, row.cam_peak_y, row_boxes)
        energy_inside = None if energy is None else round(energy, 6)
        hits += hit
        if energy_inside is not None:
            energies.append(energy_inside)
        images.append({"path": row.path, "boxes": len(row_boxes), "hit": hit, "energy_inside": energy_inside})
    known = {row.path if boxes.format == "generic" else row.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
             for row in rows}
    return {"boxes_file": boxes_file, "format": boxes.format, "n": len(images),
            "pointing_game": {"hits": hits, "hit_rate": round(hits / len(images), 6) if images else None},
            "energy_inside": {"n": len(energies), "mean": round(float(np.mean(energies)), 6) if energies else None,
                              "note": None if cams is not None else
                              "cams.npz is missing: run scan with --save-cams to measure energy inside the boxes"},
            "boxes_not_in_report": sum(key not in known for key in boxes.by_key),
            "images": images}
