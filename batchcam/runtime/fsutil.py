"""Crash-safe file writing that never follows a link planted inside the report.

``SafeDir`` is a folder opened once; every name inside it is opened relative to that folder's
descriptor with ``O_NOFOLLOW`` (and sub-folders with ``O_DIRECTORY | O_NOFOLLOW``). So a symbolic
link that someone put in place of ``.batchcam/``, ``overlays/``, the journal or the log is replaced
(or, where it cannot be told apart from the user's own data, refused), and the file it points to is
never opened for writing. Replacing files by rename from a temporary name keeps the other
guarantee: a reader sees the old file or the new one, never a torn one. Temporary names are
random and made with ``O_EXCL``: a file batchcam did not create in that very call is never replaced
or removed, whatever its name.

A file with more than one name is not an attack: it is how labs back up (``cp -al``, rsnapshot,
``rsync --link-dest``). Files are replaced by rename, so the backup keeps its copy; a file appended to
(the log, the journal) is first copied to a file of its own when another name shares it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMPORARY_TRIES = 16  # random names that all exist already: someone is guessing, not chance


class PlantedLink(OSError):
    """A symbolic link sits where batchcam keeps its own folder; it is refused, never followed."""


def temporary_name(name: str) -> str:
    """A name no one else uses: ``.NAME.<random>.tmp`` (the caller still creates it with O_EXCL)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


