"""Every command's configuration: parsed once from the command line, validated here, then frozen.

Nothing heavy is imported: the command line builds and checks these before any library loads, so a
mistake (or a locked REPORT) is reported at once. What needs torch to check (is CUDA there?) is
checked by the command once it has resolved the device (``runtime.devices``).
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from batchcam.errors import UsageError
from batchcam.records import display_path

# CAM methods: the exact fast path (gradcam) and pytorch-grad-cam's classes (cam.engine maps them).
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")
HEAT_SCALES = ("image", "run")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("cpu", "gpu")
# The exact path's model step (batchcam.cam.backends): auto = ONNX Runtime for long CPU runs when installed.
BACKENDS = ("auto", "eager", "onnx")
# --backend auto: runs processing fewer images stay eager (ONNX Runtime's start-up is paid back by then).
BACKEND_AUTO_MIN_IMAGES = 128
ENGINES = ("local", "ray")
RAY_EXTRA_HINT = "pip install 'batchcam[ray]'"
HEAD_CONNECT_TIMEOUT = 10.0  # seconds; Ray itself retries an unreachable --ray-address for ever
MEGABYTE = 2**20
MEGAPIXEL = 1_000_000

DEFAULT_PAGE_SIZE = 100          # gallery cards per page
OVERLAY_LONG_SIDE = 512          # the overlays' longer side, px (scan --overlay-size)
OVERLAY_SIZES = (256, 4096)      # the smallest and largest --overlay-size, px
# No file is read whole beyond this size (scan and predict --max-file-mb): its size is checked
# before the read, so a sparse 40 GiB file costs a stat, not the machine's memory.
DEFAULT_MAX_FILE_MB = 512
DEFAULT_MAX_FILE_BYTES = DEFAULT_MAX_FILE_MB * MEGABYTE
MAX_FILE_MB_RANGE = (1.0, 1024.0 * 1024)  # 1 MB to 1 TB
DEFAULT_SANITY_SAMPLE = 16       # images the sanity check samples
# Files named on the command line are read whole, never beyond these (runtime.bounded.read_input).
MAX_MODEL_BYTES = 1024 * MEGABYTE          # --model: a float32 ResNet18 checkpoint is 45 MB
MAX_BOXES_BYTES = 256 * MEGABYTE           # evaluate --boxes: RSNA's 30,227 boxes take 1.5 MB
MAX_REVIEW_IMPORT_BYTES = 64 * MEGABYTE    # review --import: 150,000 decisions with full notes fit
# --workers: decoding processes (local engine) or model actors (ray engine); more only costs start-up.
MAX_WORKERS = 64

DEFAULT_MAX_UPLOAD_MB = 50       # serve: one request's body
UPLOAD_MB_RANGE = (1, 4096)      # one X-ray file at least; held in memory at most
DEFAULT_MAX_FILES = 32           # serve: files in one request
MAX_FILES_RANGE = (1, 1024)
DEFAULT_MAX_MEGAPIXELS = 100     # serve: pixels in one request, in millions, from the images' headers
MEGAPIXELS_RANGE = (1, 4096)
# serve: requests read, decoded and explained at once; more get 503. By default as many as keep
# their bodies within UPLOADS_BUDGET_MB, counting each body twice (while it is parsed, the parser's
# buffer and the bytes taken from it).
UPLOADS_BUDGET_MB = 400
CONCURRENT_REQUESTS_RANGE = (1, 64)


def default_concurrent_requests(max_upload_mb: float) -> int:
    """--max-concurrent-requests when not given: 4 with the default --max-upload-mb of 50."""
    low, high = CONCURRENT_REQUESTS_RANGE
    return max(low, min(high // 4, int(UPLOADS_BUDGET_MB // (2 * max_upload_mb))))


# Which DICOM films are scored (decode.selection applies the rule; files without tags are always scored).
SELECT_MODES = ("chest", "all")
CHEST_MODALITIES = ("CR", "DX")  # computed and digital radiography
FRONTAL_VIEWS = ("PA", "AP")
ANY_VIEW = "any"
DICOM_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")  # the characters and length of a DICOM code string (CS)


@dataclass(frozen=True)
class Selection:
    """Which DICOM films the model scores: ``chest`` (the default) scores a Modality in
    ``modalities`` whose BodyPartExamined is absent or names the chest and whose ViewPosition is
    absent or in ``views`` (None: any view); ``all`` scores every file. The rest become ``skipped``
    rows with their reason. ``key`` goes into the row store, so changing the rule re-decides them."""

    mode: str = "chest"
    modalities: tuple[str, ...] = CHEST_MODALITIES
    views: tuple[str, ...] | None = FRONTAL_VIEWS

    @classmethod
    def from_options(cls, select: str = "chest", modalities: str | None = None,
                     views: str | None = None) -> "Selection":
        """From ``--select``, ``--modalities CR,DX`` and ``--views PA,AP`` (or ``any``)."""
        check_choice("--select", select, SELECT_MODES)
        if select == "all":
            if modalities is not None or views is not None:
                raise UsageError("--modalities and --views choose among DICOM films; --select all scores every file")
            return cls(mode="all")
        chosen_views = None if views is not None and views.strip().lower() == ANY_VIEW else \
            parse_codes("--views", views, FRONTAL_VIEWS)
        return cls(mode="chest", modalities=parse_codes("--modalities", modalities, CHEST_MODALITIES),
                   views=chosen_views)

    @property
    def everything(self) -> bool:
        return self.mode == "all"

    @property
    def key(self) -> str:
        if self.everything:
            return "all"
        return f"chest;{','.join(self.modalities)};{','.join(self.views) if self.views else ANY_VIEW}"


def parse_codes(option: str, text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of DICOM codes, upper-cased and de-duplicated in order."""
    if text is None:
        return default
    codes = tuple(dict.fromkeys(code.strip().upper() for code in text.split(",") if code.strip()))
    if not codes:
        raise UsageError(f"{option} needs at least one value, e.g. {option} {','.join(default)}")
    for code in codes:
        if not DICOM_CODE.fullmatch(code):
            raise UsageError(f"{option}: {code!r} is not a DICOM code (letters, digits, space or _; at most 16)")
    return codes


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
    faithfulness: bool = False       # two extra forward passes per batch (batchcam.checks.attention)
    heat_scale: str = "image"        # "image": each map alone; "run": one run-wide constant (keeps cams.npz)
    overlay_size: int = OVERLAY_LONG_SIDE  # overlays' longer side, px (never enlarged)
    precision: str = "auto"          # the forward pass: auto = bf16 (else fp16) autocast on CUDA, fp32 on the CPU
    compile: bool = False            # torch.compile the model: slow to start, faster on long GPU runs
    decode: str = "cpu"              # "gpu": JPEGs decoded in batches on the GPU (batchcam.decode.gpu_decode)
    backend: str = "auto"            # the exact path's model step: "eager" (PyTorch), "onnx" (ONNX Runtime)
    engine: str = "local"            # "local": this process and its DataLoader; "ray": a Ray cluster
    ray_address: str | None = None   # None: the ray engine starts a local Ray cluster on this machine
    gpus_per_worker: float | None = None  # ray engine; None: 1 when the cluster has GPUs, else 0
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # a larger file is an error row, never read
    selection: Selection = Selection()        # which DICOM films are scored; the rest are skipped rows
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
            raise UsageError(f"ROOT {shown(self.root)} does not exist")
        if not self.root.is_dir():
            raise UsageError(f"ROOT {shown(self.root)} is not a folder")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {shown(self.out)} exists and is not a folder")
        check_count("--batch-size", self.batch_size, 1, 4096)
        check_count("--page-size", self.page_size, 1, 10**6)
        check_count("--workers", self.workers, 0, MAX_WORKERS)
        check_choice("--heat-scale", self.heat_scale, HEAT_SCALES)
        check_choice("--cam", self.cam, CAM_METHODS)
        check_model(self.model)
        check_in_range("--max-file-mb", self.max_file_mb, *MAX_FILE_MB_RANGE)
        self.validate_engine()
        self.validate_performance()

    def validate_performance(self) -> None:
        low, high = OVERLAY_SIZES
        if not low <= self.overlay_size <= high:
            raise UsageError(f"--overlay-size must be between {low} and {high} px, got {self.overlay_size}")
        check_choice("--precision", self.precision, PRECISIONS)
        check_choice("--decode", self.decode, DECODERS)
        check_choice("--backend", self.backend, BACKENDS)
        if self.backend == "onnx" and self.compile:
            raise UsageError("--compile and --backend onnx both build the model step; choose one")

    def validate_device(self, device_type: str) -> None:
        """What can only be checked once ``--device`` is resolved (it needs torch)."""
        if self.decode == "gpu" and (device_type != "cuda" or self.engine != "local"):
            raise UsageError("--decode gpu needs a CUDA device and the local engine "
                             f"(this run: device {device_type}, engine {self.engine})")

    def validate_engine(self) -> None:
        check_choice("--engine", self.engine, ENGINES)
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


