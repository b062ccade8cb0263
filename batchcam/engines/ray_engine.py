"""``scan --engine ray``: the process stage on a Ray cluster, with the local engine's contract.

Discovery, the incremental plan, the journal and every report writer stay on the driver (this
process), exactly as in ``commands.scan.run``; only ``engines.local.process`` is replaced:

    paths (Ray Dataset) -> decode (CPU tasks, map_batches) -> model + CAM + overlays (actor pool)
                        -> rows stream back -> journaled batch by batch on the driver

Each stage reuses the local engine's code (``ScanDataset``, ``collate_samples``, ``explain_batch``,
``OverlayStage``), so the rows are the same. Overlays are written by the actors straight into
REPORT, which must therefore be the same folder on every node: the driver checks that before any
image is processed. Ray is imported only here, and only when the engine is asked for.
"""
from __future__ import annotations

import copy
import logging
import math
import signal
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchcam.cam.backends import make_forward
from batchcam.cam.explainer import CamExplainer
from batchcam.config import RAY_EXTRA_HINT, ScanConfig
from batchcam.decode.dataset import Sample, ScanDataset, collate_samples
from batchcam.engines.job import Resolved, ScanJob
from batchcam.engines.shared_storage import new_token, node_problems, remove_token, report_problem, write_token
from batchcam.engines.stages import (
    OverlayStage,
    batch_rows,
    explain_batch,
    log_decode_warnings,
    prepared_model,
    scan_dataset,
)
from batchcam.errors import ReportWriteError, UsageError
from batchcam.model.checkpoint import LoadedModel
from batchcam.records import Row
from batchcam.report.folder import ReportFolder
from batchcam.report.store import PlannedFile, RowStore
from batchcam.runtime.allocator import keep_freed_memory
from batchcam.runtime.console import Console
from batchcam.runtime.interrupt import InterruptGuard

DECODE_MEMORY = 512 * 2**20  # reserved per decode task: a batch of display copies plus one large decode


class SharedStorageError(ReportWriteError):
    """A Ray node does not see REPORT as the driver does: its overlays would be lost (exit 74)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every model actor needs: the scan's options and what the driver resolved (so the rows
    match the settings they are journaled under), and where REPORT is. ``model`` is an ObjectRef of
    the driver's LoadedModel (on the CPU), so actors need neither the checkpoint file nor a path to
    it, and all use the weights whose sha256 the rows carry."""

    config: ScanConfig
    resolved: Resolved
    model: Any
    report: str
    token: str
    gpus: float


@dataclass
class Explained:
    """One finished image as it travels back to the driver."""

    row: Row
    cam: np.ndarray | None            # the raw map, only when the run keeps them (cams.npz)
    warnings: tuple[str, ...]         # decode warnings, for the driver's log


def process(files: list[PlannedFile], job: ScanJob) -> tuple[list[Row], dict[str, np.ndarray]]:
    """The local engine's ``process`` on Ray: the same results, rows journaled as they arrive.

    ``job.device`` is the driver's and unused: each actor runs on the GPU Ray gives it, or the CPU.
    A killed driver loses at most the batches in flight; SIGINT/SIGTERM stop after journaling the
    batch that has just arrived.
    """
    if not files:
        return [], {}  # nothing to do: no cluster is started
    config, console = job.config, job.console
    with InterruptGuard() as guard, ray_session(config.ray_address) as ray:
        gpus = gpus_per_actor(ray, config.gpus_per_worker)
        actors = actor_count(ray, config.workers, gpus, batches=math.ceil(len(files) / config.batch_size))
        console.info(f"ray engine: {actors} model actor(s) with {gpus:g} GPU(s) each, "
                     f"{ray.cluster_resources().get('CPU', 0):g} CPU(s) in the cluster")
        folder = job.report.path.absolute()
        with SharedFolders(ray, config.root.absolute(), folder) as shared:
            model = ray.put(replace(job.loaded, model=copy.deepcopy(job.loaded.model).cpu()))
            spec = WorkerSpec(config=config, resolved=job.resolved, model=model, report=str(folder),
                              token=shared.token, gpus=gpus)
            batches = explained_batches(ray, files, spec, actors, job.loaded.spec.image_size, job.loaded.spec.resize)
            try:
                return journal(batches, len(files), job.store, console, guard)
            except ray.exceptions.ActorDiedError:
                shared.check()  # an actor on a node that joined during the run may have refused REPORT
                raise


