"""Guarantees a cron user relies on: lock, incremental runs, signals, crash safety, disk full."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from helpers import manifest, read_rows, scan, scan_process
from PIL import Image

from batchcam.cli import main
from batchcam.errors import ReportWriteError
from batchcam.report.generations import NewGeneration
from conftest import lock_held_elsewhere, tiny_checkpoint, write_xrays


def results(out: Path) -> list[dict]:
    """The rows without ``first_seen`` and ``change``: when a report first saw a file and what its
    last run changed differ between two reports of the same files."""
    return [{k: v for k, v in row.items() if k not in ("first_seen", "change")} for row in read_rows(out)]


def assert_same_results(out: Path, reference: Path) -> None:
    """Equal rows, measured numbers within 2e-6: a CPU convolution is not bitwise the same for an
    image in batches of other sizes or company (after kills, files are batched differently), so the
    sixth decimal of a probability or a heat share may differ; everything else, the prediction and
    the heatmap's peak included, must not."""
    found, expected = results(out), results(reference)
    assert [row["path"] for row in found] == [row["path"] for row in expected]
    measured = ("confidence", "attention_outside", "faith_drop_top", "faith_drop_random", "ood_score")
    for got, want in zip(found, expected):
        numbers = [k for k in want if want[k] and (k in measured or k.startswith("p_"))]
        assert {k: v for k, v in got.items() if k not in numbers} == {k: v for k, v in want.items() if k not in numbers}
        for k in numbers:
            assert float(got[k]) == pytest.approx(float(want[k]), abs=2e-6), (got["path"], k)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file a reader of the report sees (the log and the hidden state folder aside)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and ".batchcam" not in p.parts and p.name != "batchcam.log"}


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# ------------------------------------------------------------------ incremental runs

def without_change(csv_path: Path) -> list[str]:
    """predictions.csv's lines without their last column, ``change`` (what this run changed)."""
    return [line.rsplit(",", 1)[0] for line in csv_path.read_text(encoding="utf-8").splitlines()]


def test_unchanged_tree_reruns_without_a_single_model_call(xray_folder, tiny_model, tmp_path, model_calls):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    first = without_change(out / "predictions.csv")
    assert sum(model_calls) == 4
    model_calls.clear()
    assert scan(xray_folder, out, tiny_model) == 0
    assert model_calls == []
    assert manifest(out)["counts"] == {"found": 4, "processed": 0, "reused": 4, "ok": 4, "error": 0, "skipped": 0}
    assert without_change(out / "predictions.csv") == first     # only "new" became "" (nothing changed)
    assert {line.rsplit(",", 1)[1] for line in (out / "predictions.csv").read_text().splitlines()[1:]} == {""}


def test_new_changed_and_vanished_files_are_handled_on_rerun(xray_folder, tiny_model, tmp_path, model_calls):
    out = tmp_path / "out"
    scan(xray_folder, out, tiny_model)
    model_calls.clear()
    changed = xray_folder / "NORMAL" / "img00.png"
    Image.new("L", (90, 70), 30).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (xray_folder / "PNEUMONIA" / "img01.png").unlink()
    Image.new("L", (50, 50), 200).save(xray_folder / "NORMAL" / "new.png")
    assert scan(xray_folder, out, tiny_model) == 0
    assert sum(model_calls) == 2
    assert manifest(out)["counts"] == {"found": 4, "processed": 2, "reused": 2, "ok": 4, "error": 0, "skipped": 0}
    table = {r["path"]: r for r in read_rows(out)}
    assert "PNEUMONIA/img01.png" not in table
    assert table["NORMAL/img00.png"]["width"] == "90"
    referenced = {name for r in table.values() for name in (r["overlay"],)}
    on_disk = {f"overlays/{p.name}" for p in (out / "overlays").iterdir() if p.name.count(".") == 1}
    assert on_disk == referenced  # overlays of vanished and changed files are gone


def test_full_recomputes_everything(xray_folder, tiny_model, tmp_path, model_calls):
    out = tmp_path / "out"
    scan(xray_folder, out, tiny_model)
    model_calls.clear()
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    assert sum(model_calls) == 4 and manifest(out)["counts"]["processed"] == 4


