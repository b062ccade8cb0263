"""Reviewers' decisions on a report: the gallery's exported ``review.csv``, merged into
``REPORT/reviews.csv`` by ``batchcam review --import``, and what they say about the model.

A decision is about one file's bytes: it is keyed by (path, sha256). Merging keeps the later
decision of each key. Rows whose file is no longer in the report, or whose file changed since, are
kept and marked in ``state``; only current decisions show in the gallery and count in metrics.json.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from batchcam.errors import UsageError
from batchcam.records import Row, one_line

REVIEWS = "reviews.csv"
REVIEW_COLUMNS = ("path", "sha256", "prediction", "confidence", "decision", "note", "reviewed_at")
STORED_COLUMNS = (*REVIEW_COLUMNS, "state")
DECISIONS = ("agree", "disagree", "unsure")
FILE_CHANGED, FILE_GONE = "file changed", "file gone"
MAX_NOTE = 500
SHA256 = re.compile(r"[0-9a-f]{64}")
SHOWN_PROBLEMS = 3


@dataclass(frozen=True)
class Review:
    path: str
    sha256: str
    prediction: str
    confidence: str
    decision: str
    note: str
    reviewed_at: str         # ISO 8601, UTC
    state: str = ""          # "", FILE_CHANGED or FILE_GONE

    @property
    def key(self) -> tuple[str, str]:
        return self.path, self.sha256


def parse_export(text: str, source: str, class_names: Sequence[str]) -> list[Review]:
    """The gallery's review.csv, every row checked; UsageError naming the first problems."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [name for name in REVIEW_COLUMNS if name not in (reader.fieldnames or [])]
    if missing:
        raise UsageError(f"{source} is not a gallery's review.csv: missing column(s) {', '.join(missing)} "
                         f"(expected {','.join(REVIEW_COLUMNS)})")
    reviews, problems = [], []
    for number, values in enumerate(reader, start=2):
        try:
            reviews.append(checked_review(values, class_names))
        except ValueError as e:
            problems.append(f"line {number}: {e}")
    if problems:
        raise UsageError(f"{source}: {len(problems)} bad row(s): " + "; ".join(problems[:SHOWN_PROBLEMS]))
    if not reviews:
        raise UsageError(f"{source} holds no decisions")
    return reviews


def checked_review(values: dict[str, str | None], class_names: Sequence[str]) -> Review:
    if None in values or any(values.get(name) is None for name in REVIEW_COLUMNS):
        raise ValueError("wrong number of fields")
    decision, sha256, prediction = values["decision"], values["sha256"], values["prediction"]
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if not SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 {sha256!r} is not 64 lowercase hex digits")
    if prediction and prediction not in class_names:
        raise ValueError(f"prediction {prediction!r} is not a class of this report ({', '.join(class_names)})")
    if values["confidence"]:
        confidence = float(values["confidence"])
        if not 0 <= confidence <= 1:
            raise ValueError(f"confidence {confidence} is not within 0..1")
    note = one_line(values["note"])
    if len(note) > MAX_NOTE:
        raise ValueError(f"note longer than {MAX_NOTE} characters")
    return Review(path=values["path"], sha256=sha256, prediction=prediction, confidence=values["confidence"],
                  decision=decision, note=note, reviewed_at=utc_time(values["reviewed_at"]))


def utc_time(text: str) -> str:
    """An ISO 8601 time (the browser's ``toISOString()``) as UTC with milliseconds; ValueError if it is none."""
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"reviewed_at {text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"reviewed_at {text!r} has no time zone")
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def check_belongs(reviews: Sequence[Review], rows: Sequence[Row], source: str) -> None:
    """Refuse decisions about paths this report does not hold (a CSV of another report, most likely)."""
    paths = {row.path for row in rows}
    unknown = sorted({review.path for review in reviews if review.path not in paths})
    if not unknown:
        return
    if len(unknown) == len({review.path for review in reviews}):
        raise UsageError(f"{source} is not a review of this report: none of its paths is in predictions.csv "
                         f"(e.g. {unknown[0]!r})")
    raise UsageError(f"{source} names {len(unknown)} path(s) not in this report: "
                     + ", ".join(repr(path) for path in unknown[:SHOWN_PROBLEMS]))


