"""The one place the stages are wired together:

    discover -> plan (reuse unchanged rows) -> decode (ScanDataset in DataLoader workers)
             -> model + CAM -> overlay -> journal -> writers (CSV, manifest, gallery)

Decoding runs in DataLoader worker processes and overlay rendering/encoding in a thread pool,
both overlapping the model, which runs in the main process.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from batchcam import attention, gpu_decode
from batchcam import overlay as overlays
from batchcam.cam import TARGET_LAYER, CamBatch, CamEngine
from batchcam.config import ScanConfig, UsageError, resolve_device, resolve_precision, resolve_target
from batchcam.console import Console
from batchcam.dataset import Sample, ScanDataset, collate_samples, worker_init
from batchcam.discover import IMAGE_EXTENSIONS, discover
from batchcam.gallery import render_gallery
from batchcam.interrupt import InterruptGuard, Interrupted
from batchcam.lock import ReportLock
from batchcam.model import CheckpointError, LoadedModel, load_checkpoint, normalize
from batchcam.report import ReportFolder, ReportWriteError, label_for, manifest, now_iso, open_log, scan_metrics
from batchcam.state import PlannedFile, RowStore, Settings, make_plan, stat_candidates
from batchcam.resources import DEMO_MODEL, DEMO_NOTICE
from batchcam.rows import Row, display_path, overlay_path


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
    """Run a whole scan.

    Raises UsageError or CheckpointError leaving REPORT as it was, ReportLocked when another run
    holds REPORT, ReportWriteError when REPORT cannot be written, Interrupted after a signal.
    """
    started, started_at = time.monotonic(), now_iso()
    config.validate()
    device = resolve_device(config.device)
    lock = ReportLock(config.out, root=config.root)
    try:
        with lock:  # first, so a second run on this REPORT is refused at once
            try:
                files = discover_files(config, console)
                loaded = load_model(config.model, console)
                target = resolve_target(config.target, loaded.spec.class_names)
            except (UsageError, CheckpointError):
                lock.forget_new_report()
                raise
            settings = Settings(model_sha256=loaded.sha256, cam=config.cam, target=config.target,
                                target_layer=TARGET_LAYER, image_size=loaded.spec.image_size, mean=loaded.spec.mean,
                                std=loaded.spec.std, faithfulness=config.faithfulness, heat_scale=config.heat_scale,
                                precision=precision_name(resolve_precision(config.precision, device)),
                                decode=config.decode, overlay_size=config.overlay_size)
            console.attach_log(lambda: open_log(config.out))
            console.log(f"run started: batchcam {' '.join(config.argv)}")
            return scan_locked(config, console, files, loaded, target, settings, device, started, started_at)
    except OSError as e:
        if e.filename and not _inside(Path(e.filename), config.out):
            raise  # not a write into REPORT (a broken installation, say): a real internal failure
        raise ReportWriteError(f"cannot write the report in {config.out}: {e.strerror or e}"
                               f"{f' ({e.filename})' if e.filename else ''}; the previous report is unchanged") from None
    finally:
        console.close()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def discover_files(config: ScanConfig, console: Console) -> list[PlannedFile]:
    discovery = discover(config.root, exclude=config.out)
    for problem in discovery.problems:
        console.warn(problem)
    if not discovery.candidates:
        raise UsageError(f"no image files under {config.root} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, case-insensitive, hidden files skipped)")
    return stat_candidates(discovery.candidates)


def scan_locked(config: ScanConfig, console: Console, files: list[PlannedFile], loaded: LoadedModel,
                target: int | None, settings: Settings, device: torch.device, started: float,
                started_at: str) -> ScanResult:
    report = ReportFolder(config.out)
    try:
        return write_scan(report, config, console, files, loaded, target, settings, device, started, started_at)
    finally:
        report.close()


def write_scan(report: ReportFolder, config: ScanConfig, console: Console, files: list[PlannedFile],
               loaded: LoadedModel, target: int | None, settings: Settings, device: torch.device, started: float,
               started_at: str) -> ScanResult:
    report.prepare()
    previous_cams = report.read_cams() if config.keeps_cams else {}
    with RowStore(report.state(), settings.key) as store:
        plan = make_plan(files, store.load(), full=config.full,
                         row_is_complete=lambda row: report.has_overlays(row)
                         and (not config.keeps_cams or not row.ok or row.path in previous_cams))
        console.info(f"scanning {len(files)} images under {config.root} on {device}: "
                     f"{len(plan.process)} to process, {len(plan.reuse)} unchanged")
        engine = CamEngine(prepared_model(loaded, config, device), config.cam, target,
                           autocast=resolve_precision(config.precision, device))
        run = process
        if config.engine == "ray":
            from batchcam import ray_engine  # Ray is imported only when asked for
            run = ray_engine.process
        processed, new_cams = run(plan.process, config, engine, loaded, device, settings, report, store, console)
        rows = sorted(plan.reuse + processed, key=lambda row: row.path)
        counts = {"found": len(files), "processed": len(processed), "reused": len(plan.reuse),
                  "ok": sum(row.ok for row in rows), "error": sum(not row.ok for row in rows)}
        seconds = time.monotonic() - started
        cam_info = {"method": config.cam, "target_layer": TARGET_LAYER, "target": config.target,
                    "exact_fast_path": engine.exact, "heat_scale": config.heat_scale}
        if config.heat_scale == "run":
            cam_info["run_scale"] = rescale_overlays(rows, files, {**previous_cams, **new_cams}, config, loaded,
                                                     report, console)
        report_manifest = manifest(root=config.root, argv=config.argv, loaded=loaded, cam=cam_info,
                                   device=str(device), counts=counts, started_at=started_at,
                                   finished_at=now_iso(), seconds=seconds)
        write_report(report, rows, loaded, report_manifest,
                     cams={**previous_cams, **new_cams} if config.keeps_cams else None, page_size=config.page_size)
        report.remove_unreferenced_overlays(rows, store.written_overlays())
        store.commit(rows)
    report_errors(rows, processed, console)
    return ScanResult(report=config.out, rows=rows, counts=counts, seconds=seconds)


def prepared_model(loaded: LoadedModel, config: ScanConfig, device: torch.device) -> torch.nn.Module:
    """The model on its device in channels_last (faster convolutions on CPU and GPU), compiled if asked."""
    model = loaded.model.to(device).to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def precision_name(autocast: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]


def process(files: list[PlannedFile], config: ScanConfig, engine: CamEngine, loaded: LoadedModel,
            device: torch.device, settings: Settings, report: ReportFolder, store: RowStore,
            console: Console) -> tuple[list[Row], dict[str, np.ndarray]]:
    """Decode, explain and render ``files``, journaling each batch once its overlays are written."""
    rows: list[Row] = []
    cams: dict[str, np.ndarray] = {}
    if not files:
        return rows, cams
    batched_decoding = config.decode == "gpu"
    dataset = ScanDataset(files, loaded.spec.image_size, config.overlay_size, max_file_bytes=config.max_file_bytes,
                          can_defer=gpu_decode.can_defer if batched_decoding else None)
    loader = decode_loader(dataset, config, pin_memory=device.type == "cuda")
    decode_deferred = (gpu_decode.BatchedJpegDecoder(device, loaded.spec.image_size, config.overlay_size,
                                                     dataset.decode_deferred) if batched_decoding else None)

    def keep(finished: list[Row]) -> None:
        store.append(finished)
        rows.extend(finished)

    with InterruptGuard() as guard, engine, OverlayStage(report) as stage:
        for samples, views in console.progress(loader, len(dataset), lambda batch: len(batch[0])):
            if decode_deferred is not None:
                samples, views = decode_deferred(samples)
            results = explain_batch(samples, views, engine, loaded, device, settings_key=settings.key,
                                    faithfulness=config.faithfulness)
            log_decode_warnings(samples, console)
            store.announce(name for row, _, cam in results if cam is not None
                           for name in (row.overlay, row.thumb, row.original))
            keep(stage.submit(results))
            if config.keeps_cams:
                cams.update((row.path, cam.numpy()) for row, _, cam in results if cam is not None)
            if guard.requested:
                break
        keep(stage.drain())
    if guard.requested:
        raise Interrupted(guard.signum)
    return rows, cams


RUN_SCALE_PERCENTILE = 99.0


def run_heat_scale(maps: list[np.ndarray]) -> float:
    """``--heat-scale run``'s constant: the 99th percentile of every raw map cell of the run.

    A percentile rather than the maximum, so one outlier map does not make every other one cold;
    maps above it saturate at the hottest colour.
    """
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps]) if maps else np.zeros(1)
    return float(max(np.percentile(values, RUN_SCALE_PERCENTILE), np.finfo(np.float32).tiny))


def rescale_overlays(rows: list[Row], files: list[PlannedFile], cams: dict[str, np.ndarray], config: ScanConfig,
                     loaded: LoadedModel, report: ReportFolder, console: Console) -> float:
    """The second pass of ``--heat-scale run``: the constant is known only once every map is, so
    every ok row's overlay is rendered again from its re-decoded image at that one scale.

    Every ok row, reused ones too: the constant moves with the run. A file that changed since the
    first pass keeps its per-image overlay (logged); the next run redoes it.
    """
    scale = run_heat_scale([cams[row.path] for row in rows if row.ok and row.path in cams])
    by_relpath = {planned.relpath: planned for planned in files}
    todo = {row.relpath: row for row in rows if row.ok and row.path in cams and row.relpath in by_relpath}
    dataset = ScanDataset([by_relpath[relpath] for relpath in todo], loaded.spec.image_size, config.overlay_size,
                          max_file_bytes=config.max_file_bytes)
    console.info(f"heat scale for the run: {scale:.6g} (99th percentile of raw map values); re-rendering "
                 f"{len(todo)} overlays")
    with OverlayStage(report, scale=scale) as stage:
        for samples, _ in decode_loader(dataset, config):
            batch = []
            for sample in samples:
                row = todo[sample.relpath]
                if not sample.ok or sample.sha256 != row.sha256:
                    console.log(f"warning: {row.path}: changed during the run; its overlay keeps its own scale")
                    continue
                batch.append((row, sample, torch.from_numpy(np.asarray(cams[row.path], dtype=np.float32))))
            stage.submit(batch)
        stage.drain()
    return scale


def decode_loader(dataset: ScanDataset, config: ScanConfig, pin_memory: bool = False) -> DataLoader:
    """Batches of decoded samples, decoded by ``config.workers`` processes tied to this run."""
    return DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers,
                      collate_fn=collate_samples, pin_memory=pin_memory,
                      worker_init_fn=partial(worker_init, os.getpid()) if config.workers else None)


def write_report(report: ReportFolder, rows: list[Row], loaded: LoadedModel, report_manifest: dict,
                 cams: dict[str, np.ndarray] | None, page_size: int) -> None:
    """CSV and manifest (and metrics, cams), then the gallery: the order a reader can trust.

    The gallery is rendered before the first write, so a first report has its CSV but not yet its
    index.html only for the few writes in between, not for the rendering too.
    """
    class_names = loaded.spec.class_names
    metrics = scan_metrics(rows, class_names)
    pages = render_gallery(rows, class_names, report_manifest, metrics, page_size)
    report.write_csv(rows, class_names)
    report.write_json("manifest.json", report_manifest)
    if metrics is not None:
        report.write_json("metrics.json", metrics)
    else:
        report.remove_stale("metrics.json")
    if cams is not None:
        report.write_cams({row.path: cams[row.path] for row in rows if row.path in cams})
    report.write_gallery(pages)
    report.save_outputs()


def log_decode_warnings(samples: list[Sample], console: Console) -> None:
    for sample in samples:
        for warning in sample.warnings:
            console.log(f"warning: {display_path(sample.relpath)}: {warning}")


def report_errors(rows: list[Row], processed: list[Row], console: Console) -> None:
    for row in processed:
        if not row.ok:
            console.log(f"error row: {row.path}: {row.error}")
    errors = sum(not row.ok for row in rows)
    if errors:
        console.warn(f"{errors} image(s) could not be processed (status 'error' in predictions.csv; "
                     "reasons in batchcam.log)")


def explain_batch(samples: list[Sample], views: torch.Tensor | None, engine: CamEngine, loaded: LoadedModel,
                  device: torch.device, settings_key: str = "",
                  faithfulness: bool = False) -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """Model + CAM on the good samples of a batch (as collated by ``collate_samples``).

    Returns one (row, sample, raw map) per sample in order; the row lacks only the CAM peak, which
    ``overlay.render`` computes. predict and serve call this too, so they explain exactly as scan does.
    ``settings_key`` goes into overlay names, so a changed file or setting never reuses a name.
    ``faithfulness`` adds the drops of ``attention.faithfulness`` (two more forward passes).
    """
    cam_batch = None
    if views is not None:
        x = normalize(views.to(device, non_blocking=True), loaded.spec).contiguous(memory_format=torch.channels_last)
        cam_batch = engine(x)
    results = batch_rows(samples, cam_batch, loaded, settings_key)
    if faithfulness and cam_batch is not None:
        ok = [row for row, _, cam in results if cam is not None]
        drops = attention.faithfulness(engine.model, x, cam_batch.cams, cam_batch.targets, cam_batch.probabilities,
                                       [attention.seed_of(f"{row.relpath}:{row.sha256}") for row in ok])
        for row, top, random in zip(ok, *drops):
            row.faith_drop_top, row.faith_drop_random = float(top), float(random)
    return results


def batch_rows(samples: list[Sample], cam_batch: CamBatch | None, loaded: LoadedModel,
               settings_key: str = "") -> list[tuple[Row, Sample, torch.Tensor | None]]:
    """One row per sample, in order; ok samples take the next prediction and map in turn."""
    class_names = loaded.spec.class_names
    results = []
    ok_index = 0
    for sample in samples:
        row = Row(path=display_path(sample.relpath), status="ok" if sample.ok else "error", error=sample.error,
                  sha256=sample.sha256, model_sha256=loaded.sha256, relpath=sample.relpath,
                  size=sample.size, mtime_ns=sample.mtime_ns, transient=sample.transient)
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
            row.overlay = overlay_path(sample.relpath, f"{sample.sha256}:{settings_key}")
            cam = cam_batch.cams[ok_index]
            row.attention_outside = attention.attention_outside(cam, sample.lung_fields)
            ok_index += 1
        results.append((row, sample, cam))
    return results


class OverlayStage:
    """Renders and writes overlays on worker threads, one batch behind the model.

    PIL's resize and JPEG encoder and torch's interpolation release the GIL, so this overlaps the
    next batch's forward pass; keeping at most two batches in flight bounds memory.
    """

    def __init__(self, report: ReportFolder, threads: int = 2, scale: float | None = None):
        self.report = report
        self.scale = scale  # None: each map normalised alone; else --heat-scale run's constant
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
        rendered = overlays.render(sample.display, cam, sample.width, sample.height, self.scale)
        self.report.write_overlay(row.overlay, rendered)
        row.cam_peak_x, row.cam_peak_y = rendered.peak_x, rendered.peak_y
