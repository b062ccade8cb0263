"""From a raw low-resolution map to what a person sees: heatmap, overlay, thumbnail, peak.

The map is min-max normalised at its own resolution (as pytorch-grad-cam does), then upsampled
bilinearly to the displayed image's geometry (Pillow's C code, the arithmetic of ``upsample``),
so the heat lines up with the whole image the model saw (the model sees the full image squashed
to a square; upsampling to the original aspect ratio undoes the squash).
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


def peak_in_original(cam: torch.Tensor, width: int, height: int) -> tuple[int, int]:
    """The hottest point of the upsampled heatmap, in the original image's pixels.

    Bilinear upsampling takes its maximum at the centre of the hottest low-resolution cell, so the
    peak is that centre mapped onto the original grid: exact for the displayed heat, independent of
    the display size, and free of a full-resolution argmax.
    """
    rows, columns = cam.shape
    y, x = divmod(int(torch.argmax(cam)), columns)
    return (min(width - 1, int((x + 0.5) * width / columns)),
            min(height - 1, int((y + 0.5) * height / rows)))


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
           scale: float | None = None) -> RenderedOverlay:
    """Blend the heatmap over the displayed X-ray and encode overlay, thumbnail and original as JPEG.

    Upsampling, colouring (a palette lookup) and blending all run in Pillow's C code: the same
    steps as float arithmetic in numpy cost more than the model's forward pass per image.
    """
    shown_h, shown_w = display.shape
    colour = heat_levels(cam, shown_h, shown_w, scale)
    colour.putpalette(JET_LUT.tobytes())
    original = Image.fromarray(display, mode="L")
    overlay = Image.blend(colour.convert("RGB"), original.convert("RGB"), IMAGE_WEIGHT)
    thumb = overlay.copy()
    thumb.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.Resampling.BILINEAR, reducing_gap=DISPLAY_REDUCING_GAP)
    peak_x, peak_y = peak_in_original(cam, width, height)
    return RenderedOverlay(_jpeg(overlay), _jpeg(thumb), _jpeg(original), peak_x, peak_y)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
