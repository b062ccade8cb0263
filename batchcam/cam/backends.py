"""The model step of the exact Grad-CAM path: a batch ``x`` -> ``(logits, target-layer activations)``.

``CamExplainer`` turns those two tensors into probabilities and maps in one place, whichever backend
produced them:

- ``EagerForward``: the PyTorch model itself, the activations caught by a forward hook scoped by
  ``with``. Every device and precision; the reference.
- ``OnnxForward``: the same model exported once to ONNX with both outputs and run by ONNX Runtime
  on the CPU, float32: faster than eager there (benchmarks/RESULTS.md, "Lever 1", has the rates).
  The export is cached per checkpoint and library versions (``model_cache``).

The cache is code batchcam runs, so it is trusted like the installed package and guarded as ssh
guards its keys: it is read and written only when the cache folder and the file belong to the user
running batchcam and no group or other user may write them (else the model is exported for this run
alone). A cached file is checked against eager PyTorch twice: on a probe batch when it is read (a
stale or corrupt cache is rebuilt) and on the run's first real batch before its outputs are used,
since a file rewritten to differ only on real images passes the probe; on a disagreement the run
falls back to eager with a log line. The digest in a file's name is its own sha256: it catches a
truncated file, not a rewritten one. ``OnnxForward.file_sha256`` names the file a run used.

``choose_backend`` picks one from ``--backend``: ``auto`` takes ONNX Runtime for CPU runs of at
least ``AUTO_MIN_IMAGES`` images (its start-up, a cache read or a first export, is paid back by then),
eager otherwise; ``make_forward`` falls back to eager with a log line when ONNX Runtime is missing.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from batchcam.config import BACKEND_AUTO_MIN_IMAGES as AUTO_MIN_IMAGES
from batchcam.config import MAX_MODEL_BYTES
from batchcam.errors import UsageError

if TYPE_CHECKING:
    import onnxruntime  # imported where a session is made: only the onnx backend needs it

FORMAT = "batchcam-onnx-1"   # bump when the export changes: older cache files are then never read
OPSET = 17
PROBE_IMAGES = 2
PROBE_TOLERANCE = 1e-4       # on probabilities, as the equality target; activations relatively
CACHE_ENV = "BATCHCAM_CACHE_DIR"


class BackendUnavailable(Exception):
    """The fast backend cannot run here (not installed, export failed, outputs not equal)."""


class EagerForward:
    """The model in PyTorch; the target layer's output caught by a hook registered only inside ``with``."""

    name = "eager"
    file_sha256 = None   # no file: the checkpoint's own weights

    def __init__(self, model: nn.Module, layer: nn.Module, autocast: torch.dtype | None = None):
        self.model, self.layer, self.autocast = model, layer, autocast
        self._activations: torch.Tensor | None = None
        self._hook: RemovableHandle | None = None

    def __enter__(self) -> "EagerForward":
        self._hook = self.layer.register_forward_hook(self._keep_activations)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._activations = None

    def _keep_activations(self, module: nn.Module, inputs: tuple[object, ...], output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # not pytorch-grad-cam's own pass: that one's graph must not be kept
            self._activations = output

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._hook is None:
            raise RuntimeError("CamExplainer must be used inside a 'with' block")
        with torch.inference_mode():
            with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                logits = self.model(x).float()
            activations, self._activations = self._activations, None
            if activations is None:
                raise RuntimeError("the target layer gave no output in this forward pass")
            return logits, activations.float()


class OnnxForward:
    """An ONNX Runtime session of the model with both outputs, on the CPU in float32.

    Its outputs on the run's first batch are compared with ``eager``'s before any is used: when
    they differ, this run uses ``eager`` instead (``name`` then says ``eager``), with a log line.
    """

    def __init__(self, session: onnxruntime.InferenceSession, eager: EagerForward, file_sha256: str,
                 log: Callable[[str], None] = lambda message: None):
        self.session, self.eager, self.log = session, eager, log
        self.onnx_file_sha256 = file_sha256
        self.checked = False       # the first real batch agreed with eager
        self.fell_back = False     # it did not: eager for the rest of the run

    @property
    def name(self) -> str:
        return "eager" if self.fell_back else "onnx"

    @property
    def file_sha256(self) -> str | None:
        """The sha256 of the ONNX file whose outputs this run uses (None once it fell back to eager)."""
        return None if self.fell_back else self.onnx_file_sha256

    def __enter__(self) -> "OnnxForward":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fell_back:
            return self._in_pytorch(x)
        outputs = self.run(x)
        if not self.checked:
            expected = self._in_pytorch(x)
            if not outputs_equal(*outputs, *expected):
                self.fell_back = True
                self.log(f"backend: the ONNX model (sha256 {self.onnx_file_sha256}) disagrees with PyTorch on the "
                         "run's first batch; running the model in PyTorch (eager) for the whole run")
                return expected
            self.checked = True
        return outputs

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The session's outputs, unchecked (the probe batch's comparison uses them)."""
        logits, activations = self.session.run(None, {"x": x.float().contiguous().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(activations)

    def _in_pytorch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.eager:
            logits, activations = self.eager(x)
        return logits.cpu(), activations.cpu()


class WithActivations(nn.Module):
    """The model with the target layer's output as a second output: what gets exported."""

    def __init__(self, model: nn.Module, layer_name: str):
        super().__init__()
        self.model, self.layer_name = model, layer_name

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        caught = []
        layer = self.model.get_submodule(self.layer_name)
        hook = layer.register_forward_hook(lambda module, inputs, output: caught.append(output))
        try:
            logits = self.model(x)
        finally:
            hook.remove()
        return logits, caught[0]


