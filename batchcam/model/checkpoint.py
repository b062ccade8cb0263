"""The classifier and its checkpoint format, shared by ``train_model.py`` and ``scan``.

A checkpoint is a plain dict of tensors, strings, numbers and lists, so it loads with
``torch.load(..., weights_only=True)`` and never unpickles arbitrary objects. It carries its own
preprocessing (image size, mean, std) and class names, the way torchvision's weight enums carry
their transforms and categories, so a scan cannot preprocess differently from training. It may
also carry the calibration (``batchcam.model.calibration``): the temperature and the
out-of-distribution statistics; one without them scores at temperature 1 and flags nothing.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18

from batchcam.errors import CheckpointError
from batchcam.model.calibration import OodStatistics
from batchcam.resources import DEMO_MODEL, DEMO_NOTICE
from batchcam.runtime.fsutil import SafeDir

FORMAT = "batchcam-checkpoint"
FORMAT_VERSION = 1
ARCH = "resnet18"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What a bare state dict (torch.save(model.state_dict()) in the original notebook) is assumed to be.
PLAIN_STATE_DICT_DEFAULTS = {"class_names": ("NORMAL", "PNEUMONIA"), "image_size": 224,
                             "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that a scan needs to reproduce training's view of an image."""

    class_names: tuple[str, ...]
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dropout: float = 0.0
    arch: str = ARCH

    def __post_init__(self) -> None:
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be at least two distinct names, got {self.class_names}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have three values (one per RGB channel)")


@dataclass
class LoadedModel:
    """A model in eval mode together with where it came from."""

    model: nn.Module
    spec: ModelSpec
    path: Path
    sha256: str
    demo: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0              # divides the logits before the softmax
    ood: OodStatistics | None = None      # None: the checkpoint has no statistics, nothing is flagged

    def calibration_summary(self) -> dict[str, Any]:
        """What the manifest says about the temperature and the out-of-distribution statistics."""
        ood = self.ood.summary() if self.ood else {
            "statistics": False, "note": "this checkpoint has no feature statistics: ood_score and ood_flag "
                                         "are empty (batchcam calibrate adds them)"}
        return {"temperature": round(self.temperature, 6), "ood": ood}


