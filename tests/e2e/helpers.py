"""What the end-to-end suites share: running a scan the way a user does, and reading what it wrote
(the CSV, the manifest, the gallery's data) the way a user's script or browser reads it."""
from __future__ import annotations

import contextlib
import csv
import html.parser
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from batchcam.cli import main

REPO = Path(__file__).resolve().parents[2]
ROWS_PREFIX = "window.BATCHCAM_ROWS = "


# ---- running a scan ------------------------------------------------------------------------------

def scan_argv(root: Path, out: Path, model: Path | None, *extra: str, workers: str | None = "0") -> list[str]:
    """``scan ROOT --out OUT [--model MODEL] [--workers N] EXTRA...``; no --model: the demo model."""
    return ["scan", str(root), "--out", str(out), *(["--model", str(model)] if model else []),
            *(["--workers", workers] if workers is not None else []), *extra]


def scan(root: Path, out: Path, model: Path | None, *extra: str, workers: str | None = "0") -> int:
    """A scan in this process (``batchcam.cli.main``); its exit code."""
    return main(scan_argv(root, out, model, *extra, workers=workers))


def scan_said(root: Path, out: Path, model: Path | None, *extra: str) -> tuple[int, str]:
    """A scan in this process: its exit code and everything it printed (stdout and stderr)."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
        code = scan(root, out, model, *extra)
    return code, said.getvalue()


def scan_command(root: Path, out: Path, model: Path | None, *extra: str, workers: str | None = "0") -> list[str]:
    """The command line of a scan in a process of its own (``python -m batchcam``)."""
    return [sys.executable, "-m", "batchcam", *scan_argv(root, out, model, *extra, workers=workers)]


def scan_process(root: Path, out: Path, model: Path | None, *extra: str) -> subprocess.Popen:
    """A scan started in a process of its own, its output piped (text, unbuffered)."""
    return subprocess.Popen(scan_command(root, out, model, *extra, workers=None), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


# ---- reading a report ----------------------------------------------------------------------------

def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_rows(report: Path) -> list[dict]:
    """REPORT/predictions.csv, one dict of strings per row, in the file's order."""
    return csv_rows(report / "predictions.csv")


def rows_by_path(report: Path) -> dict[str, dict]:
    return {row["path"]: row for row in read_rows(report)}


def manifest(report: Path) -> dict:
    return json.loads((report / "manifest.json").read_text(encoding="utf-8"))


def rows_script(report: Path) -> dict:
    """REPORT/gallery/rows.js, parsed: pageSize, pages, columns, attributes and rows."""
    text = (report / "gallery" / "rows.js").read_text(encoding="utf-8")
    assert text.startswith(ROWS_PREFIX) and text.rstrip().endswith(";")
    return json.loads(text[len(ROWS_PREFIX):].rstrip().rstrip(";"))


def records(data: dict) -> list[dict]:
    """The rows of the gallery's data (rows.js or a page's), each a dict by column."""
    return [dict(zip(data["columns"], record)) for record in data["rows"]]


class _DataBlock(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.blocks: list[tuple[dict, str]] = []
        self._open: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._open = dict(attrs) if tag == "script" else None
        if self._open is not None:
            self.blocks.append((self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            attrs, text = self.blocks[-1]
            self.blocks[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        self._open = None


def page_data(page: str) -> dict:
    """A gallery page's own rows, from its JSON data block (what gallery.js builds the cards from)."""
    blocks = [text for attrs, text in _DataBlock(page).blocks if attrs.get("id") == "page-rows"]
    assert len(blocks) == 1, f"{len(blocks)} data blocks"
    return json.loads(blocks[0])


def page_cards(page: str) -> list[dict]:
    """What each card of a gallery page shows: its row's record, with its ``index`` in the run."""
    data = page_data(page)
    return [{**record, "index": data["start"] + i} for i, record in enumerate(records(data))]


def train_model_module():
    """train_model.py (a script, not a package module) imported once for the tests that call its functions."""
    if "train_model" in sys.modules:
        return sys.modules["train_model"]
    spec = importlib.util.spec_from_file_location("train_model", REPO / "train_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_model"] = module
    spec.loader.exec_module(module)
    return module
