"""``scan --engine ray`` keeps the local engine's contract, on a local Ray cluster of 2 CPUs.

One cluster serves the module (the engine uses a Ray this process already holds). The tests of a
stopped driver run the CLI in a process of its own: the killed one starts its own local cluster,
the one stopped by SIGTERM joins the module's with --ray-address.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import manifest, read_rows, scan
from PIL import Image

from batchcam.cli import main
from batchcam.config import ScanConfig
from batchcam.decode.dataset import ScanDataset
from batchcam.engines import ray_engine
from batchcam.engines.job import Resolved
from batchcam.engines.shared_storage import node_problems, token_path
from batchcam.errors import ReportWriteError
from batchcam.model.checkpoint import load_checkpoint
from batchcam.report.lock import STATE_DIR
from batchcam.report.store import PlannedFile

ray = pytest.importorskip("ray", reason="the ray engine needs the 'ray' extra (pip install -e '.[test]')")

pytestmark = pytest.mark.slow  # each test starts or joins a Ray cluster

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
BAD_FILES = ("NORMAL/a_empty.png", "NORMAL/b_text.png", "PNEUMONIA/c_truncated.jpg")
FLOAT_COLUMNS = ("confidence", "p_NORMAL", "p_PNEUMONIA", "attention_outside", "faith_drop_top", "faith_drop_random",
                 "ood_score")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for the module, with a small object store."""
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20,
             log_to_driver=False, logging_level=logging.ERROR)
    signal.signal(signal.SIGTERM, sigterm)  # ray.init's handler would make a SIGTERM exit pytest
    yield ray
    ray.shutdown()


def copy_of_samples(folder: Path) -> Path:
    shutil.copytree(SAMPLES, folder, ignore=shutil.ignore_patterns("*.md"))
    return folder


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """samples/ (24 X-rays) plus an empty file, a text file and a truncated JPEG."""
    root = copy_of_samples(tmp_path_factory.mktemp("mixed") / "root")
    (root / BAD_FILES[0]).write_bytes(b"")
    (root / BAD_FILES[1]).write_text("this is not an image\n")
    jpeg = root / BAD_FILES[2]
    Image.open(next((root / "NORMAL").glob("*.png"))).convert("RGB").save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:600])
    return root


@pytest.fixture(scope="module")
def reports(ray_cluster, mixed_root, tmp_path_factory) -> dict[str, Path]:
    """The same tree scanned by each engine (exit codes checked where they are made)."""
    out = tmp_path_factory.mktemp("reports")
    codes = {"local": demo_scan(mixed_root, out / "local", "--workers", "0"),
             "ray": demo_scan(mixed_root, out / "ray", "--engine", "ray", "--workers", "1")}
    assert codes == {"local": 3, "ray": 3}
    return {"local": out / "local", "ray": out / "ray"}


def demo_scan(root: Path, out: Path, *extra: str) -> int:
    """A scan with the demo model in batches of 8, quiet."""
    return scan(root, out, None, "--batch-size", "8", "--quiet", *extra, workers=None)


