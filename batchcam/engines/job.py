"""What an engine is given: ``process(files, job)`` and nothing else of the scan's configuration."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from batchcam.cam.engine import CamEngine
from batchcam.config import Selection
from batchcam.model.checkpoint import LoadedModel
from batchcam.report.folder import ReportFolder
from batchcam.report.store import RowStore
from batchcam.runtime.console import Console


@dataclass(frozen=True)
class RayOptions:
    """Only ``--engine ray``: where the cluster is and how its model actors are built."""

    root: Path
    address: str | None = None          # None: a local cluster for the run
    gpus_per_worker: float | None = None
    compile: bool = False
    backend: str = "eager"              # the model actors' exact-path backend (batchcam.cam.backends)


@dataclass(frozen=True)
class DecodeSettings:
    """How files become samples, the same in every engine and in the heat-scale pass."""

    image_size: int
    overlay_size: int
    max_file_bytes: int
    batch_size: int
    workers: int
    on_gpu: bool = False                # scan --decode gpu: plain JPEGs decoded in batches on the device
    selection: Selection = Selection()  # which DICOM films are scored; the others are skipped rows


@dataclass(frozen=True)
class ScanJob:
    """The model, where results go, and the few settings the engines use.

    ``settings_key`` names the row store's settings (it goes into overlay names, so a changed setting
    never reuses one); ``keeps_cams``: the raw maps come back too (cams.npz, --heat-scale run).
    """

    loaded: LoadedModel
    engine: CamEngine
    device: torch.device
    report: ReportFolder
    store: RowStore
    console: Console
    decode: DecodeSettings
    settings_key: str
    faithfulness: bool = False
    keeps_cams: bool = False
    ray: RayOptions | None = None
