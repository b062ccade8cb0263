"""What the engines receive: the scan's configuration itself and what the run resolved, never copies of
options; the decoding stages and the model stage take each option from the configuration."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from batchcam.cam.explainer import CamExplainer
from batchcam.commands.scan.run import backend_for
from batchcam.config import Measures, ScanConfig, Selection
from batchcam.decode.dataset import collate_samples
from batchcam.engines import ray_engine
from batchcam.engines.job import Resolved, ScanJob
from batchcam.engines.stages import decode_loader, explain_batch, scan_dataset
from batchcam.model.checkpoint import load_checkpoint
from batchcam.options import config_bindings
from batchcam.report.store import PlannedFile
from conftest import TINY_SIZE, write_xrays

OPTIONS = {binding.option.dest for binding in config_bindings(ScanConfig)}
# Named like their options, but what the run resolved them to: the torch.device, the class index, the model
# step it chose, the loaded weights.
RESOLVED_FROM_OPTIONS = {"device", "target", "backend", "model"}


@pytest.mark.parametrize("carrier", [ScanJob, Resolved, ray_engine.WorkerSpec], ids=lambda cls: cls.__name__)
def test_no_engine_input_copies_an_option(carrier):
    """An option reaches the engines and the Ray actors in ``config``: a field named like one is a copy."""
    assert not {field.name for field in dataclasses.fields(carrier)} & OPTIONS - RESOLVED_FROM_OPTIONS


def test_a_model_actors_spec_travels_with_the_configuration_as_given(tmp_path):
    config = ScanConfig(root=tmp_path, out=tmp_path / "report", batch_size=4, workers=1,
                        measures=Measures(faithfulness=True), selection=Selection(mode="all"), overlay_size=300)
    spec = ray_engine.WorkerSpec(config=config, resolved=Resolved(autocast=torch.bfloat16, target=1, backend="onnx",
                                                                  settings_key="k"),
                                 model=None, report=str(tmp_path), token="t", gpus=0.5)
    assert pickle.loads(pickle.dumps(spec)) == spec


def planned(paths: list[Path], root: Path) -> list[PlannedFile]:
    return [PlannedFile(p.relative_to(root).as_posix(), p, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def test_decoding_takes_its_options_from_the_configuration(tmp_path):
    paths = write_xrays(tmp_path / "root", count=3)
    config = ScanConfig(root=tmp_path / "root", out=tmp_path / "report", batch_size=2, workers=0, overlay_size=300,
                        max_file_mb=1.5, selection=Selection(mode="all"))
    dataset = scan_dataset(planned(paths, tmp_path / "root"), config, TINY_SIZE)
    assert (dataset.display_max_side, dataset.max_file_bytes, dataset.selection, dataset.image_size) == (
        300, int(1.5 * 2**20), Selection(mode="all"), TINY_SIZE)
    batches = list(decode_loader(dataset, config.batch_size, config.workers))
    assert [len(samples) for samples, _ in batches] == [2, 1]
    assert max(batches[0][0][0].display.shape) <= 300


def test_the_measures_option_adds_its_values_to_the_rows(tmp_path, tiny_model):
    paths = write_xrays(tmp_path / "root", count=2)
    config = ScanConfig(root=tmp_path / "root", out=tmp_path / "report")
    samples, views = collate_samples([scan_dataset(planned(paths, tmp_path / "root"), config, TINY_SIZE)[i]
                                      for i in range(2)])
    loaded = load_checkpoint(tiny_model)
    with CamExplainer(loaded.model) as engine:
        plain = explain_batch(samples, views, engine, loaded, torch.device("cpu"))
        measured = explain_batch(samples, views, engine, loaded, torch.device("cpu"),
                                 measures=Measures(faithfulness=True))
    assert all(row.faith_drop_top is None for row, _, _ in plain)
    assert all(row.faith_drop_top is not None and row.faith_drop_random is not None for row, _, _ in measured)
    assert [row.probabilities for row, _, _ in plain] == [row.probabilities for row, _, _ in measured]


@pytest.mark.parametrize("asked, engine, images, expected", [
    ("auto", "local", 3, "eager"),          # too few images to pay for ONNX Runtime's start
    ("auto", "local", 10_000, "onnx"),      # (make_forward falls back to eager without onnxruntime)
    ("eager", "local", 10_000, "eager"),
    ("onnx", "local", 3, "onnx"),
    ("onnx", "ray", 3, "onnx"),             # the actors run onnx when it is asked for by name
    ("auto", "ray", 10_000, "eager"),       # and only then
])
def test_the_model_step_is_chosen_in_one_place(asked, engine, images, expected, tiny_model, tmp_path):
    config = ScanConfig(root=tmp_path, out=tmp_path / "report", backend=asked, engine=engine)
    assert backend_for(config, load_checkpoint(tiny_model), torch.device("cpu"), None, images) == expected
