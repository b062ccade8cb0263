"""Files and values named on the command line, as a careless user or a hostile tester gives them:
``/dev/zero``, a FIFO, a sparse 40 GiB file or a folder to ``--boxes``, ``--import`` and ``--model``;
an empty ROOT or --out; a thousand workers; a REPORT whose name holds a newline.

Each bad file is refused at once with exit 2 and one line naming the option, the file and what is
wrong, and REPORT is left byte for byte as it was. The commands run in a subprocess with a timeout
(a FIFO must not hang them) and an address-space cap (``/dev/zero`` must not be read into memory).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchcam.cli import main
from batchcam.config import MAX_BOXES_BYTES, MAX_MODEL_BYTES, MAX_REVIEW_IMPORT_BYTES, MAX_WORKERS
from conftest import write_xrays

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30
ADDRESS_SPACE = 6 * GIB     # torch's import reserves about 4 GiB of address space; reading /dev/zero needs more


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "batchcam", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limited)
    except subprocess.TimeoutExpired:
        pytest.fail(f"batchcam {' '.join(args)} did not finish in {timeout} s (blocked on its input?)")


def snapshot(report: Path) -> dict[str, bytes]:
    return {str(p.relative_to(report)): p.read_bytes() for p in sorted(report.rglob("*"))
            if p.is_file() and p.name != "lock"}


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model) -> Path:
    base = tmp_path_factory.mktemp("inputs")
    write_xrays(base / "xrays", count=2)
    out = base / "report"
    assert main(["scan", str(base / "xrays"), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--quiet"]) == 0
    return out


@pytest.fixture
def hostile_file(tmp_path, request) -> tuple[Path, str]:
    """(path, what the refusal says it is) for /dev/zero, a FIFO, a sparse 40 GiB file and a folder."""
    kind = request.param
    if kind == "dev-zero":
        return Path("/dev/zero"), "is a character device, not a regular file"
    path = tmp_path / f"input-{kind}.csv"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "is a FIFO, not a regular file"
    if kind == "sparse":
        path.touch()
        os.truncate(path, 40 * GIB)
        return path, "is 40.0 GiB, more than the" if "model" not in request.node.name else \
            f"is 40960 MiB, more than the {MAX_MODEL_BYTES // 2**20} MiB a model file may have"
    path.mkdir()
    return path, "is a folder, not a regular file"


# The FIFO (which would hang a command) runs in the fast loop for each option; the other kinds are refused
# by the same read (runtime.bounded.read_input, config.check_model), which tests/unit/runtime/test_bounded.py
# and tests/unit/test_config.py try in-process with each kind, so their subprocesses run in .ci/run only.
KINDS = [pytest.param("dev-zero", marks=pytest.mark.slow), "fifo", pytest.param("sparse", marks=pytest.mark.slow),
         pytest.param("folder", marks=pytest.mark.slow)]


@pytest.mark.parametrize("hostile_file", KINDS, indirect=True)
def test_evaluate_boxes_is_bounded_and_regular(report, hostile_file):
    path, said = hostile_file
    before = snapshot(report)
    run = run_cli("evaluate", str(report), "--boxes", str(path))
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith(f"batchcam: error: --boxes {path} {said}"), line
    if "more than" in said:
        assert f"more than the {MAX_BOXES_BYTES // 2**20} MiB batchcam reads of a boxes CSV file" in line
    assert snapshot(report) == before


@pytest.mark.parametrize("hostile_file", KINDS, indirect=True)
def test_review_import_is_bounded_and_regular(report, hostile_file):
    path, said = hostile_file
    before = snapshot(report)
    run = run_cli("review", str(report), "--import", str(path))
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith(f"batchcam: error: --import {path} {said}"), line
    if "more than" in said:
        assert f"more than the {MAX_REVIEW_IMPORT_BYTES // 2**20} MiB batchcam reads of the review.csv" in line
    assert snapshot(report) == before


@pytest.mark.parametrize("hostile_file", KINDS, indirect=True)
def test_a_model_file_is_bounded_and_regular(tmp_path, hostile_file):
    path, said = hostile_file
    write_xrays(tmp_path / "xrays", count=1)
    run = run_cli("scan", str(tmp_path / "xrays"), "--out", str(tmp_path / "out"), "--model", str(path))
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith(f"batchcam: error: --model {path} {said}"), line
    assert not (tmp_path / "out").exists()


def test_dev_null_as_model_is_said_to_be_a_device_not_missing(tmp_path, capsys):
    write_xrays(tmp_path / "xrays", count=1)
    assert main(["scan", str(tmp_path / "xrays"), "--out", str(tmp_path / "out"), "--model", "/dev/null"]) == 2
    assert capsys.readouterr().err == ("batchcam: error: --model /dev/null is a character device, not a regular "
                                      "file: give a checkpoint file\n")


# ---- values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["scan", "", "--out", "REPORT"], ["scan", "ROOT", "--out", ""]],
                         ids=["empty ROOT", "empty --out"])
def test_an_empty_root_or_out_is_refused_not_taken_for_the_working_directory(tmp_path, monkeypatch, capsys, args):
    write_xrays(tmp_path / "ROOT", count=1)
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert "an empty path names nothing (it would mean the working directory)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ROOT"]


def test_workers_are_bounded_and_help_says_so(tmp_path, tiny_model, capsys):
    write_xrays(tmp_path / "xrays", count=1)
    assert main(["scan", str(tmp_path / "xrays"), "--out", str(tmp_path / "out"), "--workers", "1000"]) == 2
    assert capsys.readouterr().err == f"batchcam: error: --workers must be at most {MAX_WORKERS}, got 1000\n"
    assert not (tmp_path / "out").exists()
    assert main(["calibrate", str(tmp_path / "xrays"), "--model", str(tiny_model), "--out", str(tmp_path / "o.pt"),
                 "--workers", "65"]) == 2
    assert capsys.readouterr().err == f"batchcam: error: --workers must be at most {MAX_WORKERS}, got 65\n"
    assert main(["scan", "--help"]) == 0
    assert f"0..{MAX_WORKERS}" in " ".join(capsys.readouterr().out.split())


def test_a_report_path_with_a_newline_keeps_the_summary_on_one_line(tmp_path, tiny_model, capsys):
    write_xrays(tmp_path / "xrays", count=1)
    out = tmp_path / "night\nly"
    assert main(["scan", str(tmp_path / "xrays"), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and printed.endswith(f"-> {tmp_path}/night\\nly\n")
    shutil.rmtree(out)
