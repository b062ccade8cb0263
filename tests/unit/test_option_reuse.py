"""Option by option, over every ``scan`` option: changing it recomputes the rows it should and reuses
the rest, on a real re-run of a small report; options that cannot be varied here are checked at the
row key, with the reason. A new scan option fails here until it says what changing it does."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from batchcam.cli import build_parser, main
from batchcam.config import ScanConfig
from batchcam.options import config_bindings, from_values, option_values, row_bindings
from batchcam.report.store import settings_key
from conftest import tiny_checkpoint, write_xrays

XRAYS = 4                  # PNGs: files without DICOM tags, which no --select rule decides
ALL, NONE, DICOM = "all", "none", "dicom"
# What changing each option does on a re-run: the argv that changes it from the base run's value, and
# which rows are recomputed. ``why`` where it is not what ``affects_rows`` alone says.
VARIED: dict[str, tuple[list[str], str, str]] = {
    "root": (["<copy of ROOT>"], NONE, "rows are of files relative to ROOT, by size and mtime"),
    "out": (["--out", "<new REPORT>"], ALL, "a new REPORT holds no rows to reuse"),
    "model": (["--model", "<other model>"], ALL, ""),
    "device": (["--device", "cpu"], NONE, ""),
    "batch_size": (["--batch-size", "2"], NONE, ""),
    "workers": (["--workers", "1"], NONE, ""),
    "cam": (["--cam", "hirescam"], ALL, ""),
    "target": (["--target", "NORMAL"], ALL, ""),
    "positive": (["--positive", "NORMAL"], NONE, ""),
    "save_cams": (["--save-cams"], ALL, "the last run kept no maps for cams.npz"),
    "full": (["--full"], ALL, "what --full is for"),
    "quiet": (["--quiet"], NONE, ""),
    "page_size": (["--page-size", "2"], NONE, ""),
    "heat_scale": (["--heat-scale", "run"], ALL, ""),
    "faithfulness": (["--faithfulness"], ALL, ""),
    "max_file_mb": (["--max-file-mb", "1"], NONE, "a file over the limit is an error row decided every run"),
    "select": (["--select", "all"], DICOM, "each DICOM row records the rule that decided it"),
    "modalities": (["--modalities", "CR"], DICOM, "each DICOM row records the rule that decided it"),
    "views": (["--views", "any"], DICOM, "each DICOM row records the rule that decided it"),
    "overlay_size": (["--overlay-size", "256"], ALL, ""),
    "precision": (["--precision", "bf16"], ALL, ""),
    "backend": (["--backend", "eager"], NONE, ""),
}
# Options a re-run here cannot vary: only their place in the row key is checked.
KEY_ONLY: dict[str, tuple[list[str], str]] = {
    "compile": (["--compile"], "torch.compile takes a minute or more"),
    "decode": (["--decode", "gpu"], "--decode gpu needs a CUDA device"),
    "engine": (["--engine", "ray"], "the ray engine starts a Ray cluster (tests/e2e/test_ray_engine.py compares "
                                    "its rows with the local engine's)"),
    "ray_address": (["--engine", "ray", "--ray-address", "auto"], "needs the ray engine"),
    "gpus_per_worker": (["--engine", "ray", "--gpus-per-worker", "1"], "needs the ray engine and a GPU"),
}
SCAN_OPTIONS = sorted(binding.option.dest for binding in config_bindings(ScanConfig))
KEYED = {binding.option.dest for binding in row_bindings(ScanConfig)}
AFFECTS_ROWS = {binding.option.dest for binding in config_bindings(ScanConfig) if binding.option.affects_rows}
RESOLVED = {"model": {"sha256": "m"}, "precision": "fp32", "target": "predicted"}


PATHS = ("root", "out", "model")   # given as paths: any other one will do for the key


@pytest.mark.parametrize("dest", SCAN_OPTIONS)
def test_every_scan_option_says_what_changing_it_does(dest):
    assert dest in VARIED or dest in KEY_ONLY, (
        f"scan option {dest}: add it to VARIED (what a re-run recomputes when it changes) or to KEY_ONLY (why it "
        "cannot be varied here)")
    assert not (dest in VARIED and dest in KEY_ONLY)
    if dest in VARIED:
        _, recomputed, why = VARIED[dest]
        expected = ALL if dest in KEYED else DICOM if dest in AFFECTS_ROWS else NONE
        assert recomputed == expected or why, f"{dest}: recomputes {recomputed}, its declaration says {expected}"


def test_no_option_is_listed_that_scan_does_not_take():
    assert set(VARIED) | set(KEY_ONLY) <= set(SCAN_OPTIONS)


def parsed(*extra: str) -> ScanConfig:
    """As the base run's options are parsed (``Tree.scan``), and ``extra``."""
    argv = ["scan", "root", "--out", "report", "--model", "model.pt", "--workers", "0", *extra]
    return from_values(ScanConfig, vars(build_parser().parse_args(argv)))