class SafeDir:
    """An open folder: names inside it are created, replaced, appended to and read without
    following links. Close it (or use ``with``) when done."""

    def __init__(self, fd: int, path: Path):
        self.fd = fd
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = False) -> "SafeDir":
        """Open ``path`` itself, following links in it: the folder the user named is the user's choice."""
        path = Path(path)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def _about(self, name: str) -> Iterator[None]:
        """OSErrors raised inside name the full path (``dir_fd`` calls only know the bare name)."""
        try:
            yield
        except OSError as e:
            if not e.filename or not os.path.isabs(os.fsdecode(e.filename)):
                e.filename = str(self.path / name)
            raise

    def subdir(self, name: str, create: bool = True, replace_link: bool = True) -> "SafeDir":
        with self._about(name):
            return self._subdir(name, create, replace_link)

    def _subdir(self, name: str, create: bool, replace_link: bool) -> "SafeDir":
        """The folder ``name`` inside this one, made when missing.

        A link in its place is removed and a real folder made (``replace_link``), or refused with
        ``PlantedLink``; a plain file in its place is an error (it may be someone's data).
        """
        for _ in range(3):  # a link removed or a folder made by a concurrent process: look again
            try:
                return SafeDir(os.open(name, _NOFOLLOW_DIR, dir_fd=self.fd), self.path / name)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=self.fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not self.is_link(name):
                    raise
                if not replace_link:
                    raise PlantedLink(errno.ELOOP, "a symbolic link is in place of batchcam's folder; "
                                      "refusing to write through it", str(self.path / name)) from None
                os.unlink(name, dir_fd=self.fd)
        raise OSError(errno.EAGAIN, "folder keeps changing", str(self.path / name))

    def is_link(self, name: str) -> bool:
        try:
            return stat.S_ISLNK(os.lstat(name, dir_fd=self.fd).st_mode)
        except FileNotFoundError:
            return False

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.lstat(name, dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def is_file(self, name: str) -> bool:
        found = self.lstat(name)
        return found is not None and stat.S_ISREG(found.st_mode)

    @contextlib.contextmanager
    def atomic_write(self, name: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
        """Write a temporary file, flush, fsync, then rename it over ``name`` (a link there is replaced)."""
        with self._about(name), self._atomic_write(name, mode, **open_kwargs) as f:
            yield f

    def create_temporary(self, name: str, access: int = os.O_WRONLY) -> tuple[str, int]:
        """A new file at a random temporary name for ``name`` (never one that exists): (name, fd)."""
        for _ in range(_TEMPORARY_TRIES):
            temporary = temporary_name(name)
            try:
                return temporary, os.open(temporary, access | _NEW_FILE, 0o644, dir_fd=self.fd)
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.path / name))

    @contextlib.contextmanager
    def _atomic_write(self, name: str, mode: str, **open_kwargs) -> Iterator[IO]:
        temporary, fd = self.create_temporary(name)
        try:
            with open(fd, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(temporary)  # made by this call: ours to remove
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_write(name, "wb") as f:
            f.write(data)

    def open_append(self, name: str, **open_kwargs) -> IO:
        """``name`` opened for appending text, its lines kept. A link, FIFO or device in its place is
        replaced by a new, empty file (never written through, never waited on). A file that shares
        its inode with other names (a hard-link backup) is first copied to a file of its own, so the
        backup's copy never changes."""
        fd = self._open_own_file(name, os.O_RDWR | os.O_APPEND)
        if os.fstat(fd).st_nlink > 1:
            fd = self._copy_of_own(name, fd)
        return open(fd, "a", **open_kwargs)

    def open_lock_file(self, name: str) -> int:
        """A read-write descriptor of ``name``, made when missing. A regular file there is opened in
        place whatever its link count (replacing it could hand a second run a lock of its own); a
        link, FIFO or device there is replaced by a new file."""
        return self._open_own_file(name, os.O_RDWR)

    def same_file(self, name: str, fd: int) -> bool:
        """Whether ``name`` (not followed) is the file open at ``fd``."""
        found, opened = self.lstat(name), os.fstat(fd)
        return found is not None and (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)

    def _open_own_file(self, name: str, access: int) -> int:
        """Open ``name`` in place when it is a regular file; anything else there (a symbolic link, a
        FIFO, a device) is removed, never written through or waited on, and a new file made."""
        flags = access | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        with self._about(name):
            for _ in range(3):
                try:
                    fd = os.open(name, flags, 0o644, dir_fd=self.fd)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO nobody reads
                        raise
                else:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        os.set_blocking(fd, True)
                        return fd
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self.fd)
                flags |= os.O_EXCL
            raise OSError(errno.EEXIST, "something keeps reappearing here", str(self.path / name))

    def _copy_of_own(self, name: str, shared: int) -> int:
        """Replace ``name`` (open at ``shared``, which other names share) by a copy of its bytes, and
        return the copy open for appending; the other names keep the old file untouched."""
        temporary, fd = self.create_temporary(name, os.O_RDWR | os.O_APPEND)
        try:
            os.lseek(shared, 0, os.SEEK_SET)
            with open(os.dup(shared), "rb") as source, open(os.dup(fd), "wb") as copy:
                shutil.copyfileobj(source, copy, 2**20)
                copy.flush()
                os.fsync(copy.fileno())
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            os.close(fd)
            self.unlink(temporary)
            raise
        finally:
            os.close(shared)
        return fd

    def read_bytes(self, name: str) -> bytes | None:
        """The file's bytes; None when it is missing, or is a link or not a regular file."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP):
                return None
            e.filename = str(self.path / name)
            raise
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return f.read()

    def read_text(self, name: str) -> str | None:
        data = self.read_bytes(name)
        return None if data is None else data.decode("utf-8", errors="replace")

    def unlink(self, name: str) -> bool:
        """Remove ``name`` (a link is removed, never its target); False when it was not there."""
        try:
            with self._about(name):
                os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def rmdir(self, name: str) -> bool:
        """Remove the empty folder ``name``; False when it is missing or not empty."""
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            return False
        return True

    def names(self) -> list[str]:
        with os.scandir(self.fd) as entries:
            return [entry.name for entry in entries]

    def fsync(self) -> None:
        """Make renames inside this folder durable (a rename is only on disk once its folder is synced)."""
        os.fsync(self.fd)


def publish_new(folder: Path, name: str, data: bytes) -> bool:
    """Write ``folder/name`` only if nothing is there yet; True when written.

    The bytes go to a new temporary file first and are linked to ``name`` (link(2) never replaces),
    so a file already there, or a link planted there, is left exactly as it was.
    """
    with SafeDir.open(folder) as target:
        temporary, fd = target.create_temporary(name)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, name, src_dir_fd=target.fd, dst_dir_fd=target.fd, follow_symlinks=False)
            except FileExistsError:
                return False
            target.fsync()
            return True
        finally:
            target.unlink(temporary)  # made by this call


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` atomically (its folder is followed; a link at its name is replaced)."""
    path = Path(path)
    with SafeDir.open(path.parent) as folder:
        folder.write_bytes(path.name, data)
