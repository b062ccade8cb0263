"""How long the gallery takes to render for a large run (the issue asks for seconds, not minutes).

    python benchmarks/gallery_bench.py [--rows 50000] [--page-size 100]

Builds synthetic rows (labelled, a few errors, some hostile names) in memory and times
``render_gallery`` alone: no model, no images, nothing written. Prints the seconds, the number of
files and their total size.
"""
from __future__ import annotations

import argparse
import random
import time

from batchcam.config import DEFAULT_PAGE_SIZE
from batchcam.records import Row, overlay_path
from batchcam.report.gallery import render_gallery
from batchcam.report.summary import scan_metrics

CLASS_NAMES = ("NORMAL", "PNEUMONIA")


def synthetic_rows(count: int, seed: int = 0) -> list[Row]:
    """Rows like a real scan's: mostly ok, 1% errors, labels from the folder, sorted by path."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = CLASS_NAMES[i % 2]
        path = f"{label}/patient{i // 3:06d}/view {i % 3} <#{i}>.png"
        if rng.random() < 0.01:
            rows.append(Row(path=path, status="error", error="cannot decode image: truncated <PNG> & more"))
            continue
        p_pneumonia = min(1.0, max(0.0, rng.gauss(0.75 if label == "PNEUMONIA" else 0.25, 0.2)))
        probabilities = [1 - p_pneumonia, p_pneumonia]
        predicted = int(p_pneumonia >= 0.5)
        rows.append(Row(path=path, status="ok", prediction=CLASS_NAMES[predicted],
                        confidence=probabilities[predicted], probabilities=probabilities, label=label,
                        cam_target=CLASS_NAMES[predicted], overlay=overlay_path(path), width=2048, height=1536))
    return sorted(rows, key=lambda row: row.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    args = parser.parse_args()
    rows = synthetic_rows(args.rows)
    metrics = scan_metrics(rows, CLASS_NAMES)
    manifest = {"root": "/data/xrays", "finished_at": "2026-11-25T02:03:10+00:00", "batchcam_version": "bench",
                "model": {"name": "model.pt", "demo": False}, "cam": {"method": "gradcam", "target_layer": "layer4"}}
    render_gallery(rows[:10], CLASS_NAMES, manifest, metrics, args.page_size)   # load the templates first
    started = time.perf_counter()
    files = render_gallery(rows, CLASS_NAMES, manifest, metrics, args.page_size)
    seconds = time.perf_counter() - started
    size_mb = sum(len(text.encode("utf-8")) for text in files.values()) / 1e6
    print(f"render_gallery: {args.rows} rows, page size {args.page_size}: {seconds:.2f} s, "
          f"{len(files)} files, {size_mb:.1f} MB")


if __name__ == "__main__":
    main()
