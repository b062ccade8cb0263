"""Reviewers' decisions on a report: the gallery's exported ``review.csv``, merged into
``REPORT/reviews.csv`` by ``batchcam review --import``, and what they say about the model.

A decision is about one file's bytes: it is keyed by (path, sha256). Merging keeps the later
decision of each key. Rows whose file is no longer in the report, or whose file changed since, are
kept and marked in ``state``; only current decisions show in the gallery and count in metrics.json.

The export names its report (``report_id``): a CSV exported from another report, even of the same
folder, is refused. The prediction and confidence a decision is about are the report's, never the
CSV's: a row whose prediction differs from the report's for the same bytes is refused (the reviewer
judged another prediction). Notes are free text that spreadsheets open: one starting like a formula
is written with a leading single quote (OWASP's CSV-injection advice) and read back without it.
"""
from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import IO

from batchcam.errors import UsageError
from batchcam.records import Row, one_line

REVIEWS = "reviews.csv"
REVIEW_COLUMNS = ("path", "sha256", "prediction", "confidence", "decision", "note", "reviewed_at")
EXPORT_COLUMNS = (*REVIEW_COLUMNS, "report_id")   # the gallery's review.csv (templates/review.js)
STORED_COLUMNS = (*REVIEW_COLUMNS, "state")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP CSV injection: a cell starting so may run as a formula
QUOTE = "'"
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


