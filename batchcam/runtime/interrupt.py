"""SIGINT and SIGTERM as requests to stop at the next batch boundary, not as instant death.

The scan loop asks ``guard.requested`` after each batch; when set it stops reading, lets the
batch in flight finish and be journaled, and leaves with exit 130 (SIGINT) or 143 (SIGTERM).
"""
from __future__ import annotations

import signal
import threading


class Interrupted(Exception):
    """The run stopped on a signal after saving its finished work."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; finished batches are saved "
                         "and the next run resumes from them")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptGuard:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now; the journal still has every finished batch
            raise KeyboardInterrupt
        self.signum = signum
