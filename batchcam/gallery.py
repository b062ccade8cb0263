"""The static HTML gallery: rendered with Jinja2 (autoescape on) from the templates folder."""
from __future__ import annotations

from collections import Counter
from typing import Sequence
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape

from batchcam.resources import templates_dir
from batchcam.rows import Row


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(templates_dir())), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    # Relative links are percent-encoded so names with #, ?, %, spaces or non-ASCII still resolve.
    env.filters["url"] = lambda path: quote(path, safe="/")
    env.filters["percent"] = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"
    return env


def summary(rows: Sequence[Row], class_names: Sequence[str]) -> dict:
    predicted = Counter(row.prediction for row in rows if row.ok)
    return {"total": len(rows), "ok": sum(row.ok for row in rows), "error": sum(not row.ok for row in rows),
            "per_class": [(name, predicted.get(name, 0)) for name in class_names],
            "wrong": sum(row.correct is False for row in rows)}


def render_gallery(rows: Sequence[Row], class_names: Sequence[str], manifest: dict,
                   metrics: dict | None) -> dict[str, str]:
    """The gallery's files, relative to REPORT, name -> text (``index.html`` is the entry page)."""
    template = environment().get_template("index.html")
    return {"index.html": template.render(rows=rows, class_names=class_names, manifest=manifest,
                                          metrics=metrics, summary=summary(rows, class_names))}
