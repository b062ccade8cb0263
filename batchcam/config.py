"""Scan configuration: parsed once from the command line, validated in one place, then frozen."""
from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

import math

from batchcam.cam import METHODS
from batchcam.dataset import DEFAULT_MAX_FILE_MB
from batchcam.gallery import DEFAULT_PAGE_SIZE
from batchcam.imaging import OVERLAY_LONG_SIDE


HEAT_SCALES = ("image", "run")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("cpu", "gpu")
OVERLAY_SIZES = (256, 4096)      # the smallest and largest --overlay-size, px
MAX_FILE_MB_RANGE = (1.0, 1024.0 * 1024)  # --max-file-mb: 1 MB to 1 TB
MEGABYTE = 2**20
ENGINES = ("local", "ray")
RAY_EXTRA_HINT = "pip install 'batchcam[ray]'"
HEAD_CONNECT_TIMEOUT = 10.0  # seconds; Ray itself retries an unreachable --ray-address for ever


class UsageError(Exception):
    """Bad arguments or configuration: exit 2, nothing in REPORT changed."""


def default_workers() -> int:
    """Decoding workers: one per core beyond the one the model runs on (at least one, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def default_workers_for(engine: str) -> int:
    """``--workers`` left out: decoding processes for the local engine; for the ray engine 0, which
    sizes the pool of model actors to the cluster (see ``ray_engine.actor_count``)."""
    return default_workers() if engine == "local" else 0


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
    overlay_size: int = OVERLAY_LONG_SIDE  # overlays' longer side, px (never enlarged)
    precision: str = "auto"          # the forward pass: auto = bf16 (else fp16) autocast on CUDA, fp32 on the CPU
    compile: bool = False            # torch.compile the model: slow to start, faster on long GPU runs
    decode: str = "cpu"              # "gpu": JPEGs decoded in batches on the GPU (batchcam.gpu_decode)
    engine: str = "local"            # "local": this process and its DataLoader; "ray": a Ray cluster
    ray_address: str | None = None   # None: the ray engine starts a local Ray cluster on this machine
    gpus_per_worker: float | None = None  # ray engine; None: 1 when the cluster has GPUs, else 0
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # a larger file is an error row, never read
    argv: tuple[str, ...] = ()

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

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
        check_in_range("--max-file-mb", self.max_file_mb, *MAX_FILE_MB_RANGE)
        self.validate_engine()
        self.validate_performance(resolve_device(self.device))

    def validate_performance(self, device: torch.device) -> None:
        low, high = OVERLAY_SIZES
        if not low <= self.overlay_size <= high:
            raise UsageError(f"--overlay-size must be between {low} and {high} px, got {self.overlay_size}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of: {', '.join(PRECISIONS)}")
        if self.decode not in DECODERS:
            raise UsageError(f"--decode {self.decode!r} is not one of: {', '.join(DECODERS)}")
        if self.decode == "gpu" and (device.type != "cuda" or self.engine != "local"):
            raise UsageError("--decode gpu needs a CUDA device and the local engine "
                             f"(this run: device {device}, engine {self.engine})")

    def validate_engine(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r} is not one of: {', '.join(ENGINES)}")
        if self.engine != "ray":
            if self.ray_address is not None or self.gpus_per_worker is not None:
                raise UsageError("--ray-address and --gpus-per-worker need --engine ray")
            return
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must be 0 (CPU actors) or more, got {self.gpus_per_worker}")
        if self.device != "auto":  # an actor's device follows the GPUs Ray gives it, not the driver's
            raise UsageError(f"--device {self.device} applies to the local engine; with --engine ray each model "
                             "actor uses the GPU it is given (--gpus-per-worker)")
        if importlib.util.find_spec("ray") is None:
            raise UsageError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA_HINT}")
        if self.ray_address and (problem := unreachable(self.ray_address)):
            raise UsageError(f"--ray-address {self.ray_address}: cannot reach the Ray cluster's head node: {problem}")


def check_in_range(option: str, value: float, low: float, high: float) -> None:
    """UsageError unless ``low <= value <= high`` (NaN and infinities are refused too)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"{option} must be a number from {low:g} to {high:g}, got {value:g}")


def unreachable(address: str) -> str | None:
    """Why no TCP connection reaches ``HOST:PORT`` (or ``ray://HOST:PORT``); None when one does, or
    for the other forms (``auto``), which Ray resolves itself."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=HEAD_CONNECT_TIMEOUT).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass, or None for float32.

    ``auto`` is bfloat16 on CUDA devices that support it (its range matches float32's, so no
    overflow), else float16; on the CPU it is float32, the only precision whose probabilities
    stay within 1e-3 of the reference there.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
