"""Does a Ray node see ROOT and REPORT as the driver does? (``scan --engine ray``)

Decode tasks read ROOT and model actors write overlays into REPORT on whichever node they run, so
both must be the same folders at the same paths on every node: a shared file system. The driver
writes a random token into ``REPORT/.batchcam/``; a node shares REPORT when it reads that token
back and can create a file in ``REPORT/overlays``.

This module imports nothing heavy on purpose: its checks run as a task on every node before any
image is processed, and a worker that had to import torch first would add seconds to every run.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from batchcam.report.lock import STATE_DIR
from batchcam.runtime.fsutil import SafeDir

STORAGE_TOKEN = "ray-storage-token"   # in REPORT/.batchcam/ for the length of a ray run


def token_path(report: Path) -> Path:
    return Path(report) / STATE_DIR / STORAGE_TOKEN


def _state(report: Path) -> SafeDir:
    """REPORT's state folder, never through a link planted in its place."""
    with SafeDir.open(report) as folder:
        return folder.subdir(STATE_DIR, create=False, replace_link=False)


def new_token() -> str:
    return secrets.token_hex(16)


def write_token(report: Path, token: str) -> None:
    """Write the token (replacing, never following, a link planted at its name)."""
    with _state(report) as state:
        state.write_bytes(STORAGE_TOKEN, token.encode())


def remove_token(report: Path) -> None:
    with _state(report) as state:
        state.unlink(STORAGE_TOKEN)


def read_token(report: Path) -> str | None:
    with _state(report) as state:
        return state.read_text(STORAGE_TOKEN)


def node_problems(root: str, report: str, token: str) -> tuple[str | None, str | None]:
    """(why this node cannot read ROOT, why it cannot share REPORT), each None when it can."""
    root_problem = None if Path(root).is_dir() else f"node {socket.gethostname()} does not see ROOT {root}"
    return root_problem, report_problem(report, token)


def probe_overlays(report: Path) -> None:
    """Create and remove a file in REPORT/overlays, never through a link planted in its place."""
    with SafeDir.open(report) as folder, folder.subdir("overlays", create=False, replace_link=False) as overlays:
        name = f".ray-probe-{secrets.token_hex(8)}"
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=overlays.fd))
        overlays.unlink(name)


def report_problem(report: str, token: str) -> str | None:
    """Why this node cannot share REPORT with the driver, or None when it can."""
    node = socket.gethostname()
    path = token_path(Path(report))
    try:
        seen = read_token(Path(report))
    except OSError as e:
        return f"node {node} cannot read {path}: {e.strerror or e}"
    if seen != token:
        return f"node {node} sees another {path} than the one the driver wrote"
    try:
        probe_overlays(Path(report))
    except OSError as e:
        return f"node {node} cannot write into {Path(report) / 'overlays'}: {e.strerror or e}"
    return None
