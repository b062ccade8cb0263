"""Finding the candidate image files under ROOT, deterministically.

Candidates are chosen by name, so discovery stays a directory walk: the only bytes it reads are
the first 132 of files without an extension, where DICOM exports often put their images
(``IM000001``, or a UID like ``1.2.840.113619.2.55.3.1``), to look for the ``DICM`` magic. A file's
folder names its true class when it is named like one (``label_for``).
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchcam.decode.pixels import DICOM_MAGIC, DICOM_MAGIC_OFFSET
from batchcam.records import display_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm"})
NOT_IMAGES = frozenset({"dicomdir"})  # a DICOM media directory: an index, never an image


@dataclass(frozen=True)
class Candidate:
    relpath: str   # relative to ROOT, '/'-separated: the row's identity everywhere downstream
    path: Path     # where to read it


@dataclass
class Discovery:
    candidates: list[Candidate]
    # One line each, paths shown with rows.display_path: folders that could not be read, folders
    # reached twice through symbolic links, entries that are not regular files.
    problems: list[str] = field(default_factory=list)
    # Folders that could not be listed (permissions, an NFS hiccup), as relative paths like
    # Candidate.relpath: what lies in them is unknown this time, not gone.
    unlisted: list[str] = field(default_factory=list)


def discover(root: Path, exclude: Path | None = None) -> Discovery:
    """Every candidate image under ``root``, sorted by relative path.

    A candidate is a regular file (after following symbolic links) whose extension is an image's
    (case-insensitive) or that has no extension and starts like a DICOM file. Hidden files and
    folders are skipped. Symbolic links are followed, also out of ROOT, but a folder already
    visited (a link loop, or two links to one folder) is not entered twice. ``exclude`` (the report
    folder) and every folder inside it are never entered, recognised by device and inode, so a link
    to ``REPORT/overlays`` or a bind mount of REPORT inside ROOT is skipped too. What cannot be read
    is reported in ``problems``, never skipped in silence: an unreadable folder (also listed in
    ``unlisted``), a FIFO or device named like an image (reading one could block or never end). A
    file that cannot be read stays a candidate, so it gets its own error row.
    """
    root = Path(root)
    problems: list[str] = []
    unlisted: list[str] = []
    found: list[Candidate] = []
    visited: set[tuple[int, int]] = set()
    excluded = _folder_identities(exclude) if exclude is not None else set()

    def relative(path: str) -> str:
        return os.path.relpath(path, root).replace(os.sep, "/")

    def cannot_list(folder: str, error: OSError) -> None:
        shown = "ROOT" if relative(folder) == "." else f"folder {display_path(relative(folder))}"
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            problems.append(f"{shown} vanished during discovery")  # gone: its files are gone too
            return
        with contextlib.suppress(OSError):
            if _identity(folder) in excluded:
                return
        unlisted.append(relative(folder))
        problems.append(f"cannot list {shown}: {error.strerror or error}")

    def on_error(error: OSError) -> None:
        cannot_list(os.fsdecode(error.filename) if error.filename else str(root), error)

    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        try:
            identity = _identity(folder)
        except OSError as e:
            cannot_list(folder, e)
            dirs[:] = []
            continue
        if identity in excluded:
            dirs[:] = []
            continue
        if identity in visited:
            problems.append(f"skipped folder {display_path(relative(folder))}: already visited through another path "
                            "(symbolic link)")
            dirs[:] = []
            continue
        visited.add(identity)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or name.lower() in NOT_IMAGES:
                continue
            path = os.path.join(folder, name)
            if _has_image_extension(name):
                problem: str | None = _not_regular(path)
            elif _has_no_extension(name):
                problem = _not_dicom(path)
                if problem is None:
                    continue  # an ordinary file without an extension: not a candidate, not a problem
            else:
                continue
            if problem:
                problems.append(f"skipped {display_path(relative(path))}: {problem}")
                continue
            found.append(Candidate(relpath=relative(path), path=Path(path)))
    found.sort(key=lambda c: c.relpath)
    return Discovery(candidates=found, problems=problems, unlisted=sorted(unlisted))


def _identity(folder: str) -> tuple[int, int]:
    status = os.stat(folder)
    return status.st_dev, status.st_ino


def _folder_identities(folder: Path) -> set[tuple[int, int]]:
    """(device, inode) of ``folder`` and of every folder inside it (links inside it not followed)."""
    identities: set[tuple[int, int]] = set()
    for inside, _, _ in os.walk(folder, followlinks=False):
        try:
            identities.add(_identity(inside))
        except OSError:
            continue
    return identities


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _has_no_extension(name: str) -> bool:
    """No extension, or only digits after the last dot (a UID-named DICOM file)."""
    extension = os.path.splitext(name)[1]
    return not extension or extension[1:].isdigit()


def _not_regular(path: str) -> str:
    """Why an image-named entry cannot be read as a file ("" when it can, or when a broken link
    or a permission problem will be reported by its own error row)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    return "" if stat.S_ISREG(mode) else "not a regular file"


def _not_dicom(path: str) -> str | None:
    """"" for a DICOM file, None for any other file, or why it could not be checked.

    Opened without blocking and checked on the descriptor: a FIFO swapped in for the file after it
    was looked at is refused, never waited on.
    """
    if _not_regular(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot check whether it is a DICOM file: {e.strerror}"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        head = os.read(fd, DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError as e:
        return f"cannot check whether it is a DICOM file: {e.strerror}"
    finally:
        os.close(fd)
    return "" if head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC else None


def label_for(relpath: str, class_names: Sequence[str]) -> str:
    """The true class when the file's parent folder is named like a class (case-insensitive)."""
    parts = relpath.split("/")
    if len(parts) < 2:
        return ""
    parent = parts[-2].lower()
    return next((name for name in class_names if name.lower() == parent), "")