def choose_backend(requested: str, device: torch.device, exact: bool, autocast: torch.dtype | None,
                   images: int) -> str:
    """``eager`` or ``onnx`` for ``--backend requested``; UsageError when ``onnx`` cannot apply.

    ONNX Runtime computes only the exact Grad-CAM path's model step, on the CPU, in float32.
    """
    if requested == "eager":
        return "eager"
    fits = device.type == "cpu" and exact and autocast is None
    if requested == "onnx":
        if not fits:
            raise UsageError("--backend onnx runs the exact gradcam path on the CPU in fp32 only "
                             "(use --backend eager, or --device cpu --cam gradcam --precision fp32)")
        return "onnx"
    return "onnx" if fits and images >= AUTO_MIN_IMAGES else "eager"  # make_forward falls back if it must


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def make_forward(name: str, model: nn.Module, layer_name: str, checkpoint_sha256: str, image_size: int,
                 autocast: torch.dtype | None = None, explicit: bool = False,
                 log: Callable[[str], None] = lambda message: None) -> EagerForward | OnnxForward:
    """The backend ``name`` for ``model``; ONNX falls back to eager with a log line unless ``explicit``,
    where its failure is a UsageError saying why."""
    eager = EagerForward(model, model.get_submodule(layer_name), autocast)
    if name == "eager":
        return eager
    try:
        return onnx_forward(model, layer_name, checkpoint_sha256, image_size, eager, log)
    except BackendUnavailable as e:
        if explicit:
            raise UsageError(f"--backend onnx: {e}") from None
        log(f"backend: ONNX Runtime not used ({e}); running the model in PyTorch (eager)")
        return eager


def onnx_forward(model: nn.Module, layer_name: str, checkpoint_sha256: str, image_size: int,
                 eager: EagerForward, log: Callable[[str], None]) -> OnnxForward:
    """A checked ONNX Runtime session: from the cache when it is the user's alone and holds a sound
    export, else exported now (and cached, where the cache is the user's alone)."""
    version = onnxruntime_version()
    if version is None:
        raise BackendUnavailable("onnxruntime is not installed: pip install 'batchcam[onnx]'")
    cache = model_cache()
    key = cache_key(checkpoint_sha256, layer_name, image_size, version)
    probe = probe_batch(model, image_size)
    distrust = untrusted_cache(cache)
    if distrust:
        log(f"backend: the ONNX cache {cache} is not used: {distrust} (as ssh refuses such key files); exporting the "
            f"model for this run only. Fix it with chmod go-w, or set {CACHE_ENV} to a folder of your own")
    cached = None if distrust else read_cached(cache, key, log)
    if cached is not None:
        path, data = cached
        forward = checked_session(data, probe, eager, log)
        if forward is not None:
            return forward
        log("backend: the cached ONNX model disagrees with the checkpoint; exporting it again")
        path.unlink(missing_ok=True)
    log(f"backend: exporting the model for ONNX Runtime (once per checkpoint and library versions)"
        f"{'' if distrust else f' into {cache}'}")
    exported = export_onnx(model, layer_name, probe)
    forward = checked_session(exported, probe, eager, log)
    if forward is None:
        raise BackendUnavailable("the exported model's outputs differ from PyTorch's")
    if not distrust:
        try:
            write_cached(cache, key, exported)
        except OSError as e:
            log(f"backend: cannot cache the ONNX model in {cache} ({e.strerror or e}); it is exported again next run")
    return forward


