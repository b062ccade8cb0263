"""How fast is `batchcam scan`, against the ceiling and the alternatives, on the same images?

    python benchmarks/bench_scan.py                 # 256 JPEGs of 1024-2048 px, 3 repeats
    python benchmarks/bench_scan.py --format png --images 128 --repeats 1
    python benchmarks/bench_scan.py --rss 200,5000  # peak RSS of scans of 200 and 5,000 images

Measures, in one run, on the same images and the bundled demo checkpoint:
  1. ceiling: the model's forward pass alone in eager PyTorch on pre-decoded tensors (batch 32,
     channels_last); next to it the exact path's model step in ONNX Runtime (``--backend onnx``);
  2. per-image loop: the original study's way (open, transform, pytorch-grad-cam GradCAM,
     show_cam_on_image, save), one image at a time;
  3. library batches: pytorch-grad-cam GradCAM on DataLoader batches, writing overlays;
  4. batchcam scan end to end (CSV, overlays, gallery), in a fresh process, with default flags
     (its model cache in a temporary folder: the first repeat exports the model, the others read
     it); and the same scan with ``--backend eager``;
  5. host capacity: scan with the model step replaced by a zero-cost stand-in of the same output
     shapes (this benchmark only; never a product flag), with 1 worker and one per core, per core,
     next to pure decoding (file bytes to grayscale pixels at the scale scan decodes, one core);
and scan's decoding alone. Every method runs with the allocator setting batchcam's commands use
(``batchcam.runtime.allocator.keep_freed_memory``), so none is measured with a handicap. It prints
images/s (medians over repeats; methods interleaved within each repeat), the ratios 4/1, 4/2, 4/3,
5/pure decoding and peak memory, checks that scan's predictions (class, probability within 1e-3)
and CAM peaks agree with the library path and that ONNX Runtime's probabilities are within 1e-4 of
eager PyTorch's with identical CAM peaks, and writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from batchcam.cam.backends import make_forward
from batchcam.cam.explainer import CamExplainer
from batchcam.config import OVERLAY_LONG_SIDE
from batchcam.decode.dataset import ScanDataset, collate_samples
from batchcam.decode.discover import discover
from batchcam.decode.imaging import DECODE_MIN_LONG_SIDE, decode_grayscale, resize_square
from batchcam.model.calibration import scaled_probabilities
from batchcam.model.checkpoint import load_checkpoint, model_input
from batchcam.resources import DEMO_MODEL
from batchcam.runtime.allocator import keep_freed_memory
from batchcam.synthetic import generate

HERE = Path(__file__).resolve().parent
BATCH = 32
SMALL_SCAN = 16  # images of the start-up measurement


def make_images(folder: Path, count: int, fmt: str) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        size = (int(rng.integers(1024, 2049)), int(rng.integers(1024, 2049)))
        path = folder / label / f"x{i:04d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = generate(50_000 + i, label, size).image
        image.save(path, quality=90) if fmt == "jpg" else image.save(path)
        paths.append(path)
    return paths


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def forward_only(loaded, tensors: list[torch.Tensor]) -> None:
    model = loaded.model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for batch in tensors:
            model(batch)


def onnx_forward(loaded):
    """The exact path's model step in ONNX Runtime, as ``--backend onnx`` builds it (cache included)."""
    model = loaded.model.to(memory_format=torch.channels_last)
    return make_forward("onnx", model, loaded.target_layer, loaded.sha256, loaded.spec.image_size, explicit=True)


def forward_steps(forward, tensors: list[torch.Tensor]) -> None:
    with forward:
        for batch in tensors:
            forward(batch)


def backend_agreement(loaded, forward, tensors: list[torch.Tensor]) -> dict:
    """ONNX Runtime against eager PyTorch through CamExplainer: largest probability difference, same peaks."""
    model = loaded.model.to(memory_format=torch.channels_last)
    largest, same_peaks, images = 0.0, 0, 0
    with CamExplainer(model) as eager, CamExplainer(model, forward=forward) as fast:
        for batch in tensors:
            expected, actual = eager(batch), fast(batch)
            largest = max(largest, float((expected.probabilities - actual.probabilities).abs().max()))
            same_peaks += int((expected.cams.flatten(1).argmax(1) == actual.cams.flatten(1).argmax(1)).sum())
            images += batch.shape[0]
    return {"images": images, "largest_probability_difference": largest, "same_peaks": same_peaks}


