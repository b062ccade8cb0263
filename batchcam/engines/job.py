"""What an engine is given: ``process(files, job)`` with the scan's configuration and what the run resolved."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchcam.cam.explainer import CamExplainer
from batchcam.config import ScanConfig
from batchcam.model.checkpoint import LoadedModel
from batchcam.report.folder import ReportFolder
from batchcam.report.store import RowStore
from batchcam.runtime.console import Console


@dataclass(frozen=True)
class Resolved:
    """What the driver resolved once for the whole run, the same for every engine, actor and pass.

    ``settings_key`` is the row store's key (it goes into overlay names, so a changed setting never
    reuses one); ``backend`` the exact path's model step that the model actors build (``cam.backends``).
    """

    autocast: torch.dtype | None
    target: int | None
    backend: str
    settings_key: str


@dataclass(frozen=True)
class ScanJob:
    """The scan's options (``config``), what the run resolved, the model, and where results go."""

    config: ScanConfig
    resolved: Resolved
    loaded: LoadedModel
    device: torch.device
    cam_explainer: CamExplainer       # model + CAM on ``device`` (the ray engine's actors build their own)
    report: ReportFolder
    store: RowStore
    console: Console

    @property
    def settings_key(self) -> str:
        return self.resolved.settings_key
