"""The table of options and every command's configuration: parsed once, validated here, then frozen.

Each option is declared once below (``batchcam.options.Option``: flag, type, help, validation,
whether it changes a row); each command's configuration binds the options it takes with its
defaults, and the command line, the row-reuse key and the manifest's settings derive from them.
Nothing heavy is imported: the command line builds and checks these before any library loads, so a
mistake (or a locked REPORT) is reported at once. What needs torch to check (is CUDA there?) is
checked by the command once it has resolved the device (``runtime.devices``).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from batchcam.errors import UsageError
from batchcam.options import Config, Group, Option, check_choice, nested, path_argument, switch
from batchcam.records import display_path

# CAM methods: the exact fast path (gradcam) and pytorch-grad-cam's classes (cam.explainer maps them).
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
MAX_SANITY_SAMPLE = 10_000       # each sampled image costs a map per randomised layer
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
    """--max-concurrent-requests when not given: 4 with the default --max-upload-mb of 50 (1 for a cap that
    ``validate`` refuses, so a configuration with one can still be made and refused)."""
    low, high = CONCURRENT_REQUESTS_RANGE
    if not 0 < max_upload_mb < math.inf:  # NaN too
        return low
    return max(low, min(high // 4, int(UPLOADS_BUDGET_MB // (2 * max_upload_mb))))


# The architectures batchcam builds (model.architectures.ARCHITECTURES, in this order) and how a model's
# input is resized (decode.imaging.model_view): named here so the command line lists them without torch.
ARCHITECTURE_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "efficientnet_b0")
RESIZE_MODES = ("squash", "center-crop")

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

    def as_options(self) -> dict[str, str | None]:
        """The options that make this rule, as they would be typed (the manifest's settings)."""
        if self.everything:
            return {"select": "all", "modalities": None, "views": None}
        return {"select": self.mode, "modalities": ",".join(self.modalities),
                "views": ",".join(self.views) if self.views else ANY_VIEW}

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


# ---------------------------------------------------------------- how options are checked

def counted(low: int, high: int) -> Callable[[str, int], None]:
    return lambda name, value: check_count(name, value, low, high)


def within(low: float, high: float, unit: str = "") -> Callable[[str, float], None]:
    return lambda name, value: check_in_range(name, value, low, high, unit)


def existing_folder(name: str, root: Path) -> None:
    if not root.exists():
        raise UsageError(f"{name} {shown(root)} does not exist")
    if not root.is_dir():
        raise UsageError(f"{name} {shown(root)} is not a folder")


def folder_or_new(name: str, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{name} {shown(out)} exists and is not a folder")


def labelled_tree(name: str, root: Path) -> None:
    if not root.is_dir():
        raise UsageError(f"{name} {shown(root)} is not a folder (expected one sub-folder per class)")


def model_file(name: str, model: Path) -> None:
    check_model(model, name)


def comma_separated(text: str) -> tuple[str, ...]:
    """``A,B,C`` -> ("A", "B", "C"), each name stripped (``--classes``)."""
    return tuple(name.strip() for name in text.split(","))


def numbers(text: str) -> tuple[float, ...]:
    """``0.485,0.456,0.406`` -> floats (``--mean``, ``--std``); argparse says which value is not a number."""
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None


def one_of(*allowed: int) -> Callable[[str, int], None]:
    def check(name: str, value: int) -> None:
        if value not in allowed:
            raise UsageError(f"{name} must be {' or '.join(map(str, allowed))}, got {value}")
    return check


def overlay_side(name: str, size: int) -> None:
    low, high = OVERLAY_SIZES
    if not low <= size <= high:
        raise UsageError(f"{name} must be between {low} and {high} px, got {size}")


# ---------------------------------------------------------------- the options
# affects_rows: the option changes what a scan's row holds (or its overlay), so it is part of the key
# rows are reused under (report.store); every scan option says so, and tests/unit/test_options.py checks
# each against a real re-run.

MODEL = Option(flag="--model", parse=path_argument, metavar="MODEL",
               help="a batchcam checkpoint, or a state dict of a resnet18/34/50/101, densenet121 or efficientnet_b0 "
               "(plain or in a training checkpoint); anything else: batchcam import-model",
               none_means="the bundled demo model", check=model_file, affects_rows=True,
               keyed_resolved=True)  # keyed as the model's sha256, target layer and preprocessing
DEVICE = Option(flag="--device", parse=str, help="auto (CUDA when present), cpu, cuda or cuda:N",
                affects_rows=False)  # keyed through the precision it resolves to
BATCH_SIZE = Option(flag="--batch-size", parse=int, help="images per model batch", check=counted(1, 4096),
                    affects_rows=False)
WORKERS = Option(flag="--workers", parse=int, check=counted(0, MAX_WORKERS), affects_rows=False,
                 help=f"0..{MAX_WORKERS}. local engine: DataLoader processes decoding images (0: decode in the main "
                 "process); ray engine: model actors")
CAM = Option(flag="--cam", parse=str, choices=CAM_METHODS, metavar="METHOD", affects_rows=True,
             help=f"CAM method, one of: {', '.join(CAM_METHODS)}")
TARGET = Option(flag="--target", parse=str, help="class the heatmap explains: 'predicted' or a class name",
                affects_rows=True, keyed_resolved=True)  # keyed as the class it names in the model
MAX_FILE_MB = Option(flag="--max-file-mb", parse=float, metavar="MB", check=within(*MAX_FILE_MB_RANGE),
                     affects_rows=False,  # a file over it is a transient error row, decided again every run
                     help="a larger file is an error row and is never read, in MB of 2^20 bytes (default: "
                     "{default}; far above any real X-ray)")
SELECT = Option(flag="--select", parse=str, choices=SELECT_MODES, affects_rows=True,
                help="chest: score only DICOM films that are frontal chest radiographs (by their Modality, "
                "BodyPartExamined and ViewPosition), the others become 'skipped' rows with the reason; all: "
                "score every file. Files without DICOM tags (JPEG, PNG, ...) are always scored")
MODALITIES = Option(flag="--modalities", parse=str, metavar="LIST", none_means=",".join(CHEST_MODALITIES),
                    help="with --select chest: the DICOM modalities scored", affects_rows=True)
VIEWS = Option(flag="--views", parse=str, metavar="LIST", none_means=",".join(FRONTAL_VIEWS), affects_rows=True,
               help="with --select chest: the ViewPosition values scored, or 'any' (default: {default}); a film "
               "without ViewPosition is scored")
# A DICOM row records the rule that decided it; a changed rule decides only those rows again.
SELECTION = Group((SELECT.bound("chest"), MODALITIES.bound(None), VIEWS.bound(None)), Selection.from_options,
                  Selection.as_options, decided_per_row=True)

# scan
POSITIVE = Option(flag="--positive", parse=comma_separated, metavar="CLASS[,CLASS]", affects_rows=False,
                  none_means="PNEUMONIA when the model has it, else its last class",
                  help="the class or classes scored as positive in the binary metrics (sensitivity, specificity, "
                  "precision, F1, ROC AUC): an image is positive when its class is any of them")
ROOT = Option(flag="root", parse=path_argument, metavar="ROOT", help="folder to walk (recursively)",
              check=existing_folder, affects_rows=False)  # rows are of files relative to it
REPORT_OUT = Option(flag="--out", parse=path_argument, metavar="REPORT", help="report folder to write",
                    check=folder_or_new, affects_rows=False)
SAVE_CAMS = switch("--save-cams", "also write cams.npz with the raw low-resolution map of every ok image",
                   affects_rows=False)  # a row whose map cams.npz lacks is redone (scan.run.write_scan)
FULL = switch("--full", "recompute every image (default: reuse rows of unchanged files and settings)",
              affects_rows=False)
QUIET = switch("--quiet", "print only warnings, errors and the summary line", affects_rows=False)
PAGE_SIZE = Option(flag="--page-size", parse=int, help="images per gallery page", check=counted(1, 10**6),
                   affects_rows=False)
HEAT_SCALE = Option(flag="--heat-scale", parse=str, choices=HEAT_SCALES, affects_rows=True,
                    help="image: each heatmap scaled to its own range; run: every heatmap scaled by one run-wide "
                    "constant (99th percentile of raw map values) so heat compares across images (keeps cams.npz, "
                    "re-renders every overlay at the end of the run)")
FAITHFULNESS = switch("--faithfulness", "also measure the probability drop when the top 20% of each map (and a "
                      "random region of the same size) is removed: two extra forward passes per batch",
                      affects_rows=True)
ENGINE = Option(flag="--engine", parse=str, choices=ENGINES, affects_rows=False,
                help="local: this machine (DataLoader + model in this process); ray: a Ray cluster (needs the "
                "'ray' extra; REPORT must be on storage every node sees)")
RAY_ADDRESS = Option(flag="--ray-address", parse=str, metavar="ADDR", affects_rows=False,
                     none_means="start a local Ray cluster for this run",
                     help="with --engine ray: the cluster to join, e.g. head-node:6379, or 'auto' for the one "
                     "`ray start` runs on this machine")
GPUS_PER_WORKER = Option(flag="--gpus-per-worker", parse=float, metavar="G", affects_rows=False,
                         none_means="1 when the cluster has GPUs, else 0",
                         help="with --engine ray: GPUs per model actor (0: CPU actors; 0.5: two actors share a GPU)")
OVERLAY_SIZE = Option(flag="--overlay-size", parse=int, metavar="PX", check=overlay_side, affects_rows=True,
                      help="longer side of the overlays, px (never enlarged); 1024 is sharper in the large view "
                      "and costs about three times the CPU time per image")
PRECISION = Option(flag="--precision", parse=str, choices=PRECISIONS, affects_rows=True,
                   keyed_resolved=True,  # keyed as the autocast dtype it resolves to on the run's device
                   help="the forward pass's precision: auto is bf16 (else fp16) autocast on CUDA and fp32 on the "
                   "CPU; the heatmap is always computed in fp32")
COMPILE = switch("--compile", "torch.compile the model (a minute or more of compilation; pays off on long GPU "
                 "runs)", affects_rows=False)
DECODE = Option(flag="--decode", parse=str, choices=DECODERS,
                affects_rows=True,  # the batched decoder's pixels differ slightly from Pillow's
                help="gpu: decode JPEGs in batches on the GPU (nvJPEG) when CPU decoding is the bottleneck; other "
                "formats are still decoded on the CPU")
BACKEND = Option(flag="--backend", parse=str, choices=BACKENDS, affects_rows=False,
                 help="the exact gradcam path's model step: onnx runs it in ONNX Runtime (CPU, fp32; pip install "
                 "'batchcam[onnx]'), eager in PyTorch; auto is onnx for CPU runs of "
                 f"{BACKEND_AUTO_MIN_IMAGES} images or more when onnxruntime is installed, else eager")

# predict
FILES = Option(flag="files", parse=str, metavar="FILE", affects_rows=False,
               help="X-ray images (JPEG, PNG, BMP, TIFF, 16-bit too; DICOM with the dicom extra)")
OVERLAYS_OUT = Option(flag="--out", parse=path_argument, metavar="DIR", check=folder_or_new, affects_rows=False,
                      help="write each overlay (JPEG) into DIR", none_means="no files are written")
JSON = switch("--json", "print one JSON object per file instead of a table", affects_rows=False)

# evaluate, review
REPORT = Option(flag="report", parse=path_argument, metavar="REPORT", help="a report folder written by scan",
                affects_rows=False)
BOXES = Option(flag="--boxes", parse=path_argument, metavar="BOXES.csv", affects_rows=False,
               help="boxes: path,x0,y0,x1,y1 (path as in predictions.csv) or RSNA patientId,x,y,width,height,Target")
IMPORT = Option(flag="--import", dest="import_csv", parse=path_argument, metavar="REVIEW.csv", affects_rows=False,
                help="the file the gallery's \"Export decisions\" downloaded; later decisions win")

# sanity
SAMPLE_ROOT = replace(ROOT, help="folder of X-rays to sample from", check=None)
SAMPLE = Option(flag="--sample", parse=int, help="images to sample", check=counted(1, MAX_SANITY_SAMPLE),
                affects_rows=False)
SANITY_OUT = Option(flag="--out", parse=path_argument, metavar="DIR", check=folder_or_new, affects_rows=False,
                    help="folder for sanity.md, sanity.json and sanity.png")

# serve
HOST = Option(flag="--host", parse=str, affects_rows=False,
              help="address to bind (default: {default}); anything but loopback exposes the page to the network. "
              "Requests must name this address (or localhost, when it is loopback) in their Host header")
PORT = Option(flag="--port", parse=int, help="TCP port", check=counted(0, 65535), affects_rows=False)
MAX_UPLOAD_MB = Option(flag="--max-upload-mb", parse=float, metavar="MB", check=within(*UPLOAD_MB_RANGE, unit="MB"),
                       affects_rows=False,
                       help=f"largest request accepted, in MB of 2^20 bytes, {UPLOAD_MB_RANGE[0]} to "
                       f"{UPLOAD_MB_RANGE[1]} (default: {{default}}); larger ones get HTTP 413")
MAX_FILES = Option(flag="--max-files", parse=int, metavar="N", check=counted(*MAX_FILES_RANGE), affects_rows=False,
                   help=f"most files in one request, {MAX_FILES_RANGE[0]} to {MAX_FILES_RANGE[1]} (default: "
                   "{default}); more get HTTP 413 before any is decoded")
MAX_MEGAPIXELS = Option(flag="--max-megapixels", parse=float, metavar="MP", affects_rows=False,
                        check=within(*MEGAPIXELS_RANGE, unit="megapixels"),
                        help=f"most pixels in one request, in millions, as the images' headers state them, "
                        f"{MEGAPIXELS_RANGE[0]} to {MEGAPIXELS_RANGE[1]} (default: {{default}}); a 16-bit, float or "
                        "DICOM image, decoded through 64-bit floats, may have a quarter of that (a colour DICOM a "
                        "twelfth); more get HTTP 413 before any pixel is decoded")
MAX_CONCURRENT_REQUESTS = Option(flag="--max-concurrent-requests", parse=int, metavar="N", affects_rows=False,
                                 check=counted(*CONCURRENT_REQUESTS_RANGE),
                                 help=f"requests read, decoded and explained at once, {CONCURRENT_REQUESTS_RANGE[0]} "
                                 f"to {CONCURRENT_REQUESTS_RANGE[1]}; one more gets HTTP 503 with a Retry-After "
                                 "header")

# calibrate
LABELLED_ROOT = Option(flag="root", parse=path_argument, metavar="LABELLED_ROOT", check=labelled_tree,
                       affects_rows=False,
                       help="ImageFolder tree: one sub-folder per class of the model (NORMAL/, PNEUMONIA/)")
MODEL_TO_CALIBRATE = replace(MODEL, help="the checkpoint or state dict to calibrate")
CALIBRATED_OUT = Option(flag="--out", parse=path_argument, metavar="MODEL_OUT", affects_rows=False,
                        help="the new checkpoint to write (never --model itself, never through a link)")
FORCE = switch("--force", "replace MODEL_OUT when it exists (default: refuse; never --model, never a link)",
               affects_rows=False)
# import-model
MODEL_SOURCE = Option(flag="source", parse=path_argument, metavar="SRC", check=model_file, affects_rows=False,
                      help="the model file to read: a state dict or training checkpoint, a whole pickled model "
                      "(with --trust-pickle), a TorchScript file, or a batchcam checkpoint")
IMPORTED_OUT = Option(flag="--out", parse=path_argument, metavar="DST.pt", affects_rows=False,
                      help="the batchcam checkpoint to write (never SRC itself, never through a link)")
ARCH = Option(flag="--arch", parse=str, choices=ARCHITECTURE_NAMES, metavar="NAME", affects_rows=False,
              none_means="recognised from the weights' names and shapes",
              help=f"the architecture, checked against the weights: {', '.join(ARCHITECTURE_NAMES)}")
CLASSES = Option(flag="--classes", parse=comma_separated, metavar="A,B,...", affects_rows=False,
                 none_means="the file's class_names/classes/class_to_idx/idx_to_class, else NORMAL,PNEUMONIA for "
                 "two outputs or a single logit",
                 help="the class names in the order of the model's outputs")
INPUT_SIZE = Option(flag="--input-size", parse=int, metavar="N", check=counted(16, 4096), affects_rows=False,
                    none_means="224, or what a batchcam checkpoint records", help="the model's input is N x N pixels")
RESIZE = Option(flag="--resize", parse=str, choices=RESIZE_MODES, affects_rows=False, none_means="squash",
                help="squash: Resize((N, N)), the whole image; center-crop: torchvision's evaluation transform, "
                "Resize(round(N / 0.875)) on the shorter side then CenterCrop(N)")
MEAN = Option(flag="--mean", parse=numbers, metavar="M[,M,M]", affects_rows=False,
              none_means="ImageNet's for 3 channels; a 1-channel model declares it",
              help="Normalize's mean, one value or one per channel (with --std)")
STD = Option(flag="--std", parse=numbers, metavar="S[,S,S]", affects_rows=False,
             none_means="ImageNet's for 3 channels; a 1-channel model declares it",
             help="Normalize's std, one value or one per channel (with --mean)")
CHANNELS = Option(flag="--channels", parse=int, metavar="1|3", check=one_of(1, 3), affects_rows=False,
                  none_means="read off the first convolution",
                  help="the model's input channels: 3 (Image.convert('RGB')) or 1 (convert('L'))")
TRUST_PICKLE = switch("--trust-pickle", "read a whole pickled model (torch.save(model)): unpickling it runs code "
                      "from the file, so only for a file you trust; only its weights and structure are kept",
                      affects_rows=False)
FORCE_IMPORT = switch("--force", "replace DST.pt when it exists (default: refuse; never SRC, never a link)",
                      affects_rows=False)

DECODING_WORKERS = replace(WORKERS, help=f"DataLoader processes decoding images, 0..{MAX_WORKERS} (default: "
                           "{default}, decode in this process)")


# ---------------------------------------------------------------- the commands' configurations

@dataclass(frozen=True, kw_only=True)
class Measures(Config):
    """What each row measures besides the prediction and its map (``engines.stages.explain_batch``)."""

    faithfulness: bool = FAITHFULNESS.field(False)   # two extra forward passes per batch (checks.attention)


@dataclass(frozen=True, kw_only=True)
class ScanConfig(Config):
    root: Path = ROOT.required()
    out: Path = REPORT_OUT.required()
    model: Path | None = MODEL.optional()
    device: str = DEVICE.field("auto")
    batch_size: int = BATCH_SIZE.field(32)
    workers: int = WORKERS.derived(lambda config: default_workers_for(config.engine),
                                   shown="CPU cores - 1, 1..8, with the local engine; one per GPU of the cluster, "
                                   "or half its CPUs without GPUs, with the ray engine")
    cam: str = CAM.field("gradcam")
    target: str = TARGET.field("predicted")
    positive: tuple[str, ...] | None = POSITIVE.optional()
    save_cams: bool = SAVE_CAMS.field(False)
    full: bool = FULL.field(False)
    quiet: bool = QUIET.field(False)
    page_size: int = PAGE_SIZE.field(DEFAULT_PAGE_SIZE)
    heat_scale: str = HEAT_SCALE.field("image")
    measures: Measures = nested(Measures())
    max_file_mb: float = MAX_FILE_MB.field(float(DEFAULT_MAX_FILE_MB))
    selection: Selection = SELECTION.field(Selection())
    engine: str = ENGINE.field("local")
    ray_address: str | None = RAY_ADDRESS.optional()
    gpus_per_worker: float | None = GPUS_PER_WORKER.optional()
    overlay_size: int = OVERLAY_SIZE.field(OVERLAY_LONG_SIDE)
    precision: str = PRECISION.field("auto")
    compile: bool = COMPILE.field(False)
    decode: str = DECODE.field("cpu")
    backend: str = BACKEND.field("auto")
    argv: tuple[str, ...] = ()   # as given, for the manifest and the log

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

    @property
    def keeps_cams(self) -> bool:
        """Raw maps are kept (cams.npz): asked for, or needed for the run-wide heat scale."""
        return self.save_cams or self.heat_scale == "run"

    def check(self) -> None:
        if self.backend == "onnx" and self.compile:
            raise UsageError("--compile and --backend onnx both build the model step; choose one")
        self.check_engine()

    def validate_device(self, device_type: str) -> None:
        """What can only be checked once ``--device`` is resolved (it needs torch)."""
        if self.decode == "gpu" and (device_type != "cuda" or self.engine != "local"):
            raise UsageError("--decode gpu needs a CUDA device and the local engine "
                             f"(this run: device {device_type}, engine {self.engine})")

    def check_engine(self) -> None:
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


@dataclass(frozen=True, kw_only=True)
class PredictConfig(Config):
    files: tuple[str, ...] = FILES.many()
    model: Path | None = MODEL.optional()
    device: str = DEVICE.field("auto")
    out: Path | None = OVERLAYS_OUT.optional()
    json: bool = JSON.field(False)
    batch_size: int = BATCH_SIZE.field(16)
    cam: str = CAM.field("gradcam")
    target: str = TARGET.field("predicted")
    max_file_mb: float = MAX_FILE_MB.field(float(DEFAULT_MAX_FILE_MB))
    selection: Selection = SELECTION.field(Selection())

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

    def check(self) -> None:
        if not self.files:
            raise UsageError("predict needs at least one FILE")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Config):
    report: Path = REPORT.required()
    boxes: Path = BOXES.required()


@dataclass(frozen=True, kw_only=True)
class SanityConfig(Config):
    root: Path = SAMPLE_ROOT.required()
    model: Path | None = MODEL.optional()
    device: str = DEVICE.field("auto")
    sample: int = SAMPLE.field(DEFAULT_SANITY_SAMPLE)
    out: Path = SANITY_OUT.field(Path("batchcam-sanity"))


@dataclass(frozen=True, kw_only=True)
class ServeConfig(Config):
    model: Path | None = MODEL.optional()
    device: str = DEVICE.field("auto")
    host: str = HOST.field("127.0.0.1")
    port: int = PORT.field(8000)
    max_upload_mb: float = MAX_UPLOAD_MB.field(float(DEFAULT_MAX_UPLOAD_MB))
    max_files: int = MAX_FILES.field(DEFAULT_MAX_FILES)                  # files in one request
    max_megapixels: float = MAX_MEGAPIXELS.field(float(DEFAULT_MAX_MEGAPIXELS))  # pixels in one request, in millions
    max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS.derived(
        lambda config: default_concurrent_requests(config.max_upload_mb),
        shown=f"as many as keep their bodies within {UPLOADS_BUDGET_MB} MB, each counted twice: "
        f"{default_concurrent_requests(DEFAULT_MAX_UPLOAD_MB)} with the default --max-upload-mb")
    selection: Selection = SELECTION.field(Selection())

    @property
    def concurrent_requests(self) -> int:
        """Requests in the decoding stage at once."""
        return self.max_concurrent_requests

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MEGABYTE)

    @property
    def max_pixels_per_request(self) -> int:
        return int(self.max_megapixels * MEGAPIXEL)


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig(Config):
    """``batchcam calibrate ROOT --model M --out M2``: M's weights with statistics and a temperature."""

    root: Path = LABELLED_ROOT.required()
    model: Path = MODEL_TO_CALIBRATE.required()
    out: Path = CALIBRATED_OUT.required()
    force: bool = FORCE.field(False)    # replace an existing --out (never --model, never through a link)
    device: str = DEVICE.field("auto")
    batch_size: int = BATCH_SIZE.field(32)
    workers: int = DECODING_WORKERS.field(0)
    max_file_mb: float = MAX_FILE_MB.field(float(DEFAULT_MAX_FILE_MB))
    selection: Selection = SELECTION.field(Selection())  # the films the statistics describe: those scan would score

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MEGABYTE)

    def check(self) -> None:
        check_new_model_file(self.out, self.model, "--model", self.force)


