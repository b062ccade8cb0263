"""The performance options keep results: overlay size, autocast, torch.compile, batched JPEG decoding;
and the allocator setting does what it is for.

The batched decoder runs here on the CPU (torchvision's decode_jpeg takes either device); the
CUDA runs skip cleanly without a GPU.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import rows_by_path
from PIL import Image

from batchcam.cam.explainer import CamExplainer
from batchcam.cli import main
from batchcam.decode.dataset import Sample, ScanDataset, collate_samples, decode_sample
from batchcam.decode.discover import discover
from batchcam.decode.gpu_decode import BatchedJpegDecoder, can_defer
from batchcam.model.checkpoint import file_sha256, load_checkpoint, model_input
from batchcam.resources import DEMO_MODEL
from batchcam.runtime.allocator import keep_freed_memory
from batchcam.synthetic import generate
from conftest import write_xrays

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(DEMO_MODEL, demo=True)


def results(report):
    """The rows by path, without ``first_seen`` (when this report first saw the file), which differs
    between two reports of the same files made a second apart."""
    return {path: {k: v for k, v in row.items() if k != "first_seen"} for path, row in rows_by_path(report).items()}


PAGE_FAULTS_OF_A_FORWARD_PASS = textwrap.dedent("""
    import resource, sys, torch, torchvision
    from batchcam.runtime.allocator import keep_freed_memory
    torch.set_num_threads(1)  # one arena: what is measured is the setting, not thread scheduling
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    model, x = torchvision.models.resnet18(num_classes=2).eval(), torch.randn(16, 3, 224, 224)
    faults = []
    with torch.inference_mode():
        for _ in range(4):  # the first two batches grow the heap; the steady state is what a scan lives in
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(min(faults[2:]))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; left alone elsewhere")
def test_keeping_freed_memory_spares_the_next_batch_most_page_faults():
    def faults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_A_FORWARD_PASS, mode],
                              capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    assert keep_freed_memory()
    plain, tuned = faults("plain"), faults("tuned")
    assert tuned < plain / 2, (plain, tuned)  # measured: 44,000-67,000 against about 12,500


def test_only_plain_upright_complete_jpegs_are_deferred():
    gray = generate(1, "NORMAL", (300, 260)).image
    plain = jpeg_bytes(gray)
    assert can_defer(plain)
    assert can_defer(jpeg_bytes(gray.convert("RGB")))
    assert not can_defer(plain[:-200])                              # truncated: the CPU decoder says so
    assert not can_defer(jpeg_bytes(gray.convert("CMYK")))
    exif = Image.Exif()
    exif[0x0112] = 6
    assert not can_defer(jpeg_bytes(gray, exif=exif.tobytes()))     # rotated: the CPU decoder turns it
    png = io.BytesIO()
    gray.save(png, format="PNG")
    assert not can_defer(png.getvalue())


def test_batched_decoding_matches_the_cpu_decoder(tmp_path, demo):
    root = tmp_path / "xrays"
    write_xrays(root, count=6, size=(700, 560), suffix=".jpg")
    candidates = discover(root).candidates
    dataset = ScanDataset(candidates, demo.spec.image_size, 512, can_defer=can_defer)
    deferred = [dataset[i] for i in range(len(dataset))]
    assert all(sample.encoded is not None and sample.model_view is None for sample in deferred)
    decoder = BatchedJpegDecoder(torch.device("cpu"), demo.spec.image_size, 512, dataset.decode_deferred)
    samples, views = decoder(deferred)
    reference, reference_views = collate_samples(
        [decode_sample(c.relpath, c.path.read_bytes(), demo.spec.image_size, 512) for c in candidates])
    for sample, expected in zip(samples, reference):
        assert sample.ok and sample.encoded is None and sample.sha256 == expected.sha256
        assert (sample.width, sample.height) == (expected.width, expected.height)
        assert sample.display.shape == expected.display.shape
        assert np.abs(sample.model_view.astype(int) - expected.model_view).mean() < 1.5
        assert sample.lung_fields is not None
    with CamExplainer(demo.model) as engine:
        batched = engine(model_input(views, demo.spec))
        plain = engine(model_input(reference_views, demo.spec))
    assert torch.equal(batched.probabilities.argmax(1), plain.probabilities.argmax(1))
    assert (batched.probabilities - plain.probabilities).abs().max() < 0.02


