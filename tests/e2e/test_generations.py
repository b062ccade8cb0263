"""Every report file a reader opens belongs to one run: kills and signals during the write phase,
write failures, evaluate and review re-rendering, readers across a switch, the upgrade of an old
report. Each test is an attack that once worked (or the new layout's own way to break)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import manifest, page_cards, read_rows, records, rows_script, scan, scan_process
from PIL import Image
from test_cron import report_is_complete, snapshot
from test_report_safety import tree

from batchcam.cli import main
from batchcam.report.lock import STATE_DIR
from conftest import write_xrays


def one_run(out: Path) -> set[str]:
    """Assert that what a reader opens in OUT (the CSV, the manifest's counts, rows.js, the cards of
    every page) describes one run, every path exactly once, and that every link resolves; return its
    paths (empty before the first complete run)."""
    if not (out / "predictions.csv").exists():
        assert not (out / "index.html").exists() and not (out / "manifest.json").exists()
        return set()
    table = read_rows(out)
    paths = [row["path"] for row in table]
    assert len(set(paths)) == len(paths)
    counts = manifest(out)["counts"]
    assert counts["found"] == len(table)
    assert {status: counts[status] for status in ("ok", "error", "skipped")} == {
        status: Counter(row["status"] for row in table)[status] for status in ("ok", "error", "skipped")}
    data = rows_script(out)
    assert [record["path"] for record in records(data)] == paths, "rows.js describes another run than predictions.csv"
    cards = [card for page in data["pages"] for card in page_cards((out / page).read_text(encoding="utf-8"))]
    assert sorted(card["index"] for card in cards) == list(range(len(paths))), "cards duplicated or missing"
    assert all(paths[card["index"]] == card["path"] for card in cards), "a page shows another run's image"
    shown_pages = {page for page in data["pages"] if page.startswith("gallery/")}
    if (out / STATE_DIR / "current").is_symlink():
        linked = {f"gallery/{p.name}" for p in (out / "gallery").glob("page-*.html") if p.is_symlink() and p.exists()}
        assert linked == shown_pages
    assert report_is_complete(out)
    return set(paths)


def candidates(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*.png")}


def generations(out: Path) -> list[str]:
    return sorted(p.name for p in (out / STATE_DIR).glob("gen-*"))


def current(out: Path) -> str:
    return os.readlink(out / STATE_DIR / "current")


# ---- kills and signals during the write phase --------------------------------------------------------

def churn(root: Path, step: int) -> None:
    """A new image and one gone, so every run's set of paths is its own and a mixed report shows."""
    Image.new("L", (40, 32), (step * 37) % 256).save(root / "NORMAL" / f"new{step:03d}.png")
    gone = sorted(root.rglob("img*.png"))
    if gone:
        gone[step % len(gone)].unlink()


def until_scanning(run) -> None:
    """Read the run's stderr up to the line that starts its work (what precedes the write phase here)."""
    for line in run.stderr:
        if line.startswith("scanning"):
            return
    raise AssertionError(f"the run ended before scanning: {run.wait()}")


@pytest.mark.slow
def test_kills_and_sigterm_spread_over_the_write_phase_always_leave_one_runs_report(tiny_model, tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    write_xrays(root, count=150, size=(40, 32))
    page = ("--page-size", "1", "--workers", "0")  # 150 pages: a write phase long enough to land in
    assert scan(root, out, tiny_model, *page) == 0
    shown = one_run(out)
    churn(root, 0)
    run = scan_process(root, out, tiny_model, *page)
    until_scanning(run)
    started = time.monotonic()
    run.communicate(timeout=300)
    write_phase = time.monotonic() - started  # from the scan's start of work to its exit (one new image)
    assert run.returncode == 0
    shown = one_run(out)
    assert shown == candidates(root)
    codes = []
    kills = 12
    for step in range(1, kills + 1):
        churn(root, step)
        signum = signal.SIGTERM if step % 2 else signal.SIGKILL
        runs_before = (out / "runs.jsonl").read_text().count("\n")
        run = scan_process(root, out, tiny_model, *page)
        until_scanning(run)
        time.sleep(0.8 * write_phase * (step - 1) / (kills - 1))  # the interpreter's exit is the last fifth
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=300)
        codes.append((signum, run.returncode))
        seen = one_run(out)
        assert seen in (shown, candidates(root)), f"after {signum.name} at step {step}: not one run's report"
        shown = seen
        completed = seen == candidates(root) and (out / "runs.jsonl").read_text().count("\n") == runs_before + 1
        if signum == signal.SIGTERM:  # 143 whenever it lands in the run; death only once all is done
            assert run.returncode in (143, 0) or (run.returncode == -15 and completed), stderr
        else:
            assert run.returncode in (-9, 0), stderr
    assert (signal.SIGTERM, 143) in codes and (signal.SIGKILL, -9) in codes
    assert scan(root, out, tiny_model, *page) == 0
    assert one_run(out) == candidates(root)
    assert len(generations(out)) == 1


