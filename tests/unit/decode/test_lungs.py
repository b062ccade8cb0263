"""The lung-field estimate behind attention_outside: right on synthetic films and on a real CR chest
film, refused (with a reason) on anything that is not a frontal chest film."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchcam.decode.dataset import decode_sample
from batchcam.decode.imaging import resize_square
from batchcam.decode.lungs import LUNG_GRID, convex_hull_mask, estimate_lung_fields, exposed_field, region_labels
from batchcam.synthetic import generate

MODEL_VIEW = 224


def pooled(mask: np.ndarray) -> np.ndarray:
    """A full-resolution mask on the estimate's grid (cells at least half covered)."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (torch.nn.functional.adaptive_avg_pool2d(tensor, LUNG_GRID)[0, 0] > 0.5).numpy()


def at(fields: np.ndarray, x: float, y: float) -> bool:
    """The estimate at a point given as shares of the image's width and height."""
    return bool(fields[int(y * LUNG_GRID), int(x * LUNG_GRID)])


def decoded(path):
    sample = decode_sample(path.name, path.read_bytes(), MODEL_VIEW)
    assert sample.ok, sample.error
    return sample


@pytest.mark.parametrize("label", ["NORMAL", "PNEUMONIA"])
def test_the_grown_fields_cover_the_true_lungs_and_little_else(label):
    for seed in range(70_000, 70_008):
        xray = generate(seed, label, (500 + 40 * (seed % 5), 640))
        fields = estimate_lung_fields(resize_square(xray.image, MODEL_VIEW)).fields
        assert fields is not None
        lungs = pooled(xray.lungs)
        assert (fields & lungs).sum() >= 0.9 * lungs.sum()         # consolidations stay inside
        assert fields.mean() < 0.6 and not fields[0].any() and not fields[:, 0].any()


