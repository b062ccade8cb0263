"""Command line: ``python -m batchcam scan ROOT --out REPORT`` and friends.

``main(argv) -> int`` returns the exit code instead of exiting, so tests call it in-process.
Exit codes (see README): 0 all images ok, 2 usage/configuration error, 3 report written with
error rows, 74 report not writable, 75 report locked by another run, 130/143 stopped by
SIGINT/SIGTERM after saving; 1 only ever comes from an unexpected internal failure.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from batchcam import __version__
from batchcam.config import (
    BACKEND_AUTO_MIN_IMAGES,
    BACKENDS,
    CAM_METHODS,
    CHEST_MODALITIES,
    CONCURRENT_REQUESTS_RANGE,
    DECODERS,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PAGE_SIZE,
    DEFAULT_SANITY_SAMPLE,
    ENGINES,
    FRONTAL_VIEWS,
    HEAT_SCALES,
    MAX_FILES_RANGE,
    MAX_WORKERS,
    MEGAPIXELS_RANGE,
    OVERLAY_LONG_SIDE,
    PRECISIONS,
    SELECT_MODES,
    UPLOAD_MB_RANGE,
    UPLOADS_BUDGET_MB,
    CalibrateConfig,
    PredictConfig,
    ScanConfig,
    Selection,
    ServeConfig,
    default_concurrent_requests,
    default_workers_for,
    shown,
)
from batchcam.errors import ReportLocked, ReportWriteError, UsageError
from batchcam.runtime.allocator import keep_freed_memory
from batchcam.runtime.console import Console
from batchcam.runtime.interrupt import Interrupted

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_IMAGE_ERRORS = 0, 1, 2, 3
EXIT_CANNOT_WRITE, EXIT_LOCKED, EXIT_SIGINT = 74, 75, 130


def path_argument(text: str) -> Path:
    """argparse's ``type`` of every path: an empty one is refused (``Path("")`` would be the working directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing (it would mean the working directory)")
    return Path(text)


