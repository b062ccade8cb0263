"""The classifier and its checkpoint format, shared by ``train_model.py``, ``import-model`` and ``scan``.

A checkpoint is a plain dict of tensors, strings, numbers and lists, so it loads with
``torch.load(..., weights_only=True)`` and never unpickles arbitrary objects. It carries its own
preprocessing (input size, resize, channels, mean, std), class names, architecture and head, the
way torchvision's weight enums carry their transforms and categories, so a scan cannot preprocess
differently from training. It may also carry the calibration (``batchcam.model.calibration``): the
temperature and the out-of-distribution statistics; one without them scores at temperature 1 and
flags nothing.

Format version 2 (written now) records everything; version 1 (resnet18, three channels, squash)
stays readable. Besides batchcam checkpoints, ``load_checkpoint`` reads what a training script
saves when that is unambiguous (``batchcam.model.reading``): a plain state dict, or one in a
training container, of an architecture it recognises (``batchcam.model.architectures``) with a head
it can run (``batchcam.model.heads``). What it then has to assume (the preprocessing, the class
names, a head's parameterless layers) is listed in ``LoadedModel.assumptions``.
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18

from batchcam.config import MAX_MODEL_BYTES
from batchcam.decode.imaging import CENTER_CROP_RATIO, RESIZE_MODES
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.calibration import OodStatistics
from batchcam.model.heads import HeadError, HeadLayout, read_head_module
from batchcam.model.network import Network, NetworkError, build_network, canonical_state, read_network
from batchcam.model.reading import (
    ModelFile,
    archive_kind,
    find_weights,
    import_hint,
    load_weights_only,
    read_model_file,
    torchscript_refusal,
)
from batchcam.resources import DEMO_MODEL, DEMO_NOTICE
from batchcam.runtime.fsutil import SafeDir

FORMAT = "batchcam-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ARCH = "resnet18"            # build_model's (training's) architecture
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CLASS_NAMES = ("NORMAL", "PNEUMONIA")   # two outputs or a single logit, when the file names none
DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that a scan needs to reproduce training's view of an image."""

    class_names: tuple[str, ...]
    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dropout: float = 0.0
    arch: str = ARCH
    channels: int = 3              # the model's input channels: 3 (the gray image repeated) or 1
    resize: str = "squash"         # decode.imaging.model_view: "squash" or "center-crop"

    def __post_init__(self) -> None:
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be at least two distinct names, got {self.class_names}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std must have {self.channels} value(s), one per input channel")
        if not all(s > 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if not 16 <= self.image_size <= 4096:
            raise ValueError(f"image_size must be 16..4096 pixels, got {self.image_size}")

    def describe_preprocessing(self) -> str:
        """e.g. '224 x 224 squash (Resize((224, 224))), mean 0.5, std 0.25, 1 channel'."""
        size = self.image_size
        if self.resize == "squash":
            resize = f"squash (Resize(({size}, {size})))"
        else:
            resize = f"center-crop (Resize({round(size / CENTER_CROP_RATIO)}), CenterCrop({size}))"
        numbers = ", ".join
        return (f"{size} x {size} {resize}, mean {numbers(f'{m:g}' for m in self.mean)}, std "
                f"{numbers(f'{s:g}' for s in self.std)}, {self.channels} channel{'s' if self.channels > 1 else ''}")


@dataclass
class LoadedModel:
    """A model in eval mode together with where it came from and what it is."""

    model: nn.Module
    spec: ModelSpec
    path: Path
    sha256: str
    demo: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0              # divides the logits before the softmax
    ood: OodStatistics | None = None      # None: the checkpoint has no statistics, nothing is flagged
    target_layer: str = "layer4"          # the Grad-CAM layer (module path) of this architecture
    network: Network | None = None        # architecture, channels, head and outputs, as read off the weights
    source: str = "a batchcam checkpoint"  # what the file was: "a plain state dict", "a Lightning checkpoint (...)"
    assumptions: tuple[str, ...] = ()     # what batchcam assumed because the file does not say it

    def calibration_summary(self) -> dict[str, Any]:
        """What the manifest says about the temperature and the out-of-distribution statistics."""
        ood = self.ood.summary() if self.ood else {
            "statistics": False, "note": "this checkpoint has no feature statistics: ood_score and ood_flag "
                                         "are empty (batchcam calibrate adds them)"}
        return {"temperature": round(self.temperature, 6), "ood": ood}

    def description(self) -> str:
        """What the weights are and their head: 'weights of a resnet50, 2 outputs; fc = Linear(2048, 2)'."""
        if self.network is None:
            return f"weights of a {self.spec.arch}"
        return f"{self.network.describe()}; {self.network.head_description}"

    def assumption_notice(self) -> str | None:
        """The one warning line saying what was assumed (None when nothing was); ``load_model`` gives it."""
        if not self.assumptions:
            return None
        return (f"{self.path.name} is {self.source} that does not say everything; assumed "
                f"{'; '.join(self.assumptions)}. If any is wrong, declare it once: {import_hint(self.path.name)} "
                "with --classes, --input-size, --resize, --mean, --std")


def build_model(num_classes: int, dropout: float = 0.0, weights: Any = None) -> nn.Module:
    """Training's ResNet18: ``fc`` is ``Linear(512, num_classes)``, or ``Dropout(p) -> Linear`` when p > 0."""
    model = resnet18(weights=weights)
    in_features = model.fc.in_features
    head = nn.Linear(in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head
    return model


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, spec: ModelSpec, *,
                    training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                    half: bool = False, temperature: float | None = None,
                    ood: OodStatistics | None = None) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    ``half`` stores floating-point weights as float16 (the bundled demo model does, to stay small);
    they are cast back to float32 on load. The head's layers are read off ``model``'s modules.
    """
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    arch = ARCHITECTURES[spec.arch]
    head, _ = read_head_module(model.get_submodule(arch.head), arch.head)
    write_payload(path, payload(spec, state, head, training=training, metrics=metrics, temperature=temperature,
                                ood=ood))


def save_calibrated(source: str | os.PathLike, out: str | os.PathLike, temperature: float,
                    ood: OodStatistics) -> None:
    """Write ``source`` again at ``out`` with a temperature and statistics.

    A batchcam checkpoint keeps everything else as it was, its weights byte for byte; any other
    file batchcam reads becomes a version 2 checkpoint recording what was read and assumed.
    """
    file = read_model_file(source, MAX_MODEL_BYTES)
    reading = read_checkpoint(file)
    if reading.raw_batchcam is not None:
        written = {**reading.raw_batchcam, "temperature": float(temperature), "ood": ood.to_checkpoint()}
    else:
        written = payload(reading.spec, reading.state, reading.network.head, temperature=temperature, ood=ood,
                          assumed=reading.assumptions, source={"kind": reading.source, "sha256": file.sha256})
    write_payload(out, written)


def payload(spec: ModelSpec, state: dict, head: HeadLayout, *, training: dict[str, Any] | None = None,
            metrics: dict[str, Any] | None = None, temperature: float | None = None,
            ood: OodStatistics | None = None, assumed: tuple[str, ...] = (),
            source: dict[str, Any] | None = None) -> dict[str, Any]:
    """A version 2 checkpoint: plain types and tensors only."""
    written = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.arch,
        "class_names": list(spec.class_names), "image_size": spec.image_size, "resize": spec.resize,
        "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std), "dropout": float(spec.dropout),
        "head": head.to_checkpoint(), "training": training or {}, "metrics": metrics or {}, "state_dict": state,
    }
    if temperature is not None:
        written["temperature"] = float(temperature)
    if ood is not None:
        written["ood"] = ood.to_checkpoint()
    if assumed:
        written["assumed"] = list(assumed)
    if source:
        written["source"] = dict(source)
    return written


def payload_bytes(written: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(written, buffer)
    return buffer.getvalue()


def write_payload(path: str | os.PathLike, written: dict[str, Any] | bytes) -> None:
    path = Path(path)
    with SafeDir.open(path.parent) as folder, folder.atomic_write(path.name, "wb") as f:
        if isinstance(written, bytes):
            f.write(written)
        else:
            torch.save(written, f)


def load_model(path: Path | None, warn: Callable[[str], None], *, names_needed: bool = True) -> LoadedModel:
    """The checkpoint at ``path``, or the bundled demo model (saying so through ``warn``) when None.

    What batchcam had to assume to read the file is said through ``warn`` too, in one line.
    ``names_needed=False`` (``train_model.py --pretrained``, which replaces the head): a head of more
    than two outputs without class names is read with placeholder names instead of refused.
    """
    if path is None:
        warn(DEMO_NOTICE.removeprefix("batchcam: "))
        return load_checkpoint(DEMO_MODEL, demo=True)
    loaded = load_checkpoint(path, names_needed=names_needed)
    notice = loaded.assumption_notice()
    if notice:
        warn(notice)
    return loaded


def load_checkpoint(path: str | os.PathLike, *, demo: bool = False, max_bytes: int = MAX_MODEL_BYTES,
                    names_needed: bool = True) -> LoadedModel:
    """The model in a file batchcam reads (see the module docstring), in eval mode on the CPU."""
    return loaded_from(read_model_file(path, max_bytes), demo=demo, names_needed=names_needed)


def loaded_from(file: ModelFile, *, demo: bool = False, names_needed: bool = True) -> LoadedModel:
    """The model in ``file``'s bytes (read once: digest and weights are of the same bytes)."""
    reading = read_checkpoint(file, names_needed=names_needed)
    try:
        model = build_network(reading.network, reading.state)
    except NetworkError as e:
        raise file.refuse(str(e)) from None
    return LoadedModel(model=model, spec=reading.spec, path=file.path.resolve(), sha256=file.sha256, demo=demo,
                       info=reading.info, temperature=reading.temperature, ood=reading.ood,
                       target_layer=reading.network.target_layer, network=reading.network, source=reading.source,
                       assumptions=reading.assumptions)


@dataclass(frozen=True)
class CheckpointReading:
    """A model file understood, before any module is built."""

    spec: ModelSpec
    state: dict[str, torch.Tensor]     # canonical keys (shared prefix stripped, old names remapped)
    network: Network
    source: str
    info: dict[str, Any]
    assumptions: tuple[str, ...] = ()
    temperature: float = 1.0
    ood: OodStatistics | None = None
    raw_batchcam: dict[str, Any] | None = None   # the dict of a batchcam checkpoint, as read


def read_checkpoint(file: ModelFile, *, names_needed: bool = True) -> CheckpointReading:
    """What ``file`` holds, read without running code; CheckpointError (one line) for anything else."""
    if archive_kind(file) == "torchscript":
        raise torchscript_refusal(file)
    raw = load_weights_only(file)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return _read_batchcam(file, raw)
    return read_found_weights(file, raw, names_needed=names_needed)


def read_found_weights(file: ModelFile, raw: Any, *, names_needed: bool = True) -> CheckpointReading:
    """A state dict (plain or in a training container) with the defaults it needs, each listed as assumed."""
    found = find_weights(file, raw)
    state = canonical_state(found.state)
    network, head_assumed = network_of(file, state)
    if network.channels != 3:
        raise file.refuse(f"{network.describe()}; a 1-channel model's normalisation is not in the file: "
                          f"{import_hint(file.label, '--channels 1 --mean M --std S')}")
    class_names, names_assumed = _class_names(file, network, found.class_names, names_needed)
    spec = ModelSpec(class_names=class_names, arch=network.arch)
    assumed = (f"the preprocessing {spec.image_size} px squash, ImageNet mean/std, 3 channels", *names_assumed,
               *head_assumed)
    info = {"plain_state_dict": True} if found.source == "a plain state dict" else {"container": found.source}
    return CheckpointReading(spec, state, network, found.source, info, assumed)


def network_of(file: ModelFile, state: dict[str, torch.Tensor], *, declared_arch: str | None = None,
               recorded_head: HeadLayout | None = None) -> tuple[Network, tuple[str, ...]]:
    """``read_network`` with its refusal naming the file."""
    try:
        network, assumed, _ = read_network(state, declared_arch=declared_arch, recorded_head=recorded_head)
    except NetworkError as e:
        raise file.refuse(str(e)) from None
    return network, assumed


def _class_names(file: ModelFile, network: Network, found: tuple[str, ...] | None,
                 needed: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The file's class names checked against the head, else the default pair (assumed), else a refusal
    (placeholders ``output 0``... when the head is to be replaced: ``needed`` False)."""
    if found is not None:
        check_class_names(file, network, found)
        return found, ()
    if network.classes == 2:
        why = " (P(PNEUMONIA) = sigmoid of the single logit)" if network.single_logit else ""
        return DEFAULT_CLASS_NAMES, (f"the class names {', '.join(DEFAULT_CLASS_NAMES)}{why}",)
    if not needed:
        return tuple(f"output {i}" for i in range(network.classes)), ()
    letters = ",".join(chr(ord("A") + i) for i in range(min(network.outputs, 26)))
    raise file.refuse(f"{network.describe()}: a head with {network.outputs} outputs and no class names: "
                      f"{import_hint(file.label, '--classes ' + letters)}")


def check_class_names(file: ModelFile, network: Network, names: tuple[str, ...]) -> None:
    if len(names) != network.classes:
        head = "a single logit (2 classes)" if network.single_logit else f"{network.outputs} outputs"
        raise file.refuse(f"{len(names)} class names ({', '.join(names)}) for {network.describe()}: the head has "
                          f"{head}; name them: {import_hint(file.label, '--classes A,B,...')}")
    if len(set(names)) != len(names) or not all(name.strip() for name in names):
        raise file.refuse(f"its class names ({', '.join(names)}) must be distinct and not empty")


def _read_batchcam(file: ModelFile, raw: dict) -> CheckpointReading:
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise file.refuse(f"checkpoint format version {version!r} is not supported (this batchcam reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))})")
    arch = raw.get("arch")
    if arch not in ARCHITECTURES or (version == 1 and arch != ARCH):
        raise file.refuse(f"architecture {arch!r} is not one batchcam builds ({', '.join(ARCHITECTURES)})")
    state = raw.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise file.refuse("the checkpoint has no state_dict")
    try:
        recorded_head = HeadLayout.from_checkpoint(raw["head"]) if version >= 2 else None
        spec = ModelSpec(class_names=tuple(str(c) for c in raw["class_names"]), image_size=int(raw["image_size"]),
                         mean=tuple(float(m) for m in raw["mean"]), std=tuple(float(s) for s in raw["std"]),
                         dropout=float(raw.get("dropout", 0.0)), arch=arch, channels=int(raw.get("channels", 3)),
                         resize=str(raw.get("resize", "squash")))
    except (KeyError, TypeError, ValueError, HeadError) as e:
        raise file.refuse(f"checkpoint metadata is incomplete or invalid ({e})") from None
    network, _ = network_of(file, canonical_state(state), declared_arch=arch, recorded_head=recorded_head)
    if network.channels != spec.channels:
        raise file.refuse(f"{network.describe()} takes {network.channels} channel(s), but the checkpoint records "
                          f"{spec.channels}")
    if len(spec.class_names) != network.classes:
        raise file.refuse(f"the checkpoint names {len(spec.class_names)} classes ({', '.join(spec.class_names)}) but "
                          f"its head has {network.outputs} output(s)")
    temperature, ood = _calibration(file, raw)
    assumed = tuple(str(a) for a in raw.get("assumed", ()) if isinstance(a, str))
    info = {"training": raw.get("training", {}), "metrics": raw.get("metrics", {})}
    source = f"a batchcam checkpoint (format {version})"
    return CheckpointReading(spec, canonical_state(state), network, source, info, assumed, temperature, ood, raw)


def _calibration(file: ModelFile, raw: dict) -> tuple[float, OodStatistics | None]:
    """The temperature (1.0 when absent) and the OOD statistics (None when absent) of a checkpoint."""
    try:
        temperature = float(raw.get("temperature", 1.0))
        ood = OodStatistics.from_checkpoint(raw["ood"]) if raw.get("ood") is not None else None
    except (KeyError, TypeError, ValueError) as e:
        raise file.refuse(f"checkpoint calibration is invalid ({e})") from None
    if not 0 < temperature < float("inf"):
        raise file.refuse(f"checkpoint temperature must be a positive number, got {temperature}")
    return temperature, ood


def model_input(gray: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 grayscale batch (B, H, W) -> float (B, C, H, W) normalised with the checkpoint's mean/std.

    X-rays are decoded once as one channel; a 3-channel model's input channels are that image
    repeated (what ``convert("RGB")`` of a grayscale image gives) and differ only by mean/std.
    """
    x = gray.to(torch.float32).div_(255).unsqueeze(1)
    shape = (1, spec.channels, 1, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=gray.device).view(shape)
    std = torch.tensor(spec.std, dtype=torch.float32, device=gray.device).view(shape)
    return (x - mean) / std