@dataclass(frozen=True)
class PredictConfig:
    files: tuple[str, ...]
    model: Path | None = None        # None: the bundled demo model
    out: Path | None = None          # None: no overlay is written anywhere
    json: bool = False
    device: str = "auto"
    cam: str = "gradcam"
    target: str = "predicted"
    batch_size: int = 16
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    selection: Selection = Selection()

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

    def validate(self) -> None:
        if not self.files:
            raise UsageError("predict needs at least one FILE")
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {shown(self.out)} exists and is not a folder")
        check_model(self.model)
        check_count("--batch-size", self.batch_size, 1, 4096)
        check_choice("--cam", self.cam, CAM_METHODS)
        check_in_range("--max-file-mb", self.max_file_mb, *MAX_FILE_MB_RANGE)


@dataclass(frozen=True)
class CalibrateConfig:
    """``batchcam calibrate ROOT --model M --out M2``: M's weights with statistics and a temperature."""

    root: Path
    model: Path
    out: Path
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    selection: Selection = Selection()  # the films the statistics describe: those scan would score
    force: bool = False                 # replace an existing --out (never --model, never through a link)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

    def validate(self) -> None:
        """The input checkpoint is never replaced, nothing is written through a link, and an existing
        file only with ``force``."""
        if not self.root.is_dir():
            raise UsageError(f"{shown(self.root)} is not a folder (expected one sub-folder per class)")
        check_model(self.model)
        if self.out.is_symlink():
            raise UsageError(f"--out {shown(self.out)} is a symbolic link; batchcam never writes through one")
        if self.out.exists() and (self.out.is_dir() or os.path.samefile(self.out, self.model)):
            raise UsageError(f"--out {shown(self.out)} is a folder or the --model file itself; name a new file")
        if os.path.abspath(self.out) == os.path.abspath(self.model):
            raise UsageError("--out must differ from --model: calibrate never overwrites its input")
        if self.out.exists() and not self.force:
            raise UsageError(f"--out {shown(self.out)} exists: give --force to replace it, or name a new file")
        if not self.out.parent.is_dir():
            raise UsageError(f"--out {shown(self.out)}: folder {shown(self.out.parent)} does not exist")
        check_count("--batch-size", self.batch_size, 1, 4096)
        check_count("--workers", self.workers, 0, MAX_WORKERS)
        check_in_range("--max-file-mb", self.max_file_mb, *MAX_FILE_MB_RANGE)


