"""The decode stage: a Dataset that turns candidate files into model inputs, and never raises.

Each item carries its own relative path, so identity travels with the pixels through the
DataLoader: a file that fails becomes an error sample in its own place, and no prediction can
slide onto a neighbour's row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from batchcam.discover import Candidate
from batchcam.imaging import WORKING_LONG_SIDE, DecodeError, decode_grayscale, fit_within, resize_square


@dataclass
class Sample:
    """One decoded file, or the reason it could not be decoded."""

    relpath: str
    sha256: str = ""
    error: str = ""
    width: int = 0
    height: int = 0
    model_view: np.ndarray | None = None   # uint8 (size, size): what the model sees
    display: np.ndarray | None = None      # uint8 (h, w), longer side <= overlay cap: the overlay's base

    @property
    def ok(self) -> bool:
        return not self.error


class ScanDataset(Dataset):
    def __init__(self, candidates: list[Candidate], image_size: int, display_max_side: int = WORKING_LONG_SIDE):
        self.candidates = candidates
        self.image_size = image_size
        self.display_max_side = display_max_side

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, index: int) -> Sample:
        candidate = self.candidates[index]
        try:
            data = candidate.path.read_bytes()
        except OSError as e:
            return Sample(relpath=candidate.relpath, error=f"cannot read file: {e.strerror or e}")
        return decode_sample(candidate.relpath, data, self.image_size, self.display_max_side)


def decode_sample(relpath: str, data: bytes, image_size: int, display_max_side: int = WORKING_LONG_SIDE) -> Sample:
    """Decode one file's bytes into a Sample; any failure becomes ``Sample.error``, never an exception."""
    sample = Sample(relpath=relpath, sha256=hashlib.sha256(data).hexdigest())
    try:
        decoded = decode_grayscale(data, min_long_side=max(display_max_side, image_size))
    except DecodeError as e:
        sample.error = str(e)
        return sample
    except Exception as e:  # a decoder bug must cost one row, not the run
        sample.error = f"cannot decode image: {type(e).__name__}: {e}"[:240]
        return sample
    sample.width, sample.height = decoded.width, decoded.height
    sample.model_view = resize_square(decoded.gray, image_size)
    sample.display = np.asarray(fit_within(decoded.gray, display_max_side), dtype=np.uint8)
    return sample


def collate_samples(samples: list[Sample]) -> tuple[list[Sample], torch.Tensor | None]:
    """Keep every sample (good or bad) in order, and stack the good ones' model views."""
    views = [s.model_view for s in samples if s.ok]
    return samples, (torch.from_numpy(np.stack(views)) if views else None)
