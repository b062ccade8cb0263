"""What a run says while it works: a progress bar on a terminal, short lines for cron mail."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")


class Console:
    """stderr for people (quiet keeps only warnings), and a detailed log file once REPORT is known."""

    def __init__(self, quiet: bool = False, stream: IO[str] | None = None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._log: IO[str] | None = None
        self.images_total: int | None = None  # of the last ``progress``: for the log's last line
        self.images_done = 0                  # images handed on, counted as each batch is

    def attach_log(self, open_log: Callable[[], IO[str]]) -> None:
        """Append this run's details to the stream ``open_log()`` opens (REPORT/batchcam.log); best
        effort, never fatal."""
        try:
            self._log = open_log()
        except OSError:
            self._log = None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)
        self.log(message)

    def warn(self, message: str) -> None:
        print(f"batchcam: warning: {message}", file=self.stream, flush=True)
        self.log(f"warning: {message}")

    def log(self, message: str) -> None:
        """Only into the log file: details that would make cron mail long."""
        if self._log is None:
            return
        try:
            self._log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {message}\n")
            self._log.flush()
        except OSError:
            pass  # a full disk must not turn a log line into a failed run

    def progress(self, batches: Iterable[T], total_images: int, sizes: Callable[[T], int]) -> Iterator[T]:
        """Yield batches while showing progress in images (``sizes(batch)`` counts one batch)."""
        self.images_total, self.images_done = total_images, 0
        batches = self._counted(batches, sizes)
        if self.quiet:
            yield from batches
        elif self.interactive:
            from tqdm import tqdm
            with tqdm(total=total_images, unit="img", file=self.stream, dynamic_ncols=True) as bar:
                for batch in batches:
                    yield batch
                    bar.update(sizes(batch))
        else:
            yield from self._lines(batches, total_images, sizes)

    def work_done(self) -> str:
        """How far the run got, for the log's last line: "64 of 240 images processed"."""
        if self.images_total is None:
            return "no image processed"
        return f"{self.images_done} of {self.images_total} images processed"

    def _counted(self, batches: Iterable[T], sizes: Callable[[T], int]) -> Iterator[T]:
        """A batch counts once it is handed on: a stopped run finishes the batch it holds."""
        for batch in batches:
            self.images_done += sizes(batch)
            yield batch

    def _lines(self, batches: Iterable[T], total: int, sizes: Callable[[T], int]) -> Iterator[T]:
        """At most one line per tenth of the work, so a cron mail stays short."""
        done, next_report, started = 0, max(1, total // 10), time.monotonic()
        for batch in batches:
            yield batch
            done += sizes(batch)
            if done >= next_report or done == total:
                rate = done / max(time.monotonic() - started, 1e-9)
                self.info(f"processed {done}/{total} images ({rate:.1f}/s)")
                next_report = done + max(1, total // 10)