def test_another_model_or_cam_setting_forces_reprocessing(xray_folder, tiny_model, tmp_path, model_calls):
    out = tmp_path / "out"
    scan(xray_folder, out, tiny_model)
    other = tiny_checkpoint(tmp_path / "other.pt", seed=7)
    model_calls.clear()
    assert scan(xray_folder, out, other) == 0
    assert sum(model_calls) == 4
    assert {r["model_sha256"] for r in read_rows(out)} == {manifest(out)["model"]["sha256"]}
    model_calls.clear()
    assert scan(xray_folder, out, other, "--target", "NORMAL") == 0
    assert sum(model_calls) == 4


def test_error_rows_of_unchanged_files_are_reused_too(xray_folder, tiny_model, tmp_path, model_calls):
    (xray_folder / "NORMAL" / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 3
    assert scan(xray_folder, out, tiny_model) == 3
    assert manifest(out)["counts"]["reused"] == 5


# ------------------------------------------------------------------ files in flux

def test_file_changed_while_being_read_gets_a_truthful_row_and_is_retried(xray_folder, tiny_model, tmp_path,
                                                                          monkeypatch):
    from batchcam.runtime import bounded

    victim = xray_folder / "NORMAL" / "img02.png"
    real_read = bounded._read_at_most

    def read_while_someone_appends(fd, limit):
        data = real_read(fd, limit)
        if os.readlink(f"/proc/self/fd/{fd}") == str(victim):
            with open(victim, "ab") as f:
                f.write(b"more bytes from a slow writer")
        return data

    monkeypatch.setattr(bounded, "_read_at_most", read_while_someone_appends)
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 3
    row = {r["path"]: r for r in read_rows(out)}["NORMAL/img02.png"]
    assert row["status"] == "error" and "changed while it was being read" in row["error"]
    monkeypatch.setattr(bounded, "_read_at_most", real_read)
    victim.write_bytes(victim.read_bytes()[: -len(b"more bytes from a slow writer")])
    assert scan(xray_folder, out, tiny_model) == 0
    assert manifest(out)["counts"]["processed"] == 1


def test_file_vanishing_after_discovery_gets_a_vanished_row(xray_folder, tiny_model, tmp_path, monkeypatch):
    from batchcam.commands.scan import run as pipeline

    real = pipeline.stat_candidates

    def stat_then_delete(candidates):
        planned = real(candidates)
        (xray_folder / "NORMAL" / "img00.png").unlink()
        return planned

    monkeypatch.setattr(pipeline, "stat_candidates", stat_then_delete)
    assert scan(xray_folder, tmp_path / "out", tiny_model) == 3
    row = {r["path"]: r for r in read_rows(tmp_path / "out")}["NORMAL/img00.png"]
    assert row["status"] == "error" and "vanished" in row["error"]


# ------------------------------------------------------------------ the lock

def test_second_run_on_a_locked_report_exits_75_at_once_and_changes_nothing(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    scan(xray_folder, out, tiny_model)
    before = snapshot(out)
    with lock_held_elsewhere(out):
        started = time.monotonic()
        assert scan(xray_folder, out, tiny_model, "--full") == 75
        assert time.monotonic() - started < 1
        assert snapshot(out) == before


def test_a_hard_link_to_the_lock_never_lets_a_second_run_beside_the_first(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    with lock_held_elsewhere(out):
        os.link(out / ".batchcam" / "lock", tmp_path / "lock-in-a-backup")  # cp -al while a run holds the lock
        assert scan(xray_folder, out, tiny_model, "--full") == 75


@pytest.mark.slow
def test_lock_of_a_killed_run_needs_no_cleanup_even_while_its_workers_live(tiny_model, tmp_path):
    root = tmp_path / "root"
    write_xrays(root, count=60, size=(96, 96))
    out = tmp_path / "out"
    run = scan_process(root, out, tiny_model, "--workers", "2", "--batch-size", "2")
    try:
        assert wait_for(lambda: (out / ".batchcam" / "journal.jsonl").is_file()
                        and (out / ".batchcam" / "journal.jsonl").stat().st_size > 0)
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert children, "the scan had DataLoader worker processes"
        assert scan(root, out, tiny_model) == 0
        assert wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), timeout=10), \
            "DataLoader workers outlived the killed run"
    finally:
        run.kill()


# ------------------------------------------------------------------ signals

@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_finished_batches_exits_128_plus_n_and_the_next_run_resumes(signum, code, tiny_model,
                                                                                  tmp_path):
    root = tmp_path / "root"
    write_xrays(root, count=40, size=(96, 96))
    out = tmp_path / "out"
    run = scan_process(root, out, tiny_model, "--workers", "1", "--batch-size", "2")
    journal = out / ".batchcam" / "journal.jsonl"
    assert wait_for(lambda: journal.is_file() and journal.stat().st_size > 0)
    run.send_signal(signum)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == code, stderr
    saved = sum('"row"' in line for line in journal.read_text().splitlines())  # not the overlay announcements
    assert 0 < saved < 40
    assert not (out / "predictions.csv").exists()  # no partial report: the previous state (none) stays
    assert main(["scan", str(root), "--out", str(out), "--model", str(tiny_model), "--workers", "0"]) == 0
    counts = manifest(out)["counts"]
    assert counts["reused"] == saved and counts["processed"] == 40 - saved
    assert len(read_rows(out)) == 40


# ------------------------------------------------------------------ disk full, hostile report folder

def test_disk_full_exits_74_and_leaves_the_previous_report_byte_for_byte(xray_folder, tiny_model, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / "out"
    scan(xray_folder, out, tiny_model)
    before = snapshot(out)
    Image.new("L", (70, 70), 10).save(xray_folder / "NORMAL" / "extra.png")

    def disk_full(self, name, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder.path / name))

    monkeypatch.setattr(NewGeneration, "write", disk_full)
    assert scan(xray_folder, out, tiny_model) == 74
    assert "No space left on device" in capsys.readouterr().err
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    monkeypatch.undo()
    assert scan(xray_folder, out, tiny_model) == 0
    assert len(read_rows(out)) == 5


def test_unwritable_report_location_exits_74(xray_folder, tiny_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert scan(xray_folder, blocker / "out", tiny_model) == 74


def test_symbolic_links_planted_in_the_report_are_not_written_through(xray_folder, tiny_model, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert scan(xray_folder, out, tiny_model) == 0
    shutil.rmtree(out / "overlays")
    (out / "predictions.csv").unlink()
    (elsewhere / "precious.csv").write_text("do not touch")
    (out / "overlays").symlink_to(elsewhere, target_is_directory=True)
    (out / "predictions.csv").symlink_to(elsewhere / "precious.csv")
    assert scan(xray_folder, out, tiny_model) == 0
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.csv"]
    assert (elsewhere / "precious.csv").read_text() == "do not touch"
    assert not (out / "overlays").is_symlink()
    assert os.readlink(out / "predictions.csv") == ".batchcam/current/predictions.csv"  # batchcam's own link


# ------------------------------------------------------------------ logging

def test_quiet_run_prints_only_the_summary_and_logs_details_in_the_report(xray_folder, tiny_model, tmp_path, capsys):
    (xray_folder / "NORMAL" / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--quiet") == 3
    captured = capsys.readouterr()
    assert captured.out.strip().startswith("batchcam: 5 found, 4 ok, 1 error")
    assert "processed 5/5" not in captured.err and "scanning" not in captured.err
    log = (out / "batchcam.log").read_text()
    assert "run started" in log and "NORMAL/broken.png" in log


def last_log_line(out: Path) -> str:
    return (out / "batchcam.log").read_text().splitlines()[-1]


def test_the_log_ends_with_the_runs_summary_line_and_its_exit_code(xray_folder, tiny_model, tmp_path, capsys):
    """The README says batchcam.log keeps each run's counts: its last line says how the run ended."""
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("batchcam: 4 found, 4 ok, 0 error")
    assert last_log_line(out).endswith(f" run finished: {summary.removeprefix('batchcam: ')}; exit 0")
    (xray_folder / "NORMAL" / "broken.png").write_bytes(b"garbage")
    assert scan(xray_folder, out, tiny_model, "--quiet") == 3
    assert " run finished: 5 found, 4 ok, 1 error, " in last_log_line(out)
    assert last_log_line(out).endswith(f"-> {out}; exit 3")
    log = (out / "batchcam.log").read_text()
    assert log.count("run started") == log.count("run finished") == 2


def test_a_stopped_run_logs_how_far_it_got_and_its_exit_code(xray_folder, tiny_model, tmp_path, monkeypatch):
    """SIGTERM while the first batch goes through the model: that batch is finished, the run exits 143."""
    from batchcam.engines import local

    explain_batch = local.explain_batch

    def terminated_during_the_first_batch(*args, **kwargs):
        monkeypatch.setattr(local, "explain_batch", explain_batch)
        os.kill(os.getpid(), signal.SIGTERM)  # scan's handler notes it; the batch goes on
        return explain_batch(*args, **kwargs)

    monkeypatch.setattr(local, "explain_batch", terminated_during_the_first_batch)
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--batch-size", "2") == 143
    line = last_log_line(out)
    assert " run ended: stopped by SIGTERM; finished batches are saved" in line
    assert "; 2 of 4 images processed, " in line and line.endswith(" s; exit 143")


@pytest.mark.parametrize("failure, ending", [
    (ReportWriteError("cannot write the report in R: No space left on device (R/index.html); the previous report "
                      "is unchanged"), "run ended: cannot write the report in R: No space left on device"),
    (RuntimeError("a bug"), "run ended: internal failure: RuntimeError: a bug"),
    (KeyboardInterrupt(), "run ended: interrupted"),
])
def test_a_run_that_fails_after_opening_its_log_says_so_there(tmp_path, monkeypatch, failure, ending):
    """Whatever ends a run once REPORT's log is open (a write failure, a bug, a second Ctrl-C),
    the log's last line says so, with how far the run got and the exit code."""
    from batchcam.commands import scan as scan_command

    out = tmp_path / "out"
    out.mkdir()

    def failing_scan(config, console):
        console.attach_log(lambda: open(out / "batchcam.log", "a", encoding="utf-8"))
        console.log("run started: batchcam scan")
        list(console.progress([[1, 2], [3]], 5, len))
        raise failure

    monkeypatch.setattr(scan_command, "scan", failing_scan)
    code = {ReportWriteError: 74, RuntimeError: 1, KeyboardInterrupt: 130}[type(failure)]
    if code == 1:
        with pytest.raises(RuntimeError):
            main(["scan", str(tmp_path), "--out", str(out)])
    else:
        assert main(["scan", str(tmp_path), "--out", str(out)]) == code
    line = last_log_line(out)
    assert f" {ending}" in line and "; 3 of 5 images processed, " in line and line.endswith(f" s; exit {code}")


def test_a_refused_run_writes_no_log(xray_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tmp_path / "missing.pt")]) == 2
    assert not out.exists()


@pytest.mark.slow
def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_model, tmp_path):
    root = tmp_path / "root"
    write_xrays(root, count=4)
    run = scan_process(root, tmp_path / "out", tiny_model, "--workers", "0")
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0
    assert "\r" not in stderr and "img/s" not in stderr
    assert "processed 4/4 images" in stderr


# ------------------------------------------------------------------ crash safety

def report_is_complete(out: Path) -> bool:
    """A reader sees a complete report: the CSV parses, every overlay it names exists, the gallery
    exists, and every link in it resolves; or no report at all yet."""
    if not (out / "predictions.csv").exists():
        return not (out / "index.html").exists()
    table = read_rows(out)
    if not table or any(r["status"] == "ok" and not (out / r["overlay"]).is_file() for r in table):
        return False
    if not (out / "index.html").is_file():
        return False
    import html.parser
    from urllib.parse import unquote, urlsplit

    class Links(html.parser.HTMLParser):
        refs: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    for page in out.rglob("*.html"):
        links = Links()
        links.refs = []
        links.feed(page.read_text(encoding="utf-8"))
        for ref in links.refs:
            path = urlsplit(ref).path
            if path and not urlsplit(ref).scheme and not (page.parent / unquote(path)).exists():
                return False
    return True


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_report_and_the_final_csv_matches(tiny_model, tmp_path):
    import random

    root = tmp_path / "root"
    write_xrays(root, count=200, size=(72, 64))
    reference = tmp_path / "reference"
    assert scan(root, reference, tiny_model, "--batch-size", "8") == 0
    out = tmp_path / "out"
    rng = random.Random(0)
    for kill in range(30):
        if kill % 10 == 5:  # now and then change some files so later runs have work again
            for path in rng.sample(sorted(root.rglob("*.png")), 5):
                os.utime(path, ns=(time.time_ns(), time.time_ns() + kill))
        run = scan_process(root, out, tiny_model, "--workers", "1", "--batch-size", "8")
        time.sleep(rng.uniform(0.5, 7.0))
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert report_is_complete(out), f"report broken after kill {kill}"
    assert scan(root, out, tiny_model, "--batch-size", "8") == 0
    assert_same_results(out, reference)
    assert report_is_complete(out)
