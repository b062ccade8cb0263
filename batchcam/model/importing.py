"""``batchcam import-model``: a model trained elsewhere made into a self-describing batchcam checkpoint.

What ``--model`` cannot read unambiguously is declared once here: the architecture (checked against
the weights), the class names, the input size, the resize (``squash`` or ``center-crop``), the mean
and std, the channels. The checkpoint written (format 2) records all of it, so a scan needs no
flags later.

Two kinds of source need more than a state dict's reading:

- a whole pickled model (``torch.save(model)``) runs code when it is unpickled, so it is read only
  with ``trust_pickle``; only its weights and its structure (the head's layer types) are kept;
- a TorchScript file is loaded with ``torch.jit.load``; the eager model is rebuilt from its weights
  and module structure.

Both can be run, so the checkpoint written is checked to reproduce the source's probabilities on a
probe batch (synthetic X-rays through the declared preprocessing, and noise) and refused
otherwise: a source whose ``forward`` does something torchvision's architecture does not is caught
here, not in a scan. A state dict has nothing to run; it is checked against torchvision's own
class with its weights instead.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchcam.decode.imaging import RESIZE_MODES, model_view
from batchcam.errors import UsageError
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.calibration import OodStatistics
from batchcam.model.checkpoint import (
    DEFAULT_CLASS_NAMES,
    DEFAULT_IMAGE_SIZE,
    FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_MODEL_BYTES,
    CheckpointReading,
    LoadedModel,
    ModelSpec,
    check_class_names,
    loaded_from,
    model_input,
    payload,
    payload_bytes,
    read_checkpoint,
    write_payload,
)
from batchcam.model.network import Network, NetworkError, build_network, canonical_state, read_network
from batchcam.model.reading import (
    CONTAINER_KEYS,
    ModelFile,
    PickledObjects,
    archive_kind,
    class_names_in,
    find_weights,
    load_torchscript,
    load_trusting_pickle,
    load_weights_only,
    read_model_file,
    strip_shared_prefix,
)

PROBE_XRAYS = 4                # synthetic X-rays (two of each class) in the probe batch
PROBE_NOISE = 2                # and images of uniform noise
PROBE_TOLERANCE = 1e-4         # on probabilities, as scan's equality with a plain PyTorch forward pass


@dataclass(frozen=True)
class Declaration:
    """What ``import-model``'s flags declare; None leaves it to the file, then to the default."""

    arch: str | None = None
    classes: tuple[str, ...] | None = None
    input_size: int | None = None
    resize: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None
    trust_pickle: bool = False

    def validate(self) -> None:
        """UsageError naming the flag for a value that can never be right."""
        if self.arch is not None and self.arch not in ARCHITECTURES:
            raise UsageError(f"--arch {self.arch}: choose one of {', '.join(ARCHITECTURES)}")
        if self.classes is not None and (len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)
                                         or not all(c.strip() for c in self.classes)):
            raise UsageError("--classes: at least two distinct, non-empty names, comma-separated")
        if self.input_size is not None and not 16 <= self.input_size <= 4096:
            raise UsageError(f"--input-size {self.input_size}: 16..4096 pixels")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise UsageError(f"--resize {self.resize}: choose one of {', '.join(RESIZE_MODES)}")
        if self.channels is not None and self.channels not in (1, 3):
            raise UsageError(f"--channels {self.channels}: 1 or 3")
        if (self.mean is None) != (self.std is None):
            raise UsageError("--mean and --std are declared together")
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) not in (1, 3):
                raise UsageError(f"{flag}: one value, or three (one per RGB channel)")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise UsageError("--std: positive values")


@dataclass(frozen=True)
class ProbeCheck:
    """How the written checkpoint compared with what can be run of the source."""

    against: str               # "the source model" or "torchvision's resnet18 with the same weights"
    images: int
    max_difference: float      # largest absolute difference of a probability

    def describe(self) -> str:
        return (f"probabilities within {self.max_difference:.1e} of {self.against} on {self.images} probe images "
                f"({PROBE_XRAYS} synthetic X-rays, {PROBE_NOISE} noise)")