def pure_decoding(paths: list[Path]) -> None:
    """File bytes to grayscale pixels at the scale scan decodes, nothing else, on one core."""
    for path in paths:
        decode_grayscale(path.read_bytes(), min_long_side=max(DECODE_MIN_LONG_SIDE, OVERLAY_LONG_SIDE))


def per_image_loop(loaded, paths: list[Path], out: Path) -> None:
    """The original study's notebook: one image at a time, full Grad-CAM with a backward pass."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, spec = loaded.model, loaded.spec
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        image = Image.open(path).convert("RGB")
        rgb = np.asarray(image.resize((spec.image_size, spec.image_size)), dtype=np.float32) / 255
        x = torch.from_numpy((rgb - np.array(spec.mean)) / np.array(spec.std)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            predicted = int(model(x).argmax())
        with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(predicted)])[0]
        Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True)).save(out / f"{path.stem}.jpg")


class Decoded(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        gray = decode_grayscale(self.paths[i].read_bytes()).gray
        return torch.from_numpy(resize_square(gray, self.size).copy()), i


def library_batches(loaded, paths: list[Path], out: Path, workers: int) -> dict[str, tuple[int, int, int, float]]:
    """pytorch-grad-cam on DataLoader batches, overlays at 224 written per image.

    Returns, per path: predicted class, CAM peak (x, y) at 224 px, and P(class 1) at the checkpoint's
    temperature: the plain
    path's results (full decode, float32, backward-pass Grad-CAM) that scan must agree with.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    out.mkdir(parents=True, exist_ok=True)
    model, spec = loaded.model, loaded.spec
    results = {}
    loader = DataLoader(Decoded(paths, spec.image_size), batch_size=BATCH, num_workers=workers)
    for gray, indices in loader:
        x = model_input(gray, spec)
        with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
            heats = cam(input_tensor=x, targets=None)
            predictions = cam.outputs.argmax(1).tolist()
            # what batchcam reports: the softmax of the logits over the checkpoint's temperature
            positives = scaled_probabilities(cam.outputs.float(), loaded.temperature)[:, 1].tolist()
        for heat, g, i, p, positive in zip(heats, gray.numpy(), indices.tolist(), predictions, positives):
            rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32) / 255
            Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True)).save(out / f"{paths[i].stem}.jpg")
            y, x_ = np.unravel_index(np.argmax(heat), heat.shape)
            results[paths[i].relative_to(paths[i].parents[1]).as_posix()] = (p, int(x_), int(y), positive)
    return results


# Benchmark only: commands/scan/run.py's backend factory replaced by a model step that costs nothing and gives
# outputs of the model's shapes (logits, 512 x 7 x 7 activations), to measure what the CPUs can feed.
ZERO_COST_MODEL = """
import torch
from batchcam.commands.scan import run as scan_run

class ZeroCostForward:
    name = "zero-cost stand-in"
    logits = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    activations = torch.rand(4096, 512, 7, 7, generator=torch.Generator().manual_seed(1))
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        pass
    def __call__(self, x):
        return self.logits[: x.shape[0]], self.activations[: x.shape[0]]

scan_run.make_forward = lambda *args, **kwargs: ZeroCostForward()
"""