def image_count(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------ same rows as the local engine

def test_ray_engine_writes_the_local_engines_rows(reports):
    local, remote = read_rows(reports["local"]), read_rows(reports["ray"])
    assert list(local[0]) == list(remote[0])  # same columns, in the same order
    assert [r["path"] for r in remote] == [r["path"] for r in local]  # sorted, each file once
    for mine, theirs in zip(remote, local):
        for column, value in theirs.items():
            if column == "first_seen":   # two reports: each first saw its files when its own run started
                continue
            if column in FLOAT_COLUMNS and value:  # one model batch may differ in the last float bit
                # (ood_score is a distance of tens: the same last bits are a relative difference)
                assert float(mine[column]) == pytest.approx(float(value), rel=1e-5, abs=1e-5), (mine["path"], column)
            else:
                assert mine[column] == value, (mine["path"], column)


def test_bad_files_are_error_rows_and_the_counts_say_so(reports, mixed_root):
    rows = {r["path"]: r for r in read_rows(reports["ray"])}
    assert len(rows) == image_count(mixed_root) == 27
    for name in BAD_FILES:
        assert rows[name]["status"] == "error" and rows[name]["error"] and not rows[name]["prediction"]
    assert "empty" in rows[BAD_FILES[0]]["error"]
    counts = manifest(reports["ray"])["counts"]
    assert counts == {"found": 27, "processed": 27, "reused": 0, "ok": 24, "error": 3, "skipped": 0}


def test_the_workers_overlays_and_the_gallery_are_in_the_report(reports):
    report = reports["ray"]
    rows = read_rows(report)
    for row in rows:
        if row["status"] == "ok":
            stem = row["overlay"].removesuffix(".jpg")
            for name in (row["overlay"], f"{stem}.thumb.jpg", f"{stem}.orig.jpg"):
                assert (report / name).is_file(), name
    index = (report / "index.html").read_text(encoding="utf-8")
    assert "<html" in index.lower() and rows[0]["path"] in index
    assert all(row["path"] in (report / "gallery" / "rows.js").read_text(encoding="utf-8") for row in rows)
    leftovers = [p.name for p in (report / "overlays").iterdir() if p.name.startswith(".ray-probe-")]
    assert not token_path(report).exists() and not leftovers


def test_incremental_rerun_with_the_ray_engine_processes_zero_images(reports, mixed_root):
    def without_change(csv_path):   # the last column says what this run changed: "new" becomes ""
        return [line.rsplit(",", 1)[0] for line in csv_path.read_text(encoding="utf-8").splitlines()]
    before = without_change(reports["ray"] / "predictions.csv")
    assert demo_scan(mixed_root, reports["ray"], "--engine", "ray", "--workers", "1") == 3
    assert manifest(reports["ray"])["counts"]["processed"] == 0
    assert manifest(reports["ray"])["counts"]["reused"] == 27
    assert without_change(reports["ray"] / "predictions.csv") == before


# ------------------------------------------------------------------ a driver killed or stopped

def ray_scan_process(root: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """The CLI in a session of its own, so every process of a local Ray cluster it starts can be found."""
    command = [sys.executable, "-m", "batchcam", "scan", str(root), "--out", str(out), "--engine", "ray",
               "--batch-size", "1", "--workers", "1", "--quiet", *extra]
    with open(log, "w") as stream:
        return subprocess.Popen(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)


def journaled(out: Path) -> int:
    try:
        return (out / STATE_DIR / "journal.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def session_processes(session: int) -> dict[int, str]:
    """pid -> name of the live processes in a session (a Ray cluster's raylet, workers, agents)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if entry.name.isdigit() and int(fields[3]) == session and fields[0] != "Z":
            found[int(entry.name)] = name
    return found


def assert_cluster_gone(session: int, deadline: float) -> None:
    """The processes of a dead driver's local cluster end by themselves before ``deadline``
    (monotonic); whatever is left then is killed, and reported."""
    if wait_for(lambda: not session_processes(session), timeout=deadline - time.monotonic()):
        return
    left = session_processes(session)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    pytest.fail(f"processes of the killed driver's Ray cluster outlived it: {left}")


@pytest.mark.slow
def test_a_killed_driver_loses_at_most_the_batches_in_flight_and_its_cluster_follows_it(ray_cluster, tmp_path):
    """SIGKILL of a driver that started its own local cluster: the raylet and workers die with it,
    Ray's agent processes about a minute later (they first try to tell the dead GCS)."""
    root, out = copy_of_samples(tmp_path / "root"), tmp_path / "out"
    run = ray_scan_process(root, out, tmp_path / "run.log")
    try:
        assert wait_for(lambda: journaled(out) >= 2 or run.poll() is not None, timeout=150), "no batch journaled"
        assert run.poll() is None, f"the scan ended before it could be killed: {(tmp_path / 'run.log').read_text()}"
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        run.kill()
        run.wait()
    cleanup_deadline = time.monotonic() + 150
    kept = journaled(out)

    assert demo_scan(root, out, "--engine", "ray", "--workers", "1") == 0
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == len(set(paths)) == image_count(root) == 24  # every file once, no duplicate rows
    counts = manifest(out)["counts"]
    assert counts["reused"] >= kept >= 2 and counts["processed"] == 24 - counts["reused"]
    assert_cluster_gone(run.pid, cleanup_deadline)


@pytest.mark.slow
def test_sigterm_stops_a_driver_on_a_running_cluster_after_a_batch_with_exit_143(ray_cluster, tmp_path):
    """The driver joins the module's cluster (--ray-address); the rerun resumes from its journal."""
    root, out = copy_of_samples(tmp_path / "root"), tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    run = ray_scan_process(root, out, tmp_path / "run.log", "--ray-address", address)
    try:
        assert wait_for(lambda: journaled(out) >= 1 or run.poll() is not None, timeout=150), "no batch journaled"
        run.send_signal(signal.SIGTERM)
        code = run.wait(timeout=120)
    finally:
        run.kill()
        run.wait()
    log = (tmp_path / "run.log").read_text()
    assert code == 143, log
    assert "stopped by SIGTERM" in log
    kept = journaled(out)
    assert demo_scan(root, out, "--engine", "ray", "--workers", "1") == 0
    assert manifest(out)["counts"]["reused"] >= kept >= 1
    assert len(read_rows(out)) == 24


# ------------------------------------------------------------------ shared storage

def ray_scan(xray_folder: Path, tiny_model: Path, out: Path, capsys) -> tuple[int, str]:
    """A ray-engine scan of the small folder: its exit code and what it printed on stderr."""
    code = scan(xray_folder, out, tiny_model, "--engine", "ray", workers=None)
    return code, capsys.readouterr().err


def test_a_report_that_a_node_does_not_see_is_refused_before_any_image(ray_cluster, xray_folder, tiny_model,
                                                                      tmp_path, monkeypatch, capsys):
    """A node that finds another token at REPORT's path (another disk mounted there) fails the check."""
    monkeypatch.setattr(ray_engine, "write_token", lambda report, token: token_path(report).write_text("other disk"))
    out = tmp_path / "out"
    code, message = ray_scan(xray_folder, tiny_model, out, capsys)
    assert code == 74, message
    assert f"REPORT {out.absolute()} must be on storage that every Ray node sees" in message
    assert "sees another" in message
    assert not (out / "predictions.csv").exists() and not list((out / "overlays").iterdir())
    assert not token_path(out).exists()


def test_an_actor_on_a_node_that_joined_later_without_the_report_fails_the_run_clearly(
        ray_cluster, xray_folder, tiny_model, tmp_path, monkeypatch, capsys):
    """The start check passes; the node the actor lands on then does not see the token."""
    marker = tmp_path / "checked once"

    def late_node(root: str, report: str, token: str) -> tuple[str | None, str | None]:
        first = not marker.exists()
        marker.touch()
        return None, None if first else f"node late cannot read {report}"

    monkeypatch.setattr(ray_engine, "node_problems", late_node)
    monkeypatch.setattr(ray_engine, "write_token", lambda report, token: token_path(report).write_text("other disk"))
    out = tmp_path / "out"
    code, message = ray_scan(xray_folder, tiny_model, out, capsys)
    assert code == 74, message
    assert f"node late cannot read {out.absolute()}" in message
    assert not (out / "predictions.csv").exists() and not token_path(out).exists()


def test_a_root_that_a_node_does_not_see_is_a_usage_error(ray_cluster, xray_folder, tiny_model, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.setattr(ray_engine, "node_problems", lambda root, report, token: (f"node n2 does not see ROOT {root}",
                                                                                  None))
    code, message = ray_scan(xray_folder, tiny_model, tmp_path / "out", capsys)
    assert code == 2
    assert f"ROOT {xray_folder} must be on storage that every Ray node sees" in message


def test_a_node_that_sees_neither_root_nor_report_says_which_and_why(ray_cluster, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    probe = ray.remote(num_cpus=0)(node_problems)
    root_problem, report_problem = ray.get(probe.remote(str(elsewhere / "root"), str(elsewhere / "report"), "x"))
    assert f"does not see ROOT {elsewhere / 'root'}" in root_problem
    assert "cannot read" in report_problem and str(elsewhere / "report") in report_problem


def test_an_actor_starting_without_the_report_refuses_to_work(tmp_path):
    spec = worker_spec(tmp_path, model=None, token="not written")
    with pytest.raises(ray_engine.SharedStorageError, match="must be on storage that every Ray node sees"):
        ray_engine.CamWorker(spec)
    assert issubclass(ray_engine.SharedStorageError, ReportWriteError)  # exit 74


# ------------------------------------------------------------------ worker exceptions become error rows

CONFIG = ScanConfig(root=Path("root"), out=Path("report"), batch_size=4, workers=0, save_cams=True)
IMAGE_SIZE = 64


def worker_spec(report: Path, model, token: str = "t") -> ray_engine.WorkerSpec:
    return ray_engine.WorkerSpec(config=CONFIG, resolved=Resolved(autocast=None, target=None, backend="eager",
                                                                  settings_key="k"),
                                 model=model, report=str(report), token=token, gpus=0)


def planned(paths: list[Path], root: Path) -> np.ndarray:
    return ray_engine.objects([PlannedFile(p.relative_to(root).as_posix(), p, p.stat().st_size, 0) for p in paths])


def test_an_exception_while_decoding_costs_that_file_only(xray_folder, monkeypatch):
    paths = sorted(p for p in xray_folder.rglob("*.png"))
    original = ScanDataset.__getitem__

    def failing(self, index):
        if index == 1:
            raise MemoryError("no room")
        return original(self, index)

    monkeypatch.setattr(ScanDataset, "__getitem__", failing)
    samples = list(ray_engine.decode_batch({"file": planned(paths, xray_folder)}, CONFIG, IMAGE_SIZE)["sample"])
    assert [s.ok for s in samples] == [True, False, True, True]
    assert samples[1].transient and "MemoryError: no room" in samples[1].error


def test_an_exception_in_an_actor_turns_its_batch_into_error_rows(ray_cluster, xray_folder, tiny_model, tmp_path,
                                                                  monkeypatch):
    report = tmp_path / "report"
    (report / STATE_DIR).mkdir(parents=True)
    (report / "overlays").mkdir()
    token_path(report).write_text("t")
    worker = ray_engine.CamWorker(worker_spec(report, ray.put(load_checkpoint(tiny_model))))
    paths = sorted(xray_folder.rglob("*.png"))
    batch = ray_engine.decode_batch({"file": planned(paths, xray_folder)}, CONFIG, IMAGE_SIZE)

    fine = list(worker(batch)["explained"])
    assert all(item.row.ok and item.cam is not None for item in fine)
    assert all((report / item.row.overlay).is_file() for item in fine)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ray_engine, "explain_batch", broken)
    failed = list(worker(batch)["explained"])
    assert [item.row.path for item in failed] == [item.row.path for item in fine]
    assert all(not item.row.ok and item.row.transient and "CUDA out of memory" in item.row.error for item in failed)


# ------------------------------------------------------------------ usage errors

@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "need --engine ray"),
    (["--gpus-per-worker", "1"], "need --engine ray"),
    (["--engine", "ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be 0"),
    (["--engine", "ray", "--device", "cpu"], "applies to the local engine"),
])
def test_engine_options_are_checked_before_report_is_touched(args, message, xray_folder, tiny_model, tmp_path,
                                                            capsys):
    out = tmp_path / "out"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_ray_engine_without_ray_installed_says_how_to_install_it(xray_folder, tiny_model, tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what importlib sees when ray is not installed
    out = tmp_path / "out"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), "--engine", "ray"]) == 2
    assert "pip install 'batchcam[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_more_gpus_per_actor_than_the_cluster_has_is_refused(ray_cluster, xray_folder, tiny_model, tmp_path, capsys):
    code = main(["scan", str(xray_folder), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                 "--engine", "ray", "--gpus-per-worker", "1"])
    assert code == 2
    assert "--gpus-per-worker 1: the Ray cluster has 0 GPU(s)" in capsys.readouterr().err

