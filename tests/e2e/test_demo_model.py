"""The bundled demo model, checked through the whole scan chain on held-out synthetic images."""
from __future__ import annotations

import numpy as np
from helpers import read_rows

from batchcam.cli import main
from batchcam.model.checkpoint import load_checkpoint
from batchcam.resources import DEMO_MODEL
from batchcam.synthetic import generate

HELD_OUT_SEED = 90_000  # the demo model was trained on seeds 1_000_003 onwards


def test_demo_model_ships_small_and_loads():
    assert DEMO_MODEL.stat().st_size < 25 * 1024 * 1024
    loaded = load_checkpoint(DEMO_MODEL, demo=True)
    assert loaded.spec.class_names == ("NORMAL", "PNEUMONIA") and loaded.spec.image_size == 224


def test_heatmap_peak_points_at_the_opacity_for_most_pneumonia_images(tmp_path):
    """The pointing game: decode, orientation, resize, CAM, upsampling and coordinates all agree.

    A hit is a peak within 5% of the image width of an opacity pixel (the mask, dilated).
    """
    root = tmp_path / "held_out" / "PNEUMONIA"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    masks = {}
    for i in range(12):
        size = (int(rng.integers(512, 900)), int(rng.integers(512, 900)))
        xray = generate(HELD_OUT_SEED + i, "PNEUMONIA", size)
        name = f"p{i:02d}.{'png' if i % 2 else 'jpg'}"
        xray.image.save(root / name)
        masks[f"PNEUMONIA/{name}"] = xray.mask
    out = tmp_path / "report"
    assert main(["scan", str(tmp_path / "held_out"), "--out", str(out), "--workers", "1"]) == 0

    hits = 0
    rows = read_rows(out)
    for row in rows:
        ys, xs = np.nonzero(masks[row["path"]])
        x, y = int(row["cam_peak_x"]), int(row["cam_peak_y"])
        distance = np.sqrt((xs - x) ** 2 + (ys - y) ** 2).min()
        hits += distance <= 0.05 * masks[row["path"]].shape[1]
    assert len(rows) == 12
    assert hits / len(rows) >= 0.8
    assert sum(row["prediction"] == "PNEUMONIA" for row in rows) >= 11