@dataclass(frozen=True)
class ImportReport:
    """What import read and wrote, for printing (``lines``)."""

    source: Path
    out: Path
    source_kind: str
    network: Network
    spec: ModelSpec
    target_layer: str
    exact_cam: bool
    defaults: tuple[str, ...]           # what was neither declared nor in the file
    inferred: tuple[str, ...]           # what was read off the weights with an assumption (a head's gaps)
    probe: ProbeCheck
    sha256: str
    notes: tuple[str, ...] = field(default=())

    def lines(self) -> list[str]:
        cam = "exact path (no backward pass)" if self.exact_cam else "through pytorch-grad-cam (an MLP head)"
        names = self.spec.class_names
        single = f" (a single logit: P({names[1]}) = sigmoid, P({names[0]}) = 1 - sigmoid)"
        lines = [f"read {self.source}: {self.source_kind}",
                 f"{self.network.describe()}; {self.network.head_description}",
                 f"classes: {', '.join(names)}{single if self.network.single_logit else ''}",
                 f"preprocessing: {self.spec.describe_preprocessing()}",
                 f"Grad-CAM target layer: {self.target_layer}, {cam}"]
        lines += [f"default: {item}" for item in self.defaults]
        lines += [f"inferred: {item}" for item in self.inferred]
        lines += [*self.notes, f"checked: {self.probe.describe()}", f"wrote {self.out} (sha256 {self.sha256[:16]})"]
        return lines


@dataclass
class _Source:
    """What the source file gave: weights, perhaps a runnable module, perhaps a batchcam reading."""

    kind: str
    state: dict[str, torch.Tensor]
    prefix: str = ""
    module: nn.Module | None = None
    class_names: tuple[str, ...] | None = None
    batchcam: CheckpointReading | None = None


def import_model(source: str | os.PathLike, out: str | os.PathLike, declaration: Declaration = Declaration(), *,
                 max_bytes: int = MAX_MODEL_BYTES) -> ImportReport:
    """Read ``source``, apply ``declaration``, check, and write a format-2 checkpoint at ``out`` atomically.

    CheckpointError (exit 2, one line) for a source that cannot be made into a checkpoint batchcam
    runs exactly; UsageError for a declaration that can never be right. ``out`` is written only
    after the check passed.
    """
    declaration.validate()
    file = read_model_file(source, max_bytes)
    origin = _read_source(file, declaration.trust_pickle)
    network, inferred, activation = _network(file, origin, declaration.arch)
    spec, defaults, notes = _spec(file, origin, network, declaration)
    written = _payload(file, origin, network, spec, defaults, inferred, keep_calibration=not notes)
    loaded = loaded_from(ModelFile(Path(out), payload_bytes(written), ""))
    probe = _check(file, origin, network, activation, loaded)
    written["source"]["probe"] = probe.describe()
    data = payload_bytes(written)
    write_payload(out, data)
    return ImportReport(source=file.path, out=Path(out), source_kind=origin.kind, network=network, spec=spec,
                        target_layer=network.target_layer, exact_cam=network.head.is_one_linear, defaults=defaults,
                        inferred=inferred, probe=probe, sha256=hashlib.sha256(data).hexdigest(), notes=notes)


def _read_source(file: ModelFile, trust_pickle: bool) -> _Source:
    if archive_kind(file) == "torchscript":
        return _module_source("a TorchScript model", load_torchscript(file), None)
    try:
        raw = load_weights_only(file)
    except PickledObjects:
        if not trust_pickle:
            raise
        raw = load_trusting_pickle(file)
        module = _module_in(raw)
        if module is not None:
            kind = f"a pickled model ({type(module).__module__}.{type(module).__qualname__})"
            return _module_source(kind, module, class_names_in(file, raw) if isinstance(raw, dict) else None)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        reading = read_checkpoint(file)
        return _Source(reading.source, reading.state, batchcam=reading, class_names=reading.spec.class_names)
    found = find_weights(file, raw)
    return _Source(found.source, canonical_state(found.state), found.prefix, class_names=found.class_names)