def one_line(message: object) -> str:
    """A message as one line: a control or invisible character (a newline in a path) is written as its escape."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(message))


class Parser(argparse.ArgumentParser):
    """argparse, naming an unknown option (and the option it is close to) before anything else:
    argparse itself reports a missing required option first, so ``--ouput`` said only that --out is
    required."""

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            self._refuse_unknown_options(args)
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_options(self, args: list[str]) -> None:
        if self._subparsers is not None:
            return  # the top-level parser: each command's parser checks its own options
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for token in args:
            if token == "--":
                return
            name = token.split("=", 1)[0]
            if not name.startswith("--") or any(option.startswith(name) for option in known):
                continue  # argparse takes a unique prefix and refuses an ambiguous one itself
            close = difflib.get_close_matches(name, known, n=1)
            self.error(f"unrecognized option {name}" + (f"; did you mean {close[0]}?" if close else ""))


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already states its default or there
    is none to state (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchcam", description="Batch predictions and Grad-CAM explanations over folders of "
                    "chest X-rays.")
    parser.add_argument("--version", action="version", version=f"batchcam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = commands.add_parser("scan", help="classify and explain every X-ray under ROOT, write a report",
                               formatter_class=DefaultsHelpFormatter)
    scan.add_argument("root", type=path_argument, metavar="ROOT", help="folder to walk (recursively)")
    scan.add_argument("--out", type=path_argument, required=True, metavar="REPORT", help="report folder to write")
    scan.add_argument("--model", type=path_argument, default=None,
                      help="batchcam checkpoint or ResNet18 state dict (default: the bundled demo model)")
    scan.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    scan.add_argument("--batch-size", type=int, default=32, help="images per model batch")
    scan.add_argument("--workers", type=int, default=None,
                      help=f"0..{MAX_WORKERS}. local engine: DataLoader processes decoding images (0: decode in the "
                      "main process; default: CPU cores - 1, 1..8); ray engine: model actors (default: one per GPU of "
                      "the cluster, or half its CPUs without GPUs)")
    scan.add_argument("--cam", default="gradcam", choices=CAM_METHODS, metavar="METHOD",
                      help=f"CAM method, one of: {', '.join(CAM_METHODS)}")
    scan.add_argument("--target", default="predicted",
                      help="class the heatmap explains: 'predicted' or a class name")
    scan.add_argument("--save-cams", action="store_true",
                      help="also write cams.npz with the raw low-resolution map of every ok image")
    scan.add_argument("--full", action="store_true",
                      help="recompute every image (default: reuse rows of unchanged files and settings)")
    scan.add_argument("--quiet", action="store_true", help="print only warnings, errors and the summary line")
    scan.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="images per gallery page")
    scan.add_argument("--heat-scale", default="image", choices=HEAT_SCALES,
                      help="image: each heatmap scaled to its own range; run: every heatmap scaled by one run-wide "
                      "constant (99th percentile of raw map values) so heat compares across images (keeps cams.npz, "
                      "re-renders every overlay at the end of the run)")
    scan.add_argument("--faithfulness", action="store_true",
                      help="also measure the probability drop when the top 20%% of each map (and a random region "
                      "of the same size) is removed: two extra forward passes per batch")
    add_file_size_option(scan)
    add_selection_options(scan)
    add_engine_options(scan)
    add_performance_options(scan)
    add_predict_parser(commands)
    add_evaluate_parser(commands)
    add_sanity_parser(commands)
    add_serve_parser(commands)
    add_calibrate_parser(commands)
    add_review_parser(commands)
    return parser


def add_file_size_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB, metavar="MB",
                         help=f"a larger file is an error row and is never read, in MB of 2^20 bytes "
                         f"(default: {DEFAULT_MAX_FILE_MB}; far above any real X-ray)")


def add_selection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--select", default="chest", choices=SELECT_MODES,
                         help="chest: score only DICOM films that are frontal chest radiographs (by their Modality, "
                         "BodyPartExamined and ViewPosition), the others become 'skipped' rows with the reason; all: "
                         "score every file. Files without DICOM tags (JPEG, PNG, ...) are always scored")
    command.add_argument("--modalities", default=None, metavar="LIST",
                         help="with --select chest: the DICOM modalities scored "
                         f"(default: {','.join(CHEST_MODALITIES)})")
    command.add_argument("--views", default=None, metavar="LIST",
                         help=f"with --select chest: the ViewPosition values scored, or 'any' (default: "
                         f"{','.join(FRONTAL_VIEWS)}); a film without ViewPosition is scored")


def selection(args: argparse.Namespace) -> Selection:
    return Selection.from_options(args.select, args.modalities, args.views)


def add_engine_options(scan: argparse.ArgumentParser) -> None:
    scan.add_argument("--engine", default="local", choices=ENGINES,
                      help="local: this machine (DataLoader + model in this process); ray: a Ray cluster "
                      "(needs the 'ray' extra; REPORT must be on storage every node sees)")
    scan.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="with --engine ray: the cluster to join, e.g. head-node:6379, or 'auto' for the one "
                      "`ray start` runs on this machine (default: start a local Ray cluster for this run)")
    scan.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                      help="with --engine ray: GPUs per model actor (0: CPU actors; 0.5: two actors share a GPU; "
                      "default: 1 when the cluster has GPUs, else 0)")


def add_performance_options(scan: argparse.ArgumentParser) -> None:
    scan.add_argument("--overlay-size", type=int, default=OVERLAY_LONG_SIDE, metavar="PX",
                      help="longer side of the overlays, px (never enlarged); 1024 is sharper in the large view "
                      "and costs about three times the CPU time per image")
    scan.add_argument("--precision", default="auto", choices=PRECISIONS,
                      help="the forward pass's precision: auto is bf16 (else fp16) autocast on CUDA and fp32 on "
                      "the CPU; the heatmap is always computed in fp32")
    scan.add_argument("--compile", action="store_true",
                      help="torch.compile the model (a minute or more of compilation; pays off on long GPU runs)")
    scan.add_argument("--decode", default="cpu", choices=DECODERS,
                      help="gpu: decode JPEGs in batches on the GPU (nvJPEG) when CPU decoding is the bottleneck; "
                      "other formats are still decoded on the CPU")
    scan.add_argument("--backend", default="auto", choices=BACKENDS,
                      help="the exact gradcam path's model step: onnx runs it in ONNX Runtime (CPU, fp32; "
                      "pip install 'batchcam[onnx]'), eager in PyTorch; auto (default) is onnx for CPU runs of "
                      f"{BACKEND_AUTO_MIN_IMAGES} images or more when onnxruntime is installed, else eager")


def add_model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", type=path_argument, default=None,
                         help="batchcam checkpoint or ResNet18 state dict (default: the bundled demo model)")
    command.add_argument("--device", default="auto",
                         help="auto (CUDA when present; the default), cpu, cuda or cuda:N")


def add_predict_parser(commands) -> None:
    predict = commands.add_parser("predict", help="classify and explain a few X-ray files, print the results")
    predict.add_argument("files", nargs="+", metavar="FILE",
                         help="X-ray images (JPEG, PNG, BMP, TIFF, 16-bit too; DICOM with the dicom extra)")
    add_model_options(predict)
    predict.add_argument("--out", type=path_argument, default=None, metavar="DIR",
                         help="write each overlay (JPEG) into DIR (default: no files are written)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per file instead of a table")
    predict.add_argument("--batch-size", type=int, default=16, help="images per model batch (default: 16)")
    predict.add_argument("--cam", default="gradcam", choices=CAM_METHODS, metavar="METHOD",
                         help=f"CAM method, one of: {', '.join(CAM_METHODS)} (default: gradcam)")
    predict.add_argument("--target", default="predicted",
                         help="class the heatmap explains: 'predicted' (the default) or a class name")
    add_file_size_option(predict)
    add_selection_options(predict)


def add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a report's heatmaps against ground-truth boxes "
                                   "(pointing game, heat inside the boxes)")
    evaluate.add_argument("report", type=path_argument, metavar="REPORT", help="a report folder written by scan")
    evaluate.add_argument("--boxes", type=path_argument, required=True, metavar="BOXES.csv",
                          help="boxes: path,x0,y0,x1,y1 (path as in predictions.csv) or RSNA "
                          "patientId,x,y,width,height,Target")


def add_sanity_parser(commands) -> None:
    sanity = commands.add_parser("sanity", help="model-randomisation sanity check of the heatmaps "
                                 "(Adebayo et al. 2018)")
    sanity.add_argument("root", type=path_argument, metavar="ROOT", help="folder of X-rays to sample from")
    add_model_options(sanity)
    sanity.add_argument("--sample", type=int, default=DEFAULT_SANITY_SAMPLE,
                        help=f"images to sample (default: {DEFAULT_SANITY_SAMPLE})")
    sanity.add_argument("--out", type=path_argument, default=Path("batchcam-sanity"), metavar="DIR",
                        help="folder for sanity.md, sanity.json and sanity.png (default: batchcam-sanity)")


def run_evaluate(args: argparse.Namespace) -> int:
    from batchcam.commands.evaluate import evaluate

    results = evaluate(args.report, args.boxes, warn=lambda text: print(f"batchcam: warning: {one_line(text)}",
                                                                        file=sys.stderr))
    rate, energy = results["pointing_game"]["hit_rate"], results["energy_inside"]["mean"]
    print(f"batchcam: {results['n']} images with boxes, pointing game "
          f"{'n/a' if rate is None else f'{rate:.3f}'}, heat inside boxes "
          f"{'n/a' if energy is None else f'{energy:.3f}'} -> {shown(args.report / 'metrics.json')}", flush=True)
    return EXIT_OK


def add_review_parser(commands) -> None:
    review = commands.add_parser("review", help="merge reviewers' decisions (the gallery's exported review.csv) "
                                 "into REPORT/reviews.csv and update the gallery")
    review.add_argument("report", type=path_argument, metavar="REPORT", help="a report folder written by scan")
    review.add_argument("--import", dest="import_csv", type=path_argument, required=True, metavar="REVIEW.csv",
                        help="the file the gallery's \"Export decisions\" downloaded; later decisions win")


def run_review(args: argparse.Namespace) -> int:
    from batchcam.commands.review import import_reviews

    result = import_reviews(args.report, args.import_csv)
    marked = f", {result.marked} kept for files changed or gone" if result.marked else ""
    print(f"batchcam: imported {result.imported} decisions; {result.stored} in reviews.csv, {result.current} on "
          f"images as they are now{marked} -> {shown(args.report / 'reviews.csv')}", flush=True)
    return EXIT_OK


def run_sanity(args: argparse.Namespace) -> int:
    from batchcam.commands.sanity import sanity

    summary, where = sanity(args.root, args.model, args.sample, args.device, args.out)
    print(f"batchcam: {summary} -> {shown(where)}", flush=True)
    return EXIT_OK


def add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="a local web page to upload X-rays and see predictions and overlays "
                                "(needs the 'serve' extra)")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1); anything but loopback exposes the page "
                       "to the network. Requests must name this address (or localhost, when it is loopback) "
                       "in their Host header")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                       help=f"largest request accepted, in MB of 2^20 bytes, {UPLOAD_MB_RANGE[0]} to "
                       f"{UPLOAD_MB_RANGE[1]} (default: {DEFAULT_MAX_UPLOAD_MB}); larger ones get HTTP 413")
    serve.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES, metavar="N",
                       help=f"most files in one request, {MAX_FILES_RANGE[0]} to {MAX_FILES_RANGE[1]} "
                       f"(default: {DEFAULT_MAX_FILES}); more get HTTP 413 before any is decoded")
    serve.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS, metavar="MP",
                       help=f"most pixels in one request, in millions, as the images' headers state them, "
                       f"{MEGAPIXELS_RANGE[0]} to {MEGAPIXELS_RANGE[1]} (default: {DEFAULT_MAX_MEGAPIXELS}); a "
                       "16-bit, float or DICOM image, decoded through 64-bit floats, may have a quarter of that (a "
                       "colour DICOM a twelfth); more get HTTP 413 before any pixel is decoded")
    serve.add_argument("--max-concurrent-requests", type=int, default=None, metavar="N",
                       help=f"requests read, decoded and explained at once, {CONCURRENT_REQUESTS_RANGE[0]} to "
                       f"{CONCURRENT_REQUESTS_RANGE[1]}; one more gets HTTP 503 with a Retry-After header (default: as "
                       f"many as keep their bodies within {UPLOADS_BUDGET_MB} MB, each counted twice: "
                       f"{default_concurrent_requests(DEFAULT_MAX_UPLOAD_MB)} with the default --max-upload-mb)")
    add_selection_options(serve)


def add_calibrate_parser(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="add out-of-distribution statistics and a temperature "
                                    "to a model, from labelled images, without retraining")
    calibrate.add_argument("root", type=path_argument, metavar="LABELLED_ROOT",
                           help="ImageFolder tree: one sub-folder per class of the model (NORMAL/, PNEUMONIA/)")
    calibrate.add_argument("--model", type=path_argument, required=True,
                           help="the checkpoint or state dict to calibrate")
    calibrate.add_argument("--out", type=path_argument, required=True, metavar="MODEL_OUT",
                           help="the new checkpoint to write (never --model itself, never through a link)")
    calibrate.add_argument("--force", action="store_true",
                           help="replace MODEL_OUT when it exists (default: refuse; never --model, never a link)")
    calibrate.add_argument("--device", default="auto",
                           help="auto (CUDA when present; the default), cpu, cuda or cuda:N")
    calibrate.add_argument("--batch-size", type=int, default=32, help="images per model batch (default: 32)")
    calibrate.add_argument("--workers", type=int, default=0,
                           help=f"DataLoader processes decoding images, 0..{MAX_WORKERS} (default: 0, decode in this "
                           "process)")
    add_file_size_option(calibrate)
    add_selection_options(calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from batchcam.commands.calibrate import calibrate

    config = CalibrateConfig(root=args.root, model=args.model, out=args.out, device=args.device,
                             batch_size=args.batch_size, workers=args.workers, max_file_mb=args.max_file_mb,
                             selection=selection(args), force=args.force)
    result = calibrate(config, Console())
    print(f"batchcam: {result.summary_line} -> {shown(config.out)}", flush=True)
    return EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    from batchcam.commands.predict import predict

    config = PredictConfig(files=tuple(args.files), model=args.model, out=args.out, json=args.json,
                           device=args.device, cam=args.cam, target=args.target, batch_size=args.batch_size,
                           max_file_mb=args.max_file_mb, selection=selection(args))
    console = Console()
    try:
        result = predict(config, console)
    except KeyboardInterrupt:
        print("batchcam: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    where = f"; overlays in {shown(config.out)}" if config.out is not None else ""
    print(f"{result.summary_line}{where}", file=sys.stderr, flush=True)
    return EXIT_IMAGE_ERRORS if result.error else EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    from batchcam.commands.serve import serve

    config = ServeConfig(model=args.model, host=args.host, port=args.port, device=args.device,
                         max_upload_mb=args.max_upload_mb, max_files=args.max_files,
                         max_megapixels=args.max_megapixels, selection=selection(args),
                         max_concurrent_requests=args.max_concurrent_requests)
    return serve(config, Console())


def scan_config(args: argparse.Namespace, argv: list[str]) -> ScanConfig:
    workers = default_workers_for(args.engine) if args.workers is None else args.workers
    return ScanConfig(root=args.root, out=args.out, model=args.model, device=args.device,
                      batch_size=args.batch_size, workers=workers, cam=args.cam, target=args.target,
                      save_cams=args.save_cams, full=args.full, quiet=args.quiet, page_size=args.page_size,
                      faithfulness=args.faithfulness, heat_scale=args.heat_scale, engine=args.engine,
                      ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                      overlay_size=args.overlay_size, precision=args.precision, compile=args.compile,
                      decode=args.decode, backend=args.backend, max_file_mb=args.max_file_mb,
                      selection=selection(args), argv=tuple(argv))


def run_scan(config: ScanConfig) -> int:
    """Scan, print the summary line, and end REPORT/batchcam.log with how the run ended, however it
    ends (nothing is logged when the run never got as far as REPORT's log: a usage error, a lock)."""
    from batchcam.commands.scan import scan

    console = Console(quiet=config.quiet)
    started = time.monotonic()
    try:
        result = scan(config, console)
        code = EXIT_OK if result.complete else EXIT_IMAGE_ERRORS
        console.log(f"run finished: {result.summary_line.removeprefix('batchcam: ')}; exit {code}")
        print(result.summary_line, flush=True)
        return code
    except BaseException as e:
        console.log(f"run ended: {how_it_ended(e)}; {console.work_done()}, {time.monotonic() - started:.1f} s; "
                    f"exit {exit_code(e)}")
        raise
    finally:
        console.close()


def how_it_ended(error: BaseException) -> str:
    if isinstance(error, (UsageError, ReportWriteError, ReportLocked, Interrupted)):
        return one_line(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"internal failure: {type(error).__name__}: {one_line(error)}"


def exit_code(error: BaseException) -> int:
    """The exit code of a command that raised ``error``; 1 for an unexpected internal failure."""
    if isinstance(error, UsageError):  # CheckpointError and NotOurFolder too
        return EXIT_USAGE
    if isinstance(error, ReportWriteError):
        return EXIT_CANNOT_WRITE
    if isinstance(error, ReportLocked):
        return EXIT_LOCKED
    if isinstance(error, Interrupted):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGINT
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 for --help/--version
        return int(e.code or 0)
    keep_freed_memory()  # every command runs batches through the model
    try:
        if args.command == "scan":
            return run_scan(scan_config(args, argv))
        if args.command == "predict":
            return run_predict(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "sanity":
            return run_sanity(args)
        if args.command == "calibrate":
            return run_calibrate(args)
        if args.command == "review":
            return run_review(args)
    except (UsageError, ReportWriteError) as e:  # CheckpointError and NotOurFolder too
        print(f"batchcam: error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
    except ReportLocked as e:
        print(f"batchcam: {one_line(e)}; nothing was changed", file=sys.stderr)
        return exit_code(e)
    except Interrupted as e:
        print(f"batchcam: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt as e:
        print("batchcam: interrupted; finished batches are saved and the next run resumes", file=sys.stderr)
        return exit_code(e)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE
