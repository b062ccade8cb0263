"""What a scan does once REPORT is locked: discover, plan, run an engine, write the report.

    discover -> plan (reuse unchanged rows) -> engine (decode -> model + CAM -> overlays, journaled)
             -> changes (first_seen, change) -> [heat-scale pass]
             -> a new generation (CSV, manifest, metrics, cams, gallery: report.outputs) -> switch
             -> tidy (old generation) -> prune overlays -> commit rows -> runs.jsonl line

The device, the precision and the CAM target are resolved once, here, and handed down.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from batchcam.cam.backends import EagerForward, OnnxForward, choose_backend, make_forward
from batchcam.cam.explainer import CamExplainer, linear_head
from batchcam.config import ScanConfig, resolve_positive, resolve_target
from batchcam.decode.discover import IMAGE_EXTENSIONS, Discovery, discover
from batchcam.engines import local
from batchcam.engines.heat_scale import rescale_overlays
from batchcam.engines.job import Resolved, ScanJob
from batchcam.engines.stages import prepared_model
from batchcam.errors import UsageError
from batchcam.model.checkpoint import LoadedModel, load_model
from batchcam.options import settings
from batchcam.records import Row, display_path, status_counts
from batchcam.report.changes import mark_changes, run_record
from batchcam.report.folder import ReportFolder, cams_content, csv_content, json_content, published_but
from batchcam.report.generations import Content
from batchcam.report.lock import ReportLock
from batchcam.report.outputs import publish_outputs
from batchcam.report.review import Review, current_decisions, mark_states, with_review
from batchcam.report.store import PlannedFile, RowStore, make_plan, settings_key, stat_candidates
from batchcam.report.summary import manifest, now_iso, scan_metrics
from batchcam.runtime.console import Console
from batchcam.runtime.devices import precision_name, resolve_device, resolve_precision
from batchcam.runtime.interrupt import Interrupted, InterruptGuard


@dataclass
class ScanResult:
    report: Path
    rows: list[Row]
    counts: dict
    seconds: float
    unlisted: tuple[str, ...] = ()   # folders that could not be listed: their rows were kept, the run exits 3
    kept: int = 0                    # rows kept as they were under those folders

    @property
    def summary_line(self) -> str:
        c = self.counts
        rate = c["processed"] / self.seconds if self.seconds > 0 else 0.0
        skipped = f"{c['skipped']} skipped, " if c.get("skipped") else ""
        unlisted = (f"{len(self.unlisted)} folder(s) not listed ({self.kept} rows kept as they were), "
                    if self.unlisted else "")
        return (f"batchcam: {c['found']} found, {c['ok']} ok, {c['error']} error, {skipped}{unlisted}"
                f"{self.seconds:.1f} s, {rate:.1f} images/s -> {display_path(os.fspath(self.report))}")

    @property
    def complete(self) -> bool:
        """Every image processed and every folder listed (exit 0); else the report is written but exit 3."""
        return not self.counts["error"] and not self.unlisted


@dataclass(frozen=True)
class Ready:
    """Everything resolved before anything is written: refusing any of it leaves REPORT untouched."""

    files: list[PlannedFile]
    loaded: LoadedModel
    device: torch.device
    autocast: torch.dtype | None
    target: int | None
    settings_key: str                # the rows' (report.store.settings_key)
    positive: tuple[int, ...]        # the classes the binary metrics score as positive (--positive)
    step: ModelStep | None = None    # built here only for an explicit --backend onnx
    problems: tuple[str, ...] = ()   # discovery's warnings, said once the run's log is open
    unlisted: tuple[str, ...] = ()   # folders that could not be listed (relative to ROOT)


def prepare(config: ScanConfig, console: Console) -> Ready:
    """Resolve the device, find the files, load the model; UsageError for anything wrong.

    An explicit ``--backend onnx`` is built here too, so a reason it cannot run is exit 2 before REPORT is touched.
    """
    device = resolve_device(config.device)
    config.validate_device(device.type)
    discovery = discover_files(config)
    files = stat_candidates(discovery.candidates)
    loaded = load_model(config.model, console.warn)
    check_decoder(config, loaded)
    target = resolve_target(config.target, loaded.spec.class_names)
    positive = resolve_positive(config.positive, loaded.spec.class_names)
    autocast = resolve_precision(config.precision, device)
    key = settings_key(config, resolved={"model": model_identity(loaded), "precision": precision_name(autocast),
                                         "target": "predicted" if target is None else loaded.spec.class_names[target]})
    step = None
    if config.backend == "onnx":  # asked for by name: a reason it cannot run is exit 2, REPORT untouched
        step = model_step(config, loaded, prepared_model(loaded, device), device, autocast, len(files), console.log)
    return Ready(files, loaded, device, autocast, target, key, positive, step, problems=tuple(discovery.problems),
                 unlisted=tuple(discovery.unlisted))


def check_decoder(config: ScanConfig, loaded: LoadedModel) -> None:
    """``--decode gpu`` squashes whole images; a center-crop model's view is cut on the CPU (exit 2 before
    REPORT is touched)."""
    if config.decode == "gpu" and loaded.spec.resize != "squash":
        raise UsageError(f"--decode gpu makes squashed views only; {loaded.path.name} takes a {loaded.spec.resize} "
                         "view: leave out --decode gpu (its images are decoded on the CPU)")


def model_identity(loaded: LoadedModel) -> dict[str, object]:
    """What the model contributes to the row key: its file, the layer its maps come from, its preprocessing."""
    spec = loaded.spec
    return {"sha256": loaded.sha256, "target_layer": loaded.target_layer, "image_size": spec.image_size,
            "mean": list(spec.mean), "std": list(spec.std), "channels": spec.channels, "resize": spec.resize}


def backend_for(config: ScanConfig, loaded: LoadedModel, device: torch.device, autocast: torch.dtype | None,
                images: int) -> str:
    """The exact path's model step of this run, decided here only: ``--backend eager`` or ``onnx`` as asked
    (onnx refused where it cannot apply), ``auto`` by the device, the CAM and the ``images`` to process
    (``cam.backends.choose_backend``); the ray engine's actors run onnx only when it is asked for by name."""
    exact = exact_path(config, loaded) and not config.compile
    backend = choose_backend(config.backend, device, exact, autocast, images)
    return backend if config.engine == "local" or config.backend == "onnx" else "eager"


@dataclass(frozen=True)
class ModelStep:
    backend: str                                 # what the run resolved (``Resolved.backend``)
    forward: EagerForward | OnnxForward | None   # what the local engine runs; None for the ray engine


def model_step(config: ScanConfig, loaded: LoadedModel, model: torch.nn.Module, device: torch.device,
               autocast: torch.dtype | None, images: int, log: Callable[[str], None]) -> ModelStep:
    """The run's backend (``backend_for``) and the model step built for it, in one place: the local engine's
    forward (onnx falls back to eager with a log line unless asked for by name, where a reason it cannot run
    is exit 2); the ray engine's actors build their own, so only an explicit onnx is built here, to check it."""
    backend = backend_for(config, loaded, device, autocast, images)
    explicit = config.backend == "onnx"
    if config.engine != "local" and not explicit:
        return ModelStep(backend, None)
    forward = make_forward(backend, model, loaded.target_layer, loaded.sha256, loaded.spec.image_size, autocast,
                           explicit=explicit, log=log)
    return ModelStep(backend, forward if config.engine == "local" else None)


def exact_path(config: ScanConfig, loaded: LoadedModel) -> bool:
    """Whether the exact Grad-CAM path (the only one a backend other than eager runs) applies."""
    return config.cam == "gradcam" and linear_head(loaded.model) is not None


def discover_files(config: ScanConfig) -> Discovery:
    """The candidates under ROOT (REPORT skipped); UsageError when there are none, REPORT untouched."""
    discovery = discover(config.root, exclude=config.out)
    root = display_path(os.fspath(config.root))
    if not discovery.candidates and discovery.unlisted:
        raise UsageError(f"ROOT {root}: {'; '.join(discovery.problems)}; no image file found elsewhere, so nothing "
                         "was changed: run again once it can be read")
    if not discovery.candidates:
        raise UsageError(f"no image files under {root} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, case-insensitive, hidden files skipped)")
    if discovery.unlisted:
        discovery.problems.append(f"{len(discovery.unlisted)} folder(s) could not be listed: the rows of their files "
                                  "are kept as they were in the last run, and the run exits 3")
    return discovery


def run(config: ScanConfig, console: Console, ready: Ready, started: float, started_at: str,
        lock: ReportLock) -> ScanResult:
    report = ReportFolder.of(lock)
    console.attach_log(report.open_log)
    console.log(f"run started: batchcam {' '.join(config.argv)}")
    for problem in ready.problems:
        console.warn(problem)
    try:
        return write_scan(report, config, console, ready, started, started_at)
    finally:
        report.close()


def write_scan(report: ReportFolder, config: ScanConfig, console: Console, ready: Ready, started: float,
               started_at: str) -> ScanResult:
    """Plan, process, publish; a signal stops the engine after its batch, abandons a generation not
    yet published, or, once it is published, lets the bookkeeping finish (exit 130/143 each time)."""
    files, loaded, device = ready.files, ready.loaded, ready.device
    report.prepare()
    previous_cams = report.read_cams() if config.keeps_cams else {}
    with InterruptGuard() as guard, RowStore(report.state(), ready.settings_key) as store:
        plan = make_plan(files, store.load(), full=config.full, selection=config.selection.key,
                         row_is_complete=lambda row: report.has_overlays(row)
                         and (not config.keeps_cams or not row.ok or row.path in previous_cams),
                         unlisted=ready.unlisted, last_run=store.last_run())
        console.info(f"scanning {len(files)} images under {config.root} on {device}: "
                     f"{len(plan.process)} to process, {len(plan.reuse)} unchanged")
        guard.check()
        job = scan_job(config, console, ready, report, store, images=len(plan.process))
        processed, new_cams = process(plan.process, job)
        rows = sorted(plan.reuse + processed, key=lambda row: row.path)
        runs_before = report.read_runs()
        changes = mark_changes(rows, store.last_run(), started_at)
        counts = {"found": len(files), "processed": len(processed), "reused": len(plan.reuse),
                  **status_counts(rows)}
        seconds = time.monotonic() - started
        forward = job.cam_explainer.forward if config.engine == "local" else None  # ray: the actors build their own
        backend = forward.name if forward is not None else job.resolved.backend
        cam_info: dict[str, object] = {
            "method": config.cam, "target_layer": loaded.target_layer, "target": config.target,
            "exact_fast_path": job.cam_explainer.exact, "heat_scale": config.heat_scale, "backend": backend,
            "backend_file_sha256": forward.file_sha256 if forward is not None else None}
        if config.heat_scale == "run":
            cam_info["run_scale"] = rescale_overlays(rows, files, {**previous_cams, **new_cams}, job)
        report_manifest = manifest(root=config.root, argv=config.argv, loaded=loaded, cam=cam_info,
                                   device=str(device), counts=counts, started_at=started_at,
                                   finished_at=now_iso(), seconds=seconds, selection=config.selection, rows=rows)
        report_manifest["settings"] = settings(config, resolved={
            "model": str(loaded.path), "device": str(device), "precision": precision_name(ready.autocast),
            "backend": backend, "positive": [loaded.spec.class_names[c] for c in ready.positive]})
        report_manifest["report_id"] = report.report_id()
        report_manifest["unlisted"] = {"folders": [display_path(folder) for folder in ready.unlisted],
                                       "rows_kept": len(plan.kept)}
        report_manifest["changes"] = {"since": runs_before[-1]["started_at"] if runs_before else None, **changes}
        this_run = run_record(report_manifest, changes)
        reviews = write_report(report, rows, loaded, report_manifest,
                               cams={**previous_cams, **new_cams} if config.keeps_cams else None,
                               page_size=config.page_size, runs=[*runs_before, this_run], positive=ready.positive,
                               stop=guard.check)
        after_publishing(report, rows, store, this_run, reviews)
    if guard.signum is not None:
        raise Interrupted(guard.signum, published=True)
    report_errors(rows, processed, console)
    return ScanResult(report=config.out, rows=rows, counts=counts, seconds=seconds, unlisted=ready.unlisted,
                      kept=len(plan.kept))


