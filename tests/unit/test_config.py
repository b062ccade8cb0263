"""config's table of options, option by option and command by command: the default ``--help`` prints is
the value the command runs with, each option's declared type parses its text and refuses text of another
type, each bounded option refuses a value out of bounds, and a refusal is exit 2 with one line that names
the option (tests/unit/test_options.py checks the table's wiring into argparse and the settings)."""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import pytest

from batchcam import config as config_module
from batchcam.cli import COMMANDS, main
from batchcam.errors import UsageError
from batchcam.options import Binding, config_bindings, option_values, path_argument
from conftest import write_xrays
from tests.unit.test_options import help_entries

COMMAND_NAMES = sorted(COMMANDS)
BINDINGS = [(name, b) for name in COMMAND_NAMES for b in config_bindings(COMMANDS[name].config)]
GROUPED = {b.option.dest for b in config_module.SELECTION.bindings}  # one value made by Selection.from_options


def entry_of(command: str, binding: Binding, capsys, monkeypatch) -> str:
    """The option's own entry in ``batchcam COMMAND --help``."""
    name = binding.option.metavar if binding.option.positional else binding.option.flag
    return help_entries(command, capsys, monkeypatch)[name]


def required_values(config_class: type, tmp_path: Path, model: Path) -> dict:
    """Values of the required options that pass their checks."""
    (tmp_path / "xrays").mkdir(exist_ok=True)
    values: dict = {}
    for binding in config_bindings(config_class):
        if binding.required:
            dest = binding.option.dest
            existing = {"root": tmp_path / "xrays", "model": model, "source": model}
            values[dest] = ("x.png",) if binding.many else existing.get(dest, tmp_path / f"new-{dest}")
    return values


def required_argv(command: str, tmp_path: Path) -> list[str]:
    """The required arguments of ``command``, as typed, with values that pass their checks."""
    config_class = COMMANDS[command].config
    values = required_values(config_class, tmp_path, tmp_path / "m.pt")
    argv: list[str] = []
    for binding in config_bindings(config_class):
        if binding.required:
            value = values[binding.option.dest]
            text = str(value[0] if isinstance(value, tuple) else value)
            argv += [text] if binding.option.positional else [binding.option.flag, text]
    return argv


# ------------------------------------------------------------------ the default --help says is the one used

STATED = [(name, b) for name, b in BINDINGS
          if not b.required and b.rule is None and not b.option.is_switch and b.default is not None]


@pytest.mark.parametrize("command, binding", STATED, ids=[f"{c}-{b.option.dest}" for c, b in STATED])
def test_the_default_help_states_is_the_value_the_command_runs_with(command, binding, tmp_path, tiny_model, capsys,
                                                                   monkeypatch):
    entry = entry_of(command, binding, capsys, monkeypatch)
    stated = re.search(r"default: (.+?)(?:[;)]|, )", entry)
    assert stated, f"{binding.option.flag}: its help states no default: {entry}"
    config_class = COMMANDS[command].config
    used = option_values(config_class(**required_values(config_class, tmp_path, tiny_model)))[binding.option.dest]
    assert binding.option.parse(stated.group(1).strip()) == used


SWITCHES = [(name, b) for name, b in BINDINGS if b.option.is_switch]


@pytest.mark.parametrize("command, binding", SWITCHES, ids=[f"{c}-{b.option.dest}" for c, b in SWITCHES])
def test_a_switch_is_off_unless_given_and_its_help_states_no_other_default(command, binding, tmp_path, tiny_model,
                                                                          capsys, monkeypatch):
    config_class = COMMANDS[command].config
    assert option_values(config_class(**required_values(config_class, tmp_path, tiny_model)))[
        binding.option.dest] is False
    entry = entry_of(command, binding, capsys, monkeypatch)
    assert "default: True" not in entry and "default: False" not in entry and "default: on" not in entry


# ------------------------------------------------------------------ each declared type parses and refuses

