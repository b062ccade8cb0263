"""What does each ``--cam`` method cost? Time per image and the scan's peak memory, at default settings.

    python benchmarks/bench_cam_methods.py                       # 8 samples, every method
    python benchmarks/bench_cam_methods.py --images 24 --methods scorecam

Copies the first N of ``samples/`` (alternating NORMAL and PNEUMONIA) into a temporary folder and
runs ``python -m batchcam scan DIR --out REPORT --device cpu --quiet --cam METHOD`` once per method,
each in a fresh process with scan's defaults (``--batch-size 32``, one DataLoader worker on 2 cores,
the bundled demo model at 224 px). Per method: the scan's own seconds per image (``manifest.json``'s
``timings.seconds`` over the images; library start-up not included) and the peak RSS of the scan
process (``ru_maxrss`` from ``os.wait4``: the largest of the process and the workers it waited for).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")


def sample_folder(dest: Path, count: int) -> Path:
    """The first ``count`` samples, alternating the classes, under DEST/NORMAL and DEST/PNEUMONIA."""
    by_class = {label: sorted((REPO / "samples" / label).iterdir()) for label in ("NORMAL", "PNEUMONIA")}
    for i in range(count):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        source = by_class[label][i // 2]
        (dest / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / label / source.name)
    return dest


def run_scan(root: Path, report: Path, method: str, extra: tuple[str, ...]) -> dict:
    """One scan in a process of its own: its exit code, seconds per image and peak RSS in MB."""
    command = [sys.executable, "-m", "batchcam", "scan", str(root), "--out", str(report), "--device", "cpu",
               "--quiet", "--cam", method, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read().decode("utf-8", "replace")
    process.stdout.close()
    process.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{method}: scan exited {code}\n{stderr[-2000:]}")
    manifest = json.loads((report / "manifest.json").read_text())
    images = manifest["counts"]["processed"]
    return {"method": method, "images": images, "seconds_per_image": manifest["timings"]["seconds"] / images,
            "wall_seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def table(results: list[dict]) -> str:
    lines = ["| `--cam` | images | seconds per image | peak RSS (MB) | wall seconds (with start-up) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| `{r['method']}` | {r['images']} | {r['seconds_per_image']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="samples to scan, 2 to 24 (default: 8)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated --cam methods (default: {','.join(METHODS)})")
    parser.add_argument("--scan-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for `batchcam scan` (repeat for several), e.g. --batch-size=4")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not 2 <= args.images <= 24:
        parser.error(f"unknown methods {unknown}" if unknown else "--images must be 2 to 24")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        root = sample_folder(Path(scratch) / "xrays", args.images)
        results = []
        for method in methods:
            try:
                results.append(run_scan(root, Path(scratch) / f"report-{method}", method, tuple(args.scan_arg)))
            except RuntimeError as e:
                print(f"bench_cam_methods: {e}", file=sys.stderr)
                return 1
            print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    extra = f"; {' '.join(args.scan_arg)}" if args.scan_arg else ""
    print(f"batchcam scan --device cpu --quiet, demo model (224 px), {args.images} samples{extra}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"Python {sys.version.split()[0]}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
