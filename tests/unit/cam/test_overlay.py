"""The overlay stage: Pillow's fast upsampling must be the arithmetic the reference path uses."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from batchcam.cam import overlay


def test_heat_levels_equal_torch_bilinear_upsampling_to_rounding():
    """Holds when enlarging, the only case that matters (a map is 7x7, an X-ray hundreds of px)."""
    torch.manual_seed(0)
    for shape, size in (((7, 7), (900, 1024)), ((2, 3), (31, 17)), ((7, 7), (7, 300))):
        cam = torch.rand(*shape)
        fast = np.asarray(overlay.heat_levels(cam, *size), dtype=np.float32)
        reference = overlay.upsample(overlay.min_max_scaled(cam), *size).numpy() * 255
        assert fast.shape == size
        assert np.abs(fast - reference).max() <= 0.5 + 1e-3


def test_peak_is_the_centre_of_the_hottest_cell_in_original_pixels():
    cam = torch.zeros(7, 7)
    cam[2, 5] = 1.0
    assert overlay.peak_in_original(cam, width=1400, height=700) == (1100, 250)
    cam = torch.zeros(7, 7)
    cam[6, 0] = 1.0
    assert overlay.peak_in_original(cam, width=70, height=7) == (5, 6)


def test_render_keeps_the_displayed_geometry_and_puts_red_at_the_peak():
    display = np.full((300, 500), 128, dtype=np.uint8)
    cam = torch.zeros(7, 7)
    cam[3, 3] = 1.0
    rendered = overlay.render(display, cam, width=1000, height=600)
    picture = np.asarray(Image.open(io.BytesIO(rendered.overlay_jpeg)).convert("RGB"), dtype=np.int32)
    assert picture.shape == (300, 500, 3)
    centre, corner = picture[150, 250], picture[5, 5]
    assert centre[0] > centre[2] + 40 and corner[2] > corner[0] + 40  # hot red middle, cold blue corner
    assert (rendered.peak_x, rendered.peak_y) == (500, 300)
    assert Image.open(io.BytesIO(rendered.thumb_jpeg)).size == (256, 154)
    assert Image.open(io.BytesIO(rendered.original_jpeg)).mode == "L"