# ---- a write that fails leaves the previous report exactly as it was -------------------------------

def test_a_folder_planted_where_a_gallery_file_goes_exits_74_and_the_previous_report_stays(
        xray_folder, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 0
    (out / "gallery" / "rows.js").unlink()
    (out / "gallery" / "rows.js").mkdir()
    before, links = snapshot(out), tree(out)
    Image.new("L", (70, 70), 10).save(xray_folder / "NORMAL" / "extra.png")
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 74
    assert "the previous report is unchanged" in capsys.readouterr().err
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    assert {name: data for name, data in tree(out).items() if not name.startswith(("overlays/", STATE_DIR))
            and name != "batchcam.log"} == {name: data for name, data in links.items()
                                            if not name.startswith(("overlays/", STATE_DIR)) and name != "batchcam.log"}


def test_a_gallery_page_that_cannot_be_written_exits_74_and_the_previous_report_stays(
        xray_folder, tiny_model, tmp_path, monkeypatch, capsys):
    from batchcam.report import generations as generationlib

    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 0
    before, shown = snapshot(out), generations(out)
    Image.new("L", (70, 70), 10).save(xray_folder / "NORMAL" / "extra.png")
    writes = generationlib.NewGeneration.write

    def disk_full_at_page_3(self, name, content):
        if name == "gallery/page-3.html":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder.path / name))
        writes(self, name, content)

    monkeypatch.setattr(generationlib.NewGeneration, "write", disk_full_at_page_3)
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 74
    assert "No space left on device" in capsys.readouterr().err
    after = snapshot(out)
    assert {name: after[name] for name in before} == before and not (out / "gallery" / "page-3.html").exists()
    assert generations(out) == shown  # the half-written generation is gone
    monkeypatch.undo()
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 0
    assert len(one_run(out)) == 5


# ---- evaluate and review publish a generation of their own ----------------------------------------

