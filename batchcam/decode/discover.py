"""Finding the candidate image files under ROOT, deterministically.

Candidates are chosen by name, so discovery stays a directory walk: the only bytes it reads are
the first 132 of files without an extension, where DICOM exports often put their images
(``IM000001``, or a UID like ``1.2.840.113619.2.55.3.1``), to look for the ``DICM`` magic.
"""
from __future__ import annotations

import os
import stat
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


def discover(root: Path, exclude: Path | None = None) -> Discovery:
    """Every candidate image under ``root``, sorted by relative path.

    A candidate is a regular file (after following symbolic links) whose extension is an image's
    (case-insensitive) or that has no extension and starts like a DICOM file. Hidden files and
    folders are skipped. Symbolic links are followed, also out of ROOT, but a folder already
    visited (a link loop, or two links to one folder) is not entered twice; ``exclude`` (the
    report folder, when it lies inside ROOT) is never entered. What cannot be read is reported in
    ``problems``, never skipped in silence: an unreadable folder, a FIFO or device named like an
    image (reading one could block or never end). A file that cannot be read stays a candidate,
    so it gets its own error row.
    """
    root = Path(root)
    excluded = os.path.realpath(exclude) if exclude is not None else None
    problems: list[str] = []
    found: list[Candidate] = []
    visited: set[tuple[int, int]] = set()

    def shown(path: str) -> str:
        return display_path(os.path.relpath(path, root).replace(os.sep, "/"))

    def on_error(error: OSError) -> None:
        problems.append(f"cannot read folder {shown(error.filename or str(root))}: {error.strerror}")

    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        try:
            identity = _identity(folder)
        except OSError as e:
            problems.append(f"cannot read folder {shown(folder)}: {e.strerror}")
            dirs[:] = []
            continue
        if identity in visited:
            problems.append(f"skipped folder {shown(folder)}: already visited through another path "
                            "(symbolic link)")
            dirs[:] = []
            continue
        visited.add(identity)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) != excluded)
        for name in files:
            if name.startswith(".") or name.lower() in NOT_IMAGES:
                continue
            path = os.path.join(folder, name)
            if _has_image_extension(name):
                problem = _not_regular(path)
            elif _has_no_extension(name):
                problem = _not_dicom(path)
                if problem is None:
                    continue  # an ordinary file without an extension: not a candidate, not a problem
            else:
                continue
            if problem:
                problems.append(f"skipped {shown(path)}: {problem}")
                continue
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            found.append(Candidate(relpath=relpath, path=Path(path)))
    found.sort(key=lambda c: c.relpath)
    return Discovery(candidates=found, problems=problems)


def _identity(folder: str) -> tuple[int, int]:
    status = os.stat(folder)
    return status.st_dev, status.st_ino


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
    """"" for a DICOM file, None for any other file, or why it could not be checked."""
    problem = _not_regular(path)
    if problem:
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError as e:
        return f"cannot check whether it is a DICOM file: {e.strerror}"
    return "" if head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC else None