@pytest.mark.parametrize("dest", SCAN_OPTIONS, ids=[
    f"{dest}-{'key only: ' + KEY_ONLY[dest][1] if dest in KEY_ONLY else 'varied'}" for dest in SCAN_OPTIONS])
def test_changing_an_option_changes_the_row_key_exactly_when_it_affects_rows(dest):
    """The key is made of every option that affects rows, with nothing listed by hand: an option keyed by
    its resolved value changes the key through it, an option decided row by row through the row's rule."""
    base = parsed()
    if dest in PATHS:
        changed = dataclasses.replace(base, **{dest: Path("elsewhere")})
    else:
        changed = parsed(*(VARIED[dest][0] if dest in VARIED else KEY_ONLY[dest][0]))
    assert option_values(changed)[dest] != option_values(base)[dest]
    same_key = settings_key(changed, RESOLVED) == settings_key(base, RESOLVED)
    if dest in KEYED and dest in RESOLVED:
        assert same_key, f"{dest} is keyed as the run resolved it, not as given"
        other = {**RESOLVED, dest: {"sha256": "other"} if dest == "model" else "other"}
        assert settings_key(base, other) != settings_key(base, RESOLVED)
    elif dest in KEYED:
        assert not same_key, f"{dest} affects rows: it must be in the row key"
    else:
        assert same_key, f"{dest} does not affect rows: it must not be in the row key"
        if dest in AFFECTS_ROWS:   # decided row by row: by the rule each DICOM row records
            assert changed.selection.key != base.selection.key


def test_the_key_holds_the_target_as_the_class_it_names():
    """--target normal and --target NORMAL name one class of the model: the run resolves both to it."""
    resolved = {**RESOLVED, "target": "NORMAL"}
    assert settings_key(parsed("--target", "normal"), resolved) == settings_key(parsed("--target", "NORMAL"),
                                                                                resolved)


# ------------------------------------------------------------------ a real re-run, option by option

@dataclasses.dataclass(frozen=True)
class Tree:
    root: Path          # XRAYS PNGs and, with pydicom, one CR chest film
    films: int
    model: Path
    other_model: Path
    report: Path        # the base run's

    def scan(self, out: Path, *extra: str, root: Path | None = None) -> int:
        return main(["scan", str(root or self.root), "--out", str(out), "--model", str(self.model),
                     "--workers", "0", *extra])


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Tree:
    base = tmp_path_factory.mktemp("reuse")
    write_xrays(base / "root", count=XRAYS)
    films = 0
    try:
        from tests.dicom_films import dicom_film

        film = dicom_film(Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA")
        (base / "root" / "chest_pa.dcm").write_bytes(film)
        films = 1
    except ImportError:
        pass
    made = Tree(base / "root", films, tiny_checkpoint(base / "model.pt"), tiny_checkpoint(base / "other.pt", seed=1),
                base / "report")
    assert made.scan(made.report) == 0
    return made


def counts(report: Path) -> dict:
    return json.loads((report / "manifest.json").read_text())["counts"]


@pytest.mark.parametrize("dest", sorted(VARIED))
def test_changing_an_option_recomputes_the_rows_it_should_and_reuses_the_rest(dest, tree: Tree, tmp_path,
                                                                             model_calls):
    argv, recomputed, _ = VARIED[dest]
    if recomputed == DICOM and not tree.films:
        pytest.skip("pydicom (the dicom extra) is not installed: no DICOM film to decide again")
    report = tmp_path / "report"
    shutil.copytree(tree.report, report, symlinks=True)
    root = None
    if dest == "root":
        root, argv = tmp_path / "root", []
        shutil.copytree(tree.root, root)  # copy2: the same sizes and mtimes
    elif dest == "out":
        report, argv = tmp_path / "new report", []
    elif dest == "model":
        argv = ["--model", str(tree.other_model)]
    before = counts(report) if report.exists() else None
    assert tree.scan(report, *argv, root=root) == 0
    films = tree.films
    found = XRAYS + films
    expected = {ALL: found, NONE: 0, DICOM: films}[recomputed]
    assert counts(report)["processed"] == expected
    assert counts(report)["reused"] == found - expected
    assert sum(model_calls) == expected          # images through the model: the rows recomputed, no more
    assert before is None or before["ok"] == counts(report)["ok"] == found
