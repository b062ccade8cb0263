"""Scan configuration: parsed once from the command line, validated in one place, then frozen."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from batchcam.cam import METHODS
from batchcam.gallery import DEFAULT_PAGE_SIZE


HEAT_SCALES = ("image", "run")


class UsageError(Exception):
    """Bad arguments or configuration: exit 2, nothing in REPORT changed."""


def default_workers() -> int:
    """Decoding workers: one per core beyond the one the model runs on (at least one, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class ScanConfig:
    root: Path
    out: Path
    model: Path | None = None        # None: the bundled demo model
    device: str = "auto"
    batch_size: int = 32
    workers: int = 1
    cam: str = "gradcam"
    target: str = "predicted"        # "predicted" or a class name
    save_cams: bool = False
    full: bool = False               # recompute every image instead of reusing unchanged rows
    quiet: bool = False
    page_size: int = DEFAULT_PAGE_SIZE   # images per gallery page
    faithfulness: bool = False       # two extra forward passes per batch (batchcam.attention)
    heat_scale: str = "image"        # "image": each map alone; "run": one run-wide constant (keeps cams.npz)
    argv: tuple[str, ...] = ()

    @property
    def keeps_cams(self) -> bool:
        """Raw maps are kept (cams.npz): asked for, or needed for the run-wide heat scale."""
        return self.save_cams or self.heat_scale == "run"

    def validate(self) -> None:
        if not self.root.exists():
            raise UsageError(f"ROOT {self.root} does not exist")
        if not self.root.is_dir():
            raise UsageError(f"ROOT {self.root} is not a folder")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a folder")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.page_size < 1:
            raise UsageError(f"--page-size must be at least 1, got {self.page_size}")
        if self.workers < 0:
            raise UsageError(f"--workers must be 0 (decode in the main process) or more, got {self.workers}")
        if self.heat_scale not in HEAT_SCALES:
            raise UsageError(f"--heat-scale {self.heat_scale!r} is not one of: {', '.join(HEAT_SCALES)}")
        if self.cam not in METHODS:
            raise UsageError(f"--cam {self.cam!r} is not one of: {', '.join(METHODS)}")
        if self.model is not None and not self.model.is_file():
            raise UsageError(f"--model {self.model} does not exist")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def resolve_target(target: str, class_names: tuple[str, ...]) -> int | None:
    """None for the predicted class, else the index of the named class (case-insensitive)."""
    if target == "predicted":
        return None
    for index, name in enumerate(class_names):
        if name.lower() == target.lower():
            return index
    raise UsageError(f"--target {target!r} is neither 'predicted' nor a class of the model "
                     f"({', '.join(class_names)})")
