"""``batchcam predict FILE...``: the study's upload-and-test step, from a terminal.

Each file's bytes are decoded by scan's own ``decode_sample`` and explained by
``explain.Explainer``, so a file gets the prediction and overlay a scan would give it; results
print as a table, or as JSON lines for scripts, while later batches are still running.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from batchcam.config import DEFAULT_MAX_FILE_BYTES, PredictConfig, resolve_target
from batchcam.decode.dataset import Sample
from batchcam.decode.dataset import read_sample as read_file_sample
from batchcam.errors import UsageError
from batchcam.model.checkpoint import load_model
from batchcam.runtime.console import Console
from batchcam.runtime.devices import resolve_device
from batchcam.runtime.fsutil import SafeDir, publish_new
from batchcam.serving.explain import Explainer, Explanation


@dataclass
class PredictResult:
    ok: int = 0
    error: int = 0
    skipped: int = 0    # not scored: DICOM films that are not frontal chest radiographs (--select)
    overlays: list[Path] = field(default_factory=list)

    @property
    def summary_line(self) -> str:
        total = self.ok + self.error + self.skipped
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return f"batchcam: {total} file{'' if total == 1 else 's'}, {self.ok} ok, {self.error} error{skipped}"


def predict(config: PredictConfig, console: Console, stdout: TextIO | None = None) -> PredictResult:
    """Explain every file in ``config.files``; raises UsageError or CheckpointError before any output."""
    stdout = stdout or sys.stdout  # looked up per call, not at import, so redirections apply
    config.validate()
    device = resolve_device(config.device)
    loaded = load_model(config.model, console.warn)
    explainer = Explainer(loaded, device, config.cam, resolve_target(config.target, loaded.spec.class_names),
                          selection=config.selection)
    if config.out is not None:
        _make_folder(config.out)
    printer = JsonLinesPrinter(stdout) if config.json else TablePrinter(
        stdout, config.files, explainer.class_names, with_overlay=config.out is not None)
    result = PredictResult()
    for explanation in explain_files(explainer, config.files, config.batch_size, config.max_file_bytes):
        overlay = _save_overlay(explanation, config.out) if config.out is not None and explanation.ok else None
        status = explanation.row.status
        setattr(result, status, getattr(result, status) + 1)
        if status != "ok":
            print(f"batchcam: {status}: {explanation.name}: {explanation.error}", file=console.stream, flush=True)
        if explanation.row.ood_flag:
            console.warn(f"{explanation.name}: unlike the training images (ood_score "
                         f"{explanation.row.ood_score:.1f}): do not trust this prediction or its heatmap")
        if overlay is not None:
            result.overlays.append(overlay)
        printer.print(explanation, overlay)
    return result


def explain_files(explainer: Explainer, files: Sequence[str], batch_size: int,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Iterator[Explanation]:
    """Read and explain files a batch at a time, in the order given (only one batch in memory)."""
    for start in range(0, len(files), batch_size):
        yield from explainer.explain([read_sample(explainer, name, max_file_bytes)
                                      for name in files[start:start + batch_size]])


def read_sample(explainer: Explainer, name: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Sample:
    """A file that cannot be read (or is over the size cap) becomes an error sample, like one that
    cannot be decoded."""
    path = Path(name)
    return read_file_sample(path, path.as_posix(), max_file_bytes, explainer.decode)


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be created: {e.strerror or e}") from None


def _save_overlay(explanation: Explanation, out: Path) -> Path | None:
    """Write the overlay under scan's collision-free name, never over a file that is already there.

    The same file explained again with the same settings has the same name and the same bytes: that
    counts as written. Anything else at the name (someone's file, a link) is left exactly as it is
    and the file becomes an error; so does a write that fails.
    """
    if explanation.rendered is None:  # an error row: no overlay to write
        return None
    name = Path(explanation.row.overlay).name
    path, data = out / name, explanation.rendered.overlay_jpeg
    try:
        if publish_new(out, name, data):
            return path
        with SafeDir.open(out) as folder:
            if folder.read_bytes(name) == data:
                return path
        problem = "a different file (or a link) is already there; it was left as it is"
    except OSError as e:
        problem = e.strerror or str(e)
    explanation.row.status, explanation.row.error = "error", f"cannot write overlay {path}: {problem}"
    return None


class JsonLinesPrinter:
    """One JSON object per file, flushed at once, so a script can stream the results."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def print(self, explanation: Explanation, overlay: Path | None) -> None:
        record = {**explanation.as_dict(), "overlay": None if overlay is None else str(overlay)}
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()


class TablePrinter:
    """A fixed-width table; column widths are known up front, so rows print as they are ready."""

    def __init__(self, stream: TextIO, files: Sequence[str], class_names: Sequence[str], with_overlay: bool):
        self.stream = stream
        self.with_overlay = with_overlay
        self.file_width = max(len("file"), *(len(Path(name).as_posix()) for name in files))
        self.prediction_width = max(len("prediction"), len("skipped"), *(len(name) for name in class_names))
        self.probability_headers = [f"p_{name}" for name in class_names]
        header = ["file".ljust(self.file_width), "prediction".ljust(self.prediction_width), "confidence",
                  *(f"{h:>8}" for h in self.probability_headers)]
        self._write(header + (["overlay"] if with_overlay else []))

    def print(self, explanation: Explanation, overlay: Path | None) -> None:
        row = explanation.row
        if row.ok:
            prediction, numbers = row.prediction, [row.confidence, *row.probabilities]
        else:
            prediction, numbers = row.status, [None] * (1 + len(self.probability_headers))
        widths = [len("confidence"), *(max(8, len(h)) for h in self.probability_headers)]
        cells = [row.path.ljust(self.file_width), prediction.ljust(self.prediction_width),
                 *(_number(value).rjust(width) for value, width in zip(numbers, widths))]
        self._write(cells + ([str(overlay) if overlay else "-"] if self.with_overlay else []))

    def _write(self, cells: list[str]) -> None:
        self.stream.write("  ".join(cells).rstrip() + "\n")
        self.stream.flush()


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
