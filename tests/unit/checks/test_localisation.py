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
