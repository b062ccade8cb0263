"""The table of options: every option of every command reaches argparse with its help and its default
said once, parses into a frozen, typed configuration, is validated with the house's messages, and is
written to the manifest's settings."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import typing
from dataclasses import MISSING, FrozenInstanceError, dataclass
from pathlib import Path

import pytest

from batchcam import config as config_module
from batchcam.cli import COMMANDS, build_parser, main
from batchcam.config import (
    DEFAULT_PAGE_SIZE,
    MAX_WORKERS,
    ScanConfig,
    Selection,
    ServeConfig,
    default_workers,
)
from batchcam.errors import UsageError
from batchcam.options import BINDING, GROUP, Config, Option, config_bindings, from_values, settings, shown_value, switch
from batchcam.report.outputs import page_size_of

COMMAND_NAMES = sorted(COMMANDS)
BINDINGS = [(name, binding) for name in COMMAND_NAMES for binding in config_bindings(COMMANDS[name].config)]


def binding_id(value) -> str:
    return value if isinstance(value, str) else value.option.flag


def subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return commands.choices[command]


def action_of(command: str, dest: str) -> argparse.Action:
    return next(action for action in subparser(command)._actions if action.dest == dest)


def help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """Each argument's entry in ``batchcam COMMAND --help`` (unwrapped), by flag or metavar."""
    monkeypatch.setenv("COLUMNS", "2000")
    assert main([command, "--help"]) == 0
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+|[A-Z][A-Z_.]*)\b", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith(" " * 6):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in entries.items()}


# ------------------------------------------------------------------ argparse, from the table

@pytest.mark.parametrize("command, binding", BINDINGS, ids=[f"{c}-{binding_id(b)}" for c, b in BINDINGS])
def test_every_option_of_every_command_is_in_its_parser_with_its_help_and_default_once(command, binding, capsys,
                                                                                      monkeypatch):
    option, shown = binding.option, binding.shown_default()
    action = action_of(command, option.dest)
    assert action.help == binding.help()
    assert (action.required or not action.option_strings) == binding.required
    entry = help_entries(command, capsys, monkeypatch)[option.metavar if option.positional else option.flag]
    if shown is None:
        assert "default" in option.help or "default" not in entry, entry
    else:
        assert entry.count(f"default: {shown}") == 1, entry
    assert "default: None" not in entry and "default: False" not in entry


@pytest.mark.parametrize("command", COMMAND_NAMES)
def test_argparse_defaults_are_the_configurations_defaults(command, tmp_path):
    """Parsing only the required options gives the configuration its class makes with the same values."""
    config_class = COMMANDS[command].config
    required = {b.option.dest: b for b in config_bindings(config_class) if b.required}
    argv, values = [command], {}
    for dest, binding in required.items():
        value = str(tmp_path / dest)
        argv += [value] if binding.option.positional else [binding.option.flag, value]
        values[dest] = (value,) if binding.many else Path(value)
    parsed = from_values(config_class, vars(build_parser().parse_args(argv)))
    assert parsed == config_class(**values)


def test_a_group_parses_into_its_value_and_gives_back_what_was_typed():
    parsed = from_values(ScanConfig, vars(build_parser().parse_args(
        ["scan", "r", "--out", "o", "--modalities", "dx", "--views", "LL,RL", "--faithfulness"])))
    assert parsed.selection == Selection.from_options("chest", "dx", "LL,RL")
    assert parsed.measures.faithfulness is True
    assert config_module.SELECTION.values(parsed.selection) == {"select": "chest", "modalities": "DX",
                                                                "views": "LL,RL"}


# ------------------------------------------------------------------ frozen and typed