def scan_process(root: Path, out: Path, workers: int, options: tuple[str, ...] = (), env: dict | None = None,
                 zero_cost_model: bool = False) -> tuple[float, float]:
    """Wall seconds of the scan itself (from its manifest) and its main process's peak RSS in MB.

    The peak is VmHWM from /proc: ru_maxrss would be wrong here, since Linux carries it across
    execve from this (larger) benchmark process into the child.
    """
    command = [sys.executable, "-c", (ZERO_COST_MODEL if zero_cost_model else "") +
               "import sys\nfrom batchcam.cli import main\n"
               "code = main(sys.argv[1:])\n"
               "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
               "print('PEAK_RSS_KB', hwm, flush=True)\n"
               "raise SystemExit(code)", "scan", str(root), "--out", str(out), "--full", "--quiet",
               "--workers", str(workers), *options]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"scan failed ({done.returncode}): {done.stderr[-2000:]}")
    peak_kb = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    return json.loads((out / "manifest.json").read_text())["timings"]["seconds"], peak_kb / 1024


def decode_only(loaded, root: Path, workers: int) -> None:
    """scan's own decoding (read, hash, decode, model view, display copy, lung fields), nothing else."""
    dataset = ScanDataset(discover(root).candidates, loaded.spec.image_size)
    for _ in DataLoader(dataset, batch_size=BATCH, num_workers=workers, collate_fn=collate_samples):
        pass


def small_folder(paths: list[Path], folder: Path) -> Path:
    """Hard links to a few of the images, in their class folders: the start-up measurement's ROOT."""
    for path in paths:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return folder


def rss_scaling(work: Path, counts: list[int], workers: int) -> list[tuple[int, float, float]]:
    """(images, seconds, peak RSS MB) of scans of ``counts`` images: hard links to a pool of distinct
    synthetic X-rays, so 5,000 files cost no generation time (each is still read, decoded, written)."""
    pool = make_images(work / "pool", min(counts), "jpg")
    measured = []
    for count in counts:
        folder = work / f"rss-{count}"
        for i in range(count):
            source = pool[i % len(pool)]
            target = folder / source.parent.name / f"c{i:05d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
        seconds, peak = scan_process(folder, work / f"rss-report-{count}", workers)
        measured.append((count, seconds, peak))
        print(f"{count} images: {seconds:.0f} s, peak RSS {peak:.0f} MB", flush=True)
    return measured