def read_stored(text: str | None) -> list[Review]:
    """``REPORT/reviews.csv`` as written by ``write_reviews``; a row that is not one is skipped."""
    reviews = []
    for values in csv.DictReader(io.StringIO(text or "", newline="")):
        try:
            if values.get("decision") in DECISIONS and SHA256.fullmatch(values.get("sha256") or ""):
                reviews.append(Review(**{name: values[name] or "" for name in REVIEW_COLUMNS},
                                      state=values.get("state") or ""))
        except (KeyError, TypeError):
            continue
    return reviews


def merge(stored: Iterable[Review], imported: Iterable[Review]) -> list[Review]:
    """One decision per (path, sha256): the later ``reviewed_at`` wins, an imported one on a tie."""
    merged: dict[tuple[str, str], Review] = {}
    for review in (*stored, *imported):
        kept = merged.get(review.key)
        if kept is None or _moment(review) >= _moment(kept):
            merged[review.key] = review
    return sorted(merged.values(), key=lambda review: (review.path, review.reviewed_at))


def _moment(review: Review) -> datetime:
    try:
        return datetime.fromisoformat(review.reviewed_at)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def mark_states(reviews: Iterable[Review], rows: Sequence[Row]) -> list[Review]:
    """Each decision marked against the report as it is now: current, its file changed, or gone."""
    sha_of = {row.path: row.sha256 for row in rows}
    marked = []
    for review in reviews:
        state = FILE_GONE if review.path not in sha_of else "" if sha_of[review.path] == review.sha256 else FILE_CHANGED
        marked.append(replace(review, state=state))
    return marked


def write_reviews(stream: io.TextIOBase, reviews: Iterable[Review]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(STORED_COLUMNS)
    for review in reviews:
        writer.writerow([getattr(review, name) for name in STORED_COLUMNS])


def current_decisions(reviews: Iterable[Review], rows: Sequence[Row]) -> dict[str, Review]:
    """Row path -> the decision about the file as it is now (same path, same bytes)."""
    sha_of = {row.path: row.sha256 for row in rows}
    return {review.path: review for review in reviews if sha_of.get(review.path) == review.sha256}


def review_summary(rows: Sequence[Row], decisions: dict[str, Review]) -> dict:
    """metrics.json's ``review``: counts, and the model's agreement with the reviewers by predicted class.

    ``agreement`` is agree / (agree + disagree): an unsure decision is no verdict either way.
    """
    counts = {name: 0 for name in DECISIONS}
    by_class: dict[str, dict[str, int]] = {}
    for row in rows:
        review = decisions.get(row.path)
        if review is None:
            continue
        counts[review.decision] += 1
        if row.ok:
            tally = by_class.setdefault(row.prediction, {name: 0 for name in DECISIONS})
            tally[review.decision] += 1
    reviewed = sum(counts.values())
    summary = {"counts": {"reviewed": reviewed, **counts, "not_reviewed": len(rows) - reviewed}}
    if reviewed:
        summary["agreement"] = {"overall": agreement(counts),
                                "by_predicted_class": {name: {**tally, "agreement": agreement(tally)}
                                                       for name, tally in sorted(by_class.items())}}
    return summary


def agreement(tally: dict[str, int]) -> float | None:
    judged = tally["agree"] + tally["disagree"]
    return round(tally["agree"] / judged, 6) if judged else None


def with_review(metrics: dict | None, rows: Sequence[Row], decisions: dict[str, Review]) -> dict | None:
    """metrics.json with its ``review`` part; a report without labels gets one only once decisions exist."""
    if metrics is None and not decisions:
        return None
    return {**(metrics or {}), "review": review_summary(rows, decisions)}