CONFIG_CLASSES = sorted({command.config for command in COMMANDS.values()} | {config_module.Measures},
                        key=lambda cls: cls.__name__)


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_configurations_are_frozen_and_take_keywords_only(config_class, tmp_path):
    required = {f.name: tmp_path for f in dataclasses.fields(config_class)
                if f.default is MISSING and f.default_factory is MISSING}
    if config_class is config_module.PredictConfig:
        required["files"] = ("x.png",)
    config = config_class(**required)
    field = dataclasses.fields(config_class)[0]
    with pytest.raises(FrozenInstanceError):
        setattr(config, field.name, getattr(config, field.name))
    with pytest.raises(TypeError, match="positional"):
        config_class(*required.values(), "one more")


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda cls: cls.__name__)
def test_each_default_has_its_fields_type_and_parses_back_from_its_help(config_class):
    """The field's annotation fits the default, and the option's parser reads the default as --help shows it."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        binding = field.metadata.get(BINDING)
        if binding is None or binding.default in (MISSING, None):
            continue
        expected = typing.get_args(hints[field.name]) or (hints[field.name],)
        assert isinstance(binding.default, tuple(t for t in expected if t is not type(None))), field.name
        if not binding.option.is_switch:
            assert binding.option.parse(shown_value(binding.default)) == binding.default, field.name


def test_a_field_named_otherwise_than_its_option_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match="name the field batch_size"):
        @dataclass(frozen=True, kw_only=True)
        class Misnamed(Config):
            size: int = config_module.BATCH_SIZE.field(8)


def test_an_option_must_say_whether_it_affects_rows():
    with pytest.raises(TypeError, match="affects_rows"):
        Option(flag="--entropy", parse=str, help="also write the entropy column")  # type: ignore[call-arg]  # left out on purpose
    with pytest.raises(TypeError, match="affects_rows"):
        switch("--entropy", "also write the entropy column")  # type: ignore[call-arg]  # left out on purpose
    with pytest.raises(ValueError, match="only an option that affects rows is keyed"):
        Option(flag="--x", parse=str, help="x", affects_rows=False, keyed_resolved=True)


def test_every_option_field_is_bound_and_every_binding_is_a_field():
    """No configuration field outside the table but ScanConfig.argv (the command line itself)."""
    loose = {(cls.__name__, f.name) for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)
             if BINDING not in f.metadata and GROUP not in f.metadata}
    assert loose == {("ScanConfig", "argv")}


# ------------------------------------------------------------------ derived defaults

def test_a_default_that_depends_on_another_option_follows_it():
    assert ScanConfig(root=Path("r"), out=Path("o")).workers == default_workers()
    assert ScanConfig(root=Path("r"), out=Path("o"), engine="ray").workers == 0
    assert ScanConfig(root=Path("r"), out=Path("o"), engine="ray", workers=3).workers == 3
    assert ServeConfig().max_concurrent_requests == 4
    assert ServeConfig(max_upload_mb=1).max_concurrent_requests == 16


@pytest.mark.parametrize("upload_mb", [math.nan, 0, -5, math.inf])
def test_a_derived_default_of_a_refused_value_still_lets_the_configuration_be_refused(upload_mb):
    config = ServeConfig(max_upload_mb=upload_mb)
    with pytest.raises(UsageError, match="^--max-upload-mb must be"):
        config.validate()


# ------------------------------------------------------------------ bad values: exit 2, as before

@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--page-size", "0"], "--page-size must be at least 1, got 0"),
    (["--workers", "-1"], "--workers must be at least 0, got -1"),
    (["--workers", str(MAX_WORKERS + 1)], f"--workers must be at most {MAX_WORKERS}, got {MAX_WORKERS + 1}"),
    (["--overlay-size", "100"], "--overlay-size must be between 256 and 4096 px, got 100"),
    (["--max-file-mb", "0"], "--max-file-mb must be more than 0, got 0"),
    (["--max-file-mb", "nan"], "--max-file-mb must be a finite number, got nan"),
    (["--cam", "nope"], "argument --cam: invalid choice: 'nope'"),
    (["--heat-scale", "x"], "argument --heat-scale: invalid choice: 'x'"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--compile", "--backend", "onnx"], "--compile and --backend onnx both build the model step; choose one"),
    (["--ray-address", "auto"], "--ray-address and --gpus-per-worker need --engine ray"),
    (["--select", "all", "--views", "PA"], "--select all scores every file"),
    (["--modalities", "C;T"], "is not a DICOM code"),
    (["--model", "missing.pt"], "--model missing.pt does not exist"),
])
def test_a_bad_scan_value_exits_2_with_its_message_and_report_untouched(extra, message, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "xrays").mkdir()
    assert main(["scan", "xrays", "--out", "report", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port must be at most 65535, got 70000"),
    (["serve", "--max-upload-mb", "nan"], "--max-upload-mb must be a finite number, got nan"),
    (["serve", "--max-concurrent-requests", "0"], "--max-concurrent-requests must be at least 1, got 0"),
    (["predict", "x.png", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["predict", "x.png", "--out", "a-file"], "--out a-file exists and is not a folder"),
    (["calibrate", "labelled", "--model", "m.pt", "--out", "n.pt"], "labelled is not a folder"),
    (["sanity", "xrays", "--out", "a-file"], "--out a-file exists and is not a folder"),
])
def test_a_bad_value_of_another_command_exits_2_with_its_message(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the manifest's settings

def test_settings_hold_every_option_as_json_with_the_values_the_run_resolved():
    config = ScanConfig(root=Path("xrays"), out=Path("report"), page_size=7, argv=("scan",))
    written = settings(config, resolved={"device": "cpu", "precision": "fp32"})
    assert set(written) == {binding.option.dest for binding in config_bindings(ScanConfig)}
    assert json.loads(json.dumps(written)) == written
    assert written["page_size"] == 7 and written["root"] == "xrays" and written["faithfulness"] is False
    assert (written["device"], written["precision"]) == ("cpu", "fp32")
    assert (written["select"], written["modalities"], written["views"]) == ("chest", "CR,DX", "PA,AP")
    with pytest.raises(ValueError, match="not options of ScanConfig: speed"):
        settings(config, resolved={"speed": 3})


def test_evaluate_keeps_the_page_size_from_the_settings_never_from_the_arguments():
    manifest = {"args": ["scan", "x", "--out", "y", "--page-size", "3"], "settings": {"page_size": 7}}
    assert page_size_of(manifest) == 7
    assert page_size_of({"args": ["scan", "x", "--page-size", "3"]}) == DEFAULT_PAGE_SIZE  # written before settings
    assert page_size_of({"settings": {"page_size": True}}) == DEFAULT_PAGE_SIZE


def test_a_scan_writes_its_settings_and_evaluate_reads_the_page_size_back(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "report"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--page-size", "3", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["page_size"] == 3
    assert manifest["settings"]["model"] == str(tiny_model)
    assert (manifest["settings"]["device"], manifest["settings"]["precision"]) == ("cpu", "fp32")
    assert page_size_of(manifest) == 3