def agreement(report: Path, library: dict, image_size: int) -> dict:
    """Same class, P(PNEUMONIA) within 1e-3, CAM peaks within one layer4 cell (the library's is at 224 px)."""
    rows = list(csv.DictReader(open(report / "predictions.csv", newline="")))
    same_class = peaks_close = 0
    largest_difference = 0.0
    for row in rows:
        predicted, x224, y224, positive = library[row["path"]]
        same_class += ["NORMAL", "PNEUMONIA"][predicted] == row["prediction"]
        largest_difference = max(largest_difference, abs(float(row["p_PNEUMONIA"]) - positive))
        cell_x, cell_y = int(row["width"]) / 7, int(row["height"]) / 7
        x = (x224 + 0.5) * int(row["width"]) / image_size
        y = (y224 + 0.5) * int(row["height"]) / image_size
        peaks_close += abs(x - int(row["cam_peak_x"])) <= cell_x and abs(y - int(row["cam_peak_y"])) <= cell_y
    return {"images": len(rows), "same_class": same_class, "peaks_within_one_cell": peaks_close,
            "largest_probability_difference": largest_difference}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic X-rays to generate")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="file format of the images")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; medians are reported")
    parser.add_argument("--loop-images", type=int, default=64,
                        help="images for the per-image loop (it is slow; its rate is per image anyway)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for 3 and 4")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="Markdown file to write")
    parser.add_argument("--rss", type=lambda text: [int(n) for n in text.split(",")], default=None,
                        metavar="N,N", help="instead: peak RSS of scans of these many images (e.g. 200,5000)")
    parser.add_argument("--gpu", action="store_true",
                        help="instead: the CUDA section (benchmarks/gpu_check.sh): ceiling with autocast, scan with "
                        "CPU and with GPU decoding, host capacity")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every batchcam command does: the ceiling and the baselines get it too

    work = Path(tempfile.mkdtemp(prefix="batchcam-bench-"))
    if args.rss:
        return report_rss(args, work)
    if args.gpu:
        return report_gpu(args, work)
    root = work / "images"
    print(f"generating {args.images} {args.format} images in {root} ...", flush=True)
    paths = make_images(root, args.images, args.format)
    loaded = load_checkpoint(DEMO_MODEL, demo=True)
    spec = loaded.spec
    tensors = [model_input(torch.from_numpy(np.stack([resize_square(decode_grayscale(p.read_bytes()).gray,
                                                                  spec.image_size) for p in paths[i:i + BATCH]])),
                         spec).contiguous(memory_format=torch.channels_last) for i in range(0, len(paths), BATCH)]

    importlib.import_module("pytorch_grad_cam")  # its seconds of start-up are not the loops' cost
    forward_only(loaded, tensors[:1])  # warm-up: the first batch pays for kernel selection
    os.environ["BATCHCAM_CACHE_DIR"] = str(work / "bench-cache")  # this process's own export
    cache = {"BATCHCAM_CACHE_DIR": str(work / "model-cache")}  # scan's: empty at the first repeat
    onnx = onnx_forward(loaded)
    forward_steps(onnx, tensors[:1])
    small = small_folder(paths[:SMALL_SCAN], work / "small")
    cores = os.cpu_count() or 1
    rates: dict[str, list[float]] = {key: [] for key in (
        "forward", "onnx", "decode", "loop", "library", "scan", "scan_eager", "host_1", f"host_{cores}", "pure",
        "small_scan_wall")}
    peak_rss = []
    library = {}
    for repeat in range(args.repeats):
        rates["forward"].append(len(paths) / timed(lambda: forward_only(loaded, tensors)))
        rates["onnx"].append(len(paths) / timed(lambda: forward_steps(onnx, tensors)))
        rates["decode"].append(len(paths) / timed(lambda: decode_only(loaded, root, args.workers)))
        loop_paths = paths[: args.loop_images]
        rates["loop"].append(len(loop_paths) / timed(partial(per_image_loop, loaded, loop_paths, work / "loop")))
        seconds = timed(lambda: library.update(library_batches(loaded, paths, work / "library", args.workers)))
        rates["library"].append(len(paths) / seconds)
        scan_seconds, rss = scan_process(root, work / "report", args.workers, env=cache)
        rates["scan"].append(len(paths) / scan_seconds)
        peak_rss.append(rss)
        scan_seconds, _ = scan_process(root, work / "report-eager", args.workers, ("--backend", "eager"))
        rates["scan_eager"].append(len(paths) / scan_seconds)
        for workers in sorted({1, cores}):
            scan_seconds, _ = scan_process(root, work / "report-host", workers, zero_cost_model=True)
            rates[f"host_{workers}"].append(len(paths) / scan_seconds)
        rates["pure"].append(len(paths) / timed(lambda: pure_decoding(paths)))
        rates["small_scan_wall"].append(timed(lambda: scan_process(small, work / "report-small", args.workers)))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)

    median = {k: statistics.median(v) for k, v in rates.items() if v}
    checks = agreement(work / "report", library, spec.image_size)
    fast = backend_agreement(loaded, onnx, tensors)
    backend = json.loads((work / "report" / "manifest.json").read_text())["cam"]["backend"]
    host = max(median["host_1"], median[f"host_{cores}"]) / cores
    table = [
        "| method | images/s (median) |", "|---|---|",
        f"| 1. forward pass alone, eager PyTorch (ceiling) | {median['forward']:.1f} |",
        f"| (the exact path's model step in ONNX Runtime) | {median['onnx']:.1f} |",
        f"| 2. per-image loop (original study) | {median['loop']:.1f} |",
        f"| 3. pytorch-grad-cam on batches | {median['library']:.1f} |",
        f"| 4. batchcam scan end to end, default flags (backend: {backend}) | {median['scan']:.1f} |",
        f"| (scan with --backend eager) | {median['scan_eager']:.1f} |",
        f"| (scan's decoding alone, {args.workers} worker(s)) | {median['decode']:.1f} |",
        f"| 5. scan with a zero-cost model, 1 worker | {median['host_1']:.1f} |",
        *([f"| 5. scan with a zero-cost model, {cores} workers | {median[f'host_{cores}']:.1f} |"]
          if cores > 1 else []),
        f"| pure decoding, one core | {median['pure']:.1f} |",
        "", f"A small scan ({SMALL_SCAN} images, default flags: eager) takes {median['small_scan_wall']:.1f} s "
        "of wall time, the whole command from Python's start.",
        "", "| ratio | value |", "|---|---|",
        f"| ONNX Runtime model step vs eager forward pass | {median['onnx'] / median['forward']:.2f} |",
        f"| 4/1 scan vs ceiling | {median['scan'] / median['forward']:.2f} |",
        f"| 4/2 scan vs per-image loop | {median['scan'] / median['loop']:.2f} |",
        f"| 4/3 scan vs library batches | {median['scan'] / median['library']:.2f} |",
        f"| (scan --backend eager vs ceiling) | {median['scan_eager'] / median['forward']:.2f} |",
        f"| 5: host capacity per core ({host:.1f} images/s: the better of 5 / {cores} cores) vs pure decoding "
        f"per core | {host / median['pure']:.2f} |",
        "", f"Peak RSS of the scan's main process (VmHWM): {max(peak_rss):.0f} MB.",
        f"Agreement with the library path: {checks['same_class']}/{checks['images']} same class, "
        f"{checks['peaks_within_one_cell']}/{checks['images']} CAM peaks within one layer4 cell, "
        f"largest difference in P(PNEUMONIA) {checks['largest_probability_difference']:.1e} (target: under 1e-3).",
        f"ONNX Runtime against eager PyTorch on these images: largest probability difference "
        f"{fast['largest_probability_difference']:.1e} (target: under 1e-4), {fast['same_peaks']}/{fast['images']} "
        "identical CAM peaks.",
        "Per repeat: " + "; ".join(f"{k} " + "/".join(f"{v:.1f}" for v in values) for k, values in rates.items()),
    ]
    header = (f"## scan throughput: {args.images} {args.format.upper()} images of 1024-2048 px, batch {BATCH}, "
              f"{args.workers} DataLoader worker(s), {args.repeats} repeat(s)\n\nMachine: {machine()}\n")
    print("\n" + header + "\n" + "\n".join(table))
    write_section(args.results, f"scan-{args.format}", header + "\n" + "\n".join(table) + "\n")
    return 0