def model_cache() -> Path:
    """``$BATCHCAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchcam``, else ``~/.cache/batchcam``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchcam"


def untrusted_cache(cache: Path) -> str | None:
    """Why the cache folder cannot be trusted (owned by another user, or writable by a group or
    others), or None; a missing folder is made, private to the user."""
    try:
        with contextlib.suppress(FileExistsError):
            cache.mkdir(mode=0o700, parents=True)
        status = os.stat(cache)
    except OSError as e:
        return f"cannot make or look at it ({e.strerror or e})"
    if not stat.S_ISDIR(status.st_mode):
        return "it is not a folder"
    return not_private(status, "folder")


def not_private(status: os.stat_result, what: str) -> str | None:
    """Why a cache folder or file is not the user's alone, or None."""
    if status.st_uid != os.geteuid():
        return f"the {what} belongs to user id {status.st_uid}, not to you ({os.geteuid()})"
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"the {what} is writable by {'others' if status.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def cache_key(checkpoint_sha256: str, layer_name: str, image_size: int, onnxruntime_version: str) -> str:
    """What the export depends on: the weights and input size, the exporter (torch), the runtime that reads it."""
    parts = (FORMAT, checkpoint_sha256, layer_name, str(image_size), torch.__version__, onnxruntime_version,
             str(OPSET))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def read_cached(cache: Path, key: str, log: Callable[[str], None] = lambda message: None) -> tuple[Path, bytes] | None:
    """The cached export for ``key`` (path, bytes) if its bytes match the digest in its name; others are removed.

    Files are named ``KEY-DIGEST.onnx``: a truncated file fails the digest and is deleted (then
    rebuilt), never loaded. The digest is the file's own, so it says nothing of a file rewritten
    whole: that is what the cache's privacy and the first batch's comparison with eager are for. A
    file is read without following a link, bounded, and only if it is the user's alone.
    """
    for path in sorted(cache.glob(f"{key}-*.onnx")):
        try:
            data = read_private(path)
        except OSError as e:
            log(f"backend: cached ONNX model {path.name} not used: {e.strerror or e}")
            continue
        if path.name == cached_name(key, data):
            return path, data
        path.unlink(missing_ok=True)
    return None


def read_private(path: Path) -> bytes:
    """A cache file's bytes: a regular file of the user's that no one else may write, at most MAX_MODEL_BYTES."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_MODEL_BYTES:
            raise OSError(errno.EINVAL, "not a regular file of a sane size")
        if problem := not_private(status, "file"):
            raise OSError(errno.EPERM, problem)
        return f.read(MAX_MODEL_BYTES + 1)


def cached_name(key: str, data: bytes) -> str:
    return f"{key}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"


def write_cached(cache: Path, key: str, data: bytes) -> Path:
    """Write the export atomically (a temporary file in the folder, fsynced, then renamed)."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / cached_name(key, data)
    handle, temporary = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".onnx")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def export_onnx(model: nn.Module, layer_name: str, probe: torch.Tensor) -> bytes:
    """The model (float32, eval) exported with both outputs and a dynamic batch size, traced on ``probe``."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("onnx") is None:
        raise BackendUnavailable("the onnx package (torch's exporter needs it) is not installed: "
                                 "pip install 'batchcam[onnx]'")
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
            torch.onnx.export(WithActivations(model, layer_name).eval(), (probe,), buffer, input_names=["x"],  # type: ignore[arg-type]  # dynamo=False writes to a file object; torch types f as a path only
                              output_names=["logits", "activations"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}, "activations": {0: "batch"}})
    except Exception as e:  # an exporter that cannot handle this model: the eager path still can
        raise BackendUnavailable(f"export failed: {type(e).__name__}: {e}"[:300]) from None
    return buffer.getvalue()


def probe_batch(model: nn.Module, image_size: int) -> torch.Tensor:
    """A fixed batch at the model's input size (its first convolution's channels), on the CPU."""
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    return torch.randn(PROBE_IMAGES, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))


def checked_session(data: bytes, probe: torch.Tensor, eager: EagerForward,
                    log: Callable[[str], None] = lambda message: None) -> OnnxForward | None:
    """An ONNX Runtime session of ``data`` if its outputs equal eager PyTorch's on the probe batch, else None
    (the session then still compares itself with eager on the run's first real batch)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle threads sleep, as OMP_WAIT_POLICY=PASSIVE makes torch's: spinning would starve the decoders.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        forward = OnnxForward(onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"]), eager,
                              hashlib.sha256(data).hexdigest(), log)
        logits, activations = forward.run(probe)
    except Exception:  # a corrupt or foreign file the digest did not catch
        return None
    with eager:
        expected_logits, expected_activations = eager(probe)
    return forward if outputs_equal(logits, activations, expected_logits.cpu(), expected_activations.cpu()) else None


def outputs_equal(logits: torch.Tensor, activations: torch.Tensor, expected_logits: torch.Tensor,
                  expected_activations: torch.Tensor) -> bool:
    """Probabilities within ``PROBE_TOLERANCE``; activations within it relative to their largest value."""
    if logits.shape != expected_logits.shape or activations.shape != expected_activations.shape:
        return False
    probabilities = (torch.softmax(logits, 1) - torch.softmax(expected_logits, 1)).abs().max()
    scale = expected_activations.abs().max().clamp_min(1e-6)
    return bool(probabilities <= PROBE_TOLERANCE
                and (activations - expected_activations).abs().max() <= PROBE_TOLERANCE * scale)
