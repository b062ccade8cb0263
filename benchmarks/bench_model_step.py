"""Which backend runs the exact Grad-CAM path's model step fastest on this CPU, with equal outputs?

    python benchmarks/bench_model_step.py                 # 8 interleaved rounds, batch 32
    python benchmarks/bench_model_step.py --compile       # adds torch.compile (about 16 s to compile)

The model step is the demo ResNet18 returning (logits, layer4 activations) for a batch of 32
224 px images, as ``batchcam.cam.backends`` runs it. Each round times every candidate once on the
same batch, so a busy machine slows them alike; medians over the rounds are printed with the
rate relative to eager PyTorch and the largest differences from it (probabilities, activations).
OpenVINO is timed when ``import openvino`` works. Results go into benchmarks/RESULTS.md by hand.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchcam.cam.backends import WithActivations, export_onnx
from batchcam.cam.explainer import target_layer_of
from batchcam.model.checkpoint import load_checkpoint
from batchcam.resources import DEMO_MODEL
from batchcam.runtime.allocator import keep_freed_memory

BATCH = 32


def eager_step(model):
    wrapped = WithActivations(model, target_layer_of(model)).eval()

    def step(x):
        with torch.inference_mode():
            return wrapped(x.contiguous(memory_format=torch.channels_last))
    return step


def onnx_step(model, x, spinning: bool):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = onnxruntime.InferenceSession(export_onnx(model, target_layer_of(model), x[:2]), options,
                                           providers=["CPUExecutionProvider"])
    return lambda batch: [torch.from_numpy(a) for a in session.run(None, {"x": batch.numpy()})]


def torchscript_step(model, x):
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(
            WithActivations(model, target_layer_of(model)).eval(), x)))

    def step(batch):
        with torch.inference_mode():
            return frozen(batch)
    return step


def compiled_step(model):
    compiled = torch.compile(WithActivations(model, target_layer_of(model)).eval())

    def step(batch):
        with torch.inference_mode():
            return compiled(batch)
    return step


def openvino_step(model, x):
    import openvino

    compiled = openvino.compile_model(openvino.convert_model(WithActivations(model, target_layer_of(model)).eval(),
                                                             example_input=x), "CPU")
    return lambda batch: [torch.from_numpy(compiled(batch.numpy())[i]) for i in range(2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to build)")
    args = parser.parse_args(argv)
    keep_freed_memory()
    model = load_checkpoint(DEMO_MODEL, demo=True).model.eval()
    x = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    candidates = {"eager PyTorch, channels_last": eager_step(model.to(memory_format=torch.channels_last)),
                  "ONNX Runtime (idle threads sleep: batchcam's setting)": onnx_step(model, x, spinning=False),
                  "ONNX Runtime (idle threads spin)": onnx_step(model, x, spinning=True),
                  "TorchScript freeze + optimize_for_inference": torchscript_step(model, x)}
    if args.compile:
        candidates["torch.compile (inductor)"] = compiled_step(model)
    try:
        candidates["OpenVINO"] = openvino_step(model, x)
    except ImportError:
        print("OpenVINO: not installed, not timed")
    reference = candidates["eager PyTorch, channels_last"](x)
    differences = {}
    for name, step in candidates.items():
        logits, activations = step(x)  # warm-up, and the outputs compared
        probability = (torch.softmax(logits.float(), 1) - torch.softmax(reference[0], 1)).abs().max()
        differences[name] = (float(probability), float((activations.float() - reference[1]).abs().max()))
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, step in candidates.items():
            started = time.perf_counter()
            step(x)
            rates[name].append(BATCH / (time.perf_counter() - started))
    eager = statistics.median(rates["eager PyTorch, channels_last"])
    print(f"| model step, batch {BATCH}, fp32 | images/s (median of {args.rounds}) | vs eager "
          "| largest probability difference | largest activation difference |")
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / eager:.2f} | {differences[name][0]:.1e} | "
              f"{differences[name][1]:.1e} |")
    print("rounds: " + "; ".join(f"{name}: " + "/".join(f"{v:.0f}" for v in values) for name, values in rates.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