def _module_source(kind: str, module: nn.Module, class_names: tuple[str, ...] | None) -> _Source:
    state, prefix = strip_shared_prefix(dict(module.state_dict()))
    return _Source(kind, {k: v.detach() for k, v in state.items()}, prefix, module.eval(), class_names)


def _module_in(raw: Any) -> nn.Module | None:
    """The model a trusted pickle holds: itself, or one under a container key; DataParallel unwrapped."""
    module = raw if isinstance(raw, nn.Module) else None
    if module is None and isinstance(raw, dict):
        module = next((raw[k] for k in CONTAINER_KEYS if isinstance(raw.get(k), nn.Module)), None)
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def _network(file: ModelFile, origin: _Source, arch: str | None) -> tuple[Network, tuple[str, ...], str | None]:
    recorded = origin.batchcam.network.head if origin.batchcam is not None else None
    head_of = None
    if origin.module is not None:
        module, prefix = origin.module, origin.prefix

        def head_of(name: str) -> nn.Module:
            found = module
            for part in (prefix + name).split("."):  # a ScriptModule has no get_submodule
                found = getattr(found, part)
            return found

    try:
        return read_network(origin.state, declared_arch=arch, head_of=head_of, recorded_head=recorded)
    except NetworkError as e:
        raise file.refuse(str(e)) from None


def _spec(file: ModelFile, origin: _Source, network: Network,
          declaration: Declaration) -> tuple[ModelSpec, tuple[str, ...], tuple[str, ...]]:
    """The checkpoint's spec: declared, else recorded in the file, else the default (listed)."""
    recorded = origin.batchcam.spec if origin.batchcam is not None else None
    defaults: list[str] = []
    if declaration.channels is not None and declaration.channels != network.channels:
        raise file.refuse(f"{network.describe()} whose first convolution takes {network.channels} channel(s); "
                          f"--channels {declaration.channels} does not fit it")
    names = declaration.classes or origin.class_names
    if names is None:
        if network.classes != 2:
            letters = ",".join(chr(ord("A") + i) for i in range(min(network.outputs, 26)))
            raise file.refuse(f"{network.describe()}: a head with {network.outputs} outputs and no class names: "
                              f"declare them with --classes {letters}")
        names = DEFAULT_CLASS_NAMES
        defaults.append(f"class names {', '.join(names)}")
    check_class_names(file, network, tuple(names))
    size = declaration.input_size or (recorded.image_size if recorded else None)
    if size is None:
        size = DEFAULT_IMAGE_SIZE
        defaults.append(f"input size {size}")
    resize = declaration.resize or (recorded.resize if recorded else None)
    if resize is None:
        resize = "squash"
        defaults.append("resize squash")
    mean, std = _normalisation(file, network, declaration, recorded, defaults)
    spec = ModelSpec(class_names=tuple(names), image_size=size, mean=mean, std=std,
                     dropout=recorded.dropout if recorded else 0.0, arch=network.arch, channels=network.channels,
                     resize=resize)
    notes: tuple[str, ...] = ()
    reading = origin.batchcam
    if reading is not None and (reading.temperature != 1.0 or reading.ood is not None) and spec != recorded:
        notes = ("calibration left out: the preprocessing or the classes changed (batchcam calibrate fits it again)",)
    return spec, tuple(defaults), notes


