"""The decode stage: a Dataset that turns candidate files into model inputs, and never raises.

Each item carries its own relative path, so identity travels with the pixels through the
DataLoader: a file that fails becomes an error sample in its own place, and no prediction can
slide onto a neighbour's row.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from batchcam.config import DEFAULT_MAX_FILE_BYTES, OVERLAY_LONG_SIDE, Selection
from batchcam.decode.imaging import DECODE_MIN_LONG_SIDE, decode_grayscale, fit_within, model_view, view_box
from batchcam.decode.lungs import estimate_lung_fields
from batchcam.decode.pixels import DecodeError, NotSelected, is_dicom
from batchcam.runtime.bounded import FileInFlux, FileTooLarge, read_consistently, read_file_bounded


@dataclass
class Sample:
    """One decoded file, or the reason it could not be decoded (``error``) or is not scored
    (``skip_reason``: a DICOM that is not a frontal chest radiograph, see ``decode.selection``)."""

    relpath: str
    sha256: str = ""
    error: str = ""
    skip_reason: str = ""
    selection: str = ""                    # a DICOM's: the key of the rule it was selected or skipped by
    width: int = 0
    height: int = 0
    model_view: np.ndarray | None = None   # uint8 (size, size): what the model sees
    view_box: tuple[float, float, float, float] | None = None  # the part of the image it shows; None: all of it
    display: np.ndarray | None = None      # uint8 (h, w), longer side <= overlay cap: the overlay's base
    lung_fields: np.ndarray | None = None  # bool (LUNG_GRID, LUNG_GRID) estimate, None when refused
    encoded: bytes | None = None           # a JPEG left for the batched GPU decoder (scan --decode gpu)
    size: int = -1                         # the file's size and mtime when it was read
    mtime_ns: int = -1
    transient: bool = False                # the error may not recur (the file changed or vanished)
    warnings: tuple[str, ...] = ()         # decoded anyway, but worth a log line (malformed EXIF, say)

    @property
    def ok(self) -> bool:
        return not self.error and not self.skip_reason

    @property
    def status(self) -> str:
        return "error" if self.error else "skipped" if self.skip_reason else "ok"


class ScanDataset(Dataset):
    """Items are anything with ``relpath`` and ``path`` (a discovery Candidate, a PlannedFile)."""

    def __init__(self, items: Sequence, image_size: int, display_max_side: int = OVERLAY_LONG_SIDE,
                 can_defer: Callable[[bytes], bool] | None = None, *,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, selection: Selection | None = None,
                 resize: str = "squash"):
        self.items = items
        self.selection = selection  # which DICOM films are scored (None: all)
        self.image_size = image_size
        self.resize = resize        # the model's: decode.imaging.model_view
        self.display_max_side = display_max_side
        self.can_defer = can_defer  # scan --decode gpu: files it accepts are left undecoded
        self.max_file_bytes = max_file_bytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        try:
            data, size, mtime_ns = read_consistently(item.path, self.max_file_bytes)
        except FileInFlux as e:
            return Sample(relpath=item.relpath, error=str(e), transient=True)
        except FileTooLarge as e:  # re-decided every run (a stat), so a raised --max-file-mb takes effect
            return Sample(relpath=item.relpath, error=str(e), size=e.size, mtime_ns=e.mtime_ns, transient=True)
        except OSError as e:
            return Sample(relpath=item.relpath, error=cannot_read(e))
        if self.can_defer is not None and self.can_defer(data):
            sample = Sample(relpath=item.relpath, sha256=hashlib.sha256(data).hexdigest(), encoded=data)
        else:
            sample = decode_sample(item.relpath, data, self.image_size, self.display_max_side, self.selection,
                                   resize=self.resize)
        sample.size, sample.mtime_ns = size, mtime_ns
        return sample

    def decode_deferred(self, sample: Sample) -> Sample:
        """A deferred sample the batched decoder rejected, decoded on the CPU after all."""
        if sample.encoded is None:
            raise ValueError(f"{sample.relpath}: not a deferred sample (its bytes are already decoded)")
        decoded = decode_sample(sample.relpath, sample.encoded, self.image_size, self.display_max_side,
                                self.selection, resize=self.resize)
        decoded.size, decoded.mtime_ns = sample.size, sample.mtime_ns
        return decoded


def cannot_read(error: OSError) -> str:
    return f"cannot read file: {error.strerror or error}"


def read_sample(path: Path, relpath: str, max_file_bytes: int, decode: Callable[[str, bytes], Sample]) -> Sample:
    """One file read whole (bounded, a regular file only) and decoded by ``decode``; a file that cannot
    be read, or is over the size cap, becomes an error sample like one that cannot be decoded.

    For the commands that read a few named files (predict, sanity); a scan's ``ScanDataset`` also
    records the file's size and mtime and notices a file that changes while it is read.
    """
    try:
        data = read_file_bounded(path, max_file_bytes)
    except FileTooLarge as e:
        return Sample(relpath=relpath, error=str(e))
    except OSError as e:
        return Sample(relpath=relpath, error="is a folder (use scan for folders)" if path.is_dir() else cannot_read(e))
    return decode(relpath, data)


def decode_sample(relpath: str, data: bytes, image_size: int, display_max_side: int = OVERLAY_LONG_SIDE,
                  selection: Selection | None = None, *, resize: str = "squash") -> Sample:
    """Decode one file's bytes into a Sample; any failure becomes ``Sample.error``, never an exception.

    A DICOM film that ``selection`` does not score gets ``skip_reason`` and no pixels (None scores
    every file); a DICOM sample records the rule's key, so a changed rule decides it again.
    ``resize`` is the model's (``decode.imaging.model_view``): for ``center-crop`` the sample records the
    part of the image its view shows (``view_box``), where its map belongs.
    """
    sample = Sample(relpath=relpath, sha256=hashlib.sha256(data).hexdigest())
    if selection is not None and is_dicom(data, relpath):
        sample.selection = selection.key
    try:
        decoded = decode_grayscale(data, min_long_side=max(DECODE_MIN_LONG_SIDE, display_max_side), name=relpath,
                                   selection=selection)
    except NotSelected as e:
        sample.skip_reason = str(e)
        return sample
    except DecodeError as e:
        sample.error = str(e)
        return sample
    except Exception as e:  # a decoder bug must cost one row, not the run
        sample.error = f"cannot decode image: {type(e).__name__}: {e}"[:240]
        return sample
    sample.width, sample.height = decoded.width, decoded.height
    sample.warnings = tuple(decoded.warnings)
    set_model_view(sample, model_view(decoded.gray, image_size, resize))  # the lung fields too: in the workers
    if resize != "squash":
        sample.view_box = view_box_of(decoded.gray.size, (decoded.width, decoded.height), image_size, resize)
    sample.display = np.asarray(fit_within(decoded.gray, display_max_side), dtype=np.uint8)
    return sample


def view_box_of(decoded: tuple[int, int], original: tuple[int, int], image_size: int,
                resize: str) -> tuple[float, float, float, float]:
    """The model view's box in the original image's pixels, computed on the decoded pixels the view was
    cut from (a JPEG may be decoded at a reduced scale) and scaled to the original's size."""
    left, top, right, bottom = view_box(*decoded, image_size, resize)
    scale_x, scale_y = original[0] / decoded[0], original[1] / decoded[1]
    return left * scale_x, top * scale_y, right * scale_x, bottom * scale_y


def set_model_view(sample: Sample, view: np.ndarray) -> None:
    """The sample's model view and the lung fields estimated on it; a refusal becomes a warning for
    the run's log.

    ``attention_outside`` is then left empty for this file, and the log says why (one line).
    """
    sample.model_view = view
    estimate = estimate_lung_fields(view)
    sample.lung_fields = estimate.fields
    if estimate.fields is None:
        sample.warnings += (f"attention_outside left empty: {estimate.refusal}",)


def collate_samples(samples: list[Sample]) -> tuple[list[Sample], torch.Tensor | None]:
    """Keep every sample (good or bad) in order, and stack the good ones' model views."""
    views = [s.model_view for s in samples if s.ok and s.model_view is not None]
    return samples, (torch.from_numpy(np.stack(views)) if views else None)
