"""Explaining a few in-memory X-rays with scan's own stages: what ``predict`` and ``serve`` share.

There is no second copy of any stage here: decoding is ``dataset.decode_sample``, batching is
``dataset.collate_samples``, model + CAM is ``stages.explain_batch`` under a ``CamExplainer``, and
the overlay is ``overlay.render``. So a file explained here gets exactly the prediction, map and
overlay that a scan would give it.
"""
from __future__ import annotations

import base64
import threading
from dataclasses import dataclass

import torch

from batchcam.cam import overlay as overlays
from batchcam.cam.explainer import CamExplainer
from batchcam.cam.overlay import RenderedOverlay
from batchcam.config import Selection
from batchcam.decode.dataset import Sample, collate_samples, decode_sample
from batchcam.engines.stages import explain_batch
from batchcam.model.checkpoint import LoadedModel
from batchcam.records import Row, reported


@dataclass
class Explanation:
    """One file's result: the scan row (prediction, probabilities, peak) and its rendered overlay."""

    row: Row
    class_names: tuple[str, ...]
    rendered: RenderedOverlay | None = None  # None for an error row

    @property
    def name(self) -> str:
        return self.row.path

    @property
    def ok(self) -> bool:
        return self.row.ok

    @property
    def error(self) -> str:
        return self.row.error

    def as_dict(self) -> dict:
        """The JSON fields both ``predict --json`` and ``POST /api/predict`` report for a file: the
        row's columns declared ``reported`` (batchcam.records.Row)."""
        return reported(self.row, self.class_names)


def jpeg_data_url(jpeg: bytes) -> str:
    """An image the browser shows and downloads without a second request (and nothing on disk)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class Explainer:
    """A model loaded once, explaining batches of samples; safe to call from several threads.

    The model's forward pass and the CAM hook hold per-call state, so one lock serialises them;
    decoding and overlay rendering run outside it, in the caller's thread.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, method: str = "gradcam",
                 target: int | None = None, selection: Selection | None = Selection()):
        self.loaded, self.device, self.method, self.target = loaded, device, method, target
        self.selection = selection  # which DICOM films are scored; the others are skipped results
        self.model = loaded.model.to(device).to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.loaded.spec.class_names

    def decode(self, name: str, data: bytes) -> Sample:
        """Bytes to a Sample exactly as scan decodes a file; a bad file becomes ``sample.error``."""
        spec = self.loaded.spec
        return decode_sample(name, data, spec.image_size, selection=self.selection, resize=spec.resize)

    def explain(self, samples: list[Sample]) -> list[Explanation]:
        """One Explanation per sample, in order; error and skipped samples pass through as such rows."""
        samples, views = collate_samples(samples)
        with self._lock, CamExplainer(self.model, self.method, self.target, temperature=self.loaded.temperature,
                                      target_layer=self.loaded.target_layer) as explainer:
            results = explain_batch(samples, views, explainer, self.loaded, self.device)
        return [self._rendered(row, sample, cam) for row, sample, cam in results]

    def describe(self) -> dict:
        """What is loaded, for ``/healthz`` and the page's header."""
        loaded = self.loaded
        return {"name": loaded.path.name, "path": str(loaded.path), "sha256": loaded.sha256,
                "arch": loaded.spec.arch, "classes": list(self.class_names),
                "image_size": loaded.spec.image_size, "demo": loaded.demo, **loaded.calibration_summary(),
                "cam": {"method": self.method, "target_layer": loaded.target_layer,
                        "target": "predicted" if self.target is None else self.class_names[self.target]}}

    def _rendered(self, row: Row, sample: Sample, cam: torch.Tensor | None) -> Explanation:
        if cam is None or sample.display is None:
            return Explanation(row, self.class_names)
        rendered = overlays.render(sample.display, cam, sample.width, sample.height, box=sample.view_box)
        row.cam_peak_x, row.cam_peak_y = rendered.peak_x, rendered.peak_y
        return Explanation(row, self.class_names, rendered)
