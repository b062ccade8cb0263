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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from batchcam import __version__
from batchcam.config import (
    POSITIVE,
    SELECTION,
    CalibrateConfig,
    EvaluateConfig,
    ImportModelConfig,
    PredictConfig,
    ReviewConfig,
    SanityConfig,
    ScanConfig,
    Selection,
    ServeConfig,
    shown,
)
from batchcam.errors import ReportLocked, ReportWriteError, UsageError
from batchcam.options import Config, add_arguments, config_bindings, from_values
from batchcam.runtime.allocator import keep_freed_memory
from batchcam.runtime.console import Console
from batchcam.runtime.interrupt import Interrupted

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_IMAGE_ERRORS = 0, 1, 2, 3
EXIT_CANNOT_WRITE, EXIT_LOCKED, EXIT_SIGINT = 74, 75, 130
C = TypeVar("C", bound=Config)


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


def build_parser() -> argparse.ArgumentParser:
    """Each command's arguments, from the options its configuration binds (``batchcam.config``)."""
    parser = Parser(prog="batchcam", description="Batch predictions and Grad-CAM explanations over folders of "
                    "chest X-rays.")
    parser.add_argument("--version", action="version", version=f"batchcam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=command.help), config_bindings(command.config))
    return parser


def add_selection_options(parser: argparse.ArgumentParser) -> None:
    """--select, --modalities and --views (train_model.py takes them too)."""
    add_arguments(parser, SELECTION.bindings)


def add_positive_option(parser: argparse.ArgumentParser) -> None:
    """--positive (train_model.py scores its validation and test splits with it)."""
    add_arguments(parser, (POSITIVE.bound(None),))


def selection(args: argparse.Namespace) -> Selection:
    return SELECTION.from_values(vars(args))


def run_evaluate(config: EvaluateConfig) -> int:
    from batchcam.commands.evaluate import evaluate

    results = evaluate(config.report, config.boxes, warn=lambda text: print(f"batchcam: warning: {one_line(text)}",
                                                                            file=sys.stderr))
    rate, energy = results["pointing_game"]["hit_rate"], results["energy_inside"]["mean"]
    print(f"batchcam: {results['n']} images with boxes, pointing game "
          f"{'n/a' if rate is None else f'{rate:.3f}'}, heat inside boxes "
          f"{'n/a' if energy is None else f'{energy:.3f}'} -> {shown(config.report / 'metrics.json')}", flush=True)
    return EXIT_OK


def run_review(config: ReviewConfig) -> int:
    from batchcam.commands.review import import_reviews

    result = import_reviews(config.report, config.import_csv)
    marked = f", {result.marked} kept for files changed or gone" if result.marked else ""
    print(f"batchcam: imported {result.imported} decisions; {result.stored} in reviews.csv, {result.current} on "
          f"images as they are now{marked} -> {shown(config.report / 'reviews.csv')}", flush=True)
    return EXIT_OK


def run_sanity(config: SanityConfig) -> int:
    from batchcam.commands.sanity import sanity

    summary, where = sanity(config, Console())
    print(f"batchcam: {summary} -> {shown(where)}", flush=True)
    return EXIT_OK


def run_calibrate(config: CalibrateConfig) -> int:
    from batchcam.commands.calibrate import calibrate

    result = calibrate(config, Console())
    print(f"batchcam: {result.summary_line} -> {shown(config.out)}", flush=True)
    return EXIT_OK


def run_import_model(config: ImportModelConfig) -> int:
    from batchcam.commands.import_model import run_import

    report = run_import(config)
    for line in report.lines():
        print(f"batchcam: {one_line(line)}", flush=True)
    return EXIT_OK


def run_predict(config: PredictConfig) -> int:
    from batchcam.commands.predict import predict

    console = Console()
    try:
        result = predict(config, console)
    except KeyboardInterrupt:
        print("batchcam: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    where = f"; overlays in {shown(config.out)}" if config.out is not None else ""
    print(f"{result.summary_line}{where}", file=sys.stderr, flush=True)
    return EXIT_IMAGE_ERRORS if result.error else EXIT_OK


def run_serve(config: ServeConfig) -> int:
    from batchcam.commands.serve import serve

    return serve(config, Console())


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


@dataclass(frozen=True)
class Command(Generic[C]):
    """A subcommand: its configuration (whose options make its arguments), its help, what runs it."""

    config: type[C]
    help: str
    run: Callable[[C], int]
    records_argv: bool = False   # its configuration keeps the command line as given (the manifest's args)


COMMANDS: dict[str, Command[Any]] = {
    "scan": Command(ScanConfig, "classify and explain every X-ray under ROOT, write a report", run_scan,
                    records_argv=True),
    "predict": Command(PredictConfig, "classify and explain a few X-ray files, print the results", run_predict),
    "evaluate": Command(EvaluateConfig, "score a report's heatmaps against ground-truth boxes (pointing game, heat "
                        "inside the boxes)", run_evaluate),
    "sanity": Command(SanityConfig, "model-randomisation sanity check of the heatmaps (Adebayo et al. 2018)",
                      run_sanity),
    "serve": Command(ServeConfig, "a local web page to upload X-rays and see predictions and overlays (needs the "
                     "'serve' extra)", run_serve),
    "calibrate": Command(CalibrateConfig, "add out-of-distribution statistics and a temperature to a model, from "
                         "labelled images, without retraining", run_calibrate),
    "import-model": Command(ImportModelConfig, "read a model trained elsewhere (any state dict, a pickled or "
                            "TorchScript model) into a batchcam checkpoint that records its classes and "
                            "preprocessing", run_import_model),
    "review": Command(ReviewConfig, "merge reviewers' decisions (the gallery's exported review.csv) into "
                      "REPORT/reviews.csv and update the gallery", run_review),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage, 0 for --help/--version
        return int(e.code or 0)
    keep_freed_memory()  # every command runs batches through the model
    command = COMMANDS[args.command]
    try:
        others = {"argv": tuple(argv)} if command.records_argv else {}
        return command.run(from_values(command.config, vars(args), **others))
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
