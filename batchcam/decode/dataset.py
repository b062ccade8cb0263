"""The decode stage: a Dataset that turns candidate files into model inputs, and never raises.

Each item carries its own relative path, so identity travels with the pixels through the
DataLoader: a file that fails becomes an error sample in its own place, and no prediction can
slide onto a neighbour's row.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import signal
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from batchcam.config import DEFAULT_MAX_FILE_BYTES, OVERLAY_LONG_SIDE, Selection
from batchcam.decode.imaging import DECODE_MIN_LONG_SIDE, decode_grayscale, fit_within, resize_square
from batchcam.decode.lungs import estimate_lung_fields
from batchcam.decode.pixels import DecodeError, NotSelected, is_dicom


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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
READ_CHUNK = 8 * 2 ** 20


class FileInFlux(Exception):
    """The file vanished, or changed while it was being read: no row can be trusted this time."""


class FileTooLarge(Exception):
    """The file is larger than the per-file cap; the message is a one-line reason for the CSV.

    ``size`` and ``mtime_ns`` are the file's when it was refused (-1 when unknown), so its error
    row is reused until the file changes.
    """

    def __init__(self, size: int, limit: int, mtime_ns: int = -1):
        super().__init__(f"file too large: {_size_label(size)} (limit {_limit_label(limit)}, --max-file-mb)")
        self.size, self.limit, self.mtime_ns = size, limit, mtime_ns

    def __reduce__(self):  # crosses process boundaries (DataLoader workers) intact
        return type(self), (self.size, self.limit, self.mtime_ns)


class ScanDataset(Dataset):
    """Items are anything with ``relpath`` and ``path`` (a discovery Candidate, a PlannedFile)."""

    def __init__(self, items: Sequence, image_size: int, display_max_side: int = OVERLAY_LONG_SIDE,
                 can_defer: Callable[[bytes], bool] | None = None, *,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, selection: Selection | None = None):
        self.items = items
        self.selection = selection  # which DICOM films are scored (None: all)
        self.image_size = image_size
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
            return Sample(relpath=item.relpath, error=f"cannot read file: {e.strerror or e}")
        if self.can_defer is not None and self.can_defer(data):
            sample = Sample(relpath=item.relpath, sha256=hashlib.sha256(data).hexdigest(), encoded=data)
        else:
            sample = decode_sample(item.relpath, data, self.image_size, self.display_max_side, self.selection)
        sample.size, sample.mtime_ns = size, mtime_ns
        return sample

    def decode_deferred(self, sample: Sample) -> Sample:
        """A deferred sample the batched decoder rejected, decoded on the CPU after all."""
        decoded = decode_sample(sample.relpath, sample.encoded, self.image_size, self.display_max_side,
                                self.selection)
        decoded.size, decoded.mtime_ns = sample.size, sample.mtime_ns
        return decoded


def read_consistently(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, int, int]:
    """The file's bytes with its size and mtime, checked unchanged across the read.

    The size is checked on the open file before anything is read, and no more than
    ``max_bytes + 1`` bytes are ever read: a file over the cap (a sparse 40 GiB file, say) raises
    ``FileTooLarge``, one that grows while it is read raises ``FileInFlux``, as does one that
    vanishes. Other failures to read raise ``OSError``.
    """
    try:
        fd = _open_for_reading(path)
    except FileNotFoundError:
        raise FileInFlux("file vanished during the scan") from None
    try:
        before = _regular_file_status(fd)
        if before.st_size > max_bytes:
            raise FileTooLarge(before.st_size, max_bytes, before.st_mtime_ns)
        data = _read_at_most(fd, max_bytes + 1)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        now = os.stat(path)  # the same file still there, unchanged
    except FileNotFoundError:
        raise FileInFlux("file vanished during the scan") from None
    sizes = {(s.st_size, s.st_mtime_ns) for s in (before, after, now)}
    if len(sizes) > 1 or len(data) != after.st_size:
        raise FileInFlux("file changed while it was being read; it is read again on the next run")
    if len(data) > max_bytes:  # cannot be reached with an honest st_size; kept as the last word
        raise FileTooLarge(len(data), max_bytes)
    return data, after.st_size, after.st_mtime_ns


def read_file_bounded(path: Path, max_bytes: int) -> bytes:
    """A file's bytes, refused with ``FileTooLarge`` beyond ``max_bytes`` before (or while) reading.

    For one-off reads (``predict``); a scan uses ``read_consistently``, which also notices a file
    changing under it. Failures to open or read raise ``OSError``.
    """
    fd = _open_for_reading(path)
    try:
        status = _regular_file_status(fd)
        if status.st_size > max_bytes:
            raise FileTooLarge(status.st_size, max_bytes, status.st_mtime_ns)
        data = _read_at_most(fd, max_bytes + 1)
        if len(data) > max_bytes:  # it grew past the cap while it was read
            raise FileTooLarge(max(len(data), os.fstat(fd).st_size), max_bytes)
    finally:
        os.close(fd)
    return data


def _open_for_reading(path: Path) -> int:
    # O_NONBLOCK: a FIFO put where a file was found must not hang the worker (it is refused below)
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))


def _regular_file_status(fd: int) -> os.stat_result:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise OSError("not a regular file")
    return status


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, until end of file.

    The first read asks for the file's size and one byte more, so a file that does not change is
    read in one buffer of its own size (joining one chunk copies nothing); whatever a growing file
    adds comes in chunks, never past ``limit``.
    """
    expected = os.fstat(fd).st_size
    chunks, total = [], 0
    while total < limit:
        want = expected + 1 - total if total <= expected else READ_CHUNK
        chunk = os.read(fd, min(limit - total, want))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _size_label(size: int) -> str:
    """A size for a reason: ``1001 bytes``, ``2.0 KiB``, ``40.0 GiB``."""
    if size < 1024:
        return f"{size} bytes"
    for unit, name in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size} bytes"


