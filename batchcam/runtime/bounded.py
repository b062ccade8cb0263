"""Reading a file whole, bounded: every file a command reads goes through here.

A file is opened without blocking (``O_NONBLOCK``: a FIFO put where a file was expected must not
hang a run that holds REPORT's lock), checked on the open descriptor to be a regular file (never
a FIFO, a device such as ``/dev/zero``, a socket or a folder), and its size is checked before any
byte is read: at most the limit plus one byte is ever read, so a sparse 40 GiB file costs an
``fstat``, not the machine's memory.

Two kinds of reader: images (``read_consistently`` for a scan, ``read_file_bounded`` for one-off
reads) raise ``FileTooLarge`` or ``OSError``, which become the image's ``error`` row; a file named
on the command line (``--boxes``, ``--import``, ``--model``) is read by ``read_input``, which
raises a one-line ``UsageError`` naming the option, the file and the limit (``config`` declares
each kind's limit once).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from batchcam.config import DEFAULT_MAX_FILE_BYTES, file_kind, shown
from batchcam.errors import UsageError

READ_CHUNK = 8 * 2 ** 20


class FileInFlux(Exception):
    """The file vanished, or changed while it was being read: no row can be trusted this time."""


class FileTooLarge(Exception):
    """The file is larger than the per-file cap; the message is a one-line reason for the CSV.

    ``size`` and ``mtime_ns`` are the file's when it was refused (-1 when unknown), so its error
    row is reused until the file changes.
    """

    def __init__(self, size: int, limit: int, mtime_ns: int = -1):
        super().__init__(f"file too large: {size_label(size)} (limit {limit_label(limit)}, --max-file-mb)")
        self.size, self.limit, self.mtime_ns = size, limit, mtime_ns

    def __reduce__(self) -> tuple[type[FileTooLarge], tuple[int, int, int]]:
        # crosses process boundaries (DataLoader workers) intact
        return type(self), (self.size, self.limit, self.mtime_ns)


class NotRegularFile(OSError):
    """Opened, but not a regular file: ``kind`` says what it is (``a FIFO``, ``a folder``)."""

    def __init__(self, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})")
        self.kind = kind


def read_consistently(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, int, int]:
    """The file's bytes with its size and mtime, checked unchanged across the read.

    The size is checked on the open file before anything is read, and no more than
    ``max_bytes + 1`` bytes are ever read: a file over the cap (a sparse 40 GiB file, say) raises
    ``FileTooLarge``, one that grows while it is read raises ``FileInFlux``, as does one that
    vanishes. Other failures to read raise ``OSError``.
    """
    try:
        fd = open_for_reading(path)
    except FileNotFoundError:
        raise FileInFlux("file vanished during the scan") from None
    try:
        before = regular_file_status(fd)
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
    changing under it. Failures to open or read raise ``OSError`` (``NotRegularFile`` for a FIFO,
    a device or a folder).
    """
    fd = open_for_reading(path)
    try:
        status = regular_file_status(fd)
        if status.st_size > max_bytes:
            raise FileTooLarge(status.st_size, max_bytes, status.st_mtime_ns)
        data = _read_at_most(fd, max_bytes + 1)
        if len(data) > max_bytes:  # it grew past the cap while it was read
            raise FileTooLarge(max(len(data), os.fstat(fd).st_size), max_bytes)
    finally:
        os.close(fd)
    return data


def read_input(path: Path, max_bytes: int, option: str, what: str, error: type[UsageError] = UsageError) -> bytes:
    """The bytes of a file named on the command line by ``option`` (``--boxes``; "" for a file named
    otherwise), ``what`` (``a boxes CSV file``) of at most ``max_bytes``; anything else is a one-line
    ``error`` (a UsageError: exit 2) naming the file and saying what was found there."""
    name = f"{option} {shown(path)}".lstrip()
    try:
        return read_file_bounded(Path(path), max_bytes)
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except NotRegularFile as e:
        raise error(f"{name} is {e.kind}, not a regular file: give {what}") from None
    except FileTooLarge as e:
        raise error(f"{name} is {size_label(e.size)}, more than the {limit_label(max_bytes)} batchcam reads of "
                    f"{what}") from None
    except OSError as e:
        raise error(f"{name}: cannot read it: {e.strerror or e}") from None


def open_for_reading(path: Path) -> int:
    # O_NONBLOCK: a FIFO put where a file was found must not hang the reader (it is refused below)
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))


def regular_file_status(fd: int) -> os.stat_result:
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        raise NotRegularFile(file_kind(status.st_mode))
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


def size_label(size: int) -> str:
    """A size for a reason: ``1001 bytes``, ``2.0 KiB``, ``40.0 GiB``."""
    if size < 1024:
        return f"{size} bytes"
    for unit, name in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if size >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size} bytes"


def limit_label(limit: int) -> str:
    """A limit as it was most likely set: ``512 MiB``, ``1 KiB``, ``1000 bytes``."""
    for unit, name in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if limit >= unit and limit % unit == 0:
            return f"{limit // unit} {name}"
    return size_label(limit)