def report_rss(args: argparse.Namespace, work: Path) -> int:
    measured = rss_scaling(work, args.rss, args.workers)
    lines = ["| images | scan seconds | peak RSS of the scan's main process (VmHWM) |", "|---|---|---|"]
    lines += [f"| {count} | {seconds:.0f} | {peak:.0f} MB |" for count, seconds, peak in measured]
    header = (f"## Peak memory vs number of images: JPEGs of 1024-2048 px, {args.workers} DataLoader worker(s)\n\n"
              f"Machine: {machine()}\n")
    print("\n" + header + "\n" + "\n".join(lines))
    write_section(args.results, "scan-rss", header + "\n" + "\n".join(lines) + "\n")
    return 0


def forward_on_cuda(loaded, tensors: list[torch.Tensor]) -> None:
    """The ceiling on the GPU: bf16 autocast (fp16 where bf16 is unsupported), as scan's --precision auto."""
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for batch in tensors:
            loaded.model(batch)
    torch.cuda.synchronize()


def rows_agree(first: Path, second: Path) -> tuple[int, int, float]:
    """(rows, same class, largest difference in P(PNEUMONIA)) between two reports of the same images."""
    a = {row["path"]: row for row in csv.DictReader(open(first / "predictions.csv", newline=""))}
    b = {row["path"]: row for row in csv.DictReader(open(second / "predictions.csv", newline=""))}
    same = sum(a[path]["prediction"] == b[path]["prediction"] for path in a)
    largest = max(abs(float(a[path]["p_PNEUMONIA"]) - float(b[path]["p_PNEUMONIA"])) for path in a)
    return len(a), same, largest


