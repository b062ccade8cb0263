"""SIGINT and SIGTERM as requests to stop at the next safe point, not as instant death.

The scan loop asks ``guard.requested`` after each batch; when set it stops reading, lets the
batch in flight finish and be journaled, and leaves with exit 130 (SIGINT) or 143 (SIGTERM). The
write phase calls ``guard.check()`` between the files of its new generation: a signal there
abandons the generation (the previous report stays) and leaves the same way; one after the switch
lets the run finish its bookkeeping first.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# What signal.signal accepts and returns: a function, SIG_DFL/SIG_IGN, or None (set outside Python).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Interrupted(Exception):
    """The run stopped on a signal after saving its finished work."""

    def __init__(self, signum: int, published: bool = False):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after publishing this run's report" if published else
                         f"stopped by {name}; finished batches are saved and the next run resumes from them")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptGuard:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, SignalHandler] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def check(self) -> None:
        """Raise Interrupted when a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now; the journal still has every finished batch
            raise KeyboardInterrupt
        self.signum = signum
