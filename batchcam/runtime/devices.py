"""The device and the forward pass's precision, resolved once per command (they need torch)."""
from __future__ import annotations

import torch

from batchcam.errors import UsageError


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
        if device.index is not None and device.index >= torch.cuda.device_count():  # type: ignore[redundant-expr]  # torch types index int; "cuda" has None
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def precision_name(autocast: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast]
