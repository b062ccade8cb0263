"""From a raw low-resolution map to what a person sees: heatmap, overlay, thumbnail, peak.

The map is min-max normalised at its own resolution (as pytorch-grad-cam does), then upsampled
bilinearly to the displayed image's geometry (Pillow's C code, the arithmetic of ``upsample``),
so the heat lines up with the whole image the model saw (the model sees the full image squashed
to a square; upsampling to the original aspect ratio undoes the squash). A center-crop model sees only
its view box (``decode.imaging.view_box``): its map is upsampled onto that box alone, and outside it
the X-ray is shown dimmed, without heat, since the model never saw that part.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from batchcam.decode.imaging import DISPLAY_REDUCING_GAP

THUMB_MAX_SIDE = 256      # the gallery's card image, px
IMAGE_WEIGHT = 0.55       # share of the X-ray in the blend; the rest is the heatmap colour
OUTSIDE_VIEW_WEIGHT = 0.5  # brightness of the X-ray outside a center-crop model's view box
Box = tuple[float, float, float, float]   # (left, top, right, bottom) in an image's pixels
JPEG_QUALITY = 88


@dataclass
class RenderedOverlay:
    overlay_jpeg: bytes
    thumb_jpeg: bytes
    original_jpeg: bytes  # the X-ray as displayed, without heat: the gallery's "original" toggle
    peak_x: int  # in original-image pixels
    peak_y: int


def min_max_scaled(cam: torch.Tensor) -> torch.Tensor:
    """Min-max scale a map to 0..1 (a flat map becomes all zeros, not a division by zero)."""
    low, high = cam.min(), cam.max()
    return (cam - low) / (high - low) if high > low else torch.zeros_like(cam)


def upsample(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(cam[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> cyan -> yellow -> red) of values in 0..1, as uint8 RGB."""
    v = values[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(v - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0, 1)
    return (rgb * 255).astype(np.uint8)


JET_LUT = jet(np.linspace(0, 1, 256, dtype=np.float32))


def peak_in_original(cam: torch.Tensor, width: int, height: int, box: Box | None = None) -> tuple[int, int]:
    """The hottest point of the upsampled heatmap, in the original image's pixels.

    Bilinear upsampling takes its maximum at the centre of the hottest low-resolution cell, so the
    peak is that centre mapped onto the original grid (onto ``box``, the part of the image the map
    covers, when it is not all of it): exact for the displayed heat, independent of the display
    size, and free of a full-resolution argmax.
    """
    left, top, right, bottom = box or (0.0, 0.0, float(width), float(height))
    rows, columns = cam.shape
    y, x = divmod(int(torch.argmax(cam)), columns)
    return (min(width - 1, int(left + (x + 0.5) * (right - left) / columns)),
            min(height - 1, int(top + (y + 0.5) * (bottom - top) / rows)))


def shown_box(box: Box | None, width: int, height: int, shown_w: int, shown_h: int) -> tuple[int, int, int, int]:
    """``box`` (original pixels) on the displayed copy of (shown_w, shown_h) pixels, whole pixels, never empty."""
    if box is None:
        return 0, 0, shown_w, shown_h
    scale_x, scale_y = shown_w / width, shown_h / height
    left = min(shown_w - 1, max(0, round(box[0] * scale_x)))
    top = min(shown_h - 1, max(0, round(box[1] * scale_y)))
    return (left, top, max(left + 1, min(shown_w, round(box[2] * scale_x))),
            max(top + 1, min(shown_h, round(box[3] * scale_y))))


def heat_levels(cam: torch.Tensor, height: int, width: int, scale: float | None = None) -> Image.Image:
    """The normalised map upsampled to (height, width) as 0..255 levels, in Pillow's C code.

    Pillow's bilinear filter enlarges with half-pixel centres and clamped edges, the same
    arithmetic as ``upsample`` (torch, ``align_corners=False``); +0.5 makes the conversion to
    8 bits round instead of truncate. ``scale`` (``--heat-scale run``): the map divided by this
    run-wide constant and clipped to 0..1 instead of min-max normalised, so heat compares across images.
    """
    unit = min_max_scaled(cam.float()) if scale is None else (cam.float() / scale).clamp(0, 1)
    scaled = unit.numpy().astype(np.float32) * 255 + 0.5
    levels = Image.fromarray(scaled, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return levels.convert("L")


def render(display: np.ndarray, cam: torch.Tensor, width: int, height: int,
           scale: float | None = None, box: Box | None = None) -> RenderedOverlay:
    """Blend the heatmap over the displayed X-ray and encode overlay, thumbnail and original as JPEG.

    ``box``: the part of the (width x height) original the map covers (None: all of it); outside it
    the X-ray is dimmed and has no heat. Upsampling, colouring (a palette lookup) and blending all
    run in Pillow's C code: the same steps as float arithmetic in numpy cost more than the model's
    forward pass per image.
    """
    shown_h, shown_w = display.shape
    left, top, right, bottom = shown_box(box, width, height, shown_w, shown_h)
    colour = heat_levels(cam, bottom - top, right - left, scale)
    colour.putpalette(JET_LUT.tobytes())
    original = Image.fromarray(display, mode="L")
    inside = original if box is None else original.crop((left, top, right, bottom))
    overlay = Image.blend(colour.convert("RGB"), inside.convert("RGB"), IMAGE_WEIGHT)
    if box is not None:
        dimmed = original.point(lambda level: int(level * OUTSIDE_VIEW_WEIGHT)).convert("RGB")
        dimmed.paste(overlay, (left, top))
        overlay = dimmed
    thumb = overlay.copy()
    thumb.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.Resampling.BILINEAR, reducing_gap=DISPLAY_REDUCING_GAP)
    peak_x, peak_y = peak_in_original(cam, width, height, box)
    return RenderedOverlay(_jpeg(overlay), _jpeg(thumb), _jpeg(original), peak_x, peak_y)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