REFUSED_TEXT = {int: ["twelve", "1.5", ""], float: ["twelve", "1,5", ""]}
ACCEPTED_TEXT = {int: [("7", 7), ("-3", -3)], float: [("2.5", 2.5), ("1e3", 1000.0), ("8", 8.0)]}
TYPED = [(name, b) for name, b in BINDINGS if b.option.parse in (int, float)]


@pytest.mark.parametrize("command, binding", TYPED, ids=[f"{c}-{b.option.dest}" for c, b in TYPED])
def test_a_numeric_option_parses_its_type_and_refuses_other_text_with_exit_2_naming_it(command, binding,
                                                                                      tmp_path, monkeypatch,
                                                                                      capsys):
    kind, option = binding.option.parse, binding.option
    for text, value in ACCEPTED_TEXT[kind]:
        assert option.parse(text) == value and type(option.parse(text)) is kind
    monkeypatch.chdir(tmp_path)
    for text in REFUSED_TEXT[kind]:
        assert main([command, *required_argv(command, tmp_path), option.flag, text]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {option.flag}: invalid {kind.__name__} value: '{text}'" in last


PATHS = [(name, b) for name, b in BINDINGS if b.option.parse is path_argument]


@pytest.mark.parametrize("command, binding", PATHS, ids=[f"{c}-{b.option.dest}" for c, b in PATHS])
def test_a_path_option_takes_any_name_but_an_empty_one(command, binding):
    assert binding.option.parse("odd name\nwith a newline.pt") == Path("odd name\nwith a newline.pt")
    with pytest.raises(argparse.ArgumentTypeError, match="an empty path names nothing"):
        binding.option.parse("")


CHOICES = [(name, b) for name, b in BINDINGS if b.option.choices]


@pytest.mark.parametrize("command, binding", CHOICES, ids=[f"{c}-{b.option.dest}" for c, b in CHOICES])
def test_a_choice_option_takes_each_choice_and_refuses_another_word_naming_the_choices(command, binding):
    option = binding.option
    for choice in option.choices:
        option.validate(option.parse(choice))
    for wrong in ("nope", option.choices[0].upper() if option.choices[0].upper() != option.choices[0] else "X"):
        with pytest.raises(UsageError) as refused:
            option.validate(wrong)
        assert str(refused.value) == f"{option.name} {wrong!r} is not one of: {', '.join(option.choices)}"


# ------------------------------------------------------------------ bounds: one line naming the option

def out_of_bounds(binding: Binding, tmp_path: Path) -> list:
    option = binding.option
    if option.parse is int:
        return [-1, 10 ** 12]
    if option.parse is float:
        return [-1.0, 0.0, math.nan, math.inf, 1e12]
    if option.parse is path_argument:
        return [tmp_path / "missing", tmp_path / "a-file"]
    return []


CHECKED = [(name, b) for name, b in BINDINGS
           if b.option.check is not None and b.option.dest not in GROUPED]


@pytest.mark.parametrize("command, binding", CHECKED, ids=[f"{c}-{b.option.dest}" for c, b in CHECKED])
def test_a_value_out_of_bounds_is_one_line_that_names_the_option(command, binding, tmp_path, tiny_model):
    (tmp_path / "a-file").write_text("")
    config_class, option = COMMANDS[command].config, binding.option
    values = required_values(config_class, tmp_path, tiny_model)
    bad_values = [v for v in out_of_bounds(binding, tmp_path) if not (option.dest == "out" and v == tmp_path /
                                                                        "missing")]
    assert bad_values, f"{option.flag}: no value out of bounds is known for its type"
    refused = 0
    for bad in bad_values:
        try:
            config_class(**{**values, option.dest: bad}).validate()
        except UsageError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(f"{option.name} "), message
            refused += 1
    assert refused, f"{option.flag}: none of {bad_values} was refused"


NUMERIC_WITHOUT_CHECK = [(name, b) for name, b in BINDINGS
                         if b.option.parse in (int, float) and b.option.check is None]
UNCHECKED_ON_PURPOSE = {"gpus_per_worker": "needs --engine ray: ScanConfig.check_engine refuses a negative one"}


@pytest.mark.parametrize("command, binding", NUMERIC_WITHOUT_CHECK,
                         ids=[f"{c}-{b.option.dest}" for c, b in NUMERIC_WITHOUT_CHECK])
def test_every_numeric_option_declares_its_bounds_in_the_table(command, binding):
    assert binding.option.dest in UNCHECKED_ON_PURPOSE, (
        f"{binding.option.flag} ({command}) declares no check: its bounds live outside config's table")


@pytest.mark.parametrize("argv, option", [
    (["scan", "xrays", "--out", "report", "--batch-size", "0"], "--batch-size"),
    (["scan", "xrays", "--out", "report", "--max-file-mb", "inf"], "--max-file-mb"),
    (["scan", "missing", "--out", "report"], "ROOT"),
    (["predict", "x.png", "--max-file-mb", "-2"], "--max-file-mb"),
    (["sanity", "xrays", "--out", "a-file"], "--out"),
    (["serve", "--max-files", "0"], "--max-files"),
    (["calibrate", "xrays", "--model", "missing.pt", "--out", "new.pt"], "--model"),
])
def test_a_validation_error_is_exit_2_and_one_line_that_names_the_option(argv, option, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xrays").mkdir()
    (tmp_path / "a-file").write_text("")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"batchcam: error: {option} "), captured.err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("kind, said", [
    ("dev-zero", "is a character device, not a regular file: give a checkpoint file"),
    ("fifo", "is a FIFO, not a regular file: give a checkpoint file"),
    ("sparse", f"is 40960 MiB, more than the {config_module.MAX_MODEL_BYTES // 2**20} MiB a model file may have"),
    ("folder", "is a folder, not a regular file: give a checkpoint file"),
    ("missing", "does not exist"),
])
def test_a_model_file_is_checked_to_be_a_bounded_regular_file_before_anything_runs(kind, said, tmp_path):
    path = Path("/dev/zero") if kind == "dev-zero" else tmp_path / f"model-{kind}.pt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(40 * 2**30)
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(UsageError) as refused:
        config_module.check_model(path)
    assert str(refused.value) == f"--model {path} {said}"


NBV = ("NORMAL", "BACTERIA", "VIRUS")


@pytest.mark.parametrize(("given", "expected"), [
    (None, (2,)),                                 # no PNEUMONIA: the last class
    (("VIRUS", "BACTERIA"), (1, 2)),              # in the model's order whatever the order given
    (("virus", "Bacteria", "VIRUS"), (1, 2)),     # any case, each once
    (("NORMAL",), (0,)),
])
def test_positive_classes_resolve_to_the_models_indices(given, expected):
    assert config_module.resolve_positive(given, NBV) == expected


def test_the_default_positive_class_is_pneumonia_in_any_case():
    assert config_module.resolve_positive(None, ("pneumonia", "NORMAL")) == (0,)


@pytest.mark.parametrize(("given", "said"), [
    (("FUNGAL",), "--positive FUNGAL: not one of the classes (NORMAL, BACTERIA, VIRUS)"),
    (("VIRUS", "TB", "x"), "--positive TB,x: not one of the classes (NORMAL, BACTERIA, VIRUS)"),
    (("VIRUS", ""), "empty class name"),
    (("NORMAL", "BACTERIA", "VIRUS"), "names every class (NORMAL, BACTERIA, VIRUS)"),
])
def test_a_positive_class_the_model_lacks_or_every_class_at_once_is_refused_in_one_line(given, said):
    with pytest.raises(UsageError) as refused:
        config_module.resolve_positive(given, NBV)
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_an_unknown_positive_class_is_exit_2_before_the_report_is_made(tmp_path, tiny_model, capsys):
    root = tmp_path / "xrays"
    write_xrays(root, count=1)
    report = tmp_path / "report"
    assert main(["scan", str(root), "--out", str(report), "--model", str(tiny_model), "--positive", "VIRUS"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["batchcam: error: --positive VIRUS: not one of the classes (NORMAL, PNEUMONIA)"]
    assert not report.exists()
