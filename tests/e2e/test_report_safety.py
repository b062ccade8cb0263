"""REPORT is batchcam's: it never deletes what it did not write, never writes through a planted
link, and keys every file by a name no other file shares. Each test is an attack that once worked."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import read_rows, scan
from PIL import Image
from test_hostile import anatomy, dicom_bytes

from batchcam.cli import main
from batchcam.engines.shared_storage import STORAGE_TOKEN, write_token
from batchcam.report.folder import ReportFolder, cams_content
from batchcam.report.generations import NewGeneration
from batchcam.report.lock import MARKER, STATE_DIR
from conftest import write_xrays


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links as their target text), for byte-for-byte comparisons."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


def jpeg(seed: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("L", (40, 30), 40 + seed).save(out, "JPEG")
    return out.getvalue()


# ---- whose folder it is ------------------------------------------------------------------------

def test_report_equal_to_root_is_refused_and_nothing_is_touched(tmp_path, tiny_model, capsys):
    same = tmp_path / "same"
    write_xrays(same, count=2)
    (same / "overlays").mkdir()
    (same / "overlays" / "scanned-x.jpg").write_bytes(jpeg())
    before = tree(same)
    assert scan(same, same, tiny_model) == 2
    assert "is ROOT itself" in capsys.readouterr().err
    assert tree(same) == before and not (same / STATE_DIR).exists()


def test_report_containing_root_is_refused(tmp_path, tiny_model, capsys):
    outer = tmp_path / "outer"
    write_xrays(outer / "xrays", count=2)
    before = tree(outer)
    assert scan(outer / "xrays", outer, tiny_model) == 2
    assert "contains ROOT" in capsys.readouterr().err
    assert tree(outer) == before


def test_a_folder_that_is_not_a_report_is_refused_untouched(xray_folder, tmp_path, tiny_model, capsys):
    site = tmp_path / "site"
    (site / "overlays").mkdir(parents=True)
    (site / "gallery").mkdir()
    (site / "overlays" / "logo-0123456789ab.jpg").write_bytes(jpeg())
    (site / "gallery" / "about.html").write_text("<p>about us</p>")
    (site / "index.html").write_text("<p>home</p>")
    before = tree(site)
    assert scan(xray_folder, site, tiny_model) == 2
    assert "not a batchcam report" in capsys.readouterr().err
    assert tree(site) == before


def test_an_empty_folder_becomes_a_report_and_a_refused_run_leaves_it_empty(xray_folder, tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scan(xray_folder, empty, tiny_model, "--target", "NO_SUCH_CLASS") == 2
    assert list(empty.iterdir()) == []
    assert scan(xray_folder, empty, tiny_model) == 0
    assert (empty / STATE_DIR / MARKER).is_file()


def test_a_folder_holding_only_a_stray_lock_is_not_a_report_and_is_left_untouched(xray_folder, tmp_path, tiny_model,
                                                                                   capsys):
    site = tmp_path / "site"
    (site / STATE_DIR).mkdir(parents=True)
    (site / STATE_DIR / "lock").write_text("")
    (site / "gallery").mkdir()
    (site / "index.html").write_text("<p>home</p>")
    (site / "metrics.json").write_text('{"mine": true}')
    (site / "gallery" / "page-7.html").write_text("<p>seven</p>")
    before = tree(site)
    assert scan(xray_folder, site, tiny_model) == 2
    assert "not a batchcam report" in capsys.readouterr().err
    assert tree(site) == before


def test_a_report_of_batchcam_0_1_without_the_marker_is_refused_saying_how_to_mark_it(xray_folder, tmp_path,
                                                                                     tiny_model, capsys):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    (out / STATE_DIR / MARKER).unlink()
    before = tree(out)
    assert scan(xray_folder, out, tiny_model) == 2
    err = capsys.readouterr().err
    assert "batchcam 0.1" in err and f"{STATE_DIR}/{MARKER}" in err
    assert tree(out) == before


def test_within_its_report_batchcam_removes_only_what_it_wrote(xray_folder, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--page-size", "1") == 0
    assert (out / "gallery" / "page-4.html").is_file() and (out / "metrics.json").is_file()
    # a reviewer's own files, one named exactly like a batchcam overlay and one like a page
    mine = {out / "overlays" / "notes-0123456789ab.jpg": jpeg(1), out / "overlays" / "xray.png": jpeg(2),
            out / "gallery" / "about.html": b"<p>mine</p>", out / "gallery" / "page-99.html": b"<p>mine too</p>"}
    for path, data in mine.items():
        path.write_bytes(data)
    vanished = next((xray_folder / "PNEUMONIA").iterdir())
    gone_overlay = next(r["overlay"] for r in read_rows(out) if r["path"] == f"PNEUMONIA/{vanished.name}")
    vanished.unlink()
    assert scan(xray_folder, out, tiny_model, "--page-size", "1") == 0
    assert all(path.read_bytes() == data for path, data in mine.items())
    assert not (out / gone_overlay).exists()  # batchcam's own overlay of a vanished file is gone
    assert not (out / "gallery" / "page-4.html").exists() and (out / "gallery" / "page-2.html").is_file()


def test_metrics_json_is_removed_only_when_batchcam_wrote_it(tmp_path, tiny_model):
    root = tmp_path / "unlabelled"
    root.mkdir()
    Image.new("L", (64, 64), 90).save(root / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    assert scan(root, out, tiny_model) == 0
    (out / "metrics.json").write_text('{"mine": true}')  # not batchcam's: it wrote none for this run
    assert scan(root, out, tiny_model, "--full") == 0
    assert json.loads((out / "metrics.json").read_text()) == {"mine": True}


def test_predict_out_never_replaces_a_file_it_did_not_write(tmp_path, tiny_model, capsys):
    image = tmp_path / "in" / "chest.png"
    write_xrays(tmp_path / "in", count=1)
    next((tmp_path / "in").rglob("*.png")).rename(image)
    site = tmp_path / "site"
    assert main(["predict", str(image), "--model", str(tiny_model), "--out", str(site), "--json"]) == 0
    written = json.loads(capsys.readouterr().out.splitlines()[0])["overlay"]
    assert main(["predict", str(image), "--model", str(tiny_model), "--out", str(site)]) == 0  # same bytes again
    Path(written).write_bytes(b"someone else's file now")
    (site / "logo.jpg").write_bytes(jpeg())
    before = tree(site)
    assert main(["predict", str(image), "--model", str(tiny_model), "--out", str(site)]) == 3
    assert "left as it is" in capsys.readouterr().err
    assert tree(site) == before


def test_predict_out_never_removes_a_file_at_its_old_temporary_name(tmp_path, tiny_model, capsys):
    image = tmp_path / "in" / "chest.png"
    write_xrays(tmp_path / "in", count=1)
    next((tmp_path / "in").rglob("*.png")).rename(image)
    site = tmp_path / "site"
    assert main(["predict", str(image), "--model", str(tiny_model), "--out", str(site), "--json"]) == 0
    written = Path(json.loads(capsys.readouterr().out.splitlines()[0])["overlay"])
    written.unlink()
    planted = site / f".{written.name}.tmp{os.getpid()}"  # the name the scan's own pid once used
    planted.write_bytes(b"mine")
    assert main(["predict", str(image), "--model", str(tiny_model), "--out", str(site)]) == 0
    assert planted.read_bytes() == b"mine" and written.is_file()


def test_files_at_the_old_temporary_names_survive_a_scan(xray_folder, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--page-size", "2") == 0
    pid = os.getpid()  # the scan below runs in this process
    names = [f".{name}.tmp{pid}" for name in ("predictions.csv", "manifest.json", "metrics.json", "index.html",
                                             "runs.jsonl", "reviews.csv")]
    names += [f"gallery/.{name}.tmp{pid}" for name in ("gallery.css", "gallery.js", "review.js", "rows.js",
                                                      "page-2.html")]
    names += [f"{STATE_DIR}/.{name}.tmp{pid}" for name in ("rows.jsonl", "outputs.json", "journal.jsonl")]
    names += [f"overlays/.{Path(row['overlay']).name}.tmp{pid}" for row in read_rows(out)]
    for name in names:
        (out / name).write_bytes(b"not batchcam's: " + name.encode())
    assert scan(xray_folder, out, tiny_model, "--page-size", "2", "--full") == 0
    assert {name: (out / name).read_bytes() for name in names} == {name: b"not batchcam's: " + name.encode()
                                                                    for name in names}


def test_a_hard_link_snapshot_keeps_its_files_and_the_report_keeps_its_history(xray_folder, tmp_path, tiny_model):
    import subprocess

    out, snap = tmp_path / "out", tmp_path / "snapshot"
    assert scan(xray_folder, out, tiny_model) == 0
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    subprocess.run(["cp", "-al", str(out), str(snap)], check=True)  # how rsnapshot and rsync --link-dest back up
    backed_up = tree(snap)
    runs, log = (out / "runs.jsonl").read_text(), (out / "batchcam.log").read_text()
    Image.new("L", (70, 70), 10).save(xray_folder / "NORMAL" / "extra.png")
    assert scan(xray_folder, out, tiny_model) == 0
    assert tree(snap) == backed_up
    assert (out / "runs.jsonl").read_text().startswith(runs) and len((out / "runs.jsonl").read_text().splitlines()) == 3
    assert (out / "batchcam.log").read_text().startswith(log) and len((out / "batchcam.log").read_text()) > len(log)
    assert len(read_rows(out)) == 5


def test_overlays_moved_out_during_a_run_are_left_where_they_lie_and_nothing_is_published(
        xray_folder, tmp_path, tiny_model, monkeypatch, capsys):
    from batchcam.engines.stages import OverlayStage

    out, moved = tmp_path / "out", tmp_path / "moved"
    assert scan(xray_folder, out, tiny_model) == 0
    shown = {name: (out / name).read_bytes() for name in ("predictions.csv", "manifest.json", "index.html")}
    write_xrays(xray_folder, count=8, start_seed=10)
    for path in xray_folder.rglob("img*.png"):
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    drain = OverlayStage.drain
    when_moved: dict[str, dict] = {}

    def move_overlays_once_the_first_batch_is_written(self):
        finished = drain(self)  # no overlay is being written now; the batch is journaled next
        if finished and not when_moved:
            (out / "overlays").rename(moved)
            when_moved["tree"] = tree(moved)
        return finished

    monkeypatch.setattr(OverlayStage, "drain", move_overlays_once_the_first_batch_is_written)
    assert scan(xray_folder, out, tiny_model, "--batch-size", "2") == 74
    assert "moved" in capsys.readouterr().err
    assert tree(moved) == when_moved["tree"]
    assert {name: (out / name).read_bytes() for name in shown} == shown


# ---- links planted inside REPORT ----------------------------------------------------------------

@pytest.mark.parametrize("name", [f"{STATE_DIR}/journal.jsonl", f"{STATE_DIR}/rows.jsonl", f"{STATE_DIR}/lock",
                                  f"{STATE_DIR}/generations.json", f"{STATE_DIR}/current", "batchcam.log",
                                  "runs.jsonl", "predictions.csv", "manifest.json", "index.html", "cams.npz",
                                  "gallery/rows.js"])
def test_a_link_planted_in_place_of_a_report_file_is_replaced_and_its_target_unchanged(
        name, xray_folder, tmp_path, tiny_model):
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_bytes(b"precious\n" * 100)
    assert scan(xray_folder, out, tiny_model, "--save-cams") == 0
    (out / name).unlink()
    (out / name).symlink_to(target)
    assert scan(xray_folder, out, tiny_model, "--full", "--save-cams") == 0
    assert target.read_bytes() == b"precious\n" * 100
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    if name in ("predictions.csv", "manifest.json", "index.html", "cams.npz", "gallery/rows.js"):
        assert os.readlink(out / name) == "../" * name.count("/") + f"{STATE_DIR}/current/{name}"  # batchcam's own
    elif name == f"{STATE_DIR}/current":
        assert os.readlink(out / name).startswith("gen-")
    else:
        assert not (out / name).is_symlink()
    assert out.resolve() in (out / name).resolve().parents


def test_a_link_planted_in_place_of_the_mark_makes_the_folder_no_report_and_is_never_followed(
        xray_folder, tmp_path, tiny_model, capsys):
    out, outside = tmp_path / "out", tmp_path / "outside.json"
    outside.write_text('{"tool": "batchcam"}')
    assert scan(xray_folder, out, tiny_model) == 0
    (out / STATE_DIR / MARKER).unlink()
    (out / STATE_DIR / MARKER).symlink_to(outside)
    before = tree(out)
    assert scan(xray_folder, out, tiny_model, "--full") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert tree(out) == before and outside.read_text() == '{"tool": "batchcam"}'


def test_a_planted_link_in_place_of_the_state_folder_is_refused_and_nothing_written_through(
        xray_folder, tmp_path, tiny_model, capsys):
    out, outside = tmp_path / "out", tmp_path / "outside"
    assert scan(xray_folder, out, tiny_model) == 0
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    shutil.rmtree(out / STATE_DIR)
    (out / STATE_DIR).symlink_to(outside, target_is_directory=True)
    assert scan(xray_folder, out, tiny_model, "--full") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert tree(outside) == {"keep.txt": b"keep"}


def test_the_ray_storage_token_is_never_written_through_a_link(tmp_path):
    report, outside = tmp_path / "report", tmp_path / "outside.txt"
    (report / STATE_DIR).mkdir(parents=True)
    outside.write_text("precious")
    (report / STATE_DIR / STORAGE_TOKEN).symlink_to(outside)
    write_token(report, "abc")
    assert outside.read_text() == "precious"
    assert (report / STATE_DIR / STORAGE_TOKEN).read_text() == "abc"


def test_gallery_and_overlay_folders_planted_as_links_are_replaced(xray_folder, tmp_path, tiny_model):
    out, outside = tmp_path / "out", tmp_path / "outside"
    assert scan(xray_folder, out, tiny_model) == 0
    outside.mkdir()
    (outside / "page-1.html").write_text("mine")
    for folder in ("gallery", "overlays"):
        shutil.rmtree(out / folder)
        (out / folder).symlink_to(outside, target_is_directory=True)
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    assert tree(outside) == {"page-1.html": b"mine"}
    assert (out / "gallery").is_dir() and not (out / "gallery").is_symlink()


# ---- keys: one per file, never an argument name ---------------------------------------------------

@pytest.mark.parametrize("option", ["--save-cams", "--heat-scale=run"])
def test_files_named_like_numpy_arguments_keep_their_own_maps(tmp_path, tiny_model, option, model_calls):
    pytest.importorskip("pydicom", reason="extensionless files are candidates only as DICOM (the dicom extra)")
    root = tmp_path / "root"
    root.mkdir()
    for seed, name in enumerate(("file", "allow_pickle", "arr_0")):  # extensionless DICOM, found by magic
        (root / name).write_bytes(dicom_bytes(anatomy(64) // (seed + 1)))
    Image.new("L", (64, 64), 90).save(root / "a.png")
    out = tmp_path / "out"
    assert scan(root, out, tiny_model, option) == 0
    with np.load(out / "cams.npz") as saved:
        keys = set(saved.files)
    assert keys == {r["path"] for r in read_rows(out)} == {"file", "allow_pickle", "arr_0", "a.png"}
    model_calls.clear()
    assert scan(root, out, tiny_model, option) == 0
    assert model_calls == []  # every map was kept, so every row is reused


def test_cams_are_written_member_by_member_whatever_the_key(tmp_path):
    report = ReportFolder(tmp_path / "r")
    maps = {name: np.full((2, 2), i, np.float32) for i, name in enumerate(("file", "allow_pickle", "a/b.png"))}
    report.publish({"cams.npz": cams_content(maps)})
    with zipfile.ZipFile(tmp_path / "r" / "cams.npz") as archive:
        assert sorted(archive.namelist()) == sorted(f"{name}.npy" for name in maps)
    assert {k: v.tolist() for k, v in report.read_cams().items()} == {k: v.tolist() for k, v in maps.items()}
    report.close()


def test_two_files_whose_names_once_displayed_alike_keep_their_own_rows_maps_and_overlays(tmp_path, tiny_model):
    root = tmp_path / "root"
    root.mkdir()
    Image.new("L", (64, 64), 30).save(root / "a\nb.png", "PNG")
    bright = Image.new("L", (64, 64), 30)
    bright.paste(230, (0, 0, 20, 20))
    bright.save(root / "a\\nb.png", "PNG")
    out = tmp_path / "out"
    assert scan(root, out, tiny_model, "--heat-scale", "run") == 0
    table = {r["path"]: r for r in read_rows(out)}
    assert set(table) == {"a\\nb.png", "a\\\\nb.png"}
    assert len({r["overlay"] for r in table.values()}) == 2
    with np.load(out / "cams.npz") as saved:
        assert set(saved.files) == set(table)
    assert len({r["sha256"] for r in table.values()}) == 2


# ---- exit codes the README promises ---------------------------------------------------------------

def test_evaluate_refuses_a_boxes_row_longer_than_its_header_with_exit_2(xray_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,3,4,5,6\n")
    assert main(["evaluate", str(out), "--boxes", str(boxes)]) == 2
    assert "more fields than the header" in capsys.readouterr().err


def test_evaluate_on_a_report_it_cannot_write_exits_74(xray_folder, tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,3,4\n")
    before = (out / "predictions.csv").read_bytes()

    shown = (out / "index.html").read_bytes()

    def read_only(self, name, content):
        raise OSError(errno.EROFS, "Read-only file system", str(self.folder.path / name))

    monkeypatch.setattr(NewGeneration, "write", read_only)
    assert main(["evaluate", str(out), "--boxes", str(boxes)]) == 74
    assert (out / "predictions.csv").read_bytes() == before and (out / "index.html").read_bytes() == shown


def test_evaluate_refuses_a_folder_batchcam_did_not_write(xray_folder, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("predictions.csv", "manifest.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,3,4\n")
    assert main(["evaluate", str(copy), "--boxes", str(boxes)]) == 2
    assert sorted(p.name for p in copy.iterdir()) == ["manifest.json", "predictions.csv"]


def test_sanity_skips_a_broken_link_in_root(tmp_path, tiny_model):
    root = tmp_path / "root"
    write_xrays(root, count=3)
    (root / "NORMAL" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert main(["sanity", str(root), "--model", str(tiny_model), "--sample", "4", "--device", "cpu",
                 "--out", str(tmp_path / "sanity")]) == 0
    assert (tmp_path / "sanity" / "sanity.json").is_file()


# ---- found in review: hard links, FIFOs, an edited outputs list, the Ray probe ----------------------

def test_an_edited_record_of_generations_never_removes_a_file_outside_them(xray_folder, tmp_path, tiny_model):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "notes.txt").write_text("mine")
    record = out / STATE_DIR / "generations.json"
    listed = json.loads(record.read_text())
    bad_names = ["gallery/../../victim.txt", "../victim.txt", "/etc/hostname", "gallery/..", "../notes.txt"]
    for generation in list(listed["generations"]):
        listed["generations"][generation] += bad_names
    listed["generations"].update({"..": ["victim.txt"], "../..": ["victim.txt"], ".": ["../notes.txt"]})
    record.write_text(json.dumps(listed))
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    assert victim.read_text() == "keep me" and (out / "notes.txt").read_text() == "mine"


def test_an_edited_outputs_list_of_an_older_report_never_adopts_or_removes_a_file_outside_it(
        xray_folder, tmp_path, tiny_model):
    from test_generations import to_layout_before_generations

    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    to_layout_before_generations(out)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    listed = json.loads((out / STATE_DIR / "outputs.json").read_text())
    listed["files"] += ["gallery/../../victim.txt", "../victim.txt", "/etc/hostname", "gallery/.."]
    (out / STATE_DIR / "outputs.json").write_text(json.dumps(listed))
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    assert victim.read_text() == "keep me" and victim.stat().st_nlink == 1


@pytest.mark.parametrize("name", [f"{STATE_DIR}/lock", f"{STATE_DIR}/journal.jsonl", "batchcam.log"])
def test_a_file_batchcam_appends_to_that_has_another_name_is_never_written_through_it(name, xray_folder, tmp_path,
                                                                                      tiny_model):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    other = tmp_path / "other-name.txt"
    other.write_bytes(b"precious\n")
    (out / name).unlink()
    os.link(other, out / name)
    assert scan(xray_folder, out, tiny_model, "--full") == 0
    assert other.read_bytes() == b"precious\n"
    if name == f"{STATE_DIR}/lock":  # locked where it is: replacing it could let a second run beside the first
        assert (out / name).samefile(other)
    else:                            # appended to in a copy of its own, its lines kept
        assert (out / name).stat().st_nlink == 1 and not (out / name).samefile(other)
    if name == "batchcam.log":
        assert (out / name).read_bytes().startswith(b"precious\n") and b"run started" in (out / name).read_bytes()


# The journal's case in the fast loop; the log is opened by the same SafeDir.open_append, which
# tests/unit/runtime/test_fsutil_planted.py tries on a FIFO in-process, so its subprocess runs in .ci/run only.
@pytest.mark.parametrize("name", [pytest.param("batchcam.log", marks=pytest.mark.slow), f"{STATE_DIR}/journal.jsonl"])
def test_a_fifo_planted_at_the_log_or_journal_never_blocks_the_run(name, xray_folder, tmp_path, tiny_model):
    import subprocess
    import sys

    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    (out / name).unlink()
    os.mkfifo(out / name)
    run = subprocess.run([sys.executable, "-m", "batchcam", "scan", str(xray_folder), "--out", str(out), "--model",
                          str(tiny_model), "--workers", "0", "--full"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (out / name).is_file()


def test_a_refused_link_is_judged_inside_report_without_following_it(tmp_path):
    from batchcam.commands.scan import _inside

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / STATE_DIR).symlink_to(elsewhere, target_is_directory=True)
    assert _inside(out / STATE_DIR, out)  # so the refusal is exit 74, not an internal error


def test_the_ray_storage_probe_never_creates_a_file_through_a_planted_overlays_link(tmp_path):
    from batchcam.engines.shared_storage import probe_overlays
    from batchcam.runtime.fsutil import PlantedLink

    report, elsewhere = tmp_path / "report", tmp_path / "elsewhere"
    report.mkdir()
    elsewhere.mkdir()
    (report / "overlays").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(PlantedLink):
        probe_overlays(report)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("broken", ["metrics", "manifest", "confidence"])
def test_evaluate_on_a_malformed_report_exits_2(broken, xray_folder, tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model) == 0
    if broken == "metrics":
        (out / "metrics.json").write_text("[1]")
    elif broken == "manifest":
        (out / "manifest.json").write_text("{}")
    else:
        text = (out / "predictions.csv").read_text()
        header, first, *rest = text.splitlines()
        cells = first.split(",")
        cells[header.split(",").index("confidence")] = "high"
        (out / "predictions.csv").write_text("\n".join([header, ",".join(cells), *rest]) + "\n")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nNORMAL/img00.png,1,2,3,4\n")
    code = main(["evaluate", str(out), "--boxes", str(boxes)])
    assert code == (0 if broken == "metrics" else 2), capsys.readouterr().err


def test_the_run_wide_heat_scale_pass_never_redraws_the_previous_reports_overlays_in_place(
        xray_folder, tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "out"
    assert scan(xray_folder, out, tiny_model, "--heat-scale", "run") == 0
    shown = {name: (out / name).read_bytes() for row in read_rows(out) for name in (row["overlay"],)}
    Image.new("L", (80, 80), 250).save(xray_folder / "NORMAL" / "bright.png")  # moves the run-wide scale

    def disk_full(self, name, content):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder.path / name))

    monkeypatch.setattr(NewGeneration, "write", disk_full)
    assert scan(xray_folder, out, tiny_model, "--heat-scale", "run") == 74
    assert {name: (out / name).read_bytes() for name in shown} == shown  # the old pages show what they showed
    monkeypatch.undo()
    assert scan(xray_folder, out, tiny_model, "--heat-scale", "run") == 0
    overlays = {row["overlay"] for row in read_rows(out)}
    on_disk = {f"overlays/{p.name}" for p in (out / "overlays").iterdir() if p.name.count(".") == 1}
    assert on_disk == overlays  # the superseded overlays were removed
