"""Reading a file whole, bounded: what a careless user or an attacker can put where a file is expected
(a FIFO, a link, a folder, a file over the limit, a sparse 40 GiB file, a file that grows while it is
read, an empty path) is refused with its reason, never hangs the reader and never fills its memory."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from batchcam.cli import main
from batchcam.errors import UsageError
from batchcam.runtime.bounded import (
    FileInFlux,
    FileTooLarge,
    NotRegularFile,
    limit_label,
    read_consistently,
    read_file_bounded,
    read_input,
    size_label,
)

GIB = 2 ** 30


def finishes(call, seconds: float = 10.0):
    """``call()``'s result or exception, failing (instead of hanging the suite) if it blocks."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the test as it was raised
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the read blocked for more than {seconds} s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


@pytest.fixture
def bytes_read(monkeypatch) -> list[int]:
    """Every byte count os.read returns while the test runs."""
    counts: list[int] = []
    real_read = os.read

    def counting(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        counts.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting)
    return counts


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "image.png"
    os.mkfifo(path)
    return path


# ------------------------------------------------------------------ what is read

def test_a_regular_file_is_read_whole_with_its_size_and_mtime(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"0123456789")
    data, size, mtime_ns = read_consistently(path, max_bytes=10)
    assert (data, size, mtime_ns) == (b"0123456789", 10, path.stat().st_mtime_ns)
    assert read_file_bounded(path, 10) == b"0123456789"
    assert read_input(path, 10, "--boxes", "a boxes CSV file") == b"0123456789"


def test_an_empty_file_is_read_as_no_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert read_consistently(path) == (b"", 0, path.stat().st_mtime_ns)
    assert read_file_bounded(path, 1) == b""


def test_a_link_is_read_as_the_file_it_names_and_refused_as_what_it_names(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(b"pixels")
    (tmp_path / "link.png").symlink_to(target)
    (tmp_path / "to-zero.png").symlink_to("/dev/zero")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    assert read_consistently(tmp_path / "link.png")[0] == b"pixels"
    with pytest.raises(NotRegularFile, match=r"not a regular file \(a character device\)"):
        finishes(lambda: read_consistently(tmp_path / "to-zero.png"))
    with pytest.raises(FileInFlux, match="vanished"):
        read_consistently(tmp_path / "dangling.png")
    with pytest.raises(UsageError, match="^--boxes .*dangling.png does not exist$"):
        read_input(tmp_path / "dangling.png", 100, "--boxes", "a boxes CSV file")


# ------------------------------------------------------------------ what is refused, and how

def test_a_fifo_is_refused_at_once_instead_of_blocking_the_reader(fifo):
    with pytest.raises(NotRegularFile, match=r"not a regular file \(a FIFO\)") as refused:
        finishes(lambda: read_consistently(fifo))
    assert refused.value.kind == "a FIFO"
    with pytest.raises(NotRegularFile):
        finishes(lambda: read_file_bounded(fifo, 100))
    with pytest.raises(UsageError) as usage:
        finishes(lambda: read_input(fifo, 100, "--import", "the exported REVIEW.csv"))
    assert str(usage.value) == f"--import {fifo} is a FIFO, not a regular file: give the exported REVIEW.csv"


def test_a_device_is_refused_as_a_device_never_read(bytes_read):
    with pytest.raises(NotRegularFile, match=r"\(a character device\)"):
        read_consistently(Path("/dev/zero"))
    with pytest.raises(UsageError) as usage:
        read_input(Path("/dev/zero"), 100, "--boxes", "a boxes CSV file")
    assert str(usage.value) == "--boxes /dev/zero is a character device, not a regular file: give a boxes CSV file"
    assert sum(bytes_read) == 0


def test_a_folder_is_refused_as_a_folder(tmp_path):
    with pytest.raises(NotRegularFile, match=r"\(a folder\)"):
        read_consistently(tmp_path)
    with pytest.raises(NotRegularFile, match=r"\(a folder\)"):
        read_file_bounded(tmp_path, 100)
    with pytest.raises(UsageError, match="is a folder, not a regular file: give a boxes CSV file$"):
        read_input(tmp_path, 100, "--boxes", "a boxes CSV file")


def test_a_file_one_byte_over_the_limit_is_refused_before_a_byte_is_read(tmp_path, bytes_read):
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 1025)
    with pytest.raises(FileTooLarge) as refused:
        read_consistently(path, max_bytes=1024)
    assert (refused.value.size, refused.value.limit, refused.value.mtime_ns) == (1025, 1024,
                                                                                 path.stat().st_mtime_ns)
    assert str(refused.value) == "file too large: 1.0 KiB (limit 1 KiB, --max-file-mb)"
    with pytest.raises(FileTooLarge):
        read_file_bounded(path, 1024)
    with pytest.raises(UsageError) as usage:
        read_input(path, 1024, "--boxes", "a boxes CSV file")
    assert str(usage.value) == f"--boxes {path} is 1.0 KiB, more than the 1 KiB batchcam reads of a boxes CSV file"
    assert sum(bytes_read) == 0
    assert read_consistently(path, max_bytes=1025)[0] == b"x" * 1025  # at the limit: read


