"""Rows from a batch's model results (``stages.batch_rows``), and the job's row key: one row per sample in
order, ok samples taking the next prediction in turn, error and skipped samples passing through as their
own rows, the out-of-distribution distance and flag from the checkpoint's statistics, and overlay names
that change with every keyed setting."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from batchcam.cam.explainer import CamBatch
from batchcam.config import Measures, ScanConfig
from batchcam.decode.dataset import Sample
from batchcam.decode.lungs import LUNG_GRID
from batchcam.engines.job import Resolved, ScanJob
from batchcam.engines.stages import batch_rows
from batchcam.model.calibration import OodStatistics
from batchcam.model.checkpoint import load_checkpoint
from batchcam.options import row_bindings
from batchcam.records import overlay_path
from batchcam.report.store import settings_key

FEATURES = 4


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_checkpoint(tiny_model)


def ok_sample(relpath: str, sha: str, lung_fields: np.ndarray | None = None) -> Sample:
    return Sample(relpath=relpath, sha256=sha, width=160, height=128, size=1000, mtime_ns=7,
                  display=np.zeros((128, 160), np.uint8), lung_fields=lung_fields)


def cam_batch(probabilities: list[list[float]], features: list[list[float]]) -> CamBatch:
    n = len(probabilities)
    cams = torch.rand(n, 7, 7, generator=torch.Generator().manual_seed(0))
    probs = torch.tensor(probabilities)
    return CamBatch(probabilities=probs, targets=probs.argmax(1), cams=cams, features=torch.tensor(features),
                    logits=probs.log())


def statistics(threshold: float) -> OodStatistics:
    return OodStatistics(means=torch.zeros(2, FEATURES), precision=torch.eye(FEATURES), threshold=threshold,
                         percentiles={}, shrinkage=0.0, images=10)


SAMPLES = [
    ok_sample("NORMAL/a.png", "aa", lung_fields=np.ones((LUNG_GRID, LUNG_GRID), bool)),
    Sample(relpath="PNEUMONIA/broken.png", sha256="bb", error="cannot identify image file", size=3, mtime_ns=8),
    ok_sample("PNEUMONIA/b.png", "cc"),
    Sample(relpath="knee.dcm", sha256="dd", skip_reason="Modality MR is not scored (--select chest)",
           selection="chest;CR,DX;PA,AP"),
    ok_sample("unlabelled.png", "ee"),
]
PROBABILITIES = [[0.9, 0.1], [0.25, 0.75], [0.6, 0.4]]
FEATURE_ROWS = [[0.0] * FEATURES, [2.0] + [0.0] * (FEATURES - 1), [0.0, 1.0, 0.0, 0.0]]


def test_one_row_per_sample_in_order_with_the_ok_ones_taking_the_predictions_in_turn(loaded):
    results = batch_rows(SAMPLES, cam_batch(PROBABILITIES, FEATURE_ROWS), loaded, settings_key="key")
    rows = [row for row, _, _ in results]
    assert [row.path for row in rows] == [s.relpath for s in SAMPLES]
    assert [row.status for row in rows] == ["ok", "error", "ok", "skipped", "ok"]
    assert [results[i][1] for i in range(5)] == SAMPLES
    ok = [rows[0], rows[2], rows[4]]
    assert [row.prediction for row in ok] == ["NORMAL", "PNEUMONIA", "NORMAL"]
    assert [row.confidence for row in ok] == pytest.approx([0.9, 0.75, 0.6])
    assert [row.probabilities for row in ok] == [pytest.approx(p) for p in PROBABILITIES]
    assert [row.cam_target for row in ok] == ["NORMAL", "PNEUMONIA", "NORMAL"]
    assert [row.label for row in ok] == ["NORMAL", "PNEUMONIA", ""]   # from the parent folder, when a class
    assert all((row.width, row.height, row.model_sha256) == (160, 128, loaded.sha256) for row in ok)
    assert [row.overlay for row in ok] == [overlay_path(s.relpath, f"{s.sha256}:key")
                                           for s in (SAMPLES[0], SAMPLES[2], SAMPLES[4])]
    assert [results[i][2] is not None for i in range(5)] == [True, False, True, False, True]
    assert torch.equal(results[2][2], cam_batch(PROBABILITIES, FEATURE_ROWS).cams[1])
    assert rows[0].attention_outside == pytest.approx(0.0) and rows[2].attention_outside is None


def test_error_and_skipped_samples_pass_through_with_their_reasons_and_nothing_predicted(loaded):
    rows = [row for row, _, _ in batch_rows(SAMPLES, cam_batch(PROBABILITIES, FEATURE_ROWS), loaded)]
    error, skipped = rows[1], rows[3]
    assert (error.error, error.sha256, error.size, error.mtime_ns) == ("cannot identify image file", "bb", 3, 8)
    assert (skipped.error, skipped.selection) == ("Modality MR is not scored (--select chest)", "chest;CR,DX;PA,AP")
    for row in (error, skipped):
        assert (row.prediction, row.confidence, row.probabilities, row.overlay, row.cam_target) == ("", None, [],
                                                                                                   "", "")
        assert row.ood_score is None and row.ood_flag is None


def test_a_batch_of_only_error_and_skipped_samples_needs_no_model_results(loaded):
    rows = [row for row, _, _ in batch_rows([SAMPLES[1], SAMPLES[3]], None, loaded)]
    assert [row.status for row in rows] == ["error", "skipped"]


def test_an_ok_sample_without_its_batchs_results_is_refused(loaded):
    with pytest.raises(ValueError, match="NORMAL/a.png: an ok sample needs its batch's model results"):
        batch_rows(SAMPLES[:1], None, loaded)


def test_the_ood_distance_is_to_the_nearest_class_mean_and_flagged_beyond_the_threshold(loaded):
    calibrated = dataclasses.replace(loaded, ood=statistics(threshold=1.5))
    rows = [row for row, _, _ in batch_rows(SAMPLES, cam_batch(PROBABILITIES, FEATURE_ROWS), calibrated)]
    assert [rows[i].ood_score for i in (0, 2, 4)] == pytest.approx([0.0, 2.0, 1.0])
    assert [rows[i].ood_flag for i in (0, 2, 4)] == [False, True, False]


def test_without_statistics_no_row_has_an_ood_score(loaded):
    assert loaded.ood is None
    rows = [row for row, _, _ in batch_rows(SAMPLES, cam_batch(PROBABILITIES, FEATURE_ROWS), loaded)]
    assert all(row.ood_score is None and row.ood_flag is None for row in rows)


# ------------------------------------------------------------------ the job's row key

BASE = ScanConfig(root=Path("root"), out=Path("report"))
RESOLVED = {"model": {"sha256": "m"}, "precision": "fp32", "target": "predicted"}
# One changed value for every option that affects rows: as given, or (keyed_resolved) as the run resolved it.
CHANGED: dict[str, tuple[dict, dict]] = {
    "model": ({}, {"model": {"sha256": "another model"}}),
    "cam": ({"cam": "hirescam"}, {}),
    "target": ({}, {"target": "PNEUMONIA"}),
    "heat_scale": ({"heat_scale": "run"}, {}),
    "faithfulness": ({"measures": Measures(faithfulness=True)}, {}),
    "overlay_size": ({"overlay_size": 1024}, {}),
    "precision": ({}, {"precision": "bf16"}),
    "decode": ({"decode": "gpu"}, {}),
}


def job(config: ScanConfig, resolved: dict, loaded) -> ScanJob:
    """A job as the scan builds it (commands.scan.run), with what this test does not use left out."""
    return ScanJob(config=config, resolved=Resolved(autocast=None, target=None, backend="eager",
                                                    settings_key=settings_key(config, resolved)),
                   loaded=loaded, device=torch.device("cpu"), cam_explainer=None, report=None, store=None,
                   console=None)  # type: ignore[arg-type]  # unused by the key


def test_every_option_that_affects_rows_has_a_changed_value_here():
    assert set(CHANGED) == {binding.option.dest for binding in row_bindings(ScanConfig)}


@pytest.mark.parametrize("dest", sorted(CHANGED))
def test_the_jobs_key_and_its_overlay_names_change_with_each_keyed_value(dest, loaded):
    given, resolved = CHANGED[dest]
    base = job(BASE, RESOLVED, loaded)
    changed = job(dataclasses.replace(BASE, **given), {**RESOLVED, **resolved}, loaded)
    assert changed.settings_key != base.settings_key
    overlays = [batch_rows(SAMPLES[:1], cam_batch(PROBABILITIES[:1], FEATURE_ROWS[:1]), loaded,
                           settings_key=j.settings_key)[0][0].overlay for j in (base, changed)]
    assert overlays[0] != overlays[1]


@pytest.mark.parametrize("given", [{"batch_size": 3}, {"workers": 5}, {"quiet": True}, {"page_size": 9},
                                   {"backend": "onnx"}, {"max_file_mb": 2.0}, {"full": True}])
def test_the_jobs_key_stays_for_options_that_do_not_affect_rows(given, loaded):
    assert job(dataclasses.replace(BASE, **given), RESOLVED, loaded).settings_key == \
        job(BASE, RESOLVED, loaded).settings_key
