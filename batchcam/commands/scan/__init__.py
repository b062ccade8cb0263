"""``batchcam scan ROOT --out REPORT``: REPORT is claimed and locked first, then the stages run
(``run``: what the scan does once REPORT is locked).

Nothing heavy is imported before the lock is held: a second run on a locked REPORT, or a REPORT
batchcam must not write into, is refused in a blink even while the first run keeps every core busy.
"""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from batchcam.config import ScanConfig
from batchcam.errors import ReportWriteError, UsageError
from batchcam.report.lock import ReportLock
from batchcam.runtime.console import Console

if TYPE_CHECKING:
    from batchcam.commands.scan.run import ScanResult


def scan(config: ScanConfig, console: Console) -> ScanResult:
    """Run a whole scan.

    Raises UsageError (CheckpointError, NotOurFolder) leaving REPORT as it was, ReportLocked when
    another run holds REPORT, ReportWriteError when REPORT cannot be written, Interrupted after a
    signal. The caller closes ``console`` (and with it REPORT/batchcam.log) once it has logged how
    the run ended.
    """
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    config.validate()
    lock = ReportLock(config.out, root=config.root)
    try:
        with lock:  # first, so a second run on this REPORT is refused at once
            from batchcam.commands.scan import run as scan_run  # torch and the stages load once REPORT is ours

            started = time.monotonic()  # the run's timings leave out the libraries' import, as before
            try:
                ready = scan_run.prepare(config, console)
            except UsageError:
                lock.forget_new_report()
                raise
            return scan_run.run(config, console, ready, started, started_at, lock)
    except OSError as e:
        if e.filename and not _inside(Path(e.filename), config.out):
            raise  # not a write into REPORT (a broken installation, say): a real internal failure
        where = f" ({e.filename})" if e.filename else ""
        raise ReportWriteError(f"cannot write the report in {config.out}: {e.strerror or e}{where}; "
                               "the previous report is unchanged") from None


def _inside(path: Path, folder: Path) -> bool:
    """Lexically: resolving could follow the very link inside REPORT that was refused."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