def _limit_label(limit: int) -> str:
    """A limit as it was most likely set: ``512 MiB``, ``1 KiB``, ``1000 bytes``."""
    for unit, name in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if limit >= unit and limit % unit == 0:
            return f"{limit // unit} {name}"
    return _size_label(limit)


def worker_init(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker set-up: tie each worker's life to the run's.

    Ctrl-C reaches the whole process group, but only the main process decides how a run stops (it
    finishes the batch in flight and saves), so workers ignore SIGINT. And a worker must not
    outlive a run killed with SIGKILL: blocked on a full queue nobody reads, it would stay forever,
    so on Linux the kernel is asked to kill it when its parent dies. Bind ``parent_pid`` with
    ``functools.partial(worker_init, os.getpid())``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers then rely on torch's own parent check
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def decode_sample(relpath: str, data: bytes, image_size: int, display_max_side: int = OVERLAY_LONG_SIDE,
                  selection: Selection | None = None) -> Sample:
    """Decode one file's bytes into a Sample; any failure becomes ``Sample.error``, never an exception.

    A DICOM film that ``selection`` does not score gets ``skip_reason`` and no pixels (None scores
    every file); a DICOM sample records the rule's key, so a changed rule decides it again.
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
    sample.model_view = resize_square(decoded.gray, image_size)
    attach_lung_fields(sample)  # here, in the decoding workers
    sample.display = np.asarray(fit_within(decoded.gray, display_max_side), dtype=np.uint8)
    return sample


def attach_lung_fields(sample: Sample) -> None:
    """The lung fields of the sample's model view; a refusal becomes a warning for the run's log.

    ``attention_outside`` is then left empty for this file, and the log says why (one line).
    """
    estimate = estimate_lung_fields(sample.model_view)
    sample.lung_fields = estimate.fields
    if estimate.fields is None:
        sample.warnings += (f"attention_outside left empty: {estimate.refusal}",)


def collate_samples(samples: list[Sample]) -> tuple[list[Sample], torch.Tensor | None]:
    """Keep every sample (good or bad) in order, and stack the good ones' model views."""
    views = [s.model_view for s in samples if s.ok and s.model_view is not None]
    return samples, (torch.from_numpy(np.stack(views)) if views else None)
