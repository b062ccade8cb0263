"""Command line: ``python -m batchcam scan ROOT --out REPORT`` and friends.

``main(argv) -> int`` returns the exit code instead of exiting, so tests call it in-process.
Exit codes (see README): 0 all images ok, 2 usage/configuration error, 3 report written with
error rows; 1 only ever comes from an unexpected internal failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batchcam import __version__
from batchcam.cam import METHODS
from batchcam.config import ScanConfig, UsageError, default_workers
from batchcam.console import Console
from batchcam.model import CheckpointError

EXIT_OK, EXIT_USAGE, EXIT_IMAGE_ERRORS = 0, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchcam", description="Batch predictions and Grad-CAM "
                                     "explanations over folders of chest X-rays.")
    parser.add_argument("--version", action="version", version=f"batchcam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = commands.add_parser("scan", help="classify and explain every X-ray under ROOT, write a report",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scan.add_argument("root", type=Path, metavar="ROOT", help="folder to walk (recursively)")
    scan.add_argument("--out", type=Path, required=True, metavar="REPORT", help="report folder to write")
    scan.add_argument("--model", type=Path, default=None,
                      help="batchcam checkpoint or ResNet18 state dict (default: the bundled demo model)")
    scan.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    scan.add_argument("--batch-size", type=int, default=32, help="images per model batch")
    scan.add_argument("--workers", type=int, default=default_workers(),
                      help="DataLoader processes decoding images (0: decode in the main process)")
    scan.add_argument("--cam", default="gradcam", choices=METHODS, metavar="METHOD",
                      help=f"CAM method, one of: {', '.join(METHODS)}")
    scan.add_argument("--target", default="predicted",
                      help="class the heatmap explains: 'predicted' or a class name")
    scan.add_argument("--save-cams", action="store_true",
                      help="also write cams.npz with the raw low-resolution map of every ok image")
    scan.add_argument("--quiet", action="store_true", help="print only warnings, errors and the summary line")
    return parser


def scan_config(args: argparse.Namespace, argv: list[str]) -> ScanConfig:
    return ScanConfig(root=args.root, out=args.out, model=args.model, device=args.device,
                      batch_size=args.batch_size, workers=args.workers, cam=args.cam, target=args.target,
                      save_cams=args.save_cams, quiet=args.quiet, argv=tuple(argv))


def run_scan(config: ScanConfig) -> int:
    from batchcam.pipeline import scan

    console = Console(quiet=config.quiet)
    result = scan(config, console)
    print(result.summary_line, flush=True)
    return EXIT_IMAGE_ERRORS if result.counts["error"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 for --help/--version
        return int(e.code or 0)
    try:
        if args.command == "scan":
            return run_scan(scan_config(args, argv))
    except (UsageError, CheckpointError) as e:
        print(f"batchcam: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE
