"""The overlay's arithmetic as tensor operations, so a CUDA scan colours, blends, shrinks and
encodes its overlays on the GPU, a batch at a time, and its CPUs only decode and write.

It follows ``overlay.render`` step by step: the map normalised (or divided by the run's scale),
``* 255 + 0.5``, upsampled bilinearly with half-pixel centres and clamped edges, truncated to 8
bits (Pillow's F -> L), looked up in the same jet palette, blended as Pillow's ``Image.blend``
does (``colour + 0.55 * (gray - colour)``, truncated), the thumbnail's size chosen as Pillow's
``thumbnail`` chooses it. The thumbnail's filter (antialiased bilinear, not a box reduction first)
and the JPEG encoder (libjpeg or nvJPEG through torchvision, not Pillow's) differ slightly; the
same code runs on the CPU in the tests, which hold it to ``overlay.render`` within a few grey levels
and to the same peak.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from batchcam.cam.overlay import (
    IMAGE_WEIGHT,
    JET_LUT,
    JPEG_QUALITY,
    OUTSIDE_VIEW_WEIGHT,
    THUMB_MAX_SIDE,
    Box,
    RenderedOverlay,
    min_max_scaled,
    peak_in_original,
    shown_box,
)


def heat_levels(cam: torch.Tensor, height: int, width: int, scale: float | None = None) -> torch.Tensor:
    """(height, width) uint8 levels of the map, as ``overlay.heat_levels`` computes them in Pillow."""
    unit = min_max_scaled(cam.float()) if scale is None else (cam.float() / scale).clamp(0, 1)
    scaled = unit * 255 + 0.5
    upsampled = F.interpolate(scaled[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return upsampled.clamp(0, 255).to(torch.uint8)  # truncates, as Pillow's F -> L conversion does


def blended(display: torch.Tensor, cam: torch.Tensor, scale: float | None = None,
            box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """(3, h, w) uint8 overlay of a (h, w) uint8 display copy: jet colour blended with the X-ray (inside
    ``box``, in display pixels, when given; outside it the X-ray dimmed, as ``overlay.render`` draws it)."""
    height, width = display.shape
    left, top, right, bottom = box or (0, 0, width, height)
    levels = heat_levels(cam, bottom - top, right - left, scale)
    colour = torch.from_numpy(JET_LUT).to(display.device)[levels.long()].float().permute(2, 0, 1)
    gray = display.float()[None]
    inside = (colour + IMAGE_WEIGHT * (gray[:, top:bottom, left:right] - colour)).to(torch.uint8)
    if box is None:
        return inside
    overlay = (gray * OUTSIDE_VIEW_WEIGHT).to(torch.uint8).expand(3, -1, -1).clone()
    overlay[:, top:bottom, left:right] = inside
    return overlay


def thumbnail_size(width: int, height: int, side: int = THUMB_MAX_SIDE) -> tuple[int, int]:
    """The size Pillow's ``Image.thumbnail((side, side))`` gives a (width, height) image."""
    if side >= width and side >= height:
        return width, height

    def round_aspect(number: float, key: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    aspect = width / height
    if aspect <= 1:
        return round_aspect(side * aspect, key=lambda n: abs(aspect - n / side)), side
    return side, round_aspect(side / aspect, key=lambda n: 0 if n == 0 else abs(aspect - side / n))


def shrunk(image: torch.Tensor) -> torch.Tensor:
    """(3, h, w) uint8 image resized to the thumbnail's size (antialiased bilinear, rounded)."""
    width, height = thumbnail_size(image.shape[2], image.shape[1])
    if (width, height) == (image.shape[2], image.shape[1]):
        return image
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def render_batch(displays: list[np.ndarray], cams: list[torch.Tensor], sizes: list[tuple[int, int]],
                 device: torch.device, scale: float | None = None,
                 boxes: list[Box | None] | None = None) -> list[RenderedOverlay]:
    """``overlay.render`` for a batch, on ``device``: overlays, thumbnails and originals encoded together.

    ``sizes`` are the original images' (width, height), for the peaks; ``boxes`` the part of each the
    map covers (None: all of it).
    """
    from torchvision.io import encode_jpeg

    boxes = boxes or [None] * len(cams)
    images = []
    for display, cam, size, box in zip(displays, cams, sizes, boxes):
        gray = torch.from_numpy(np.require(display, requirements="W")).to(device, non_blocking=True)
        shown = None if box is None else shown_box(box, *size, display.shape[1], display.shape[0])
        overlay = blended(gray, cam.to(device), scale, shown)
        images += [overlay, shrunk(overlay), gray[None]]
    encoded = encode_jpeg(images, quality=JPEG_QUALITY)
    data = [bytes(jpeg.cpu().numpy()) for jpeg in encoded]
    return [RenderedOverlay(data[3 * i], data[3 * i + 1], data[3 * i + 2], *peak_in_original(cam.cpu(), *size, box))
            for i, (cam, size, box) in enumerate(zip(cams, sizes, boxes))]
