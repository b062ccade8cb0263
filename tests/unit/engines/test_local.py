"""The local engine on a few tiny images: the rows it journals and returns are the rows the per-image
explain path (predict and serve's ``Explainer``) gives each file alone, its overlays are on disk, bad
files are their own rows, and ``--heat-scale run`` rescales every overlay with one run-wide constant."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from batchcam.cam.explainer import CamExplainer
from batchcam.config import ScanConfig
from batchcam.engines import heat_scale, local
from batchcam.engines.job import Resolved, ScanJob
from batchcam.engines.stages import prepared_model
from batchcam.model.checkpoint import load_checkpoint
from batchcam.report.folder import ReportFolder
from batchcam.report.store import PlannedFile, RowStore
from batchcam.runtime.console import Console
from batchcam.runtime.interrupt import Interrupted
from batchcam.serving.explain import Explainer
from conftest import write_xrays

COMPARED = ("path", "status", "error", "prediction", "cam_target", "label", "width", "height", "sha256",
            "model_sha256", "cam_peak_x", "cam_peak_y", "attention_outside")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_checkpoint(tiny_model)


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> tuple[Path, list[PlannedFile]]:
    root = tmp_path_factory.mktemp("xrays")
    paths = write_xrays(root, count=5, size=(96, 80))
    (root / "NORMAL" / "broken.png").write_bytes(b"not a png")
    paths.append(root / "NORMAL" / "broken.png")
    planned = [PlannedFile(p.relative_to(root).as_posix(), p, p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(paths)]
    return root, planned


def run_local(config: ScanConfig, loaded, files: list[PlannedFile], key: str = "k", then=None):
    """``local.process`` as the scan runs it, into a fresh report; ``then(rows, cams, job)`` runs while
    the report and its journal are still open. Returns the rows, the maps and the journaled rows."""
    report = ReportFolder(config.out)
    report.prepare()
    engine = CamExplainer(prepared_model(loaded, torch.device("cpu")), config.cam, None,
                       temperature=loaded.temperature)
    try:
        with RowStore(report.state(), key) as store:
            job = ScanJob(config=config, resolved=Resolved(autocast=None, target=None, backend="eager",
                                                           settings_key=key),
                          loaded=loaded, device=torch.device("cpu"), cam_explainer=engine, report=report, store=store,
                          console=Console(quiet=True, stream=io.StringIO()))
            rows, cams = local.process(files, job)
            extra = then(rows, cams, job) if then else None
        journaled = [json.loads(line)["row"] for line in (config.out / ".batchcam" / "journal.jsonl").read_text()
                     .splitlines() if "row" in json.loads(line)]
    finally:
        report.close()
    return rows, cams, journaled, extra


def test_the_local_engines_rows_are_the_per_image_explain_paths(xrays, loaded, tmp_path):
    root, files = xrays
    config = ScanConfig(root=root, out=tmp_path / "report", batch_size=4, workers=0)
    rows, cams, journaled, _ = run_local(config, loaded, files)
    explainer = Explainer(loaded, torch.device("cpu"))
    alone = [explainer.explain([explainer.decode(f.relpath, f.path.read_bytes())])[0].row for f in files]
    assert [row.path for row in rows] == [f.relpath for f in files]
    assert [row.status for row in rows].count("error") == 1
    for scanned, explained in zip(rows, alone):
        assert {name: getattr(scanned, name) for name in COMPARED} == \
            pytest.approx({name: getattr(explained, name) for name in COMPARED}, abs=1e-5)
        assert scanned.probabilities == pytest.approx(explained.probabilities, abs=1e-5)
        assert scanned.confidence == pytest.approx(explained.confidence, abs=1e-5)
    assert cams == {}   # kept only for --save-cams or --heat-scale run
    assert sorted(row["path"] for row in journaled) == sorted(f.relpath for f in files)
    for row in rows:
        if row.ok:
            assert all((config.out / name).is_file() for name in (row.overlay, row.thumb, row.original))


def test_with_no_files_nothing_is_decoded_or_written(loaded, tmp_path):
    config = ScanConfig(root=tmp_path, out=tmp_path / "report", workers=0)
    rows, cams, journaled, _ = run_local(config, loaded, [])
    assert (rows, cams, journaled) == ([], {}, [])
    assert list((config.out / "overlays").iterdir()) == []


def test_a_stop_requested_during_a_batch_keeps_the_finished_batches_and_raises_interrupted(xrays, loaded, tmp_path,
                                                                                          monkeypatch):
    root, files = xrays
    config = ScanConfig(root=root, out=tmp_path / "report", batch_size=2, workers=0)
    real = local.explain_batch
    calls = []

    def explain_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "explain_batch", explain_then_signal)
    with pytest.raises(Interrupted) as stopped:
        run_local(config, loaded, files)
    assert stopped.value.exit_code == 143 and len(calls) == 1
    journal = (config.out / ".batchcam" / "journal.jsonl").read_text().splitlines()
    assert len([line for line in journal if '"row"' in line]) == 2   # the batch in flight, journaled


# ------------------------------------------------------------------ --heat-scale run

def test_the_run_wide_scale_is_the_99th_percentile_of_every_map_cell():
    maps = [np.arange(100, dtype=np.float32).reshape(10, 10), np.full((5, 5), 1000.0, np.float32)]
    cells = np.concatenate([m.ravel() for m in maps])
    assert heat_scale.run_heat_scale(maps) == pytest.approx(float(np.percentile(cells, 99.0)))
    one_outlier = [np.ones((10, 10), np.float32)] * 150 + [np.full((10, 10), 1e6, np.float32)]
    assert heat_scale.run_heat_scale(one_outlier) == 1.0   # one hot map does not make every other one cold


@pytest.mark.parametrize("maps", [[], [np.zeros((7, 7), np.float32)]])
def test_a_run_without_heat_has_a_tiny_positive_scale_never_zero(maps):
    assert 0 < heat_scale.run_heat_scale(maps) == np.finfo(np.float32).tiny


def test_heat_scale_run_renders_every_ok_overlay_again_under_a_name_with_the_scale(xrays, loaded, tmp_path):
    root, files = xrays
    config = ScanConfig(root=root, out=tmp_path / "report", batch_size=4, workers=0, heat_scale="run")

    def rescale(rows, cams, job):
        first = {row.path: row.overlay for row in rows}
        scale = heat_scale.rescale_overlays(rows, files, cams, job)
        return first, scale

    rows, cams, _, (first, scale) = run_local(config, loaded, files, then=rescale)
    ok = [row for row in rows if row.ok]
    assert set(cams) == {row.path for row in ok}
    assert scale == pytest.approx(heat_scale.run_heat_scale(list(cams.values())))
    for row in ok:
        assert row.overlay != first[row.path]
        assert all((config.out / name).is_file() for name in (row.overlay, row.thumb, row.original))
    assert [row.overlay for row in rows if not row.ok] == [""]


def test_heat_scale_run_leaves_a_file_changed_since_the_first_pass_with_its_own_overlay(xrays, loaded, tmp_path):
    root, files = xrays
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    moved = [dataclasses.replace(f, path=copy / f.relpath) for f in files]
    config = ScanConfig(root=copy, out=tmp_path / "report", batch_size=4, workers=0, heat_scale="run")
    changed = next(f for f in moved if not f.relpath.endswith("broken.png"))

    def change_then_rescale(rows, cams, job):
        first = {row.path: row.overlay for row in rows}
        write_xrays(tmp_path / "other", count=1, size=(96, 80), start_seed=50)
        shutil.copyfile(next((tmp_path / "other").rglob("*.png")), changed.path)
        heat_scale.rescale_overlays(rows, moved, cams, job)
        return first

    rows, _, _, first = run_local(config, loaded, moved, then=change_then_rescale)
    by_path = {row.path: row for row in rows}
    assert by_path[changed.relpath].overlay == first[changed.relpath]
    assert all(row.overlay != first[row.path] for row in rows if row.ok and row.path != changed.relpath)
