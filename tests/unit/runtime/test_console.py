"""What a run says while it works: short progress lines for cron mail (at most one per tenth of the
work), nothing but warnings when quiet, and a log whose last line says how the run ended and how far
it got."""
from __future__ import annotations

import io
import re
import signal

import pytest

from batchcam import cli
from batchcam.commands import scan as scan_command
from batchcam.runtime.console import Console
from batchcam.runtime.interrupt import Interrupted

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


class Unwritable(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def batches(count: int, size: int = 4) -> list[list[int]]:
    return [list(range(i * size, (i + 1) * size)) for i in range(count)]


def test_progress_on_a_pipe_is_at_most_one_line_per_tenth_and_ends_with_the_total():
    stream = io.StringIO()
    console = Console(stream=stream)
    given = batches(25)
    assert list(console.progress(given, total_images=100, sizes=len)) == given
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 10
    done = [int(re.fullmatch(r"processed (\d+)/100 images \(\d+\.\d/s\)", line).group(1)) for line in lines]
    assert done == sorted(done) and done[-1] == 100
    assert console.work_done() == "100 of 100 images processed"


def test_a_run_smaller_than_ten_images_says_each_batch():
    stream = io.StringIO()
    list(Console(stream=stream).progress(batches(3, size=1), total_images=3, sizes=len))
    assert [line.split(" (")[0] for line in stream.getvalue().splitlines()] == [
        "processed 1/3 images", "processed 2/3 images", "processed 3/3 images"]


def test_quiet_says_nothing_but_warnings_and_still_counts_the_work():
    stream = io.StringIO()
    console = Console(quiet=True, stream=stream)
    assert list(console.progress(batches(5), total_images=20, sizes=len)) == batches(5)
    console.info("scanning")
    console.warn("2 files are links")
    assert stream.getvalue() == "batchcam: warning: 2 files are links\n"
    assert console.work_done() == "20 of 20 images processed"


def test_a_stopped_run_counts_the_batches_it_was_handed_and_no_more():
    console = Console(quiet=True, stream=io.StringIO())
    assert console.work_done() == "no image processed"
    for number, _ in enumerate(console.progress(batches(10), total_images=40, sizes=len), start=1):
        if number == 3:
            break
    assert console.work_done() == "12 of 40 images processed"


def test_the_log_gets_every_message_with_a_timestamp_and_details_stderr_does_not():
    stream, log = io.StringIO(), io.StringIO()
    console = Console(stream=stream)
    console.attach_log(lambda: log)
    console.info("found 3 images")
    console.warn("a.png: malformed EXIF")
    console.log("reused 2 rows")
    assert stream.getvalue() == "found 3 images\nbatchcam: warning: a.png: malformed EXIF\n"
    lines = log.getvalue().splitlines()
    assert all(LOG_LINE.match(line) for line in lines)
    assert [LOG_LINE.sub("", line) for line in lines] == ["found 3 images", "warning: a.png: malformed EXIF",
                                                          "reused 2 rows"]
    console.close()
    assert log.closed


def test_a_log_that_cannot_be_opened_or_written_never_fails_the_run():
    def refused():
        raise PermissionError(13, "Permission denied")

    console = Console(stream=io.StringIO())
    console.attach_log(refused)
    console.info("still said")
    console.attach_log(Unwritable)
    console.warn("still said too")
    assert console.stream.getvalue() == "still said\nbatchcam: warning: still said too\n"
    console.close()


def fake_scan(log: io.StringIO, stop_after: int | None):
    """A scan that attaches ``log``, runs 10 batches of 4 images and is stopped by SIGTERM after
    ``stop_after`` of them (None: it finishes)."""

    class Result:
        complete = True
        summary_line = "batchcam: 40 images: 40 ok"

    def scan(config, console: Console):
        console.attach_log(lambda: log)
        for number, _ in enumerate(console.progress(batches(10), 40, len), start=1):
            if number == stop_after:
                raise Interrupted(signal.SIGTERM)
        return Result()

    return scan


@pytest.mark.parametrize("stop_after, code, last_line", [
    (None, 0, r"run finished: 40 images: 40 ok; exit 0"),
    (3, 143, r"run ended: stopped by SIGTERM; finished batches are saved and the next run resumes from them; "
             r"12 of 40 images processed, \d+\.\d s; exit 143"),
])
def test_the_logs_last_line_says_how_the_run_ended_and_how_far_it_got(stop_after, code, last_line, tmp_path,
                                                                      monkeypatch, capsys):
    (tmp_path / "xrays").mkdir()
    log = io.StringIO()
    log.close = lambda: None  # read after the run
    monkeypatch.setattr(scan_command, "scan", fake_scan(log, stop_after))
    assert cli.main(["scan", str(tmp_path / "xrays"), "--out", str(tmp_path / "report"), "--quiet"]) == code
    assert re.fullmatch(last_line, LOG_LINE.sub("", log.getvalue().splitlines()[-1]))
