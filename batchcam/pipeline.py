"""The one place the stages are wired together:

    discover -> decode (ScanDataset in DataLoader workers) -> model + CAM -> overlay -> writers

Decoding runs in DataLoader worker processes and overlay rendering/encoding in a thread pool,
both overlapping the model, which runs in the main process.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from batchcam import overlay as overlays
from batchcam.cam import TARGET_LAYER, CamBatch, CamEngine
from batchcam.config import ScanConfig, UsageError, resolve_device, resolve_target
from batchcam.console import Console
from batchcam.dataset import Sample, ScanDataset, collate_samples
from batchcam.discover import IMAGE_EXTENSIONS, discover
from batchcam.gallery import render_gallery
from batchcam.model import LoadedModel, load_checkpoint, normalize
from batchcam.report import ReportFolder, label_for, manifest, now_iso, scan_metrics
from batchcam.resources import DEMO_MODEL, DEMO_NOTICE
from batchcam.rows import Row, overlay_path


@dataclass
class ScanResult:
    report: Path
    rows: list[Row]
    counts: dict
    seconds: float

    @property
    def summary_line(self) -> str:
        c = self.counts
        rate = c["processed"] / self.seconds if self.seconds > 0 else 0.0
        return (f"batchcam: {c['found']} found, {c['ok']} ok, {c['error']} error, "
                f"{self.seconds:.1f} s, {rate:.1f} images/s -> {self.report}")


def load_model(path: Path | None, console: Console) -> LoadedModel:
    if path is None:
        console.warn(DEMO_NOTICE.removeprefix("batchcam: "))
        return load_checkpoint(DEMO_MODEL, demo=True)
    return load_checkpoint(path)


def scan(config: ScanConfig, console: Console) -> ScanResult:
    """Run a whole scan; raises UsageError or CheckpointError before REPORT is touched."""
    started, started_at = time.monotonic(), now_iso()
    config.validate()
    device = resolve_device(config.device)
    discovery = discover(config.root, exclude=config.out)
    for problem in discovery.problems:
        console.warn(problem)
    if not discovery.candidates:
        raise UsageError(f"no image files under {config.root} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, case-insensitive, hidden files skipped)")
    loaded = load_model(config.model, console)
    target = resolve_target(config.target, loaded.spec.class_names)
    model = loaded.model.to(device).to(memory_format=torch.channels_last)

    report = ReportFolder(config.out)
    report.prepare()
    console.info(f"scanning {len(discovery.candidates)} images under {config.root} on {device}")
    dataset = ScanDataset(discovery.candidates, loaded.spec.image_size)
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers,
                        collate_fn=collate_samples, pin_memory=device.type == "cuda")
    rows: list[Row] = []
    raw_cams: dict[str, np.ndarray] = {}
    with CamEngine(model, config.cam, target) as engine, OverlayStage(report) as stage:
        for samples, views in console.progress(loader, len(dataset), lambda batch: len(batch[0])):
            results = explain_batch(samples, views, engine, loaded, device)
            rows.extend(stage.submit(results))
            if config.save_cams:
                raw_cams.update((row.path, cam.numpy()) for row, _, cam in results if cam is not None)
        rows.extend(stage.drain())

    rows.sort(key=lambda row: row.path)
    counts = {"found": len(discovery.candidates), "processed": len(rows), "reused": 0,
              "ok": sum(row.ok for row in rows), "error": sum(not row.ok for row in rows)}
    seconds = time.monotonic() - started
    cam_info = {"method": config.cam, "target_layer": TARGET_LAYER, "target": config.target,
                "exact_fast_path": engine.exact}
    report_manifest = manifest(root=config.root, argv=config.argv, loaded=loaded, cam=cam_info,
                               device=str(device), counts=counts, started_at=started_at,
                               finished_at=now_iso(), seconds=seconds)
    metrics = scan_metrics(rows, loaded.spec.class_names)
    report.write_csv(rows, loaded.spec.class_names)
    report.write_json("manifest.json", report_manifest)
    if metrics is not None:
        report.write_json("metrics.json", metrics)
    else:
        report.remove("metrics.json")
    if config.save_cams:
        report.write_cams(raw_cams)
    report.write_gallery(render_gallery(rows, loaded.spec.class_names, report_manifest, metrics))
    return ScanResult(report=config.out, rows=rows, counts=counts, seconds=seconds)


def explain_batch(samples: list[Sample], views: torch.Tensor | None, engine: CamEngine, loaded: LoadedModel,
                  device: torch.device) -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """Model + CAM on the good samples of a batch (as collated by ``collate_samples``).

    Returns one (row, sample, raw map) per sample in order; the row lacks only the CAM peak, which
    ``overlay.render`` computes. predict and serve call this too, so they explain exactly as scan does.
    """
    cam_batch = None
    if views is not None:
        x = normalize(views.to(device, non_blocking=True), loaded.spec).contiguous(memory_format=torch.channels_last)
        cam_batch = engine(x)
    return batch_rows(samples, cam_batch, loaded)


def batch_rows(samples: list[Sample], cam_batch: CamBatch | None,
               loaded: LoadedModel) -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """One row per sample, in order; ok samples take the next prediction and map in turn."""
    class_names = loaded.spec.class_names
    results = []
    ok_index = 0
    for sample in samples:
        row = Row(path=sample.relpath, status="ok" if sample.ok else "error", error=sample.error,
                  sha256=sample.sha256, model_sha256=loaded.sha256)
        cam = None
        if sample.ok:
            probabilities = cam_batch.probabilities[ok_index]
            predicted = int(probabilities.argmax())
            row.prediction = class_names[predicted]
            row.confidence = float(probabilities[predicted])
            row.probabilities = [float(p) for p in probabilities]
            row.label = label_for(sample.relpath, class_names)
            row.cam_target = class_names[int(cam_batch.targets[ok_index])]
            row.width, row.height = sample.width, sample.height
            row.overlay = overlay_path(sample.relpath)
            cam = cam_batch.cams[ok_index]
            ok_index += 1
        results.append((row, sample, cam))
    return results


class OverlayStage:
    """Renders and writes overlays on worker threads, one batch behind the model.

    PIL's resize and JPEG encoder and torch's interpolation release the GIL, so this overlaps the
    next batch's forward pass; keeping at most two batches in flight bounds memory.
    """

    def __init__(self, report: ReportFolder, threads: int = 2):
        self.report = report
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="overlay")
        self.pending: list[tuple[Row, Future | None]] = []

    def __enter__(self) -> "OverlayStage":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def submit(self, items: list[tuple[Row, Sample, torch.Tensor | None]]) -> list[Row]:
        """Queue a batch; return the rows of the batch queued before it, now complete."""
        finished = self.drain()
        for row, sample, cam in items:
            future = None if cam is None else self.pool.submit(self._render, row, sample, cam)
            self.pending.append((row, future))
        return finished

    def drain(self) -> list[Row]:
        done = []
        for row, future in self.pending:
            if future is not None:
                future.result()
            done.append(row)
        self.pending = []
        return done

    def _render(self, row: Row, sample: Sample, cam: torch.Tensor) -> None:
        rendered = overlays.render(sample.display, cam, sample.width, sample.height)
        self.report.write_overlay(row.overlay, rendered)
        row.cam_peak_x, row.cam_peak_y = rendered.peak_x, rendered.peak_y