def build_model(num_classes: int, dropout: float = 0.0, weights: Any = None) -> nn.Module:
    """ResNet18 whose ``fc`` is ``Linear(512, num_classes)``, or ``Dropout(p) -> Linear`` when p > 0."""
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
    they are cast back to float32 on load.
    """
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    _write_payload(path, _payload(spec, state, training, metrics, temperature, ood))


def save_calibrated(source: str | os.PathLike, out: str | os.PathLike, temperature: float,
                    ood: OodStatistics) -> None:
    """Write ``source`` again at ``out`` with a temperature and statistics, its weights byte for byte.

    A bare state dict becomes a batchcam checkpoint with the bare-state-dict defaults.
    """
    source = Path(source)
    raw = _read_weights_only(source)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        _parse_batchcam(source, raw)
        payload = {**raw, "temperature": float(temperature), "ood": ood.to_checkpoint()}
    else:
        spec, state, _ = _parse_plain_state_dict(source, _plain_state_dict(source, raw))
        payload = _payload(spec, state, {}, {}, temperature, ood)
    _write_payload(out, payload)


def _payload(spec: ModelSpec, state: dict, training: dict[str, Any] | None, metrics: dict[str, Any] | None,
             temperature: float | None, ood: OodStatistics | None) -> dict[str, Any]:
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec.arch,
        "class_names": list(spec.class_names), "image_size": spec.image_size,
        "mean": list(spec.mean), "std": list(spec.std), "dropout": float(spec.dropout),
        "training": training or {}, "metrics": metrics or {}, "state_dict": state,
    }
    if temperature is not None:
        payload["temperature"] = float(temperature)
    if ood is not None:
        payload["ood"] = ood.to_checkpoint()
    return payload


def _write_payload(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    path = Path(path)
    with SafeDir.open(path.parent) as folder, folder.atomic_write(path.name, "wb") as f:
        torch.save(payload, f)


def load_model(path: Path | None, warn: Callable[[str], None]) -> LoadedModel:
    """The checkpoint at ``path``, or the bundled demo model (saying so through ``warn``) when None."""
    if path is None:
        warn(DEMO_NOTICE.removeprefix("batchcam: "))
        return load_checkpoint(DEMO_MODEL, demo=True)
    return load_checkpoint(path)


def load_checkpoint(path: str | os.PathLike, *, demo: bool = False) -> LoadedModel:
    """Load a batchcam checkpoint, or a bare ResNet18 state dict, into an eval-mode model on the CPU."""
    path = Path(path)
    raw = _read_weights_only(path)
    temperature, ood = 1.0, None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        spec, state, info = _parse_batchcam(path, raw)
        temperature, ood = _parse_calibration(path, raw)
    else:
        spec, state, info = _parse_plain_state_dict(path, _plain_state_dict(path, raw))
    model = build_model(len(spec.class_names), spec.dropout)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[1:4]) or first_line[0]
        raise CheckpointError(f"{path}: weights do not fit a {spec.arch} with "
                              f"{len(spec.class_names)} classes: {detail}") from None
    model.eval()
    return LoadedModel(model=model, spec=spec, path=path.resolve(), sha256=file_sha256(path),
                       demo=demo, info=info, temperature=temperature, ood=ood)


def _plain_state_dict(path: Path, raw: Any) -> dict:
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw
    raise CheckpointError(f"{path}: not a batchcam checkpoint nor a ResNet18 state dict")


def _parse_calibration(path: Path, raw: dict) -> tuple[float, OodStatistics | None]:
    """The temperature (1.0 when absent) and the OOD statistics (None when absent) of a checkpoint."""
    try:
        temperature = float(raw.get("temperature", 1.0))
        ood = OodStatistics.from_checkpoint(raw["ood"]) if raw.get("ood") is not None else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint calibration is invalid ({e})") from None
    if not 0 < temperature < float("inf"):
        raise CheckpointError(f"{path}: checkpoint temperature must be a positive number, got {temperature}")
    return temperature, ood


def _read_weights_only(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and not magic.startswith(b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a legacy "
                              "torch.save file)")
    try:
        # weights_only=True is always passed explicitly: nothing in the file can run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: the file holds Python objects other than plain weights "
                              f"and metadata ({_unpickler_reason(e)})") from None
    except Exception as e:  # torch raises many types for corrupt archives; all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{_strip_ansi(str(e)).strip()[:200]})") from None


def _unpickler_reason(error: Exception) -> str:
    """The specific cause in torch's long weights-only message (e.g. 'Unsupported global: ...')."""
    lines = [_strip_ansi(line).strip() for line in str(error).splitlines()]
    specific = [line for line in lines if "WeightsUnpickler error" in line or "Unsupported global" in line]
    reason = specific[0] if specific else next((line for line in lines if line), "unsupported content")
    return reason.removeprefix("WeightsUnpickler error:").strip()[:200]


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _parse_batchcam(path: Path, raw: dict) -> tuple[ModelSpec, dict, dict]:
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported "
                              f"(this batchcam reads version {FORMAT_VERSION})")
    if raw.get("arch") != ARCH:
        raise CheckpointError(f"{path}: architecture {raw.get('arch')!r} is not supported (only {ARCH})")
    state = raw.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint has no state_dict")
    try:
        spec = ModelSpec(class_names=tuple(str(c) for c in raw["class_names"]),
                         image_size=int(raw["image_size"]), mean=tuple(float(m) for m in raw["mean"]),
                         std=tuple(float(s) for s in raw["std"]), dropout=float(raw.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is incomplete or invalid ({e})") from None
    info = {"training": raw.get("training", {}), "metrics": raw.get("metrics", {})}
    return spec, state, info


def _parse_plain_state_dict(path: Path, raw: dict) -> tuple[ModelSpec, dict, dict]:
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    head_key = "fc.weight" if "fc.weight" in state else "fc.1.weight" if "fc.1.weight" in state else None
    if head_key is None or "conv1.weight" not in state:
        raise CheckpointError(f"{path}: a state dict without ResNet18 keys (conv1, fc) is not a model "
                              "batchcam can load")
    num_classes = state[head_key].shape[0]
    names = PLAIN_STATE_DICT_DEFAULTS["class_names"]
    if num_classes != len(names):
        raise CheckpointError(f"{path}: a bare state dict must have {len(names)} outputs "
                              f"({', '.join(names)}); this one has {num_classes}. Save it as a batchcam "
                              "checkpoint with its class names instead")
    # Dropout's p does not matter in eval mode; 0.5 only selects the Sequential(Dropout, Linear) head.
    dropout = 0.5 if head_key == "fc.1.weight" else 0.0
    spec = ModelSpec(class_names=names, image_size=PLAIN_STATE_DICT_DEFAULTS["image_size"],
                     mean=PLAIN_STATE_DICT_DEFAULTS["mean"], std=PLAIN_STATE_DICT_DEFAULTS["std"],
                     dropout=dropout)
    return spec, state, {"plain_state_dict": True}


def spec_as_dict(spec: ModelSpec) -> dict[str, Any]:
    data = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def normalize(gray: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """uint8 grayscale batch (B, H, W) -> float (B, 3, H, W) normalised with the checkpoint's mean/std.

    X-rays are decoded once as one channel; the three input channels differ only by mean/std.
    """
    x = gray.to(torch.float32).div_(255).unsqueeze(1)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=gray.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=gray.device).view(1, 3, 1, 1)
    return (x - mean) / std