def test_a_jpeg_the_batched_decoder_rejects_gets_the_cpu_decoders_row(tmp_path):
    good = jpeg_bytes(generate(3, "NORMAL", (300, 260)).image)
    rejected = b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9"
    samples = [Sample(relpath="good.jpg", sha256="a", encoded=good, size=len(good)),
               Sample(relpath="bad.jpg", sha256="b", encoded=rejected, size=len(rejected))]
    dataset = ScanDataset([], 64, 512)
    samples, views = BatchedJpegDecoder(torch.device("cpu"), 64, 512, dataset.decode_deferred)(samples)
    assert samples[0].ok and views.shape == (1, 64, 64)
    expected = decode_sample("bad.jpg", rejected, 64, 512)
    assert not samples[1].ok and samples[1].error == expected.error and samples[1].size == len(rejected)


def test_autocast_computes_the_map_in_float32_close_to_fp32(demo):
    x = model_input(torch.from_numpy(np.stack([np.asarray(generate(s, "PNEUMONIA", (224, 224)).image)
                                             for s in range(4)])), demo.spec)
    with CamExplainer(demo.model) as engine:
        fp32 = engine(x)
    with CamExplainer(demo.model, autocast=torch.bfloat16) as engine:
        bf16 = engine(x)
    assert bf16.cams.dtype == torch.float32 and bf16.probabilities.dtype == torch.float32
    assert torch.equal(bf16.targets, fp32.targets)
    assert (bf16.cams - fp32.cams).abs().max() <= 0.05 * fp32.cams.max()


def test_overlay_size_caps_the_overlays_and_is_part_of_the_settings(tiny_model, tmp_path):
    root = tmp_path / "xrays"
    write_xrays(root, count=2, size=(900, 700))
    report = tmp_path / "report"
    common = ["--model", str(tiny_model), "--workers", "0", "--quiet"]
    assert main(["scan", str(root), "--out", str(report), "--overlay-size", "300", *common]) == 0
    for row in results(report).values():
        assert max(Image.open(report / row["overlay"]).size) == 300
    assert main(["scan", str(root), "--out", str(report), *common]) == 0     # the default size: redone
    for row in results(report).values():
        assert max(Image.open(report / row["overlay"]).size) == 512


@pytest.mark.parametrize("options, message", [
    (["--overlay-size", "100"], "--overlay-size must be between"),
    (["--decode", "gpu", "--device", "cpu"], "--decode gpu needs a CUDA device"),
    (["--backend", "onnx", "--cam", "gradcam++"], "--backend onnx runs the exact gradcam path"),
    (["--backend", "onnx", "--compile"], "--compile and --backend onnx both build the model step"),
])
def test_bad_performance_options_exit_2(tiny_model, xray_folder, tmp_path, capsys, options, message):
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "r"), "--model", str(tiny_model),
                 *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_onnx_backend_gives_the_eager_rows_and_the_manifest_says_which_ran(tiny_model, tmp_path,
                                                                              private_model_cache):
    pytest.importorskip("onnxruntime")
    root = tmp_path / "xrays"
    write_xrays(root, count=6, size=(300, 240))
    common = ["--model", str(tiny_model), "--workers", "0", "--quiet"]
    assert main(["scan", str(root), "--out", str(tmp_path / "eager"), "--backend", "eager", *common]) == 0
    assert main(["scan", str(root), "--out", str(tmp_path / "onnx"), "--backend", "onnx", *common]) == 0
    eager, onnx = results(tmp_path / "eager"), results(tmp_path / "onnx")
    assert eager.keys() == onnx.keys()
    for path, row in eager.items():
        assert row["prediction"] == onnx[path]["prediction"]
        assert abs(float(row["p_PNEUMONIA"]) - float(onnx[path]["p_PNEUMONIA"])) < 1e-4
        assert (row["cam_peak_x"], row["cam_peak_y"]) == (onnx[path]["cam_peak_x"], onnx[path]["cam_peak_y"])
        assert abs(float(row["attention_outside"]) - float(onnx[path]["attention_outside"])) < 1e-4
        assert row["attention_flag"] == onnx[path]["attention_flag"]
    eager_cam = json.loads((tmp_path / "eager" / "manifest.json").read_text())["cam"]
    onnx_cam = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["cam"]
    assert (eager_cam["backend"], eager_cam["backend_file_sha256"]) == ("eager", None)
    (cached,) = private_model_cache.glob("*.onnx")
    assert (onnx_cam["backend"], onnx_cam["backend_file_sha256"]) == ("onnx", file_sha256(cached))