def test_evaluate_publishes_a_new_generation_with_the_scans_own_files(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--save-cams", "--page-size", "3") == 0
    kept = {name: (out / name).read_bytes() for name in ("predictions.csv", "manifest.json", "cams.npz")}
    before = current(out)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,30,40\n")
    assert main(["evaluate", str(out), "--boxes", str(boxes)]) == 0
    assert current(out) != before and generations(out) == [current(out)]
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert "localisation" in json.loads((out / "metrics.json").read_text())
    assert len(one_run(out)) == 4


def test_review_import_publishes_a_new_generation_and_keeps_reviews_outside_it(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    row = read_rows(out)[0]
    export = tmp_path / "review.csv"
    report_id = json.loads((out / "manifest.json").read_text())["report_id"]
    export.write_text("path,sha256,prediction,confidence,decision,note,reviewed_at,report_id\n"
                      f"{row['path']},{row['sha256']},{row['prediction']},{row['confidence']},disagree,"
                      f"look again,2026-12-02T08:00:00.000Z,{report_id}\n")
    before = current(out)
    assert main(["review", str(out), "--import", str(export)]) == 0
    assert current(out) != before and generations(out) == [current(out)]
    assert not (out / "reviews.csv").is_symlink() and "look again" in (out / "reviews.csv").read_text()
    assert json.loads((out / "metrics.json").read_text())["review"]
    assert len(one_run(out)) == 4


# ---- readers ------------------------------------------------------------------------------------------

def test_read_report_never_mixes_two_runs_across_a_switch(xray_folder, tiny_model, tmp_path, monkeypatch):
    from batchcam import read_report
    from batchcam.report import reader

    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    write_xrays(xray_folder, count=6, start_seed=20)
    for path in xray_folder.rglob("*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    rescanned = []

    class JsonThenRescan:
        """The reader's json: once the manifest is read, another run publishes (a cron run starting)."""

        def __getattr__(self, name):
            return getattr(json, name)

        def loads(self, text, **kwargs):
            value = json.loads(text, **kwargs)
            if not rescanned:
                rescanned.append(scan(xray_folder, out, tiny_model))
            return value

    monkeypatch.setattr(reader, "json", JsonThenRescan())
    frame = read_report(out)
    assert rescanned == [0]
    assert len(frame) == frame.attrs["manifest"]["counts"]["found"]


def test_a_current_link_planted_out_of_the_report_is_never_followed(xray_folder, tiny_model, tmp_path):
    from batchcam import read_report

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert scan(xray_folder, out, tiny_model) == 0
    shutil.copytree(out / STATE_DIR / current(out), elsewhere, symlinks=True)
    (out / STATE_DIR / "current").unlink()
    (out / STATE_DIR / "current").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="not one of batchcam's generations"):
        read_report(out)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,30,40\n")
    before = tree(elsewhere)
    assert main(["evaluate", str(out), "--boxes", str(boxes)]) == 2
    assert tree(elsewhere) == before


# ---- a report of the layout before generations --------------------------------------------------------

def to_layout_before_generations(out: Path) -> None:
    """Turn a report into what batchcam wrote before generations: regular files at the top, a real
    gallery/ of pages, outputs.json listing them."""
    written = []
    for link in [*out.iterdir(), *(out / "gallery").iterdir()]:
        if link.is_symlink():
            data = link.read_bytes()
            link.unlink()
            link.write_bytes(data)
            written.append(str(link.relative_to(out)))
    (out / STATE_DIR / "current").unlink()
    for name in generations(out):
        shutil.rmtree(out / STATE_DIR / name)
    (out / STATE_DIR / "generations.json").unlink()
    (out / STATE_DIR / "outputs.json").write_text(json.dumps({"files": sorted(written)}))


def test_a_report_of_the_layout_before_generations_is_adopted_keeping_the_users_files(
        xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--page-size", "1") == 0
    to_layout_before_generations(out)
    mine = {out / "gallery" / "about.html": b"<p>mine</p>", out / "gallery" / "page-99.html": b"<p>mine too</p>",
            out / "notes.txt": b"mine"}
    for path, data in mine.items():
        path.write_bytes(data)
    assert one_run(out) == candidates(xray_folder)
    (xray_folder / "NORMAL" / "img00.png").unlink()
    assert scan(xray_folder, out, tiny_model, "--page-size", "1") == 0
    assert one_run(out) == candidates(xray_folder)
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert not (out / "gallery" / "page-4.html").exists() and not (out / "gallery" / "page-4.html").is_symlink()
    assert not (out / STATE_DIR / "outputs.json").exists() and generations(out) == [current(out)]
    assert all((out / name).is_symlink() for name in ("index.html", "predictions.csv", "gallery/rows.js"))


def test_a_report_copied_without_its_links_is_refused_until_told_and_then_adopted(
        xray_folder, tiny_model, tmp_path, capsys):
    from batchcam import read_report

    out, copy = tmp_path / "out", tmp_path / "copy"
    assert scan(xray_folder, out, tiny_model) == 0
    shutil.copytree(out, copy)  # links followed: files at the top, a folder at .batchcam/current
    before = tree(copy)
    with pytest.raises(ValueError, match="copied without its links"):
        read_report(copy)
    assert scan(xray_folder, copy, tiny_model) == 2
    assert "copied without its links" in capsys.readouterr().err
    assert tree(copy) == before
    shutil.rmtree(copy / STATE_DIR / "current")
    assert scan(xray_folder, copy, tiny_model) == 0
    assert one_run(copy) == candidates(xray_folder) and len(read_report(copy)) == 4
