"""Reading a model file: bounded, never blocking, never running code, and saying what was found.

A model file is read once, whole, into memory (at most ``MAX_MODEL_MB``), so its digest and its
weights come from the same bytes. What it holds is decided before any unpickling: a TorchScript
archive by its members (``code/``, ``constants.pkl``), a ``torch.save`` file by its zip or pickle
magic. Only ``weights_only`` unpickling is used unless the caller trusts the file
(``import-model --trust-pickle``).

The weights are found where training scripts put them: a plain state dict, or one inside the usual
containers (``model_state_dict``, ``state_dict``, ``model``, ``net``, ``weights``: a training dict
with its optimizer state, a Lightning or timm checkpoint), with a prefix every key shares stripped
(``module.`` from DataParallel, ``model.`` from a Lightning module, ``module.model.``...). Class names
come from ``class_names``, ``classes``, ``class_to_idx`` or ``idx_to_class`` when the file has them.

Every refusal is a ``CheckpointError`` (exit 2) of one line: the file, what was found, what to do.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batchcam.config import MAX_MODEL_BYTES
from batchcam.errors import CheckpointError
from batchcam.runtime.bounded import FileTooLarge, NotRegularFile, read_file_bounded

MAX_MODEL_MB = MAX_MODEL_BYTES // 2 ** 20   # a model file larger than this is refused before it is read
CONTAINER_KEYS = ("model_state_dict", "state_dict", "model", "net", "weights")
CLASS_NAME_KEYS = ("class_names", "classes", "class_to_idx", "idx_to_class")
# Harmless classes training scripts store beside the weights: timm's train.py saves its arguments.
SAFE_EXTRA_GLOBALS = (argparse.Namespace,)
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80


class PickledObjects(CheckpointError):
    """The file holds pickled Python objects (a whole model, say): reading them would run code."""


def import_hint(label: str, flags: str = "") -> str:
    return f"batchcam import-model {label} --out MODEL.pt{' ' + flags if flags else ''}"


@dataclass(frozen=True)
class ModelFile:
    """A model file's bytes, read once, and their digest."""

    path: Path
    data: bytes
    sha256: str

    @property
    def label(self) -> str:
        return str(self.path)

    def refuse(self, reason: str) -> CheckpointError:
        return CheckpointError(f"{self.label}: {reason}")


