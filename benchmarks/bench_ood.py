"""What the OOD score and the temperature cost next to the forward pass they ride on.

    python benchmarks/bench_ood.py                  # 8 batches of 32 at the demo model's 224 px

On the bundled demo checkpoint, per batch: the model's forward pass alone (the engine's logits and
layer4 activations), then ``from_forward`` (exact maps, pooled features, temperature-scaled
probabilities), then the Mahalanobis distances of the features (``OodStatistics.distances``).
Inputs are random tensors: the cost does not depend on what the pixels show. Prints medians over
batches and writes its section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from batchcam.cam.explainer import CamExplainer, from_forward
from batchcam.model.checkpoint import load_checkpoint
from batchcam.resources import DEMO_MODEL
from batchcam.runtime.allocator import keep_freed_memory

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scan import machine, write_section  # noqa: E402  (the same machine line and RESULTS.md writer)


def milliseconds(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return (time.perf_counter() - started) * 1000, result


def one_batch(engine: CamExplainer, loaded, batch_size: int, size: int) -> dict[str, float]:
    """Milliseconds of each step on one random batch."""
    x = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    forward, (logits, activations) = milliseconds(lambda: engine.forward(x))
    with torch.inference_mode():
        explain, batch = milliseconds(lambda: from_forward(logits, activations, engine.head.weight, None,
                                                           loaded.temperature))
    distances, _ = milliseconds(lambda: loaded.ood.distances(batch.features))
    return {"forward": forward, "from_forward": explain, "distances": distances}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    keep_freed_memory()
    loaded = load_checkpoint(DEMO_MODEL, demo=True)
    if loaded.ood is None:
        raise SystemExit("the demo model has no OOD statistics")
    model = loaded.model.to(memory_format=torch.channels_last)
    size = loaded.spec.image_size
    times: dict[str, list[float]] = {"forward": [], "from_forward": [], "distances": []}
    with CamExplainer(model, temperature=loaded.temperature) as engine:
        engine.forward(torch.randn(args.batch_size, 3, size, size))   # warm-up: kernel selection
        for _ in range(args.batches):
            for name, took in one_batch(engine, loaded, args.batch_size, size).items():
                times[name].append(took)
    median = {name: statistics.median(values) for name, values in times.items()}
    header = (f"## OOD score and temperature: cost per batch of {args.batch_size} at {size} px "
              f"(demo model, CPU, {args.batches} batches)")
    lines = [f"Machine: {machine()}.", "", "| step | ms per batch (median) | share of the forward pass |",
             "|---|---|---|",
             f"| forward pass (logits + layer4 activations) | {median['forward']:.1f} | 100% |",
             f"| `from_forward`: maps, pooled features, scaled probabilities | {median['from_forward']:.2f} | "
             f"{median['from_forward'] / median['forward']:.2%} |",
             f"| Mahalanobis distances of the features (the OOD score) | {median['distances']:.2f} | "
             f"{median['distances'] / median['forward']:.2%} |", ""]
    text = header + "\n\n" + "\n".join(lines)
    print(text)
    write_section(args.results, "ood-cost", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
