"""The failures a command reports with its own exit code (see cli.py); nothing here imports anything.

Per-image failures are not here: they are data (an ``error`` row), never exceptions.
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or configuration: exit 2, nothing in REPORT changed."""


class CheckpointError(UsageError):
    """A model file that cannot be used (exit 2); the message names the file and the problem."""


class NotOurFolder(UsageError):
    """REPORT is not a folder batchcam may write into (exit 2); nothing was touched."""


class ReportWriteError(Exception):
    """REPORT could not be written (disk full, permissions): exit 74, the previous report intact."""


class ReportLocked(Exception):
    """Another batchcam run holds this report's lock (exit 75)."""
