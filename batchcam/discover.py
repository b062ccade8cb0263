"""Finding the candidate image files under ROOT, deterministically."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Candidate:
    relpath: str   # relative to ROOT, '/'-separated: the row's identity everywhere downstream
    path: Path     # where to read it


@dataclass
class Discovery:
    candidates: list[Candidate]
    problems: list[str] = field(default_factory=list)  # folders that could not be read, loops skipped


def discover(root: Path, exclude: Path | None = None) -> Discovery:
    """Every candidate image under ``root``, sorted by relative path.

    Candidates are chosen by extension (case-insensitive). Hidden files and folders are skipped;
    symbolic links are followed, also out of ROOT, but a folder already visited (a link loop) is
    not entered twice; ``exclude`` (the report folder, when it lies inside ROOT) is never entered.
    """
    root = Path(root)
    excluded = os.path.realpath(exclude) if exclude is not None else None
    problems: list[str] = []
    found: list[Candidate] = []
    visited: set[tuple[int, int]] = set()

    def on_error(error: OSError) -> None:
        problems.append(f"cannot read folder {error.filename}: {error.strerror}")

    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in visited:
            problems.append(f"skipped {folder}: already visited (symbolic link loop)")
            dirs[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) != excluded)
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(folder, name)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            found.append(Candidate(relpath=relpath, path=path))
    found.sort(key=lambda c: c.relpath)
    return Discovery(candidates=found, problems=problems)
