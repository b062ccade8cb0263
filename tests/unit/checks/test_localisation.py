"""checks.localisation: the pointing game and the heat inside the boxes, row by row."""
from __future__ import annotations

import numpy as np
import pytest

from batchcam.checks.localisation import Boxes, localisation
from batchcam.records import Row

BOXES = Boxes("generic", {"a.png": [(0.0, 0.0, 64.0, 64.0)]})
CAMS = {"a.png": np.arange(49, dtype=np.float32).reshape(7, 7)}


def test_a_row_with_its_size_gets_the_heat_inside_its_boxes():
    row = Row(path="a.png", status="ok", cam_peak_x=60, cam_peak_y=60, width=64, height=64)
    result = localisation([row], BOXES, CAMS, "boxes.csv")
    assert result["pointing_game"] == {"hits": 1, "hit_rate": 1.0}
    assert result["images"][0]["energy_inside"] == pytest.approx(1.0)
    assert result["energy_inside"]["n"] == 1


def test_a_row_without_its_image_size_plays_the_pointing_game_and_leaves_the_energy_empty():
    """A row whose width and height are unknown (a hand-edited row store) crashed the energy measure."""
    row = Row(path="a.png", status="ok", cam_peak_x=60, cam_peak_y=60)
    result = localisation([row], BOXES, CAMS, "boxes.csv")
    assert result["pointing_game"] == {"hits": 1, "hit_rate": 1.0}
    assert result["images"][0]["energy_inside"] is None
    assert result["energy_inside"]["n"] == 0 and result["energy_inside"]["mean"] is None


# A center-crop model's map covers its view, the centred square of a wide film: 200 x 100 at 64 px is resized
# to 146 x 73 and cropped at (41, 4), so the view is x 56.2..143.8, y 5.5..93.2 of the film.
WIDE = Row(path="wide.png", status="ok", cam_peak_x=100, cam_peak_y=50, width=200, height=100)
WIDE_MAP = {"wide.png": np.pad(np.ones((7, 3), dtype=np.float32), ((0, 0), (0, 4)))}    # heat in its left 3/7
CENTER_CROP = {"image_size": 64, "resize": "center-crop"}


def test_the_heat_of_a_center_crop_model_lies_in_its_view_not_spread_over_the_whole_film():
    left_of_view = Boxes("generic", {"wide.png": [(0.0, 0.0, 56.0, 100.0)]})
    result = localisation([WIDE], left_of_view, WIDE_MAP, "boxes.csv", preprocessing=CENTER_CROP)
    assert result["images"][0]["energy_inside"] == 0.0     # the model never saw that strip: no heat there

    view_left_half = Boxes("generic", {"wide.png": [(56.2, 0.0, 100.0, 100.0)]})
    result = localisation([WIDE], view_left_half, WIDE_MAP, "boxes.csv", preprocessing=CENTER_CROP)
    assert result["images"][0]["energy_inside"] == pytest.approx(1.0, abs=0.02)


def test_a_squash_model_spreads_its_map_over_the_whole_film():
    left_strip = Boxes("generic", {"wide.png": [(0.0, 0.0, 56.0, 100.0)]})
    result = localisation([WIDE], left_strip, WIDE_MAP, "boxes.csv", preprocessing={"image_size": 64,
                                                                                     "resize": "squash"})
    assert result["images"][0]["energy_inside"] > 0.5