def parse_export(text: str, source: str, class_names: Sequence[str], report_id: str) -> list[Review]:
    """The gallery's review.csv of the report ``report_id``, every row checked; UsageError naming the
    first problems. A CSV without ``report_id`` (an older gallery's) cannot say which report it is of."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [name for name in EXPORT_COLUMNS if name not in (reader.fieldnames or [])]
    if missing == ["report_id"]:
        raise UsageError(f"{source} does not say which report it was exported from (no report_id column: an older "
                         "gallery's export); export the decisions again from this report's gallery")
    if missing:
        raise UsageError(f"{source} is not a gallery's review.csv: missing column(s) {', '.join(missing)} "
                         f"(expected {','.join(EXPORT_COLUMNS)})")
    reviews, problems, foreign = [], [], set()
    for number, values in enumerate(reader, start=2):
        try:
            reviews.append(checked_review(values, class_names))
        except ValueError as e:
            problems.append(f"line {number}: {e}")
            continue
        if values["report_id"] != report_id:
            foreign.add(values["report_id"])
    if problems:
        raise UsageError(f"{source}: {len(problems)} bad row(s): " + "; ".join(problems[:SHOWN_PROBLEMS]))
    if foreign:
        raise UsageError(f"{source} was exported from another report (report_id {', '.join(map(repr, sorted(foreign)))}"
                         f"; this report's is {report_id!r}): import it into the report it came from")
    if not reviews:
        raise UsageError(f"{source} holds no decisions")
    return reviews


def checked_review(values: dict[str, str | None], class_names: Sequence[str]) -> Review:
    fields = {name: value for name in EXPORT_COLUMNS if (value := values.get(name)) is not None}
    if None in values or len(fields) != len(EXPORT_COLUMNS):
        raise ValueError("wrong number of fields")
    decision, sha256, prediction = fields["decision"], fields["sha256"], fields["prediction"]
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    if not SHA256.fullmatch(sha256):
        raise ValueError(f"sha256 {sha256!r} is not 64 lowercase hex digits")
    if prediction and prediction not in class_names:
        raise ValueError(f"prediction {prediction!r} is not a class of this report ({', '.join(class_names)})")
    if fields["confidence"]:
        confidence = float(fields["confidence"])
        if not 0 <= confidence <= 1:
            raise ValueError(f"confidence {confidence} is not within 0..1")
    note = one_line(formula_unescaped(fields["note"]))
    if len(note) > MAX_NOTE:
        raise ValueError(f"note longer than {MAX_NOTE} characters")
    return Review(path=fields["path"], sha256=sha256, prediction=prediction, confidence=fields["confidence"],
                  decision=decision, note=note, reviewed_at=utc_time(fields["reviewed_at"]))


def utc_time(text: str) -> str:
    """An ISO 8601 time (the browser's ``toISOString()``) as UTC with milliseconds; ValueError if it is none
    (no time zone, or a time that has no UTC equivalent such as ``0001-01-01T00:00:00+23:59``)."""
    moment = _parsed_time(text)
    if moment.tzinfo is None:
        raise ValueError(f"reviewed_at {text!r} has no time zone")
    return _in_utc(moment, text).isoformat(timespec="milliseconds")


def _parsed_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"reviewed_at {text!r} is not an ISO 8601 time") from None


def _in_utc(moment: datetime, text: str) -> datetime:
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"reviewed_at {text!r} is out of range in UTC") from None


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


def with_report_values(reviews: Sequence[Review], rows: Sequence[Row], source: str) -> list[Review]:
    """Each decision with the report's prediction and confidence for its file's bytes, not the CSV's.

    A decision whose prediction differs from the report's for the same bytes is refused: the reviewer
    judged another prediction (the report was scored again since the export). A decision about other
    bytes of the path (the file changed since) keeps no prediction or confidence: the report no longer
    says what the model made of those bytes.
    """
    current = {(row.path, row.sha256): row for row in rows}
    checked, problems = [], []
    for review in reviews:
        row = current.get(review.key)
        if row is None:
            checked.append(replace(review, prediction="", confidence=""))
            continue
        if review.prediction != row.prediction:
            problems.append(f"{review.path!r}: prediction {review.prediction!r}, but the report predicts "
                            f"{row.prediction!r} for these bytes")
            continue
        checked.append(replace(review, confidence="" if row.confidence is None else f"{row.confidence:.6f}"))
    if problems:
        raise UsageError(f"{source}: {len(problems)} decision(s) about another prediction than the report's "
                         f"(scored again since the export?): " + "; ".join(problems[:SHOWN_PROBLEMS])
                         + "; export the decisions again from this report's gallery")
    return checked


def read_stored(text: str | None) -> list[Review]:
    """``REPORT/reviews.csv`` as written by ``write_reviews``; a row that is not one is skipped.

    Notes are read back as the reviewer wrote them; a hand-edited time is kept, normalised to UTC
    where it can be (a time without a zone is taken as UTC).
    """
    reviews = []
    for values in csv.DictReader(io.StringIO(text or "", newline="")):
        try:
            if values.get("decision") in DECISIONS and SHA256.fullmatch(values.get("sha256") or ""):
                fields = {name: values[name] or "" for name in REVIEW_COLUMNS}
                fields.update(note=formula_unescaped(fields["note"]), reviewed_at=_stored_time(fields["reviewed_at"]))
                reviews.append(Review(**fields, state=values.get("state") or ""))
        except (KeyError, TypeError):
            continue
    return reviews


def _stored_time(text: str) -> str:
    try:
        moment = _parsed_time(text)
        return _in_utc(moment.replace(tzinfo=moment.tzinfo or timezone.utc), text).isoformat(timespec="milliseconds")
    except ValueError:
        return text   # kept as written; it sorts before every real time (``_moment``)


def formula_escaped(text: str) -> str:
    """A cell a spreadsheet shows as text: a leading ``= + - @``, tab or carriage return (or a quote,
    so the escape can be undone without doubt) gets a single quote in front (OWASP CSV injection)."""
    return QUOTE + text if text.startswith((*FORMULA_STARTS, QUOTE)) else text


def formula_unescaped(text: str) -> str:
    """``formula_escaped`` undone: the cell as it was before it was escaped."""
    return text[1:] if text.startswith(QUOTE) else text


def merge(stored: Iterable[Review], imported: Iterable[Review]) -> list[Review]:
    """One decision per (path, sha256): the later ``reviewed_at`` wins, an imported one on a tie."""
    merged: dict[tuple[str, str], Review] = {}
    for review in (*stored, *imported):
        kept = merged.get(review.key)
        if kept is None or _moment(review) >= _moment(kept):
            merged[review.key] = review
    return sorted(merged.values(), key=lambda review: (review.path, review.reviewed_at))


def _moment(review: Review) -> datetime:
    """When the decision was made, comparable with any other: an unreadable time sorts first."""
    try:
        moment = datetime.fromisoformat(review.reviewed_at)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def mark_states(reviews: Iterable[Review], rows: Sequence[Row]) -> list[Review]:
    """Each decision marked against the report as it is now: current, its file changed, or gone."""
    sha_of = {row.path: row.sha256 for row in rows}
    marked = []
    for review in reviews:
        state = FILE_GONE if review.path not in sha_of else "" if sha_of[review.path] == review.sha256 else FILE_CHANGED
        marked.append(replace(review, state=state))
    return marked


def write_reviews(stream: IO[str], reviews: Iterable[Review]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(STORED_COLUMNS)
    for review in reviews:
        writer.writerow([formula_escaped(review.note) if name == "note" else getattr(review, name)
                         for name in STORED_COLUMNS])


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
    summary: dict[str, dict] = {"counts": {"reviewed": reviewed, **counts, "not_reviewed": len(rows) - reviewed}}
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
