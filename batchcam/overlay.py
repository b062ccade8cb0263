"""From a raw low-resolution map to what a person sees: heatmap, overlay, thumbnail, peak.

The map is min-max normalised at its own resolution (as pytorch-grad-cam does), then upsampled
bilinearly to the displayed image's geometry, so the heat lines up with the whole image the model
saw (the model sees the full image squashed to a square; upsampling to the original aspect ratio
undoes the squash).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OVERLAY_MAX_SIDE = 1024   # the overlay's longer side, px (the same as imaging.WORKING_LONG_SIDE)
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


def normalise(cam: torch.Tensor) -> torch.Tensor:
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


def peak_in_original(heat: torch.Tensor, width: int, height: int) -> tuple[int, int]:
    """The hottest displayed pixel, mapped to the original image's pixel grid."""
    shown_h, shown_w = heat.shape
    index = int(torch.argmax(heat))
    y, x = divmod(index, shown_w)
    return (min(width - 1, int((x + 0.5) * width / shown_w)),
            min(height - 1, int((y + 0.5) * height / shown_h)))


def render(display: np.ndarray, cam: torch.Tensor, width: int, height: int) -> RenderedOverlay:
    """Blend the heatmap over the displayed X-ray and encode overlay, thumbnail and original as JPEG.

    Colouring is a 256-entry lookup and the blend runs in Pillow's C code: per-pixel float
    arithmetic in numpy cost several times the model's forward pass per image.
    """
    shown_h, shown_w = display.shape
    heat = upsample(normalise(cam.float()), shown_h, shown_w)
    peak_x, peak_y = peak_in_original(heat, width, height)
    levels = heat.mul(255).round_().to(torch.uint8).numpy()
    colour = Image.fromarray(JET_LUT[levels], mode="RGB")
    original = Image.fromarray(display, mode="L")
    overlay = Image.blend(colour, original.convert("RGB"), IMAGE_WEIGHT)
    thumb = overlay.copy()
    thumb.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE), Image.BILINEAR, reducing_gap=2.0)
    return RenderedOverlay(_jpeg(overlay), _jpeg(thumb), _jpeg(original), peak_x, peak_y)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