def test_a_sparse_40_gib_file_costs_a_stat_not_the_memory(tmp_path, bytes_read):
    path = tmp_path / "sparse.dcm"
    with open(path, "wb") as f:
        f.truncate(40 * GIB)
    with pytest.raises(FileTooLarge, match=r"^file too large: 40\.0 GiB \(limit 512 MiB, --max-file-mb\)$"):
        read_consistently(path)
    with pytest.raises(UsageError, match=r"is 40\.0 GiB, more than the 1 GiB batchcam reads of a checkpoint$"):
        read_input(path, GIB, "--model", "a checkpoint")
    assert sum(bytes_read) == 0


def test_a_file_that_grows_between_the_stat_and_the_read_is_in_flux_and_never_read_past_the_limit(tmp_path,
                                                                                                  monkeypatch):
    path = tmp_path / "growing.png"
    path.write_bytes(b"a" * 100)
    real_read, read = os.read, []

    def growing_read(fd: int, n: int) -> bytes:
        if not read:  # the writer appends after the size was checked, before the first byte is read
            with open(path, "ab") as f:
                f.write(b"b" * 5000)
        data = real_read(fd, n)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "read", growing_read)
    with pytest.raises(FileInFlux, match="changed while it was being read"):
        read_consistently(path, max_bytes=1000)
    assert sum(read) <= 1001
    path.write_bytes(b"a" * 100)
    read.clear()
    with pytest.raises(FileTooLarge) as refused:
        read_file_bounded(path, 1000)
    assert refused.value.size > 1000 and sum(read) <= 1001


def test_a_file_that_vanishes_is_in_flux_and_a_missing_input_does_not_exist(tmp_path):
    with pytest.raises(FileInFlux, match="vanished"):
        read_consistently(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError):
        read_file_bounded(tmp_path / "gone.png", 10)
    with pytest.raises(UsageError, match="^--boxes .*gone.csv does not exist$"):
        read_input(tmp_path / "gone.csv", 10, "--boxes", "a boxes CSV file")


def test_an_empty_path_never_reads_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\n")
    with pytest.raises(UsageError, match="not a regular file"):
        read_input(Path(""), 100, "--boxes", "a boxes CSV file")
    with pytest.raises((FileInFlux, NotRegularFile)):
        read_consistently(Path(""))


@pytest.mark.parametrize("argv", [
    ["evaluate", "report", "--boxes", ""],
    ["review", "report", "--import", ""],
    ["scan", "", "--out", "report"],
    ["scan", "xrays", "--out", "report", "--model", ""],
])
def test_an_empty_path_on_the_command_line_exits_2_with_one_line_naming_it(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xrays").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "an empty path names nothing" in err[-1]
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("size, label", [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"),
                                         (3 * 2 ** 20 // 2, "1.5 MiB"), (40 * GIB, "40.0 GiB"),
                                         (2 ** 40, "1.0 TiB")])
def test_sizes_are_said_in_the_largest_unit_they_reach(size, label):
    assert size_label(size) == label


@pytest.mark.parametrize("limit, label", [(512 * 2 ** 20, "512 MiB"), (1024, "1 KiB"), (1000, "1000 bytes"),
                                          (GIB, "1 GiB"), (int(1.5 * 2 ** 20), "1536 KiB")])
def test_limits_are_said_as_they_were_most_likely_set(limit, label):
    assert limit_label(limit) == label
