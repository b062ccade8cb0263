"""The local engine: decoding in DataLoader worker processes, the model in this process, overlay
rendering and writing on a small thread pool one batch behind it, each batch journaled once its
overlays are on disk."""
from __future__ import annotations

import numpy as np

from batchcam.decode import gpu_decode
from batchcam.engines.job import ScanJob
from batchcam.engines.stages import OverlayStage, decode_loader, explain_batch, log_decode_warnings, scan_dataset
from batchcam.records import Row
from batchcam.report.store import PlannedFile
from batchcam.runtime.interrupt import InterruptGuard


def render_device(job: ScanJob):
    """Where overlays are drawn: on the GPU in a CUDA scan (as tensors, a batch at a time), else Pillow."""
    return job.device if job.device.type == "cuda" else None


def process(files: list[PlannedFile], job: ScanJob) -> tuple[list[Row], dict[str, np.ndarray]]:
    """Decode, explain and render ``files``, journaling each batch once its overlays are written.

    Returns the rows and, when the job keeps them, the raw maps by row path.
    """
    rows: list[Row] = []
    cams: dict[str, np.ndarray] = {}
    if not files:
        return rows, cams
    config, image_size = job.config, job.loaded.spec.image_size
    on_gpu = config.decode == "gpu"
    dataset = scan_dataset(files, config, image_size, can_defer=gpu_decode.can_defer if on_gpu else None,
                           resize=job.loaded.spec.resize)
    loader = decode_loader(dataset, config.batch_size, config.workers, pin_memory=job.device.type == "cuda")
    decode_deferred = (gpu_decode.BatchedJpegDecoder(job.device, image_size, config.overlay_size,
                                                     dataset.decode_deferred) if on_gpu else None)

    def keep(finished: list[Row]) -> None:
        job.store.append(finished)
        rows.extend(finished)

    with InterruptGuard() as guard, job.cam_explainer, OverlayStage(job.report, render_on=render_device(job)) as stage:
        for samples, views in job.console.progress(loader, len(dataset), lambda batch: len(batch[0])):
            if decode_deferred is not None:
                samples, views = decode_deferred(samples)
            results = explain_batch(samples, views, job.cam_explainer, job.loaded, job.device,
                                    settings_key=job.settings_key, measures=config.measures)
            log_decode_warnings(samples, job.console)
            job.store.announce(name for row, _, cam in results if cam is not None
                               for name in (row.overlay, row.thumb, row.original))
            keep(stage.submit(results))
            if config.keeps_cams:
                cams.update((row.path, cam.numpy()) for row, _, cam in results if cam is not None)
            if guard.requested:
                break
        keep(stage.drain())
    guard.check()  # stopped by a signal: Interrupted, once the finished batches are journaled
    return rows, cams