def journal(batches: Generator[list[Explained], None, None], total: int, store: RowStore, console: Console,
            guard: InterruptGuard) -> tuple[list[Row], dict[str, np.ndarray]]:
    """Journal each batch the moment it arrives, as ``engines.local.process`` does.

    After SIGINT/SIGTERM (also one received while the cluster started) it stops after the batch
    that arrives next; the pipeline is closed, its other batches are redone by the next run.
    """
    rows: list[Row] = []
    cams: dict[str, np.ndarray] = {}
    arriving = () if guard.requested else console.progress(batches, total, len)  # () when stopped while starting
    with closing(batches):
        for batch in arriving:
            finished = [item.row for item in batch]
            store.append(finished)
            rows.extend(finished)
            log_decode_warnings([Sample(relpath=item.row.relpath, warnings=item.warnings) for item in batch], console)
            cams.update((item.row.path, item.cam) for item in batch if item.cam is not None)
            if guard.requested:
                break
    guard.check()  # stopped by a signal: Interrupted, once the arrived batches are journaled
    return rows, cams


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray Data ({e}): {RAY_EXTRA_HINT}") from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected for this run.

    A Ray already initialised in this process (a notebook, the tests) is used as it is. Otherwise
    this run joins ``address``, or starts a local cluster on this machine (``address="local"``
    ignores RAY_ADDRESS and any cluster ``ray start`` runs here, so the default never depends on
    what else runs on the box), and leaves it again at the end: a local cluster stops with it.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    options = {} if address else {"include_dashboard": False}
    try:
        ray.init(address=address or "local", log_to_driver=False, logging_level=logging.ERROR, **options)
    except ConnectionError as e:
        raise UsageError(f"--ray-address {address}: cannot join the Ray cluster: {e}") from None
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # ray.init installs a handler that exits at once
    quiet_ray_data()
    try:
        yield ray
    finally:
        ray.shutdown()


def quiet_ray_data() -> None:
    """Ray Data narrates every execution on stderr; cron mail gets batchcam's own lines only.

    Its full log stays in the Ray session's logs folder (``ray-data.log``).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def gpus_per_actor(ray, asked: float | None) -> float:
    """``--gpus-per-worker``, by default one GPU per actor when the cluster has GPUs; asking for
    more GPUs than the cluster has is refused rather than left waiting forever."""
    available = ray.cluster_resources().get("GPU", 0)
    gpus = (1.0 if available >= 1 else 0.0) if asked is None else asked
    if gpus > available:
        raise UsageError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {available:g} GPU(s)")
    return gpus


def actor_count(ray, workers: int, gpus: float, batches: int) -> int:
    """``--workers`` model actors, or (0) one per GPU share, or half the cluster's CPUs (the other
    half decodes); never more than there are batches."""
    if not workers:
        resources = ray.cluster_resources()
        workers = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 2)) // 2
    return max(1, min(workers, batches))


class SharedFolders:
    """ROOT and REPORT, which every node must see as the driver does (``batchcam.engines.shared_storage``).

    Entering writes the token into REPORT and checks every live node before any image is
    processed; actors check the token again when they start, for nodes that join later. Leaving
    removes the token.
    """

    def __init__(self, ray, root: Path, report: Path):
        self.ray, self.root, self.report = ray, root, report
        self.token = new_token()

    def __enter__(self) -> "SharedFolders":
        write_token(self.report, self.token)
        try:
            self.check()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        remove_token(self.report)

    def check(self) -> None:
        """Raise UsageError when a node does not see ROOT, SharedStorageError when it cannot share REPORT."""
        probe = self.ray.remote(num_cpus=0)(node_problems)
        affinity = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        nodes = [node["NodeID"] for node in self.ray.nodes() if node["Alive"]]
        problems = self.ray.get([probe.options(scheduling_strategy=affinity(node, soft=False))
                                 .remote(str(self.root), str(self.report), self.token) for node in nodes])
        root_problems = [problem for problem, _ in problems if problem]
        if root_problems:
            raise UsageError(f"ROOT {self.root} must be on storage that every Ray node sees at the same path: "
                             f"{'; '.join(root_problems)}")
        raise_report_problems([problem for _, problem in problems if problem], self.report)


def raise_report_problems(problems: list[str], report: Path) -> None:
    if problems:
        raise SharedStorageError(f"REPORT {report} must be on storage that every Ray node sees at the same path "
                                 f"(NFS or another shared file system): {'; '.join(problems)}")


def explained_batches(ray, files: list[PlannedFile], spec: WorkerSpec, actors: int,
                      image_size: int, resize: str = "squash") -> Generator[list[Explained], None, None]:
    """The Ray Data pipeline: one list of Explained per model batch, in completion order.

    Decode tasks reserve memory, so Ray never packs more of them onto a node than it holds; the
    different resources also keep Ray from fusing decoding into the actors, so decoding the next
    batches overlaps the model.
    """
    batch_size = spec.config.batch_size
    absolute = [replace(planned, path=planned.path.absolute()) for planned in files]  # workers' cwd differs
    dataset = ray.data.from_items([{"file": planned} for planned in absolute],
                                  override_num_blocks=math.ceil(len(files) / batch_size))
    dataset = dataset.map_batches(decode_batch, fn_kwargs={"config": spec.config, "image_size": image_size,
                                                           "resize": resize},
                                  batch_size=batch_size, batch_format="numpy", num_cpus=1, memory=DECODE_MEMORY)
    dataset = dataset.map_batches(CamWorker, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                  num_cpus=1, num_gpus=spec.gpus)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield list(batch["explained"])


def objects(items: list) -> np.ndarray:
    """A 1-D object array (np.array would turn a list of equal-shaped arrays into one array)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def decode_batch(batch: dict[str, np.ndarray], config: ScanConfig, image_size: int,
                 resize: str = "squash") -> dict[str, np.ndarray]:
    """Decode task: files -> Samples, with ``ScanDataset``'s reading and decoding."""
    dataset = scan_dataset(list(batch["file"]), config, image_size, resize=resize)
    return {"sample": objects([decode_safely(dataset, index) for index in range(len(dataset))])}


