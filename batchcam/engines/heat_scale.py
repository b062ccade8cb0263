"""``scan --heat-scale run``: one run-wide scale for every heatmap, and the second pass it needs."""
from __future__ import annotations

import numpy as np
import torch

from batchcam.engines.job import ScanJob
from batchcam.engines.stages import OverlayStage, decode_loader, scan_dataset
from batchcam.records import Row, overlay_path
from batchcam.report.store import PlannedFile

RUN_SCALE_PERCENTILE = 99.0


def run_heat_scale(maps: list[np.ndarray]) -> float:
    """``--heat-scale run``'s constant: the 99th percentile of every raw map cell of the run.

    A percentile rather than the maximum, so one outlier map does not make every other one cold;
    maps above it saturate at the hottest colour.
    """
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps]) if maps else np.zeros(1)
    return float(max(np.percentile(values, RUN_SCALE_PERCENTILE), np.finfo(np.float32).tiny))


def rescale_overlays(rows: list[Row], files: list[PlannedFile], cams: dict[str, np.ndarray], job: ScanJob) -> float:
    """The second pass of ``--heat-scale run``: the constant is known only once every map is, so
    every ok row's overlay is rendered again from its re-decoded image at that one scale.

    Every ok row, reused ones too: the constant moves with the run. The new overlays get names of
    their own (the scale is part of them, announced in the journal first), so the previous report's
    pages keep showing their own overlays until the new CSV and gallery replace them. A file that
    changed since the first pass keeps its per-image overlay (logged); the next run redoes it.
    """
    config, report, console = job.config, job.report, job.console
    scale = run_heat_scale([cams[row.path] for row in rows if row.ok and row.path in cams])
    by_relpath = {planned.relpath: planned for planned in files}
    todo = {row.relpath: row for row in rows if row.ok and row.path in cams and row.relpath in by_relpath}
    dataset = scan_dataset([by_relpath[relpath] for relpath in todo], config, job.loaded.spec.image_size,
                           resize=job.loaded.spec.resize)
    console.info(f"heat scale for the run: {scale:.6g} (99th percentile of raw map values); re-rendering "
                 f"{len(todo)} overlays")
    with OverlayStage(report, scale=scale) as stage:
        for samples, _ in decode_loader(dataset, config.batch_size, config.workers):
            batch = []
            for sample in samples:
                row = todo[sample.relpath]
                if not sample.ok or sample.sha256 != row.sha256:
                    console.log(f"warning: {row.path}: changed during the run; its overlay keeps its own scale")
                    continue
                row.overlay = overlay_path(row.relpath, f"{row.sha256}:{job.settings_key}:run scale {scale:.9g}")
                batch.append((row, sample, torch.from_numpy(np.asarray(cams[row.path], dtype=np.float32))))
            job.store.announce(name for row, _, _ in batch for name in (row.overlay, row.thumb, row.original))
            stage.submit(batch)
        stage.drain()
    return scale
