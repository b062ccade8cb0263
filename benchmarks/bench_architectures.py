"""Scan throughput per architecture: resnet18, resnet50, densenet121, efficientnet_b0 on the same images.

    python benchmarks/bench_architectures.py                  # 64 JPEGs of 1024-1536 px
    python benchmarks/bench_architectures.py --images 32 --archs resnet18,densenet121

Each architecture gets seeded random weights and a 2-class Linear head, saved as a plain state dict
(what a user's notebook saves; 224 px squash, ImageNet mean/std, as ``--model`` assumes): throughput
does not depend on the weights. On the same images it measures, per architecture:

  1. ``batchcam scan`` end to end in a fresh process (``--backend eager``, the default workers), its
     own images/s (the summary line: the run, without the interpreter's start-up) and the wall time;
  2. the exact path alone: ``CamExplainer`` (one forward pass, the map read off it) on pre-decoded
     batches of 32;
  3. pytorch-grad-cam's ``GradCAM`` (forward and backward pass) on the same batches and the same
     target layer, for the same classes;

and checks that the two paths' maps agree (the lowest per-image correlation). Prints a markdown
section and writes it into benchmarks/RESULTS.md (``--results``; ``-`` to print only).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import machine, write_section  # noqa: E402  (the same machine line and RESULTS.md writer)

from batchcam.cam.explainer import CamExplainer  # noqa: E402
from batchcam.decode.dataset import decode_sample  # noqa: E402
from batchcam.model.checkpoint import load_checkpoint, model_input  # noqa: E402
from batchcam.runtime.allocator import keep_freed_memory  # noqa: E402
from batchcam.synthetic import generate  # noqa: E402

HERE = Path(__file__).resolve().parent
ARCHS = ("resnet18", "resnet50", "densenet121", "efficientnet_b0")
BATCH = 32


def user_weights(arch: str, path: Path) -> None:
    """A torchvision model with its head replaced by a 2-class Linear, seeded, saved as a plain state dict."""
    torch.manual_seed(0)
    model = getattr(models, arch)()
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, 2)
    elif arch.startswith("densenet"):
        model.classifier = nn.Linear(model.classifier.in_features, 2)
    else:
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, 2)
    torch.save(model.state_dict(), path)


def write_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        side = int(rng.integers(1024, 1537))
        path = folder / f"xray{i:03d}.jpg"
        generate(i, ("NORMAL", "PNEUMONIA")[i % 2], (side, int(side * rng.uniform(0.8, 1.2)))).image.save(
            path, quality=90)
        paths.append(path)
    return paths


def scan_rate(images: Path, model: Path, out: Path) -> tuple[float, float]:
    """(scan's own images/s, wall seconds of the process) of one scan in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "batchcam", "scan", str(images), "--out", str(out), "--model",
                           str(model), "--backend", "eager", "--quiet"], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    rate = re.search(r"([\d.]+) images/s", done.stdout)
    if rate is None:
        raise RuntimeError(f"no summary line in scan's output: {done.stdout!r} {done.stderr!r}")
    return float(rate.group(1)), wall


def exact_and_library(model_path: Path, batches: list[torch.Tensor]) -> tuple[float, float, float]:
    """(exact path images/s, pytorch-grad-cam images/s, lowest map correlation between them)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    loaded = load_checkpoint(model_path)
    model = loaded.model.to(memory_format=torch.channels_last)
    images = sum(len(x) for x in batches)
    with CamExplainer(model, target_layer=loaded.target_layer) as explainer:
        explainer(batches[0][:2])  # warm-up
        started = time.perf_counter()
        results = [explainer(x) for x in batches]
        exact = images / (time.perf_counter() - started)
    layer = model.get_submodule(loaded.target_layer)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        cam(input_tensor=batches[0][:2], targets=[ClassifierOutputTarget(0)] * 2)  # warm-up
        started = time.perf_counter()
        maps = [cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in result.targets])
                for x, result in zip(batches, results)]
        library = images / (time.perf_counter() - started)
    lowest = 1.0
    for result, theirs in zip(results, maps):
        ours = torch.nn.functional.interpolate(result.cams[:, None], size=theirs.shape[1:], mode="bilinear",
                                               align_corners=False)[:, 0].numpy()
        for a, b in zip(ours, theirs):
            if a.std() > 0 and b.std() > 0:
                lowest = min(lowest, float(np.corrcoef(a.ravel(), b.ravel())[0, 1]))
    return exact, library, lowest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="synthetic X-rays to generate")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="Markdown file to write, or -")
    args = parser.parse_args(argv)
    keep_freed_memory()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    lines = ["| architecture | target layer | scan, images/s | scan wall, s | exact path (model + map), images/s | "
             "pytorch-grad-cam GradCAM, images/s | exact / library | lowest map correlation |",
             "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        paths = write_images(folder / "images", args.images)
        views = [decode_sample(p.name, p.read_bytes(), 224).model_view for p in paths]
        for arch in archs:
            weights = folder / f"{arch}.pth"
            user_weights(arch, weights)
            spec = load_checkpoint(weights).spec
            batches = [model_input(torch.from_numpy(np.stack(views[i:i + BATCH])), spec)
                       .contiguous(memory_format=torch.channels_last) for i in range(0, len(views), BATCH)]
            rate, wall = scan_rate(folder / "images", weights, folder / f"report-{arch}")
            exact, library, lowest = exact_and_library(weights, batches)
            layer = load_checkpoint(weights).target_layer
            lines.append(f"| {arch} | `{layer}` | {rate:.1f} | {wall:.1f} | {exact:.1f} | {library:.1f} | "
                         f"{exact / library:.1f} x | {lowest:.4f} |")
            print(lines[-1], flush=True)
    header = (f"## Scan throughput per architecture (issue 23): {args.images} JPEGs of 1024-1536 px, 224 px views, "
              f"batch {BATCH}\n\nMachine: {machine()}. Random seeded weights (throughput does not depend on them); "
              "`python benchmarks/bench_architectures.py`.\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    print("\n" + text)
    if args.results != "-":
        write_section(Path(args.results), "architectures", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