def test_the_spine_between_the_synthetic_lungs_stays_outside():
    xray = generate(70_100, "NORMAL", (560, 640))
    fields = estimate_lung_fields(resize_square(xray.image, MODEL_VIEW)).fields
    spine_column = int(np.argmax(np.asarray(xray.image, dtype=np.float32)[xray.image.height // 2]))
    x = spine_column / xray.image.width
    assert not at(fields, x, 0.4) and not at(fields, x, 0.5)


# A reference drawn on RG1 (pydicom-data's CR chest PA film, 1841 x 1955, MONOCHROME1): points as
# shares of the width and height, read off the film's display.
RG1_LUNGS = [(0.27, 0.22), (0.25, 0.40), (0.22, 0.55),       # the film's left half: the right lung
             (0.70, 0.22), (0.73, 0.42), (0.75, 0.60)]       # the left lung
RG1_NOT_LUNGS = {
    "spine and mediastinum": [(0.48, 0.25), (0.48, 0.45), (0.50, 0.60)],
    "shoulders": [(0.03, 0.15), (0.97, 0.15)],
    "collimation border": [(0.50, 0.005), (0.25, 0.005), (0.75, 0.005)],
    "air above the shoulders": [(0.04, 0.03), (0.96, 0.03)],
    "abdomen below the diaphragm": [(0.25, 0.88), (0.50, 0.85), (0.75, 0.92)],
}


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_the_real_chest_film_has_both_lungs_and_nothing_else(public_dicom, name):
    fields = estimate_lung_fields(decoded(public_dicom(name)).model_view).fields
    assert fields is not None
    assert all(at(fields, x, y) for x, y in RG1_LUNGS)
    for place, points in RG1_NOT_LUNGS.items():
        assert not any(at(fields, x, y) for x, y in points), place
    assert 0.25 < fields.mean() < 0.6


def test_the_real_chest_film_keeps_its_lungs_inside_a_collimator_frame(public_dicom):
    from PIL import Image

    view = decoded(public_dicom("RG1_UNCR.dcm")).model_view
    framed = np.full((280, 280), 250, dtype=np.uint8)      # an even white band, as a collimator leaves
    framed[28:252, 28:252] = view
    fields = estimate_lung_fields(resize_square(Image.fromarray(framed), MODEL_VIEW)).fields
    assert fields is not None
    inner = lambda x, y: (0.1 + 0.8 * x, 0.1 + 0.8 * y)    # noqa: E731 - the film's points in the frame
    assert all(at(fields, *inner(x, y)) for x, y in RG1_LUNGS)
    assert not any(at(fields, *inner(x, y)) for points in RG1_NOT_LUNGS.values() for x, y in points)
    assert not fields[:4].any() and not fields[-4:].any() and not fields[:, :4].any() and not fields[:, -4:].any()


@pytest.mark.parametrize("name", [
    "RG3_UNCR.dcm", "RG3_J2KR.dcm",                 # a CR tibia: bone between two dark strips of air
    "693_UNCR.dcm",                                 # a CT slice of the head
    "MR2_UNCR.dcm",                                 # an MR shoulder
    "US1_UNCR.dcm", "color-pl.dcm",                 # ultrasound frames, text burnt in
    "JPEG-LL.dcm",                                  # a nuclear-medicine whole-body scan
    "mlut_18.dcm",                                  # a test pattern
])
def test_a_film_that_is_not_a_frontal_chest_film_is_refused_with_a_reason(public_dicom, name):
    sample = decoded(public_dicom(name))
    estimate = estimate_lung_fields(sample.model_view)
    assert estimate.fields is None and estimate.refusal.startswith("no lung fields: ")
    assert sample.lung_fields is None
    assert sample.warnings[-1] == f"attention_outside left empty: {estimate.refusal}"


def test_the_real_chest_film_upside_down_or_inverted_is_refused(public_dicom):
    view = decoded(public_dicom("RG1_UNCR.dcm")).model_view
    assert estimate_lung_fields(view[::-1].copy()).fields is None
    assert estimate_lung_fields(255 - view).fields is None


def test_blank_noise_and_gradients_are_refused():
    rng = np.random.default_rng(0)
    blank = estimate_lung_fields(np.full((224, 224), 128, dtype=np.uint8))
    assert blank.fields is None and "too little contrast" in blank.refusal
    assert estimate_lung_fields(rng.integers(0, 256, (224, 224), dtype=np.uint8)).fields is None
    gradient = np.tile(np.linspace(0, 255, 224, dtype=np.float32), (224, 1)).astype(np.uint8)
    assert estimate_lung_fields(gradient).fields is None
    assert estimate_lung_fields(gradient.T.copy()).fields is None


def test_a_synthetic_film_decoded_from_a_file_carries_its_fields_and_no_warning(tmp_path):
    path = tmp_path / "film.png"
    generate(70_200, "PNEUMONIA", (520, 600)).image.save(path)
    sample = decode_sample(path.name, path.read_bytes(), MODEL_VIEW)
    assert sample.lung_fields is not None and sample.warnings == ()


def test_the_exposed_field_drops_even_border_bands_only():
    pixels = np.full((100, 120), 240, dtype=np.float32)
    pixels[10:90, 20:110] = np.random.default_rng(0).integers(0, 200, (80, 90))
    assert exposed_field(pixels, flat=20) == (10, 90, 20, 110)
    assert exposed_field(pixels[10:90, 20:110], flat=20) == (0, 80, 0, 90)


def test_the_convex_hull_fills_a_bite_out_of_a_region():
    region = np.zeros((12, 12), dtype=bool)
    region[2:10, 2:10] = True
    region[4:8, 6:10] = False        # a bite from the right side, as a bright consolidation makes
    hull = convex_hull_mask(region)
    assert hull[2:10, 2:10].all() and hull.sum() == 64


def test_regions_are_four_connected_and_numbered_in_reading_order():
    mask = np.array([[0, 0, 0, 1],
                     [1, 1, 0, 1],
                     [0, 0, 1, 0],    # touches the first region only at a corner: a region of its own
                     [1, 0, 1, 1]], dtype=bool)
    assert region_labels(mask).tolist() == [[0, 0, 0, 1],
                                            [2, 2, 0, 1],
                                            [0, 0, 3, 0],
                                            [4, 0, 3, 3]]
