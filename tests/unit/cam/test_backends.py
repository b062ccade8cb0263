"""The exact path's model step through ONNX Runtime: equal outputs, a cache that is never trusted blindly."""
from __future__ import annotations

import pytest
import torch

from batchcam.cam import backends
from batchcam.cam.backends import (
    AUTO_MIN_IMAGES,
    EagerForward,
    OnnxForward,
    cache_key,
    choose_backend,
    make_forward,
    model_cache,
)
from batchcam.cam.engine import TARGET_LAYER, CamEngine
from batchcam.errors import UsageError
from batchcam.model.checkpoint import build_model

onnxruntime = pytest.importorskip("onnxruntime")
SIZE = 64
SHA = "ab" * 32
CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(2, 0.5).eval()


def onnx_engine(model: torch.nn.Module, sha: str = SHA, log=lambda message: None) -> CamEngine:
    forward = make_forward("onnx", model, TARGET_LAYER, sha, SIZE, explicit=True, log=log)
    assert isinstance(forward, OnnxForward)
    return CamEngine(model, forward=forward)


def test_onnx_engine_gives_eager_probabilities_targets_and_cam_peaks(private_model_cache):
    model = tiny_model()
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with CamEngine(model) as engine:
        expected = engine(x)
    with onnx_engine(model) as engine:
        assert engine.backend == "onnx"
        actual = engine(x)
    assert (actual.probabilities - expected.probabilities).abs().max() < 1e-4
    assert actual.targets.tolist() == expected.targets.tolist()
    assert actual.cams.shape == expected.cams.shape
    assert (actual.cams - expected.cams).abs().max() <= 1e-4 * expected.cams.max()
    assert actual.cams.flatten(1).argmax(1).tolist() == expected.cams.flatten(1).argmax(1).tolist()


def test_the_export_is_cached_once_and_read_back_without_exporting(private_model_cache, monkeypatch):
    model = tiny_model()
    onnx_engine(model)
    key = cache_key(SHA, TARGET_LAYER, SIZE, onnxruntime.__version__)
    cached = list(private_model_cache.glob(f"{key}-*.onnx"))
    assert len(cached) == 1
    monkeypatch.setattr(backends, "export_onnx", lambda *args: pytest.fail("exported again"))
    onnx_engine(model)
    assert list(private_model_cache.glob(f"{key}-*.onnx")) == cached


def test_a_corrupt_cache_file_is_removed_and_rebuilt(private_model_cache):
    model = tiny_model()
    onnx_engine(model)
    (cached,) = private_model_cache.glob(f"{cache_key(SHA, TARGET_LAYER, SIZE, onnxruntime.__version__)}-*.onnx")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data[: len(data) - 100]))
    x = torch.randn(2, 3, SIZE, SIZE)
    with onnx_engine(model) as engine, CamEngine(model) as eager:
        assert (engine(x).probabilities - eager(x).probabilities).abs().max() < 1e-4
    assert cached.read_bytes() != bytes(data[: len(data) - 100])  # the sound export took its place


def test_a_stale_cache_holding_other_weights_is_rebuilt_not_trusted(private_model_cache):
    """A well-formed export of other weights under this key (a checkpoint rewritten in place, say)
    fails the probe comparison with eager PyTorch and is replaced."""
    onnx_engine(tiny_model(seed=1))                     # cached under SHA with the wrong weights
    model = tiny_model(seed=0)
    logged = []
    x = torch.randn(3, 3, SIZE, SIZE)
    with onnx_engine(model, log=logged.append) as engine, CamEngine(model) as eager:
        assert (engine(x).probabilities - eager(x).probabilities).abs().max() < 1e-4
    assert any("exporting it again" in line for line in logged)


def test_without_onnxruntime_auto_falls_back_to_eager_with_a_log_line_and_explicit_is_refused(monkeypatch):
    monkeypatch.setattr(backends, "onnxruntime_version", lambda: None)
    logged = []
    forward = make_forward("onnx", tiny_model(), TARGET_LAYER, SHA, SIZE, log=logged.append)
    assert isinstance(forward, EagerForward)
    assert "onnxruntime is not installed" in logged[0]
    with pytest.raises(UsageError, match="onnxruntime is not installed"):
        make_forward("onnx", tiny_model(), TARGET_LAYER, SHA, SIZE, explicit=True)


def test_auto_takes_onnx_only_for_long_exact_fp32_cpu_runs():
    assert choose_backend("auto", CPU, exact=True, autocast=None, images=AUTO_MIN_IMAGES) == "onnx"
    assert choose_backend("auto", CPU, exact=True, autocast=None, images=AUTO_MIN_IMAGES - 1) == "eager"
    assert choose_backend("auto", CPU, exact=False, autocast=None, images=10_000) == "eager"
    assert choose_backend("auto", torch.device("cuda"), exact=True, autocast=None, images=10_000) == "eager"
    assert choose_backend("eager", CPU, exact=True, autocast=None, images=10_000) == "eager"
    assert choose_backend("onnx", CPU, exact=True, autocast=None, images=1) == "onnx"
    with pytest.raises(UsageError, match="--backend onnx runs the exact gradcam path"):
        choose_backend("onnx", CPU, exact=False, autocast=None, images=1)
    with pytest.raises(UsageError, match="--backend onnx"):
        choose_backend("onnx", CPU, exact=True, autocast=torch.bfloat16, images=1)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHCAM_CACHE_DIR", str(tmp_path / "mine"))
    assert model_cache() == tmp_path / "mine"
    monkeypatch.delenv("BATCHCAM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache() == tmp_path / "xdg" / "batchcam"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache() == tmp_path / "home" / ".cache" / "batchcam"
