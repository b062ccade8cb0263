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
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMPORARY_TRIES = 16  # random names that all exist already: someone is guessing, not chance
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{16}\.tmp", re.DOTALL)


class PlantedLink(OSError):
    """A symbolic link sits where batchcam keeps its own folder; it is refused, never followed."""


class FolderMoved(OSError):
    """A folder batchcam holds open was moved away or replaced while it worked: writing on would
    write where the folder now lies, outside the report."""


def temporary_name(name: str) -> str:
    """A name no one else uses: ``.NAME.<random>.tmp`` (the caller still creates it with O_EXCL)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def temporary_of(entry: str) -> str | None:
    """The name ``entry`` is a temporary for (``temporary_name``'s form), or None."""
    found = _TEMPORARY.fullmatch(entry)
    return found.group(1) if found else None


class SafeDir:
    """An open folder: names inside it are created, replaced, appended to and read without
    following links. Close it (or use ``with``) when done.

    A folder opened by ``subdir`` remembers its parent and name, so ``in_place`` can tell whether it
    is still the folder at that name.
    """

    def __init__(self, fd: int, path: Path, parent: SafeDir | None = None, name: str = ""):
        self.fd = fd
        self.path = Path(path)
        self.parent = parent
        self.name = name

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = False) -> "SafeDir":
        """Open ``path`` itself, following links in it: the folder the user named is the user's choice."""
        path = Path(path)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), path)

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc: object) -> None:
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
                return SafeDir(os.open(name, _NOFOLLOW_DIR, dir_fd=self.fd), self.path / name, self, name)
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

    def in_place(self) -> bool:
        """Whether this folder is still the one at its name inside its parent (compared by device and
        inode, the name not followed): False once it was moved away, or replaced by another."""
        if self.parent is None:
            return True
        found = self.parent.lstat(self.name)
        mine = os.fstat(self.fd)
        return found is not None and (found.st_dev, found.st_ino) == (mine.st_dev, mine.st_ino)

    def check_in_place(self) -> None:
        """Raise FolderMoved unless ``in_place``."""
        if not self.in_place():
            raise FolderMoved(errno.ENOENT, "moved or replaced while batchcam was writing; nothing more is "
                              "written there", str(self.path))

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
    def atomic_write(self, name: str, mode: str = "w", *, encoding: str | None = None,
                     newline: str | None = None) -> Iterator[IO]:
        """Write a temporary file, flush, fsync, then rename it over ``name`` (a link there is replaced)."""
        with self._about(name), self._atomic_write(name, mode, encoding, newline) as f:
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
    def _atomic_write(self, name: str, mode: str, encoding: str | None, newline: str | None) -> Iterator[IO]:
        temporary, fd = self.create_temporary(name)
        try:
            with open(fd, mode, encoding=encoding, newline=newline) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(temporary)  # made by this call: ours to remove
            raise

    def create(self, name: str) -> IO[bytes]:
        """A new file ``name`` for writing bytes; FileExistsError when anything is there (never replaced)."""
        with self._about(name):
            return open(os.open(name, os.O_WRONLY | _NEW_FILE, 0o644, dir_fd=self.fd), "wb")

    def open_existing(self, name: str) -> BinaryIO:
        """The regular file ``name`` opened for writing from empty (never a link, FIFO or device)."""
        with self._about(name):
            fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=self.fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
            os.set_blocking(fd, True)
            return open(fd, "wb")

    def make_folder(self, name: str) -> None:
        """A new folder ``name``; FileExistsError when anything is there."""
        with self._about(name):
            os.mkdir(name, 0o755, dir_fd=self.fd)

    def symlink(self, name: str, target: str) -> None:
        """A new symbolic link ``name`` -> ``target``; FileExistsError when anything is there."""
        with self._about(name):
            os.symlink(target, name, dir_fd=self.fd)

    def replace_with_link(self, name: str, target: str) -> None:
        """Make ``name`` a symbolic link to ``target`` in one rename (a reader finds the old entry or
        the new link, never nothing); a folder at ``name`` is an error, never removed."""
        with self._about(name):
            for _ in range(_TEMPORARY_TRIES):
                temporary = temporary_name(name)
                try:
                    os.symlink(target, temporary, dir_fd=self.fd)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.path / name))
            try:
                os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except BaseException:
                self.unlink(temporary)
                raise

    def readlink(self, name: str) -> str | None:
        """The text of the symbolic link ``name``; None when it is missing or not a link."""
        try:
            return os.readlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a link
                return None
            raise

    def link_to(self, name: str, other: SafeDir, new_name: str) -> None:
        """``other/new_name`` becomes another name of the regular file ``name`` (copied where the file
        system has no hard links); FileExistsError when anything is at ``new_name``."""
        with self._about(name):
            try:
                os.link(name, new_name, src_dir_fd=self.fd, dst_dir_fd=other.fd, follow_symlinks=False)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
                    raise
            with open(self._open_regular(name), "rb") as source, other.create(new_name) as copy:
                shutil.copyfileobj(source, copy, 2**20)
                copy.flush()
                os.fsync(copy.fileno())

    def _open_regular(self, name: str) -> int:
        """A read descriptor of the regular file ``name`` (never a link, FIFO or device)."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
        os.set_blocking(fd, True)
        return fd

    def empty(self, name: str) -> None:
        """Replace ``name`` by an empty file in one rename (not made durable: it is about to go)."""
        with self._about(name):
            temporary, fd = self.create_temporary(name)
            os.close(fd)
            try:
                os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except BaseException:
                self.unlink(temporary)
                raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_write(name, "wb") as f:
            f.write(data)

    def open_append(self, name: str, *, encoding: str | None = None, errors: str | None = None) -> IO[str]:
        """``name`` opened for appending text, its lines kept. A link, FIFO or device in its place is
        replaced by a new, empty file (never written through, never waited on). A file that shares
        its inode with other names (a hard-link backup) is first copied to a file of its own, so the
        backup's copy never changes."""
        fd = self._open_own_file(name, os.O_RDWR | os.O_APPEND)
        if os.fstat(fd).st_nlink > 1:
            fd = self._copy_of_own(name, fd)
        return open(fd, "a", encoding=encoding, errors=errors)

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