@dataclass(frozen=True)
class ServeConfig:
    model: Path | None = None        # None: the bundled demo model
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_files: int = DEFAULT_MAX_FILES              # files in one request
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS  # pixels in one request, in millions
    selection: Selection = Selection()
    max_concurrent_requests: int | None = None      # None: default_concurrent_requests(max_upload_mb)

    def validate(self) -> None:
        check_model(self.model)
        check_count("--port", self.port, 0, 65535)
        check_in_range("--max-upload-mb", self.max_upload_mb, *UPLOAD_MB_RANGE, unit="MB")
        check_count("--max-files", self.max_files, *MAX_FILES_RANGE)
        check_in_range("--max-megapixels", self.max_megapixels, *MEGAPIXELS_RANGE, unit="megapixels")
        if self.max_concurrent_requests is not None:
            check_count("--max-concurrent-requests", self.max_concurrent_requests, *CONCURRENT_REQUESTS_RANGE)

    @property
    def concurrent_requests(self) -> int:
        """Requests in the decoding stage at once (validate first)."""
        if self.max_concurrent_requests is None:
            return default_concurrent_requests(self.max_upload_mb)
        return self.max_concurrent_requests

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MEGABYTE)

    @property
    def max_pixels_per_request(self) -> int:
        return int(self.max_megapixels * MEGAPIXEL)


def check_model(model: Path | None) -> None:
    """A model file given: a regular file (a FIFO or ``/dev/null`` is said to be what it is) within the size
    limit. Checked before REPORT is touched; ``model.reading`` checks again on the descriptor it reads."""
    if model is None:
        return
    try:
        status = os.stat(model)
    except FileNotFoundError:
        raise UsageError(f"--model {shown(model)} does not exist") from None
    except OSError as e:
        raise UsageError(f"--model {shown(model)}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(status.st_mode):
        raise UsageError(f"--model {shown(model)} is {file_kind(status.st_mode)}, not a regular file: give a "
                         "checkpoint file")
    if status.st_size > MAX_MODEL_BYTES:
        raise UsageError(f"--model {shown(model)} is {status.st_size / MEGABYTE:.0f} MiB, more than the "
                         f"{MAX_MODEL_BYTES // MEGABYTE} MiB a model file may have")


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words (``a character device``)."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def shown(path: str | os.PathLike) -> str:
    """A path as one line of text: a newline or other control character in it is escaped, as the report shows
    names (``records.display_path``)."""
    return display_path(os.fspath(path))



def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{option} {value!r} is not one of: {', '.join(choices)}")


def check_in_range(option: str, value: float, low: float, high: float, unit: str = "") -> None:
    """UsageError unless ``low <= value <= high``; NaN and the infinities are refused by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{option} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number, got {value:g}")
    if value <= 0:
        raise UsageError(f"{option} must be more than 0, got {value:g}")
    unit = f" ({unit})" if unit else ""
    if value < low:
        raise UsageError(f"{option} must be at least {low:g}{unit}, got {value:g}")
    if value > high:
        raise UsageError(f"{option} must be at most {high:g}{unit}, got {value:g}")


def check_count(option: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be a whole number, got {value!r}")
    if value < low:
        raise UsageError(f"{option} must be at least {low}, got {value}")
    if value > high:
        raise UsageError(f"{option} must be at most {high}, got {value}")


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


def resolve_target(target: str, class_names: tuple[str, ...]) -> int | None:
    """None for the predicted class, else the index of the named class (case-insensitive)."""
    if target == "predicted":
        return None
    for index, name in enumerate(class_names):
        if name.lower() == target.lower():
            return index
    raise UsageError(f"--target {target!r} is neither 'predicted' nor a class of the model "
                     f"({', '.join(class_names)})")
