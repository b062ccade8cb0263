"""A center-crop model's map covers its view box only: the overlay draws heat there alone (the X-ray
outside dimmed, without heat) and the peak lies inside it, in the Pillow and the tensor renderers."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from batchcam.cam import overlay, overlay_tensor
from batchcam.decode.dataset import decode_sample
from batchcam.decode.imaging import view_box
from batchcam.synthetic import generate

WIDTH, HEIGHT, SIZE = 200, 120, 64


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    generate(3, "PNEUMONIA", (width, height)).image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_center_crop_sample_records_its_view_box_and_a_squash_sample_none():
    cropped = decode_sample("a.png", _png(WIDTH, HEIGHT), SIZE, resize="center-crop")
    squashed = decode_sample("a.png", _png(WIDTH, HEIGHT), SIZE)

    assert cropped.view_box == pytest.approx(view_box(WIDTH, HEIGHT, SIZE, "center-crop"))
    assert squashed.view_box is None
    assert not np.array_equal(cropped.model_view, squashed.model_view)


def _decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("renderer", ["pillow", "tensor"])
def test_heat_and_peak_stay_in_the_view_box(renderer):
    sample = decode_sample("a.png", _png(WIDTH, HEIGHT), SIZE, resize="center-crop")
    box = sample.view_box
    cam = torch.zeros(2, 2)
    cam[0, 0] = 1.0   # the hottest cell: the view box's top-left quarter, not the image's

    if renderer == "pillow":
        rendered = overlay.render(sample.display, cam, WIDTH, HEIGHT, box=box)
    else:
        rendered = overlay_tensor.render_batch([sample.display], [cam], [(WIDTH, HEIGHT)], torch.device("cpu"),
                                               boxes=[box])[0]

    left, top, right, bottom = box
    assert left <= rendered.peak_x < (left + right) / 2 and top <= rendered.peak_y < (top + bottom) / 2
    image = _decoded(rendered.overlay_jpeg)
    scale = image.shape[1] / WIDTH
    outside = image[:, : int(left * scale) - 2].reshape(-1, 3)
    inside = image[:, int(left * scale) + 2: int(right * scale) - 2].reshape(-1, 3)
    original = _decoded(rendered.original_jpeg)[:, : int(left * scale) - 2].reshape(-1, 3)
    assert np.abs(outside - outside.mean(1, keepdims=True)).max() <= 12           # gray: no heat outside
    assert outside.mean() < original.mean() * 0.6 + 3                             # and dimmed
    assert np.abs(inside - inside.mean(1, keepdims=True)).max() > 40              # heat inside
