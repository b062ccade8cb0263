"""What does the lung-field estimate cost per image? CPU milliseconds of one core, as in scan's
DataLoader workers (one torch thread).

    python benchmarks/bench_lungs.py

Times ``batchcam.decode.lungs.estimate_lung_fields`` on the model's 224 px view of 64 synthetic
films (accepted: the sweep stops at the first level with a pair of lungs), and, when pydicom-data
is installed (the test extra), of its real CR chest film (accepted after more levels) and of its
tibia, CT, MR and ultrasound images (refused: every level is tried). Best of three runs of
``time.process_time``. Prints a markdown table.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from batchcam.decode.dataset import decode_sample
from batchcam.decode.imaging import resize_square
from batchcam.decode.lungs import estimate_lung_fields
from batchcam.synthetic import generate

IMAGE_SIZE = 224
REFUSED_FILMS = ("RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm")


def synthetic_views(count: int = 64) -> list[np.ndarray]:
    return [resize_square(generate(seed, ("NORMAL", "PNEUMONIA")[seed % 2], (700, 800)).image, IMAGE_SIZE)
            for seed in range(count)]


def public_film_views(names: tuple[str, ...]) -> list[np.ndarray] | None:
    """The model views of pydicom-data's files, decoded as scan decodes them; None without the package."""
    try:
        import data_store
    except ImportError:
        return None
    folder = Path(data_store.__file__).parent / "data"
    return [decode_sample(name, (folder / name).read_bytes(), IMAGE_SIZE).model_view for name in names]


def cpu_ms_per_image(views: list[np.ndarray], runs: int = 3) -> float:
    estimate_lung_fields(views[0])    # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for view in views:
            estimate_lung_fields(view)
        best = min(best, (time.process_time() - start) / len(views) * 1000)
    return best


def main() -> None:
    torch.set_num_threads(1)
    cases = [("64 synthetic films", synthetic_views())]
    chest, refused = public_film_views(("RG1_UNCR.dcm",)), public_film_views(REFUSED_FILMS)
    if chest is not None:
        cases += [("pydicom-data RG1, real CR chest film (x16)", chest * 16),
                  ("pydicom-data tibia, CT, MR, US: refused (x4)", refused * 4)]
    print("| images | estimate, CPU ms per image |\n|---|---:|")
    for name, views in cases:
        print(f"| {name} | {cpu_ms_per_image(views):.1f} |")


if __name__ == "__main__":
    main()