def read_model_file(path: str | os.PathLike, max_bytes: int = MAX_MODEL_BYTES) -> ModelFile:
    """The bytes of a regular file of at most ``max_bytes`` (``runtime.bounded``: opened non-blocking,
    so a FIFO cannot hang; checked on the descriptor; its size before any byte is read)."""
    path = Path(path)
    try:
        data = read_file_bounded(path, max_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such model file") from None
    except NotRegularFile as e:
        raise CheckpointError(f"{path}: not a regular file ({e.kind}), so not a model file") from None
    except FileTooLarge as e:
        raise CheckpointError(f"{path}: {_mib(e.size)}, larger than the {_mib(max_bytes)} a model file may have") \
            from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the model file ({e.strerror or e})") from None
    return ModelFile(path, data, hashlib.sha256(data).hexdigest())


def _mib(size: int) -> str:
    return f"{size / 2 ** 20:.0f} MiB" if size >= 2 ** 20 else f"{size} bytes"


def archive_kind(file: ModelFile) -> str:
    """``torchscript``, ``torch`` (a torch.save zip) or ``legacy`` (torch.save's older pickle format)."""
    data = file.data
    if not data:
        raise file.refuse("an empty file (0 bytes), not a PyTorch model")
    if data.startswith(ZIP_MAGIC):
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise file.refuse("a damaged or truncated zip archive, not a readable PyTorch model") from None
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return "torchscript"
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "torch"
        raise file.refuse("a zip archive that is not a PyTorch model (it holds no data.pkl)")
    if data[0] == PICKLE_PROTOCOL_OPCODE:
        return "legacy"
    raise file.refuse("not a PyTorch model file (neither a torch.save zip archive nor a legacy torch.save file)")


def torchscript_refusal(file: ModelFile) -> CheckpointError:
    return file.refuse(f"a TorchScript model; read it once into a batchcam checkpoint: {import_hint(file.label)}")


def load_weights_only(file: ModelFile) -> Any:
    """The file's content through torch's weights-only unpickler: tensors and plain types, never code."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(SAFE_EXTRA_GLOBALS)):
            warnings.simplefilter("ignore")
            # weights_only=True is always passed explicitly: nothing in the file can run code.
            return torch.load(io.BytesIO(file.data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = pickled_global(e)
        raise PickledObjects(f"{file.label}: holds pickled Python objects{f' ({found})' if found else ''}, such as a "
                             "whole model saved with torch.save(model); loading them runs code. If you trust the file: "
                             f"{import_hint(file.label, '--trust-pickle')}") from None
    except Exception:  # torch raises many types for damaged archives; all mean "unreadable"
        raise file.refuse("cannot be read as a PyTorch model (damaged or truncated?)") from None


def pickled_global(error: Exception) -> str:
    """The class or function torch's weights-only unpickler refused (e.g. 'torchvision.models.resnet.ResNet')."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    match = re.search(r"GLOBAL ([\w.]+)", text)
    return match.group(1) if match else ""


def load_trusting_pickle(file: ModelFile) -> Any:
    """Everything the file holds, unpickled with code execution allowed (``import-model --trust-pickle``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(file.data), map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as e:
        missing = _missing_code(e)
        raise file.refuse(f"the pickled model needs code that is not importable here ({missing}: a class defined in "
                          "a notebook, say); save its weights instead (torch.save(model.state_dict(), FILE)) or a "
                          "TorchScript file (torch.jit.script(model).save(FILE))") from None
    except Exception:
        raise file.refuse("cannot be read as a PyTorch model (damaged or truncated?)") from None


def _missing_code(error: Exception) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"module {error.name}"
    match = re.search(r"attribute '(\w+)' on <module '([\w.]+)'", str(error))
    return f"{match.group(2)}.{match.group(1)}" if match else "a class or module"


def load_torchscript(file: ModelFile) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch announces TorchScript's deprecation
            return torch.jit.load(io.BytesIO(file.data), map_location="cpu")
    except Exception:
        raise file.refuse("a TorchScript file that cannot be read (damaged, or saved by a newer PyTorch?)") from None


@dataclass(frozen=True)
class FoundWeights:
    """The state dict a file holds, with its shared key prefix stripped, and what else it says."""

    state: dict[str, torch.Tensor]
    source: str                          # "a plain state dict", "a training dict (model_state_dict)", ...
    prefix: str                          # the prefix stripped from every key ("module.", "" when none)
    class_names: tuple[str, ...] | None  # from the file, None when it has none


def is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def find_weights(file: ModelFile, raw: Any) -> FoundWeights:
    """The weights in ``raw`` (a plain state dict, or one inside a training container)."""
    if is_state_dict(raw):
        state, prefix = strip_shared_prefix(raw)
        return FoundWeights(state, "a plain state dict", prefix, None)
    if not isinstance(raw, dict):
        raise file.refuse(f"holds a {type(raw).__name__}, not a state dict or a training checkpoint")
    key = next((k for k in CONTAINER_KEYS if is_state_dict(raw.get(k))), None)
    if key is None:
        keys = [str(k) for k in raw][:8]
        raise file.refuse(f"a dict (keys {', '.join(keys)}{', ...' if len(raw) > 8 else ''}) with no state dict under "
                          f"{', '.join(CONTAINER_KEYS[:-1])} or {CONTAINER_KEYS[-1]}")
    state, prefix = strip_shared_prefix(raw[key])
    kind = "a Lightning checkpoint" if any("lightning" in str(k) for k in raw) else "a training checkpoint"
    return FoundWeights(state, f"{kind} (weights under '{key}')", prefix, class_names_in(file, raw))


def strip_shared_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Drop the first name component while every key shares it (``module.``, ``model.``, ``module.model.``).

    A model's keys start with at least two names (its backbone and its head), so a name every key
    starts with belongs to a wrapper (DataParallel, a Lightning module, a training wrapper).
    """
    stripped = ""
    while all("." in key for key in state):
        firsts = {key.split(".", 1)[0] for key in state}
        if len(firsts) != 1:
            break
        prefix = firsts.pop() + "."
        state = {key[len(prefix):]: value for key, value in state.items()}
        stripped += prefix
    return state, stripped


def class_names_in(file: ModelFile, raw: dict) -> tuple[str, ...] | None:
    """Class names from the container's top level, or its Lightning ``hyper_parameters``; None when absent."""
    for where in (raw, raw.get("hyper_parameters")):
        if not isinstance(where, dict):
            continue
        for key in CLASS_NAME_KEYS:
            if where.get(key) is not None:
                names = _names_from(where[key], key)
                if names is None:
                    raise file.refuse(f"its '{key}' is not a list of class names nor a mapping numbering them "
                                      "0..N-1; declare them: " + import_hint(file.label, "--classes A,B"))
                return names
    return None


def _names_from(value: Any, key: str) -> tuple[str, ...] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int)) for v in value):
        return tuple(str(v) for v in value)
    if not isinstance(value, dict) or not value:
        return None
    pairs = value.items() if key != "class_to_idx" else ((index, name) for name, index in value.items())
    by_index = {}
    for index, name in pairs:
        if isinstance(index, str) and index.isdigit():
            index = int(index)
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(name, (str, int)):
            return None
        by_index[index] = str(name)
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return tuple(by_index[i] for i in range(len(by_index)))