def decode_safely(dataset: ScanDataset, index: int) -> Sample:
    """``dataset[index]``; an unexpected exception costs that file's row (retried next run), not the job."""
    try:
        return dataset[index]
    except Exception as e:
        return Sample(relpath=dataset.items[index].relpath, transient=True,
                      error=f"cannot decode image: internal error: {type(e).__name__}: {e}"[:240])


class CamWorker:
    """Model actor: gets the model once, then explains batches and writes their overlays into REPORT."""

    def __init__(self, spec: WorkerSpec):
        import ray

        keep_freed_memory()  # an actor runs batches through the model as the local engine does
        problem = report_problem(spec.report, spec.token)
        raise_report_problems([problem] if problem else [], Path(spec.report))
        self.spec = spec
        self.device = torch.device("cuda" if spec.gpus else "cpu")
        self.loaded: LoadedModel = ray.get(spec.model)
        config, resolved = spec.config, spec.resolved
        model = prepared_model(self.loaded, self.device, config.compile)
        backend = resolved.backend if self.device.type == "cpu" else "eager"  # ONNX Runtime runs CPU actors only
        loaded = self.loaded
        forward = make_forward(backend, model, loaded.target_layer, loaded.sha256, loaded.spec.image_size,
                               resolved.autocast)
        self.explainer = CamExplainer(model, config.cam, resolved.target, autocast=resolved.autocast,
                                      temperature=self.loaded.temperature, forward=forward,
                                      target_layer=self.loaded.target_layer)
        self.report = ReportFolder(Path(spec.report))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = list(batch["sample"])
        try:
            explained = self.explain(samples)
        except Exception as e:  # a worker exception costs this batch's rows (retried next run), never the job
            explained = self.failed(samples, e)
        return {"explained": objects(explained)}

    def explain(self, samples: list[Sample]) -> list[Explained]:
        _, views = collate_samples(samples)
        with self.explainer:
            results = explain_batch(samples, views, self.explainer, self.loaded, self.device,
                                    settings_key=self.spec.resolved.settings_key, measures=self.spec.config.measures)
        with OverlayStage(self.report) as stage:
            stage.submit(results)
            stage.drain()
        keeps_cams = self.spec.config.keeps_cams
        return [Explained(row, cam.numpy() if keeps_cams and cam is not None else None, sample.warnings)
                for row, sample, cam in results]

    def failed(self, samples: list[Sample], error: Exception) -> list[Explained]:
        for sample in samples:
            if sample.ok:
                sample.error = f"internal error while explaining its batch: {type(error).__name__}: {error}"[:240]
                sample.transient = True
        return [Explained(row, None, sample.warnings)
                for row, sample, _ in batch_rows(samples, None, self.loaded, self.spec.resolved.settings_key)]
