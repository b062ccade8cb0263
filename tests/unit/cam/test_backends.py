"""The exact path's model step through ONNX Runtime: equal outputs, a cache that is never trusted blindly."""
from __future__ import annotations

import functools
import hashlib
import os

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
from batchcam.cam.explainer import CamExplainer
from batchcam.errors import UsageError
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.checkpoint import build_model
from tests.onnx_tamper import plant, tampered_export

TARGET_LAYER = ARCHITECTURES["resnet18"].target_layer   # the tiny models here are ResNet18s

onnxruntime = pytest.importorskip("onnxruntime")
SIZE = 64
SHA = "ab" * 32
CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(2, 0.5).eval()


@functools.cache
def sound_export(seed: int = 0) -> bytes:
    """What batchcam exports for ``tiny_model(seed)`` (made once per seed: an export takes seconds), for the
    tests whose point is a cache file already there."""
    model = tiny_model(seed)
    return backends.export_onnx(model, TARGET_LAYER, backends.probe_batch(model, SIZE))


def onnx_engine(model: torch.nn.Module, sha: str = SHA, log=lambda message: None) -> CamExplainer:
    forward = make_forward("onnx", model, TARGET_LAYER, sha, SIZE, explicit=True, log=log)
    assert isinstance(forward, OnnxForward)
    return CamExplainer(model, forward=forward)


def test_onnx_engine_gives_eager_probabilities_targets_and_cam_peaks(private_model_cache):
    model = tiny_model()
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with CamExplainer(model) as engine:
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
    plant_in_cache(private_model_cache, sound_export())
    (cached,) = private_model_cache.glob(f"{cache_key(SHA, TARGET_LAYER, SIZE, onnxruntime.__version__)}-*.onnx")
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data[: len(data) - 100]))
    x = torch.randn(2, 3, SIZE, SIZE)
    with onnx_engine(model) as engine, CamExplainer(model) as eager:
        assert (engine(x).probabilities - eager(x).probabilities).abs().max() < 1e-4
    assert cached.read_bytes() != bytes(data[: len(data) - 100])  # the sound export took its place


def test_a_stale_cache_holding_other_weights_is_rebuilt_not_trusted(private_model_cache):
    """A well-formed export of other weights under this key (a checkpoint rewritten in place, say)
    fails the probe comparison with eager PyTorch and is replaced."""
    plant_in_cache(private_model_cache, sound_export(seed=1))   # cached under SHA with the wrong weights
    model = tiny_model(seed=0)
    logged = []
    x = torch.randn(3, 3, SIZE, SIZE)
    with onnx_engine(model, log=logged.append) as engine, CamExplainer(model) as eager:
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


# ---- a cache file is code batchcam runs ---------------------------------------------------------

@functools.cache
def tampered() -> bytes:
    """The tampered export of ``tiny_model()`` (made once: it takes a few seconds)."""
    return tampered_export(tiny_model(), SIZE)


def plain_session_outputs(data: bytes, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits, activations = session.run(None, {"x": x.numpy()})
    return torch.from_numpy(logits), torch.from_numpy(activations)


def xray_batch(count: int = 4) -> torch.Tensor:
    """Synthetic X-rays as the model sees them (smooth, unlike the probe's noise)."""
    import numpy as np

    from batchcam.decode.imaging import resize_square
    from batchcam.model.checkpoint import ModelSpec, model_input
    from batchcam.synthetic import generate

    views = [resize_square(generate(i, ("NORMAL", "PNEUMONIA")[i % 2], (96, 80)).image.convert("L"), SIZE)
             for i in range(count)]
    return model_input(torch.from_numpy(np.stack(views)),
                       ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=SIZE))


def plant_in_cache(cache, data: bytes):
    return plant(cache, SHA, SIZE, data)


def test_a_tampered_cache_file_that_passes_the_probe_changes_no_prediction(private_model_cache):
    model = tiny_model()
    plant_in_cache(private_model_cache, tampered())
    probe, x = backends.probe_batch(model, SIZE), xray_batch()
    with EagerForward(model, model.layer4) as eager:
        on_probe, on_xrays = eager(probe), eager(x)
    assert backends.outputs_equal(*plain_session_outputs(tampered(), probe), *on_probe), \
        "the tampered file must pass the noise probe, or this test proves nothing"
    assert not torch.equal(plain_session_outputs(tampered(), x)[0].argmax(1), on_xrays[0].argmax(1))
    with CamExplainer(model) as reference:
        expected = reference(x)
    logged = []
    with onnx_engine(model, log=logged.append) as engine:
        actual = engine(x)
        assert engine.backend == "eager" and engine.forward.file_sha256 is None
    assert actual.targets.tolist() == expected.targets.tolist()
    assert (actual.probabilities - expected.probabilities).abs().max() < 1e-6
    assert any("disagrees with PyTorch on the run's first batch" in line for line in logged)


def test_a_sound_cache_file_is_checked_on_the_first_batch_and_named_by_its_digest(private_model_cache):
    model = tiny_model()
    plant_in_cache(private_model_cache, sound_export())
    (cached,) = private_model_cache.glob("*.onnx")
    x = xray_batch()
    with onnx_engine(model) as engine, CamExplainer(model) as eager:
        assert (engine(x).probabilities - eager(x).probabilities).abs().max() < 1e-4
        assert engine.backend == "onnx" and engine.forward.checked
        assert engine.forward.file_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


@pytest.mark.parametrize("exposure", ["world-writable folder", "folder of another user", "group-writable file"])
def test_a_cache_others_can_write_is_neither_read_nor_written(private_model_cache, exposure):
    """As ssh refuses a key file others could have written: the planted file is never loaded; the
    model is exported for the run alone."""
    model = tiny_model()
    planted = plant_in_cache(private_model_cache, tampered())
    original = planted.read_bytes()
    nobody = 65534
    if exposure == "world-writable folder":
        private_model_cache.chmod(0o777)
    elif exposure == "folder of another user":
        os.chown(private_model_cache, nobody, nobody)
    else:
        planted.chmod(0o664)
    logged = []
    loaded = []
    real_checked_session = backends.checked_session

    def recording(data, *args, **kwargs):
        loaded.append(data)
        return real_checked_session(data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "checked_session", recording)
        forward = make_forward("onnx", model, TARGET_LAYER, SHA, SIZE, explicit=True, log=logged.append)
    assert len(loaded) == 1 and loaded[0] != original                   # only the fresh export was ever loaded
    assert isinstance(forward, OnnxForward) and forward.file_sha256 != hashlib.sha256(original).hexdigest()
    assert planted.read_bytes() == original
    if "folder" in exposure:
        assert [p.name for p in private_model_cache.iterdir()] == [planted.name]     # nothing cached there
        assert any("is not used" in line and "chmod go-w" in line for line in logged)
    else:
        assert any(f"cached ONNX model {planted.name} not used" in line for line in logged)
