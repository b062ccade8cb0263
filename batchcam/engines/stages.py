"""The stage code every engine and the upload-and-test commands share: model + CAM on a batch,
rows from its results, overlays rendered and written one batch behind the model, decoding loaders.

predict and serve call ``explain_batch`` too, so they explain exactly as a scan does.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from batchcam.cam import overlay as overlays
from batchcam.cam import overlay_tensor
from batchcam.cam.explainer import CamBatch, CamExplainer
from batchcam.checks import attention
from batchcam.config import Measures, ScanConfig
from batchcam.decode.dataset import Sample, ScanDataset, collate_samples
from batchcam.decode.discover import label_for
from batchcam.model.checkpoint import LoadedModel, model_input
from batchcam.records import Row, display_path, overlay_path
from batchcam.report.folder import ReportFolder
from batchcam.runtime.console import Console
from batchcam.runtime.workers import worker_init


def prepared_model(loaded: LoadedModel, device: torch.device, compile: bool = False) -> torch.nn.Module:
    """The model on its device in channels_last (faster convolutions on CPU and GPU), compiled if asked."""
    model = loaded.model.to(device).to(memory_format=torch.channels_last)
    return cast(torch.nn.Module, torch.compile(model)) if compile else model  # a module that compiles on first use


def scan_dataset(files, config: ScanConfig, image_size: int, can_defer=None, resize: str = "squash") -> ScanDataset:
    """The files as samples, read and decoded as the scan's options say, for a model of ``image_size`` and
    ``resize``."""
    return ScanDataset(files, image_size, config.overlay_size, can_defer=can_defer,
                       max_file_bytes=config.max_file_bytes, selection=config.selection, resize=resize)


def decode_loader(dataset: ScanDataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches of decoded samples, decoded by ``workers`` processes tied to this run."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples,
                      pin_memory=pin_memory, worker_init_fn=partial(worker_init, os.getpid()) if workers else None)


def log_decode_warnings(samples: list[Sample], console: Console) -> None:
    for sample in samples:
        for warning in sample.warnings:
            console.log(f"warning: {display_path(sample.relpath)}: {warning}")


def explain_batch(samples: list[Sample], views: torch.Tensor | None, explainer: CamExplainer, loaded: LoadedModel,
                  device: torch.device, settings_key: str = "",
                  measures: Measures = Measures()) -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """Model + CAM on the good samples of a batch (as collated by ``collate_samples``).

    Returns one (row, sample, raw map) per sample in order; the row lacks only the CAM peak, which
    ``overlay.render`` computes. predict and serve call this too, so they explain exactly as scan does.
    ``settings_key`` goes into overlay names, so a changed file or setting never reuses a name.
    ``measures`` (the scan's options that add measurements to a row): ``faithfulness`` adds the drops of
    ``attention.faithfulness`` (two more forward passes).
    """
    cam_batch, x = None, None
    if views is not None:
        x = model_input(views.to(device, non_blocking=True), loaded.spec).contiguous(memory_format=torch.channels_last)
        cam_batch = explainer(x)
    results = batch_rows(samples, cam_batch, loaded, settings_key)
    if measures.faithfulness and cam_batch is not None and x is not None:
        ok = [row for row, _, cam in results if cam is not None]
        drops = attention.faithfulness(explainer.model, x, cam_batch.cams, cam_batch.targets, cam_batch.probabilities,
                                       [attention.seed_of(f"{row.relpath}:{row.sha256}") for row in ok],
                                       explainer.temperature)
        for row, top, random in zip(ok, *drops):
            row.faith_drop_top, row.faith_drop_random = float(top), float(random)
    return results


def batch_rows(samples: list[Sample], cam_batch: CamBatch | None, loaded: LoadedModel,
               settings_key: str = "") -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """One row per sample, in order; ok samples take the next prediction and map in turn."""
    class_names, ood = loaded.spec.class_names, loaded.ood
    distances = ood.distances(cam_batch.features) if ood is not None and cam_batch is not None else None
    results: list[tuple[Row, Sample, torch.Tensor | None]] = []
    ok_index = 0
    for sample in samples:
        row = Row(path=display_path(sample.relpath), status=sample.status, error=sample.error or sample.skip_reason,
                  sha256=sample.sha256, model_sha256=loaded.sha256, relpath=sample.relpath,
                  size=sample.size, mtime_ns=sample.mtime_ns, transient=sample.transient,
                  selection=sample.selection)
        cam = None
        if sample.ok:
            if cam_batch is None:
                raise ValueError(f"{row.path}: an ok sample needs its batch's model results")
            probabilities = cam_batch.probabilities[ok_index]
            predicted = int(probabilities.argmax())
            row.prediction = class_names[predicted]
            row.confidence = float(probabilities[predicted])
            row.probabilities = [float(p) for p in probabilities]
            row.label = label_for(sample.relpath, class_names)
            row.cam_target = class_names[int(cam_batch.targets[ok_index])]
            row.width, row.height = sample.width, sample.height
            row.overlay = overlay_path(sample.relpath, f"{sample.sha256}:{settings_key}")
            cam = cam_batch.cams[ok_index]
            row.attention_outside = attention.attention_outside(cam, sample.lung_fields)
            if ood is not None and distances is not None:
                row.ood_score = float(distances[ok_index])
                row.ood_flag = row.ood_score > ood.threshold
            ok_index += 1
        results.append((row, sample, cam))
    return results


class OverlayStage:
    """Renders and writes overlays on worker threads, one batch behind the model.

    PIL's resize and JPEG encoder and torch's interpolation release the GIL, so this overlaps the
    next batch's forward pass; keeping at most two batches in flight bounds memory. ``render_on``
    (a CUDA device in a CUDA scan): each batch is coloured, blended, shrunk and JPEG-encoded there as
    tensors (``cam.overlay_tensor``) instead of image by image in Pillow on the CPU.
    """

    def __init__(self, report: ReportFolder, threads: int = 2, scale: float | None = None,
                 render_on: torch.device | None = None):
        self.report = report
        self.scale = scale  # None: each map normalised alone; else --heat-scale run's constant
        self.render_on = render_on
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="overlay")
        self.pending: list[tuple[Row, Future[None] | None]] = []

    def __enter__(self) -> "OverlayStage":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

    def submit(self, items: Sequence[tuple[Row, Sample, torch.Tensor | None]]) -> list[Row]:
        """Queue a batch; return the rows of the batch queued before it, now complete."""
        finished = self.drain()
        drawn = [(row, sample, cam) for row, sample, cam in items if cam is not None]
        if self.render_on is not None and drawn:
            batch = self.pool.submit(self._render_batch, drawn, self.render_on)
            self.pending += [(row, None if cam is None else batch) for row, _, cam in items]
            return finished
        for row, sample, cam in items:
            self.pending.append((row, None if cam is None else self.pool.submit(self._render, row, sample, cam)))
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
        self._write(row, overlays.render(display_of(sample), cam, sample.width, sample.height, self.scale,
                                         sample.view_box))

    def _render_batch(self, drawn: list[tuple[Row, Sample, torch.Tensor]], device: torch.device) -> None:
        rendered = overlay_tensor.render_batch([display_of(sample) for _, sample, _ in drawn],
                                               [cam for *_, cam in drawn],
                                               [(sample.width, sample.height) for _, sample, _ in drawn],
                                               device, self.scale, [sample.view_box for _, sample, _ in drawn])
        for (row, _, _), one in zip(drawn, rendered):
            self._write(row, one)

    def _write(self, row: Row, rendered: overlays.RenderedOverlay) -> None:
        self.report.write_overlay(row.overlay, rendered)
        row.cam_peak_x, row.cam_peak_y = rendered.peak_x, rendered.peak_y


def display_of(sample: Sample) -> np.ndarray:
    """The display copy an overlay is drawn on; every explained sample has one."""
    if sample.display is None:
        raise ValueError(f"{display_path(sample.relpath)}: no display copy to draw its overlay on")
    return sample.display
