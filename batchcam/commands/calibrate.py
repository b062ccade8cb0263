"""``batchcam calibrate ROOT --model M --out M2``: add OOD statistics and a temperature to a model.

ROOT is a labelled ImageFolder tree (``ROOT/<CLASS>/...``, class names as the model's). Its files are
decoded exactly as scan decodes them and run through the same CamExplainer (one forward pass each); a
fixed, stratified share of them (chosen by a hash of the path, so a rerun picks the same ones) is
held out: the others fit the class means and covariance, the held-out ones set the temperature and
the flag threshold (``batchcam.model.calibration``). M2 gets M's weights unchanged.

Too few images for the statistics it fits is refused before any is decoded (and again if unreadable
files leave too few), saying how many it needs, and so is a temperature fit that ran to the edge of
its range (the held-out images hold no estimate of it); one outside a sane range is warned about. An
existing M2 is replaced only with ``--force``.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from batchcam.cam.explainer import CamExplainer
from batchcam.checks.metrics import expected_calibration_error
from batchcam.config import CalibrateConfig, shown
from batchcam.decode.dataset import ScanDataset
from batchcam.decode.discover import Candidate, discover
from batchcam.engines.stages import decode_loader
from batchcam.errors import UsageError
from batchcam.model.calibration import (
    MIN_FIT_PER_CLASS,
    MIN_HELD_OUT,
    Calibration,
    fit_calibration,
    scaled_probabilities,
    temperature_at_edge,
    temperature_warning,
    too_few_images,
)
from batchcam.model.checkpoint import LoadedModel, load_model, model_input, save_calibrated
from batchcam.records import display_path
from batchcam.runtime.console import Console
from batchcam.runtime.devices import resolve_device

CALIBRATION_DISPLAY_SIDE = 256  # the display copy decoding makes and calibration never shows: kept small
HELD_OUT_SHARE = 0.3       # of each class: temperature and threshold; the rest fits means and covariance


@dataclass(frozen=True)
class LabelledFile:
    relpath: str
    path: Path
    label: int
    held_out: bool


@dataclass(frozen=True)
class CalibrateResult:
    calibration: Calibration
    fit_images: int
    held_out_images: int
    unreadable: int
    ece_before: float | None
    ece_after: float | None

    @property
    def summary_line(self) -> str:
        ood = self.calibration.ood
        return (f"calibrated on {self.fit_images} + {self.held_out_images} held-out images "
                f"({self.unreadable} unreadable): temperature {self.calibration.temperature:.4f}, "
                f"held-out ECE {_round(self.ece_before)} -> {_round(self.ece_after)}, "
                f"OOD threshold {ood.threshold:.3f} (shrinkage {ood.shrinkage:.3f})")


def calibrate(config: CalibrateConfig, console: Console) -> CalibrateResult:
    config.validate()
    loaded = load_model(config.model, console.warn)
    class_names = loaded.spec.class_names
    files = labelled_files(config.root, class_names, console)
    check_enough([sum(f.label == c and not f.held_out for f in files) for c in range(len(class_names))],
                 sum(f.held_out for f in files), class_names, config.root)
    device = resolve_device(config.device)
    features, logits, labels, held_out, unreadable = forward_all(files, loaded, config, device, console)
    fit, held = ~held_out, held_out
    check_enough([int((labels[fit] == c).sum()) for c in range(len(class_names))], int(held.sum()), class_names,
                 config.root, readable=True)
    calibration = fit_calibration(features[fit], labels[fit], features[held], logits[held], labels[held],
                                  len(class_names))
    check_temperature(calibration.temperature, int(held.sum()), config.root)
    if warning := temperature_warning(calibration.temperature):
        console.warn(warning)
    save_calibrated(config.model, config.out, calibration.temperature, calibration.ood)
    return CalibrateResult(calibration=calibration, fit_images=int(fit.sum()), held_out_images=int(held.sum()),
                           unreadable=unreadable,
                           ece_before=_ece(logits[held], labels[held], 1.0),
                           ece_after=_ece(logits[held], labels[held], calibration.temperature))


def images_needed(classes: int) -> int:
    """About how many labelled images the minimums ask for, given the share held out of each class."""
    return max(math.ceil(MIN_HELD_OUT / HELD_OUT_SHARE), classes * math.ceil(MIN_FIT_PER_CLASS / (1 - HELD_OUT_SHARE)))


def check_enough(fit_per_class: Sequence[int], held_out: int, class_names: Sequence[str], root: Path,
                 readable: bool = False) -> None:
    """UsageError (exit 2, nothing written) when the images are too few for the statistics, saying how many it needs."""
    reason = too_few_images(fit_per_class, held_out, class_names)
    if reason:
        raise UsageError(f"{shown(root)}: too few {'readable ' if readable else ''}images to calibrate on: {reason}; "
                         f"{HELD_OUT_SHARE:.0%} of each class folder is held out, so that is about "
                         f"{images_needed(len(class_names))} labelled images in all")


def check_temperature(temperature: float, held_out: int, root: Path) -> None:
    """UsageError (nothing written) when the fit ran to an end of its range: no temperature was estimated."""
    if not temperature_at_edge(temperature):
        return
    low = temperature < 1
    verdict = "gets all of them right, or nearly, by a wide margin" if low else "gets nearly all of them wrong"
    raise UsageError(f"{shown(root)}: the {held_out} held-out images give no estimate of the temperature: the model "
                     f"{verdict}, so the fit runs to the edge of the range searched ({temperature:.4f}) and every "
                     f"confidence would read {'1.000' if low else 'as an even split'}; calibrate on held-out images "
                     "that include some the model gets wrong (nothing was written)")


def labelled_files(root: Path, class_names: tuple[str, ...], console: Console) -> list[LabelledFile]:
    """Every image under ``root/<CLASS>/`` (any depth), labelled by that folder; a stratified held-out share."""
    index = {name.lower(): i for i, name in enumerate(class_names)}
    by_class: dict[int, list[Candidate]] = {i: [] for i in range(len(class_names))}
    discovery = discover(root)
    for problem in discovery.problems:
        console.warn(problem)
    for candidate in discovery.candidates:
        label = index.get(candidate.relpath.split("/", 1)[0].lower()) if "/" in candidate.relpath else None
        if label is not None:
            by_class[label].append(candidate)
    files = []
    for label, found in by_class.items():
        ordered = sorted(found, key=lambda c: hashlib.sha256(c.relpath.encode("utf-8", "surrogateescape")).digest())
        cut = max(1, round(len(ordered) * HELD_OUT_SHARE))
        files += [LabelledFile(c.relpath, c.path, label, i < cut) for i, c in enumerate(ordered)]
    return files


def forward_all(files: list[LabelledFile], loaded: LoadedModel, config: CalibrateConfig, device: torch.device,
                console: Console) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Features, logits, labels and held-out marks of every readable file (decoded as scan decodes)."""
    dataset = ScanDataset(files, loaded.spec.image_size, CALIBRATION_DISPLAY_SIDE,
                          max_file_bytes=config.max_file_bytes, selection=config.selection, resize=loaded.spec.resize)
    by_relpath = {f.relpath: f for f in files}
    features, logits, labels, held_out, unreadable = [], [], [], [], 0
    model = loaded.model.to(device)
    with CamExplainer(model, target_layer=loaded.target_layer) as explainer:
        for samples, views in decode_loader(dataset, config.batch_size, config.workers):
            for sample in samples:
                if not sample.ok:
                    unreadable += 1
                    console.log(f"warning: {display_path(sample.relpath)}: left out: "
                                f"{sample.error or sample.skip_reason}")
            if views is None:
                continue
            batch = explainer(model_input(views.to(device), loaded.spec))
            good = [by_relpath[s.relpath] for s in samples if s.ok]
            features.append(batch.features)
            logits.append(batch.logits)
            labels += [f.label for f in good]
            held_out += [f.held_out for f in good]
    if not features:
        raise UsageError(f"{shown(config.root)}: no readable image to calibrate on")
    return (torch.cat(features), torch.cat(logits), torch.tensor(labels), torch.tensor(held_out, dtype=torch.bool),
            unreadable)


def _ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float | None:
    probabilities = scaled_probabilities(logits, temperature)
    confidence, predicted = probabilities.max(1)
    return expected_calibration_error((predicted == labels).tolist(), confidence.tolist())


def _round(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