@dataclass(frozen=True, kw_only=True)
class ImportModelConfig(Config):
    """``batchcam import-model SRC --out DST.pt``: a model trained elsewhere, declared once, as a checkpoint."""

    source: Path = MODEL_SOURCE.required()
    out: Path = IMPORTED_OUT.required()
    arch: str | None = ARCH.optional()
    classes: tuple[str, ...] | None = CLASSES.optional()
    input_size: int | None = INPUT_SIZE.optional()
    resize: str | None = RESIZE.optional()
    mean: tuple[float, ...] | None = MEAN.optional()
    std: tuple[float, ...] | None = STD.optional()
    channels: int | None = CHANNELS.optional()
    trust_pickle: bool = TRUST_PICKLE.field(False)
    force: bool = FORCE_IMPORT.field(False)

    def check(self) -> None:
        check_new_model_file(self.out, self.source, "SRC", self.force)


def check_new_model_file(out: Path, source: Path, source_name: str, force: bool) -> None:
    """A model file about to be written from ``source``: never ``source`` itself, never through a link, an
    existing file only with ``force``, in a folder that exists."""
    if out.is_symlink():
        raise UsageError(f"--out {shown(out)} is a symbolic link; batchcam never writes through one")
    if out.exists() and (out.is_dir() or os.path.samefile(out, source)):
        raise UsageError(f"--out {shown(out)} is a folder or the {source_name} file itself; name a new file")
    if os.path.abspath(out) == os.path.abspath(source):
        raise UsageError(f"--out must differ from {source_name}: batchcam never overwrites its input")
    if out.exists() and not force:
        raise UsageError(f"--out {shown(out)} exists: give --force to replace it, or name a new file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {shown(out)}: folder {shown(out.parent)} does not exist")


