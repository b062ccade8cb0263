"""The command line's own text: help that states each default once, and errors that name the problem."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from batchcam.cli import build_parser, main

COMMANDS = ("scan", "predict", "evaluate", "sanity", "serve", "calibrate", "review")


def command_help(command: str, capsys) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def option_entries(help_text: str) -> dict[str, str]:
    """Each option's help, its wrapped lines joined, keyed by the option's first spelling."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in entries.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_states_its_default_at_most_once_and_never_none(command, capsys):
    entries = option_entries(command_help(command, capsys))
    assert "-h" in entries and len(entries) >= 2
    assert {name: text for name, text in entries.items() if text.count("(default:") > 1} == {}
    assert {name: text for name, text in entries.items() if "default: None" in text or "default: False" in text} \
        == {}


def test_scan_help_states_the_defaults_it_has(capsys):
    entries = option_entries(command_help("scan", capsys))
    assert entries["--out"] == "--out REPORT report folder to write"
    assert entries["--modalities"].endswith("(default: CR,DX)")
    assert entries["--batch-size"].endswith("(default: 32)")
    assert entries["--max-file-mb"].count("512") == 1


@pytest.mark.parametrize("argv, message", [
    (["scan", "samples", "--ouput", "report"], "unrecognized option --ouput; did you mean --out?"),
    (["scan", "samples", "--out=report", "--ouput=other"], "unrecognized option --ouput; did you mean --out?"),
    (["scan", "samples", "--out", "report", "--qiet"], "unrecognized option --qiet; did you mean --quiet?"),
    (["predict", "x.png", "--jsn"], "unrecognized option --jsn; did you mean --json?"),
    (["serve", "--max-upload", "5", "--zzzz"], "unrecognized option --zzzz\n"),
])
def test_an_unknown_option_is_named_with_the_option_it_is_close_to(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "required" not in err


def test_a_unique_prefix_and_values_after_double_dash_still_work():
    args = build_parser().parse_args(["scan", "--out", "report", "--qui", "--", "--odd-folder-name"])
    assert args.quiet and str(args.root) == "--odd-folder-name"


def test_the_synthetic_generator_names_itself_as_it_is_run():
    done = subprocess.run([sys.executable, "-m", "batchcam.synthetic", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: python -m batchcam.synthetic ")