def report_gpu(args: argparse.Namespace, work: Path) -> int:
    """Ceiling with autocast, scan with CPU and with GPU decoding, host capacity: a GPU box's table."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    root = work / "images"
    print(f"generating {args.images} {args.format} images in {root} ...", flush=True)
    paths = make_images(root, args.images, args.format)
    loaded = load_checkpoint(DEMO_MODEL, demo=True)
    loaded.model.to("cuda", memory_format=torch.channels_last)
    spec = loaded.spec
    tensors = [model_input(torch.from_numpy(np.stack([resize_square(decode_grayscale(p.read_bytes()).gray,
                                                                  spec.image_size) for p in paths[i:i + BATCH]])),
                         spec).to("cuda").contiguous(memory_format=torch.channels_last)
               for i in range(0, len(paths), BATCH)]
    forward_on_cuda(loaded, tensors[:1])
    cores = os.cpu_count() or 1
    rates: dict[str, list[float]] = {key: [] for key in ("forward", "scan_cpu_decode", "scan_gpu_decode",
                                                          "host_1", f"host_{args.workers}", "pure")}
    cuda = ("--device", "cuda")
    for repeat in range(args.repeats):
        rates["forward"].append(len(paths) / timed(lambda: forward_on_cuda(loaded, tensors)))
        rates["scan_cpu_decode"].append(len(paths) / scan_process(root, work / "cpu-decode", args.workers, cuda)[0])
        rates["scan_gpu_decode"].append(len(paths) / scan_process(root, work / "gpu-decode", args.workers,
                                                                  (*cuda, "--decode", "gpu"))[0])
        for workers in sorted({1, args.workers}):
            seconds, _ = scan_process(root, work / "host", workers, cuda, zero_cost_model=True)
            rates[f"host_{workers}"].append(len(paths) / seconds)
        rates["pure"].append(len(paths) / timed(lambda: pure_decoding(paths)))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    host = median[f"host_{args.workers}"] / min(cores, args.workers + 1)
    rows, same, largest = rows_agree(work / "cpu-decode", work / "gpu-decode")
    lines = [
        "| method | images/s (median) |", "|---|---|",
        f"| forward pass alone, autocast (ceiling) | {median['forward']:.1f} |",
        f"| scan end to end, CPU decoding ({args.workers} workers) | {median['scan_cpu_decode']:.1f} |",
        f"| scan end to end, --decode gpu ({args.workers} workers) | {median['scan_gpu_decode']:.1f} |",
        f"| scan with a zero-cost model, 1 worker | {median['host_1']:.1f} |",
        f"| scan with a zero-cost model, {args.workers} workers | {median[f'host_{args.workers}']:.1f} |",
        f"| pure decoding, one core | {median['pure']:.1f} |",
        "", f"Host capacity per core (the {args.workers}-worker rate over {min(cores, args.workers + 1)} busy "
        f"processes) vs pure decoding per core: {host / median['pure']:.2f}.",
        f"--decode gpu against CPU decoding: {same}/{rows} same class, largest difference in P(PNEUMONIA) "
        f"{largest:.1e}.",
        "Per repeat: " + "; ".join(f"{k} " + "/".join(f"{v:.1f}" for v in values) for k, values in rates.items()),
    ]
    header = (f"## scan on a GPU: {args.images} {args.format.upper()} images of 1024-2048 px, batch {BATCH}, "
              f"{args.repeats} repeat(s)\n\nMachine: {machine()}\n")
    print("\n" + header + "\n" + "\n".join(lines))
    write_section(args.results, "scan-gpu", header + "\n" + "\n".join(lines) + "\n")
    return 0


def write_section(results: Path, key: str, text: str) -> None:
    """Replace (or add) one marked section of RESULTS.md, keeping the others."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    current = results.read_text() if results.exists() else "# Benchmark results\n\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end) + 1:]
    else:
        current += "\n" + block
    results.write_text(current)


if __name__ == "__main__":
    raise SystemExit(main())
