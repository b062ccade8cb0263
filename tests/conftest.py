"""Shared fixtures: tiny models and tiny synthetic X-ray folders, made fresh in temporary folders."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from batchcam.model.checkpoint import ModelSpec, build_model, save_checkpoint
from batchcam.synthetic import generate

TINY_SIZE = 64  # model input for fast tests; the checkpoint carries it, so scan uses it too


def tiny_checkpoint(path: Path, dropout: float = 0.0, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model(2, dropout).eval()
    save_checkpoint(path, model, ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=TINY_SIZE,
                                           dropout=dropout))
    return path


@pytest.fixture(autouse=True)
def private_model_cache(tmp_path_factory, monkeypatch) -> Path:
    """Built models (scan --backend onnx) go to a temporary cache, never the real ~/.cache/batchcam;
    scans the tests start in subprocesses inherit it."""
    cache = tmp_path_factory.mktemp("model-cache")
    monkeypatch.setenv("BATCHCAM_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op torch thread for a module's tests, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised ResNet18 checkpoint with a 64 px input."""
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


def write_xrays(folder: Path, count: int = 4, size: tuple[int, int] = (160, 128), start_seed: int = 0,
                suffix: str = ".png") -> list[Path]:
    """A few small synthetic X-rays, alternating classes, in class-named subfolders."""
    paths = []
    for i in range(count):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        path = folder / label / f"img{i:02d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        generate(start_seed + i, label, size).image.save(path)
        paths.append(path)
    return paths


@pytest.fixture
def xray_folder(tmp_path) -> Path:
    root = tmp_path / "xrays"
    write_xrays(root)
    return root


@pytest.fixture
def model_calls(monkeypatch) -> list[int]:
    """Counts images through the model (CamExplainer calls), however the engine is built."""
    from batchcam.cam import explainer

    calls: list[int] = []
    original = explainer.CamExplainer.__call__

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(explainer.CamExplainer, "__call__", counting)
    return calls


@pytest.fixture(scope="session")
def public_dicom():
    """``public_dicom(name)``: the path of one of pydicom-data's public test films (``RG1_UNCR.dcm``,
    the CR chest PA film; ``RG3_UNCR.dcm``, a CR tibia; CT, MR, US files). Skipped without the
    test extra's pydicom-data, or without pydicom and pylibjpeg to decode it."""
    data_store = pytest.importorskip("data_store", reason="pydicom-data (the test extra) is not installed")
    pytest.importorskip("pydicom", reason="pydicom (the dicom extra) is not installed")
    pytest.importorskip("pylibjpeg", reason="pylibjpeg (the dicom extra) is not installed")
    folder = Path(data_store.__file__).parent / "data"

    def path(name: str) -> Path:
        if not (folder / name).is_file():
            pytest.skip(f"{name} is not in this pydicom-data")
        return folder / name

    return path


@contextlib.contextmanager
def lock_held_elsewhere(report: Path) -> Iterator[None]:
    """REPORT's lock held by another process (as a running scan holds it) until the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom batchcam.report.lock import ReportLock\n"
                               "with ReportLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(report)], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