def process(files: list[PlannedFile], job: ScanJob) -> tuple[list[Row], dict[str, np.ndarray]]:
    """The engine the scan asks for processes ``files``: this machine, or a Ray cluster."""
    if job.config.engine == "ray":
        from batchcam.engines import ray_engine  # Ray is imported only when asked for

        return ray_engine.process(files, job)
    return local.process(files, job)


def scan_job(config: ScanConfig, console: Console, ready: Ready, report: ReportFolder, store: RowStore,
             images: int) -> ScanJob:
    """The scan's options and what the run resolved, with the model prepared once on its device and its
    backend chosen for the ``images`` this run processes (the ray engine's actors build theirs)."""
    loaded, device, autocast = ready.loaded, ready.device, ready.autocast
    model = prepared_model(loaded, device, config.compile)
    step = ready.step or model_step(config, loaded, model, device, autocast, images, console.log)
    cam_explainer = CamExplainer(model, config.cam, ready.target, autocast=autocast, temperature=loaded.temperature,
                                 forward=step.forward, target_layer=loaded.target_layer)
    resolved = Resolved(autocast=autocast, target=ready.target, backend=step.backend,
                        settings_key=ready.settings_key)
    return ScanJob(config=config, resolved=resolved, loaded=loaded, device=device, cam_explainer=cam_explainer,
                   report=report, store=store, console=console)


def write_report(report: ReportFolder, rows: list[Row], loaded: LoadedModel, report_manifest: dict,
                 cams: dict[str, np.ndarray] | None, page_size: int, runs: list[dict], positive: tuple[int, ...],
                 stop: Callable[[], None] = lambda: None) -> list[Review] | None:
    """Publish the run's gallery, CSV, manifest (and metrics, cams) as one new generation; return the
    stored review decisions, re-marked for files gone or changed, when they need writing (after the
    switch, so a run that fails or is stopped before it changes nothing)."""
    class_names = loaded.spec.class_names
    stored_reviews = report.read_reviews()
    reviews = mark_states(stored_reviews, rows)
    decisions = current_decisions(reviews, rows)
    metrics = with_review(scan_metrics(rows, class_names, positive), rows, decisions)
    scan_files: dict[str, Content] = {"predictions.csv": csv_content(rows, class_names),
                                      "manifest.json": json_content(report_manifest)}
    if cams is not None:
        scan_files["cams.npz"] = cams_content({row.path: cams[row.path] for row in rows if row.path in cams})
    publish_outputs(report, rows, class_names, report_manifest, metrics, page_size, positive, decisions=decisions,
                    runs=runs, stop=stop, scan_files=scan_files)
    return reviews if reviews != stored_reviews else None


def after_publishing(report: ReportFolder, rows: list[Row], store: RowStore, this_run: dict,
                     reviews: list[Review] | None) -> None:
    """What follows the switch, in an order a kill at any instant cannot break: the review marks,
    the old generation removed, the overlays no row names removed, the rows committed (until then
    the journal lets the next run reuse every row), the runs.jsonl line last (a completed run only).

    A failure here leaves this run's report published; the next run finishes what is left.
    """
    try:
        if reviews is not None:
            report.write_reviews(reviews)  # decisions on files gone or changed are kept, marked
        report.tidy()
        report.remove_unreferenced_overlays(rows, store.written_overlays())
        store.commit(rows)
        report.append_run(this_run)
    except OSError as e:
        raise published_but(report.path, e) from None


def report_errors(rows: list[Row], processed: list[Row], console: Console) -> None:
    for row in processed:
        if row.status != "ok":
            console.log(f"{row.status} row: {row.path}: {row.error}")
    errors = status_counts(rows)["error"]
    if errors:
        console.warn(f"{errors} image(s) could not be processed (status 'error' in predictions.csv; "
                     "reasons in batchcam.log)")