def test_a_tampered_onnx_cache_file_flips_no_prediction(tiny_model, tmp_path, private_model_cache):
    """The tester's file: it passes the noise probe and swaps the logits on every X-ray. The run's first
    batch is compared with PyTorch, so the run falls back to eager and says so."""
    pytest.importorskip("onnxruntime")
    from tests.onnx_tamper import plant, tampered_export

    loaded = load_checkpoint(tiny_model)
    plant(private_model_cache, loaded.sha256, loaded.spec.image_size,
          tampered_export(loaded.model, loaded.spec.image_size))
    root = tmp_path / "xrays"
    write_xrays(root, count=6, size=(300, 240))
    common = ["--model", str(tiny_model), "--workers", "0", "--quiet"]
    assert main(["scan", str(root), "--out", str(tmp_path / "eager"), "--backend", "eager", *common]) == 0
    assert main(["scan", str(root), "--out", str(tmp_path / "onnx"), "--backend", "onnx", *common]) == 0
    eager, onnx = results(tmp_path / "eager"), results(tmp_path / "onnx")
    assert {path: row["prediction"] for path, row in onnx.items()} == \
        {path: row["prediction"] for path, row in eager.items()}
    cam = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["cam"]
    assert (cam["backend"], cam["backend_file_sha256"]) == ("eager", None)
    assert "disagrees with PyTorch on the run's first batch" in (tmp_path / "onnx" / "batchcam.log").read_text()


def test_overlays_drawn_as_tensors_match_pillows_rows_and_pixels(tiny_model, tmp_path, monkeypatch):
    """The tensor renderer a CUDA scan uses, run on the CPU through the whole scan."""
    from batchcam.engines import local

    root = tmp_path / "xrays"
    write_xrays(root, count=5, size=(700, 560))
    common = ["--model", str(tiny_model), "--workers", "0", "--quiet"]
    assert main(["scan", str(root), "--out", str(tmp_path / "pillow"), *common]) == 0
    monkeypatch.setattr(local, "render_device", lambda job: torch.device("cpu"))
    assert main(["scan", str(root), "--out", str(tmp_path / "tensor"), *common]) == 0
    pillow, tensor = results(tmp_path / "pillow"), results(tmp_path / "tensor")
    assert pillow == tensor
    for row in pillow.values():
        for name in (row["overlay"], row["overlay"].replace(".jpg", ".thumb.jpg")):
            a = np.asarray(Image.open(tmp_path / "pillow" / name).convert("RGB"), dtype=np.int32)
            b = np.asarray(Image.open(tmp_path / "tensor" / name).convert("RGB"), dtype=np.int32)
            assert a.shape == b.shape
            assert np.abs(a - b).mean() < 1.5


def test_a_small_scan_stays_eager_by_default(tiny_model, xray_folder, tmp_path):
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "r"), "--model", str(tiny_model),
                 "--workers", "0", "--quiet"]) == 0
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["cam"]["backend"] == "eager"


def test_an_explicit_onnx_backend_without_onnxruntime_is_exit_2_before_report_is_written(
        tiny_model, xray_folder, tmp_path, capsys, monkeypatch):
    from batchcam.cam import backends

    monkeypatch.setattr(backends, "onnxruntime_version", lambda: None)
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "r"), "--model", str(tiny_model),
                 "--backend", "onnx"]) == 2
    assert "onnxruntime is not installed" in capsys.readouterr().err
    assert not (tmp_path / "r" / "predictions.csv").exists()


@pytest.mark.slow
def test_a_compiled_model_gives_the_same_rows(tiny_model, xray_folder, tmp_path):
    common = ["--model", str(tiny_model), "--workers", "0", "--quiet"]
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "eager"), *common]) == 0
    assert main(["scan", str(xray_folder), "--out", str(tmp_path / "compiled"), "--compile", *common]) == 0
    eager, compiled = results(tmp_path / "eager"), results(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for path, row in eager.items():
        assert row["prediction"] == compiled[path]["prediction"]
        assert abs(float(row["confidence"]) - float(compiled[path]["confidence"])) < 1e-4
        assert (row["cam_peak_x"], row["cam_peak_y"]) == (compiled[path]["cam_peak_x"], compiled[path]["cam_peak_y"])


@cuda
@pytest.mark.parametrize("options", [["--decode", "gpu"], ["--precision", "auto"], ["--compile"]])
def test_the_cuda_paths_agree_with_the_cpu(tmp_path, options):
    root = tmp_path / "xrays"
    write_xrays(root, count=8, size=(900, 760), suffix=".jpg")
    assert main(["scan", str(root), "--out", str(tmp_path / "cpu"), "--device", "cpu", "--quiet"]) == 0
    assert main(["scan", str(root), "--out", str(tmp_path / "cuda"), "--device", "cuda", "--quiet", *options]) == 0
    cpu, gpu = results(tmp_path / "cpu"), results(tmp_path / "cuda")
    for path, row in cpu.items():
        assert row["prediction"] == gpu[path]["prediction"]
        assert abs(float(row["confidence"]) - float(gpu[path]["confidence"])) < 0.02