def _normalisation(file: ModelFile, network: Network, declaration: Declaration, recorded: ModelSpec | None,
                   defaults: list[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = declaration.mean, declaration.std
    if mean is not None and std is not None:  # validate() lets through both or neither
        if network.channels == 1 and (len(mean) != 1 or len(std) != 1):
            raise file.refuse(f"{network.describe()}: a 1-channel model takes one --mean and one --std value")
        if network.channels == 3 and len(mean) == 1:
            mean, std = mean * 3, std * 3
        if network.channels == 3 and len(std) == 1:
            std = std * 3
        if len(mean) != len(std):
            raise file.refuse("--mean and --std need the same number of values")
        return tuple(mean), tuple(std)
    if recorded is not None:
        return recorded.mean, recorded.std
    if network.channels == 1:
        raise file.refuse(f"{network.describe()}; a 1-channel model's normalisation is not in the file: declare it "
                          "with --mean M --std S")
    defaults.append("ImageNet mean/std")
    return IMAGENET_MEAN, IMAGENET_STD


def _payload(file: ModelFile, origin: _Source, network: Network, spec: ModelSpec, defaults: tuple[str, ...],
             inferred: tuple[str, ...], keep_calibration: bool) -> dict[str, Any]:
    reading = origin.batchcam
    temperature: float | None = None
    ood: OodStatistics | None = None
    if reading is not None and keep_calibration:
        temperature, ood = (reading.temperature if reading.temperature != 1.0 else None), reading.ood
    info = reading.info if reading is not None else {}
    source = {"kind": origin.kind, "file": file.path.name, "sha256": file.sha256, "defaults": list(defaults),
              "inferred": list(inferred)}
    return payload(spec, origin.state, network.head, training=info.get("training"), metrics=info.get("metrics"),
                   source=source, temperature=temperature, ood=ood)


def _check(file: ModelFile, origin: _Source, network: Network, activation: str | None,
           loaded: LoadedModel) -> ProbeCheck:
    """The written checkpoint's probabilities against the source's (or torchvision's), on a probe batch."""
    x = probe_batch(loaded.spec)
    if origin.module is not None:
        reference, against = origin.module, "the source model"
    else:
        reference = build_network(network, origin.state, plain=True)
        against = f"torchvision's {network.arch} with the same weights"
    with torch.inference_mode():
        try:
            output = reference(x)
        except Exception as e:  # the source's own code: any failure means it cannot be checked
            raise file.refuse(f"the source model does not run on a {loaded.spec.image_size} px probe batch "
                              f"({type(e).__name__}); batchcam cannot check it") from None
        expected = _probabilities(file, output, activation, network)
        actual = torch.softmax(loaded.model(x).float(), dim=1)
    difference = float((actual - expected).abs().max())
    if not difference <= PROBE_TOLERANCE:
        raise file.refuse(f"the rebuilt {network.arch} does not reproduce {against}'s outputs (probabilities differ "
                          f"by up to {difference:.3g} on {len(x)} probe images): its forward pass is not "
                          f"torchvision's {network.arch} (custom steps in forward?); batchcam cannot run it exactly")
    return ProbeCheck(against, len(x), difference)


def _probabilities(file: ModelFile, output: Any, activation: str | None, network: Network) -> torch.Tensor:
    """The source's class probabilities, from its logits or from the output activation it ends with."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] != network.outputs:
        raise file.refuse(f"the source model's output is not a tensor of {network.outputs} score(s) per image; "
                          "batchcam cannot check it")
    output = output.float()
    if activation == "log-softmax":
        output = output.exp()
    if network.single_logit:
        positive = output[:, 0] if activation == "sigmoid" else torch.sigmoid(output[:, 0])
        return torch.stack([1 - positive, positive], dim=1)
    return output if activation in ("softmax", "log-softmax") else torch.softmax(output, dim=1)


def probe_batch(spec: ModelSpec) -> torch.Tensor:
    """Synthetic X-rays through the declared preprocessing, and uniform noise: normalised model inputs.

    Realistic images make a random or barely trained model's outputs vary the way real ones do, so
    a mismatch shows; the noise covers inputs far from any X-ray.
    """
    from batchcam.synthetic import generate

    size = spec.image_size
    shapes = [(round(size * 1.25), size), (size, round(size * 1.5)), (size * 2, size * 2), (round(size * 1.1), size)]
    views = [model_view(generate(seed, ("NORMAL", "PNEUMONIA")[seed % 2], shape).image, size, spec.resize)
             for seed, shape in zip(range(PROBE_XRAYS), shapes)]
    gray = torch.from_numpy(np.stack(views))
    noise = torch.randint(0, 256, (PROBE_NOISE, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    return model_input(torch.cat([gray, noise]), spec)

