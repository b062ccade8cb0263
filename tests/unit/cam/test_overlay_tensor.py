"""The tensor renderer (a CUDA scan's overlays) against Pillow's, on the CPU: the same pixels
within a few grey levels, the same sizes and peaks."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from batchcam.cam import overlay, overlay_tensor
from batchcam.synthetic import generate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def xray_display(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(generate(seed, "PNEUMONIA", size).image.convert("L"), dtype=np.uint8)


def pillow_overlay(display: np.ndarray, cam: torch.Tensor, scale: float | None = None) -> np.ndarray:
    colour = overlay.heat_levels(cam, *display.shape, scale)
    colour.putpalette(overlay.JET_LUT.tobytes())
    return np.asarray(Image.blend(colour.convert("RGB"), Image.fromarray(display).convert("RGB"),
                                  overlay.IMAGE_WEIGHT), dtype=np.int32)


@pytest.mark.parametrize("scale", [None, 0.02])
def test_blending_equals_pillows_to_a_heat_level_at_most(scale):
    """A heat level one off where float rounding differs moves jet by up to 4 levels x 0.45: 2 grey levels."""
    torch.manual_seed(0)
    for size in ((512, 400), (300, 512), (257, 31)):
        display, cam = xray_display(3, size), torch.rand(7, 7) * 0.03
        tensor = overlay_tensor.blended(torch.from_numpy(display.copy()), cam, scale).permute(1, 2, 0).numpy()
        assert tensor.shape == (size[1], size[0], 3)
        difference = np.abs(tensor.astype(np.int32) - pillow_overlay(display, cam, scale))
        assert difference.max() <= 2
        assert (difference > 0).mean() < 0.01


def test_thumbnail_sizes_are_pillows():
    for size in ((512, 400), (400, 512), (512, 512), (512, 37), (37, 512), (200, 100), (257, 256), (511, 3)):
        image = Image.new("L", size)
        image.thumbnail((overlay.THUMB_MAX_SIDE, overlay.THUMB_MAX_SIDE))
        assert overlay_tensor.thumbnail_size(*size) == image.size, size


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int32)


def assert_renders_agree(device: torch.device) -> None:
    torch.manual_seed(1)
    displays = [xray_display(seed, size) for seed, size in ((5, (512, 420)), (6, (380, 512)))]
    cams = [torch.rand(7, 7), torch.rand(7, 7)]
    sizes = [(1400, 1148), (1040, 1400)]
    batch = overlay_tensor.render_batch(displays, cams, sizes, device)
    for display, cam, size, tensor in zip(displays, cams, sizes, batch):
        pillow = overlay.render(display, cam, *size)
        assert (tensor.peak_x, tensor.peak_y) == (pillow.peak_x, pillow.peak_y)
        for ours, theirs in ((tensor.overlay_jpeg, pillow.overlay_jpeg), (tensor.thumb_jpeg, pillow.thumb_jpeg),
                             (tensor.original_jpeg, pillow.original_jpeg)):
            a, b = decoded(ours), decoded(theirs)
            assert a.shape == b.shape
            assert np.abs(a - b).mean() < 1.5
            assert np.percentile(np.abs(a - b), 99) <= 8


def test_a_batch_renders_like_pillow_on_the_cpu():
    assert_renders_agree(torch.device("cpu"))


@cuda
def test_a_batch_renders_like_pillow_on_the_gpu():
    assert_renders_agree(torch.device("cuda"))