@dataclass(frozen=True, kw_only=True)
class ReviewConfig(Config):
    report: Path = REPORT.required()
    import_csv: Path = IMPORT.required()


def check_model(model: Path | None, name: str = "--model") -> None:
    """A model file given: a regular file (a FIFO or ``/dev/null`` is said to be what it is) within the size
    limit. Checked before REPORT is touched; ``model.reading`` checks again on the descriptor it reads."""
    if model is None:
        return
    try:
        status = os.stat(model)
    except FileNotFoundError:
        raise UsageError(f"{name} {shown(model)} does not exist") from None
    except OSError as e:
        raise UsageError(f"{name} {shown(model)}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(status.st_mode):
        raise UsageError(f"{name} {shown(model)} is {file_kind(status.st_mode)}, not a regular file: give a "
                         "checkpoint file")
    if status.st_size > MAX_MODEL_BYTES:
        raise UsageError(f"{name} {shown(model)} is {status.st_size / MEGABYTE:.0f} MiB, more than the "
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


def resolve_positive(positive: Sequence[str] | None, class_names: Sequence[str]) -> tuple[int, ...]:
    """The indices of the ``--positive`` classes (case-insensitive, as ``resolve_target`` matches: the first
    class of that name; each once, in the classes' order); the default (PNEUMONIA, else the last class) when
    None. UsageError for a name not among ``class_names`` (a model's, or the training data's folders) or for
    every class at once (nothing would be negative)."""
    if positive is None:
        return (default_positive_index(class_names),)
    classes = ", ".join(class_names)
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(name.lower(), i)
    if not all(positive):
        raise UsageError(f"--positive {','.join(positive)!r} has an empty class name; name some of the classes "
                         f"({classes}), separated by commas")
    unknown = [name for name in positive if name.lower() not in index]
    if unknown:
        raise UsageError(f"--positive {','.join(unknown)}: not one of the classes ({classes})")
    chosen = tuple(sorted({index[name.lower()] for name in positive}))
    if len(chosen) == len(class_names):
        raise UsageError(f"--positive names every class ({classes}): leave at least one negative")
    return chosen


def default_positive_index(class_names: Sequence[str]) -> int:
    """The positive class when ``--positive`` is left out: PNEUMONIA when present, else the last class."""
    upper = [name.upper() for name in class_names]
    return upper.index("PNEUMONIA") if "PNEUMONIA" in upper else len(class_names) - 1
