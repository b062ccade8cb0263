"""What changed since the last completed run: each row's ``first_seen`` and ``change``, and
``REPORT/runs.jsonl``, one line per completed run (the gallery's "last runs" table).

A row is compared with the row of the same file in the last complete run's store, whatever the
settings it was made with: a file not there is ``new``; one whose bytes differ is ``changed``; one
whose prediction differs (a new model or CAM setting re-scored it) is ``prediction changed``.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from batchcam.records import CHANGES, Row

RUNS = "runs.jsonl"
RECENT_RUNS = 5     # runs shown in the gallery's summary


def change_of(row: Row, before: Row | None) -> str:
    if before is None:
        return "new"
    if before.sha256 != row.sha256:
        return "changed"
    if _prediction(before) != _prediction(row):
        return "prediction changed"
    return ""


def _prediction(row: Row) -> str:
    return row.prediction if row.ok else ""   # any status but ok means "no prediction"


def mark_changes(rows: Sequence[Row], last_run: dict[str, Row], started_at: str) -> dict:
    """Set each row's ``first_seen`` and ``change`` against the last complete run; return the counts."""
    for row in rows:
        before = last_run.get(row.relpath)
        row.first_seen = before.first_seen if before is not None and before.first_seen else started_at
        row.change = change_of(row, before)
    return change_counts(rows)


def change_counts(rows: Sequence[Row]) -> dict:
    counted = Counter(row.change for row in rows)
    return {change.replace(" ", "_"): counted.get(change, 0) for change in CHANGES}


def run_record(manifest: dict, changes: dict) -> dict:
    """One line of runs.jsonl: when, what was found and changed, with which model and CAM settings."""
    return {"started_at": manifest["started_at"], "finished_at": manifest["finished_at"],
            "counts": {**manifest["counts"], **changes}, "model": manifest["model"].get("name", ""),
            "model_sha256": manifest["model"]["sha256"], "cam": manifest["cam"]}


def parse_runs(text: str | None) -> list[dict]:
    """The runs in runs.jsonl, oldest first; a torn or foreign line is skipped."""
    runs = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("started_at"), str):
            runs.append(record)
    return runs


def since_text(runs_before: Sequence[dict], changes: dict) -> str:
    """The summary's sentence, e.g. "12 new images since the run of 2026-12-01 02:15, 1 prediction changed"."""
    parts = [f"{changes['new']} new image{'s' if changes['new'] != 1 else ''}"]
    if not runs_before:
        return f"{parts[0]}: the first run recorded for this report"
    parts[0] += f" since the run of {short_time(runs_before[-1]['started_at'])}"
    if changes["changed"]:
        parts.append(f"{changes['changed']} changed")
    parts.append(f"{changes['prediction_changed']} prediction{'s' if changes['prediction_changed'] != 1 else ''} "
                 "changed")
    return ", ".join(parts)


def short_time(iso: str) -> str:
    """``2026-12-01T02:15:09+00:00`` -> ``2026-12-01 02:15`` (the report's times are UTC)."""
    return iso[:16].replace("T", " ")
