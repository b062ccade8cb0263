#!/usr/bin/env bash
# The GPU check of issue 16, in one command, on a fresh machine with an NVIDIA GPU (about 8 minutes):
#
#     bash benchmarks/gpu_check.sh            # from a checkout of batchcam
#
# Installs batchcam with pip into a virtual environment (.venv-gpu; pip's default torch wheel for
# Linux x86_64 carries CUDA), generates the benchmark's images, runs the GPU section of
# benchmarks/bench_scan.py (ceiling with autocast, scan with CPU decoding and with --decode gpu,
# host capacity with a zero-cost model) and the CUDA tests, and writes the table into
# benchmarks/RESULTS.md (section scan-gpu) and benchmarks/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
log=benchmarks/gpu_check.log
exec > >(tee "$log") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
timeout 240 pip install --quiet --upgrade pip
timeout 240 pip install --quiet -e ".[onnx]" pytest
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))"

cores=$(nproc)
workers=$(( cores > 9 ? 8 : (cores > 1 ? cores - 1 : 1) ))
timeout 300 python benchmarks/bench_scan.py --gpu --images 256 --repeats 2 --workers "$workers"
timeout 150 python -m pytest -q -m "slow or not slow" -k "cuda" tests
echo "gpu_check: done; the table is in benchmarks/RESULTS.md (section scan-gpu) and $log"
