"""The model view for each declared resize equals torchvision.transforms on the same PIL image, pixel for
pixel; ``squash`` is exactly what a scan's decoder makes today."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from batchcam.decode.dataset import decode_sample
from batchcam.decode.imaging import decode_grayscale, model_view, resize_square, view_box
from batchcam.synthetic import generate


def _png(tmp_path, size) -> bytes:
    path = tmp_path / "x.png"
    generate(7, "PNEUMONIA", size).image.save(path)
    return path.read_bytes()


@pytest.mark.parametrize("size", [(150, 120), (120, 160), (64, 64), (333, 97)])
def test_squash_is_the_scan_decoders_model_view_and_torchvisions_resize(tmp_path, size):
    data = _png(tmp_path, size)
    gray = decode_grayscale(data).gray
    view = model_view(gray, 64, "squash")
    assert np.array_equal(view, resize_square(gray, 64))
    assert np.array_equal(view, decode_sample("x.png", data, 64).model_view)
    with Image.open(tmp_path / "x.png") as image:
        expected = np.asarray(transforms.Resize((64, 64))(image.convert("L")))
    assert np.array_equal(view, expected)


@pytest.mark.parametrize("size", [(150, 120), (120, 160), (64, 64), (333, 97), (40, 50), (73, 200)])
@pytest.mark.parametrize("input_size", [64, 224, 57])
def test_center_crop_is_torchvisions_resize_then_center_crop(tmp_path, size, input_size):
    gray = decode_grayscale(_png(tmp_path, size)).gray
    reference = transforms.Compose([transforms.Resize(round(input_size / 0.875)), transforms.CenterCrop(input_size)])
    expected = np.asarray(reference(gray))
    view = model_view(gray, input_size, "center-crop")
    assert view.shape == (input_size, input_size) and view.dtype == np.uint8
    assert np.array_equal(view, expected)


def test_an_unknown_resize_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="squash, center-crop"):
        model_view(Image.new("L", (10, 10)), 8, "letterbox")


def test_view_box_is_the_part_of_the_image_the_model_sees():
    assert view_box(300, 200, 224, "squash") == (0.0, 0.0, 300.0, 200.0)
    left, top, right, bottom = view_box(300, 200, 224, "center-crop")
    # shorter side 200 -> 256 (scale 1.28), longer 300 -> 384; the 224 crop starts at (80, 16) there
    assert (left, top, right, bottom) == pytest.approx((80 / 1.28, 16 / 1.28, 304 / 1.28, 240 / 1.28))
