"""The static HTML review gallery: paginated card pages, a summary with inline SVG charts, and a
data file that lets the page script filter and sort across the whole run.

Layout inside REPORT (every link relative, so the folder opens from ``file://`` and can be moved):

    index.html              summary, page list and the first page of cards
    gallery/page-N.html     the other pages of cards (N >= 2)
    gallery/gallery.css     styles (a CSP without 'unsafe-inline' blocks inline styles)
    gallery/gallery.js      the cards, filters, sorting, the large view (no inline scripts either)
    gallery/review.js       reviewers' decisions: kept in localStorage, exported as review.csv
    gallery/rows.js         every row, loaded by a <script src> only when the whole-run view is asked
                            for (fetch() of a JSON file fails on file://)

A card is built in one place, gallery.js's ``buildCard``, for a page and for the whole-run view
alike: each page carries its own rows as a JSON data block (``<script type="application/json">``,
never run, so the CSP's ``script-src 'self'`` allows it), in the same form as rows.js (``records``:
the columns the row schema declares ``shown``, then the gallery's links, review and box fields).
Without JavaScript a page lists its images' names, linked to their overlays, in a ``<noscript>``.
Pages are rendered by Jinja2 with autoescape on; the script builds cards with textContent only, so
no file name, class name or error text can become markup.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from urllib.parse import quote

import numpy as np
from jinja2 import Environment, FileSystemLoader, Template, select_autoescape
from markupsafe import Markup

from batchcam.cam.overlay import jet
from batchcam.checks.metrics import reliability_bins, roc_auc, roc_curve
from batchcam.config import default_positive_index
from batchcam.records import ATTENTION_THRESHOLD, Row, shown_attributes, shown_columns, shown_values, status_counts
from batchcam.report.changes import RECENT_RUNS, change_counts, short_time, since_text
from batchcam.report.review import DECISIONS, Review, agreement
from batchcam.resources import templates_dir

DEFAULT_PAGE_SIZE = 100
GALLERY_DIR = "gallery"
ROWS_SCRIPT = f"{GALLERY_DIR}/rows.js"
STATIC_ASSETS = ("gallery.css", "gallery.js", "review.js")
# Only the report's own files: in Chromium 'self' on a file:// page matches file: URLs (the browser
# tests load every image, style and script under this policy); inline scripts and styles are refused.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self'; script-src 'self'; style-src 'self'; "
                           "base-uri 'none'; form-action 'none'")
# After the row's shown columns (records.Row), in every record of the gallery's data: the links of a
# card's images, the decision in reviews.csv (report.review) and, after ``evaluate --boxes``, the
# ground-truth boxes the large view draws.
LINK_COLUMNS = ("thumb", "original")
REVIEW_COLUMNS = ("decision", "note", "reviewed_at")
REVIEW_ATTRIBUTES = {"decision": "review", "note": "review-note", "reviewed_at": "reviewed-at"}
BOX_COLUMNS = ("width", "height", "boxes")
# What gallery.js keeps on each item beside its columns: no column may take these names.
ITEM_NAMES = ("record", "index", "page", "card", "groundTruth", "review", "attributes")
HISTOGRAM_BINS = 20
ROC_MAX_POINTS = 400        # enough for a smooth curve; a 50,000-row run would otherwise draw 50,000
PAGE_WINDOW = 3             # pages linked on either side of the current one
# Colour-blind-safe (Okabe-Ito) series colours; grey for images without a known label.
SERIES_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
UNLABELLED_COLOUR = "#8a8a8a"
POSITIVE_COLOUR = "#D55E00"          # the ROC curve of two classes' positive one
POSITIVE_SET_COLOUR = "#000000"      # of several positive classes together, dashed beside the per-class curves
POSITIVE_SET_DASHES = "6 3"
SERIES_DASHES = ("", "2 2", "8 3 2 3")  # the first six classes' curves solid, the next six dotted, ...


@dataclass(frozen=True)
class Page:
    number: int
    start: int      # index of the page's first row in the run
    stop: int

    @property
    def name(self) -> str:
        return page_name(self.number)

    @property
    def base(self) -> str:
        """The way from this page back to REPORT, prefixed to every report-relative link."""
        return "../" * self.name.count("/")


def page_name(number: int) -> str:
    """Page 1 is the entry page itself; the others live in gallery/ so REPORT stays tidy."""
    return "index.html" if number == 1 else f"{GALLERY_DIR}/page-{number}.html"


def paginate(total: int, page_size: int) -> list[Page]:
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    starts = range(0, max(total, 1), page_size)
    return [Page(number, start, min(start + page_size, total)) for number, start in enumerate(starts, 1)]


def url_path(path: str) -> str:
    """Percent-encode a relative link so names with #, ?, %, spaces or non-ASCII still resolve."""
    return quote(path, safe="/")


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(templates_dir())), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["url"] = url_path
    env.filters["percent"] = percent
    return env


# ---- the summary: counts and chart geometry, computed here so the templates only draw ----------

@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    count: int
    title: str


@dataclass(frozen=True)
class Histogram:
    """Stacked bars of the probability of the positive classes (their sum), one series per true label."""
    title: str
    bars: list[Bar]
    legend: list[tuple[str, str]]       # (colour, name)
    max_count: int
    threshold_x: float | None           # the argmax decision line, drawn for two classes


@dataclass(frozen=True)
class ConfusionCell:
    x: float
    y: float
    count: int
    share: float                        # of the true class's row
    title: str


@dataclass(frozen=True)
class Confusion:
    class_names: list[str]
    cells: list[ConfusionCell]
    cell_size: float
    description: str
    drawn_width: int                    # of the SVG's viewBox: the true-class labels, then the cells
    width: int                          # on the page, in CSS pixels: more classes, a wider matrix


@dataclass(frozen=True)
class RocCurve:
    name: str                           # its class, or the positive classes ("BACTERIA or VIRUS")
    points: str                         # SVG polyline points in the plot's coordinates
    auc: float | None
    colour: str
    dashes: str = ""                    # SVG stroke-dasharray; "" for a solid line
    positive_set: bool = False          # the positive classes together, when --positive names several


@dataclass(frozen=True)
class Roc:
    """The positive class's curve for two classes; for more, one curve per class against the rest (and
    the positive classes together, when there are several)."""
    curves: list[RocCurve]
    one_vs_rest: bool


@dataclass(frozen=True)
class ReliabilityBar:
    x: float
    width: float
    accuracy_y: float                   # top of the bar: the bin's accuracy
    confidence_y: float                 # where a perfectly calibrated bar would end
    title: str


@dataclass(frozen=True)
class Reliability:
    bars: list[ReliabilityBar]
    ece: float | None
    bins: int


@dataclass(frozen=True)
class Summary:
    total: int
    ok: int
    error: int
    per_class: list[tuple[str, int]]
    labelled: int
    wrong: int
    positive_name: str                  # "PNEUMONIA", or "BACTERIA or VIRUS"
    histogram: Histogram
    confusion: Confusion | None
    roc: Roc | None
    attention_flagged: int = 0          # rows whose heat lies mostly off the lungs
    skipped: int = 0                    # rows not scored (decode.selection)
    attention_measured: int = 0         # rows with lung fields (the estimate refuses non-chest images)
    reliability: Reliability | None = None
    ood_flagged: int | None = None      # rows unlike the training images; None: the model has no statistics


# Plot areas of the charts, in SVG user units (the SVGs scale with their viewBox).
CHART_WIDTH, CHART_HEIGHT = 420, 220
ROC_SIZE = 220
CONFUSION_CELL = 78
CONFUSION_LABELS_WIDTH = 110            # the true-class labels left of the cells
CONFUSION_MIN_WIDTH = 270               # the two-class matrix's width on the page
CONFUSION_MIN_SCALE = 0.75              # many classes shrink it no further, so its counts stay readable


def summarise(rows: Sequence[Row], class_names: Sequence[str], metrics: dict | None,
              positive: Sequence[int] | None = None) -> Summary:
    """The summary's counts and charts; ``positive``: the classes the binary metrics score as positive
    (default: ``config.default_positive_index``'s)."""
    positive = positive if positive is not None else (default_positive_index(class_names),)
    ok_rows = [row for row in rows if row.ok and row.probabilities]
    predicted = Counter(row.prediction for row in rows if row.ok)
    labelled = [row for row in ok_rows if row.label]
    counts = status_counts(rows)
    return Summary(total=len(rows), ok=counts["ok"], error=counts["error"], skipped=counts["skipped"],
                   per_class=[(name, predicted.get(name, 0)) for name in class_names], labelled=len(labelled),
                   wrong=sum(row.correct is False for row in rows),
                   positive_name=positive_name(class_names, positive),
                   histogram=probability_histogram(ok_rows, class_names, positive),
                   confusion=confusion_chart(metrics) if metrics and labelled else None,
                   roc=roc_chart(labelled, class_names, positive) if metrics and labelled else None,
                   attention_flagged=sum(bool(row.attention_flag) for row in ok_rows),
                   attention_measured=sum(row.attention_outside is not None for row in ok_rows),
                   reliability=reliability_chart(labelled, metrics) if metrics and labelled else None,
                   ood_flagged=ood_flagged(ok_rows))


def positive_name(class_names: Sequence[str], positive: Sequence[int]) -> str:
    return " or ".join(class_names[c] for c in positive)


def ood_flagged(ok_rows: Sequence[Row]) -> int | None:
    """How many images are unlike the training images; None when no row was scored."""
    scored = [row for row in ok_rows if row.ood_flag is not None]
    return sum(row.ood_flag is True for row in scored) if scored else None


def reliability_chart(labelled: Sequence[Row], metrics: dict) -> Reliability:
    """The reliability diagram (Guo et al. 2017): per confidence bin, accuracy against confidence."""
    bins = metrics.get("ece_bins", 15)
    found = reliability_bins([row.correct is True for row in labelled],      # scored rows: a confidence each
                             [row.confidence or 0.0 for row in labelled], bins)
    width = ROC_SIZE / bins
    bars = [ReliabilityBar(x=round(b["low"] * ROC_SIZE + 1, 1), width=round(width - 2, 1),
                           accuracy_y=round((1 - b["accuracy"]) * ROC_SIZE, 1),
                           confidence_y=round((1 - b["confidence"]) * ROC_SIZE, 1),
                           title=f"confidence {b['low']:.2f}-{b['high']:.2f}: {b['n']} images, mean confidence "
                                 f"{b['confidence']:.3f}, accuracy {b['accuracy']:.3f}") for b in found]
    return Reliability(bars=bars, ece=metrics.get("ece"), bins=bins)


def probability_histogram(rows: Sequence[Row], class_names: Sequence[str], positive: Sequence[int]) -> Histogram:
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    scores = positive_scores(rows, positive)
    name = positive_name(class_names, positive)
    labels = np.array([row.label for row in rows], dtype=object)
    series = [s for s in label_series(labels, class_names, positive) if s[2].any()]
    unlabelled = labels == ""
    if unlabelled.any() or not series:
        series.append(("no label" if series else "all images", UNLABELLED_COLOUR, unlabelled))
    counts = [np.histogram(scores[mask], bins=edges)[0] for _, _, mask in series]
    max_count = max(1, int(np.sum(counts, axis=0).max(initial=0)))
    bin_width = CHART_WIDTH / HISTOGRAM_BINS
    bars = []
    for b in range(HISTOGRAM_BINS):
        stacked = 0.0
        for (series_name, colour, _), series_counts in zip(series, counts):
            count = int(series_counts[b])
            if count:
                height = count / max_count * CHART_HEIGHT
                stacked += height
                bars.append(Bar(x=round(b * bin_width + 1, 1), y=round(CHART_HEIGHT - stacked, 1),
                                width=round(bin_width - 2, 1), height=round(height, 1), colour=colour,
                                count=count, title=f"{series_name}: {count} with P({name}) "
                                      f"{edges[b]:.2f}-{edges[b + 1]:.2f}"))
    return Histogram(title=f"P({name})", bars=bars,
                     legend=[(colour, series_name) for series_name, colour, _ in series], max_count=max_count,
                     threshold_x=CHART_WIDTH / 2 if len(class_names) == 2 else None)


def label_series(labels: np.ndarray, class_names: Sequence[str],
                 positive: Sequence[int]) -> list[tuple[str, str, np.ndarray]]:
    """The histogram's series by true label: (name, colour, mask) for each class while the colours last,
    else the positive classes and the others (bars cannot be told apart by a dash pattern)."""
    if len(class_names) <= len(SERIES_COLOURS):
        return [(f"true {name}", colour, labels == name) for name, colour in zip(class_names, SERIES_COLOURS)]
    is_positive = np.isin(labels, [class_names[c] for c in positive])
    return [(f"true {positive_name(class_names, positive)}", SERIES_COLOURS[1], is_positive),
            ("true other classes", SERIES_COLOURS[0], (labels != "") & ~is_positive)]


def confusion_chart(metrics: dict) -> Confusion:
    names = list(metrics["class_names"])
    matrix = metrics["confusion_matrix"]
    cells = []
    for t, true_name in enumerate(names):
        row_total = max(1, sum(matrix[t]))
        for p, predicted_name in enumerate(names):
            count = int(matrix[t][p])
            cells.append(ConfusionCell(x=p * CONFUSION_CELL, y=t * CONFUSION_CELL, count=count,
                                       share=count / row_total,
                                       title=f"true {true_name}, predicted {predicted_name}: {count}"))
    description = "; ".join(cell.title for cell in cells)
    drawn_width = CONFUSION_LABELS_WIDTH + len(names) * CONFUSION_CELL
    width = max(CONFUSION_MIN_WIDTH, math.ceil(CONFUSION_MIN_SCALE * drawn_width))
    return Confusion(class_names=names, cells=cells, cell_size=CONFUSION_CELL, description=description,
                     drawn_width=drawn_width, width=width)


def roc_chart(labelled: Sequence[Row], class_names: Sequence[str], positive: Sequence[int]) -> Roc | None:
    """Two classes: the positive class's curve, as the metrics score it. More: each class against the rest,
    then the positive classes together when they are several; a curve only where both sides have labelled
    images (its AUC is defined), and no chart without one. The AUCs are computed from the rows, so a report
    re-rendered from an older metrics.json draws them too."""
    labels = np.array([row.label for row in labelled], dtype=object)
    if len(class_names) == 2:
        return Roc(curves=[positive_set_curve(labels, labelled, class_names, positive, POSITIVE_COLOUR, "")],
                   one_vs_rest=False)
    curves = [roc_line(name, labels == name, np.array([row.probabilities[c] for row in labelled]), **series_style(c))
              for c, name in enumerate(class_names)]
    if len(positive) > 1:
        curves.append(positive_set_curve(labels, labelled, class_names, positive, POSITIVE_SET_COLOUR,
                                         POSITIVE_SET_DASHES))
    curves = [curve for curve in curves if curve.auc is not None]
    return Roc(curves=curves, one_vs_rest=True) if curves else None


def positive_set_curve(labels: np.ndarray, labelled: Sequence[Row], class_names: Sequence[str],
                       positive: Sequence[int], colour: str, dashes: str) -> RocCurve:
    curve = roc_line(positive_name(class_names, positive), np.isin(labels, [class_names[c] for c in positive]),
                     positive_scores(labelled, positive), colour, dashes)
    return replace(curve, positive_set=len(class_names) > 2)


def roc_line(name: str, is_positive: np.ndarray, scores: np.ndarray, colour: str, dashes: str) -> RocCurve:
    return RocCurve(name=name, points=roc_points(is_positive, scores), auc=roc_auc(is_positive, scores),
                    colour=colour, dashes=dashes)


def series_style(index: int) -> dict[str, str]:
    """The colour of a class's curve, and beyond the six colours a dash pattern: no two of the first 18
    classes look alike (beyond them the looks repeat; each curve's tooltip names its class)."""
    cycle, colour = divmod(index, len(SERIES_COLOURS))
    return {"colour": SERIES_COLOURS[colour], "dashes": SERIES_DASHES[cycle % len(SERIES_DASHES)]}


def positive_scores(rows: Sequence[Row], positive: Sequence[int]) -> np.ndarray:
    """Each row's probability of the positive classes: the sum of theirs (the binary metrics' score)."""
    return np.array([sum(row.probabilities[c] for c in positive) for row in rows], dtype=np.float64)


def roc_points(is_positive: np.ndarray, scores: np.ndarray) -> str:
    """The ROC curve as SVG polyline points, thinned to ``ROC_MAX_POINTS``."""
    curve = roc_curve(is_positive, scores)
    keep = np.unique(np.linspace(0, len(curve) - 1, min(len(curve), ROC_MAX_POINTS)).round().astype(int))
    return " ".join(f"{curve[i][0] * ROC_SIZE:.1f},{(1 - curve[i][1]) * ROC_SIZE:.1f}" for i in keep)


def heatmap_legend_stops(count: int = 9) -> list[tuple[str, str]]:
    """(offset, colour) stops of the exact colour map the overlays use (overlay.jet)."""
    values = np.linspace(0.0, 1.0, count, dtype=np.float32)
    return [(f"{100 * v:.1f}%", "#{:02x}{:02x}{:02x}".format(*rgb)) for v, rgb in zip(values, jet(values))]


def heat_scale_text(cam: dict) -> str:
    """What the legend says about the scale: per image, or one run-wide constant (--heat-scale)."""
    if cam.get("heat_scale") == "run" and cam.get("run_scale") is not None:
        return (f"one scale for the whole run (red = raw map value {cam['run_scale']:.4g}, the run's 99th "
                "percentile, or more): heat compares across images")
    return "each map scaled to its own range (red = that image's hottest point): heat does not compare across images"


# ---- the gallery's data: rows.js and each page's rows ----------------------------------------------------

Boxes = dict[str, Sequence[Sequence[float]]]   # path -> ground-truth boxes (x0, y0, x1, y1), original pixels


def box_list(boxes: Boxes | None, row: Row) -> list[list[float]] | None:
    """The row's ground-truth boxes for the large view, rounded; None when it has none."""
    if not boxes or not row.ok or not row.width or not row.height or not boxes.get(row.path):
        return None
    return [[round(float(value), 2) for value in box] for box in boxes[row.path]]


def record_columns(boxes: Boxes | None = None) -> list[str]:
    """The columns of every record in the gallery's data (rows.js and each page's rows)."""
    columns = [*shown_columns(), *LINK_COLUMNS, *REVIEW_COLUMNS, *(BOX_COLUMNS if boxes else ())]
    if len(set(columns)) != len(columns) or set(columns) & set(ITEM_NAMES):
        raise ValueError(f"a column of the gallery's data is named twice or as gallery.js's own: {columns}")
    return columns


def row_record(row: Row, boxes: Boxes | None = None, review: Review | None = None) -> list:
    """One row of the gallery's data, in the order of ``record_columns(boxes)``."""
    record = [*shown_values(row), *(getattr(row, name) for name in LINK_COLUMNS), *review_fields(review)]
    if boxes:
        record += [row.width, row.height, box_list(boxes, row)]
    return record


def records(rows: Sequence[Row], boxes: Boxes | None = None,
            reviews: dict[str, Review] | None = None) -> list[list]:
    reviews = reviews or {}
    return [row_record(row, boxes, reviews.get(row.path)) for row in rows]


def data_layout(boxes: Boxes | None = None) -> dict:
    """What the script needs to read a record: its columns, and which of them are the card's data attributes."""
    return {"columns": record_columns(boxes), "attributes": {**shown_attributes(), **REVIEW_ATTRIBUTES}}


def rows_script(found: list[list], pages: Sequence[Page], page_size: int, boxes: Boxes | None = None) -> str:
    """Every row's record (``found``, in gallery order) as a JavaScript assignment (ASCII only, so no
    charset can garble a name)."""
    data = {"pageSize": page_size, "pages": [page.name for page in pages], **data_layout(boxes), "rows": found}
    return "window.BATCHCAM_ROWS = " + json.dumps(data, ensure_ascii=True, separators=(",", ":")) + ";\n"


def page_rows(page: Page, found: list[list], boxes: Boxes | None = None) -> Markup:
    """A page's own rows as the text of its JSON data block: ASCII, with every <, > and & escaped, so
    no name can end the block or open a comment in it."""
    data = {"start": page.start, **data_layout(boxes), "rows": found[page.start:page.stop]}
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


# ---- review decisions and what changed since the last run ----------------------------------------

def review_fields(review: Review | None) -> list[str | None]:
    return [review.decision, review.note, review.reviewed_at] if review else [None, None, None]


@dataclass(frozen=True)
class ReviewLine:
    name: str            # a predicted class, or "all images"
    counts: dict[str, int]
    not_reviewed: int

    @property
    def disagreement(self) -> float | None:
        """disagree / (agree + disagree): an unsure decision is no verdict either way."""
        rate = agreement(self.counts)
        return None if rate is None else 1 - rate


def review_table(rows: Sequence[Row], reviews: dict[str, Review], class_names: Sequence[str]) -> list[ReviewLine]:
    """The summary's review counts by predicted class, then for all images (the page script
    recounts them with the decisions kept in the browser)."""
    def line(name: str, group: Sequence[Row]) -> ReviewLine:
        decided = [reviews[row.path].decision for row in group if row.path in reviews]
        return ReviewLine(name, {d: decided.count(d) for d in DECISIONS}, len(group) - len(decided))
    return [*(line(name, [row for row in rows if row.ok and row.prediction == name]) for name in class_names),
            line("all images", rows)]


@dataclass(frozen=True)
class ChangesView:
    sentence: str
    runs: list[dict]     # newest first, at most RECENT_RUNS


def changes_view(rows: Sequence[Row], runs: Sequence[dict]) -> ChangesView:
    recent = [{**run, "started": short_time(run["started_at"]), "finished": short_time(run["finished_at"])}
              for run in list(runs)[::-1][:RECENT_RUNS]]
    return ChangesView(since_text(list(runs)[:-1], change_counts(rows)), recent)


# ---- pages --------------------------------------------------------------------------------------

def page_numbers_near(current: int, last: int) -> list[int | None]:
    """First, last and a window around the current page; None marks a gap."""
    wanted = sorted({1, last, *range(max(1, current - PAGE_WINDOW), min(last, current + PAGE_WINDOW) + 1)})
    numbers: list[int | None] = []
    for number in wanted:
        if numbers and number - numbers[-1] > 1:
            numbers.append(None)
        numbers.append(number)
    return numbers


def page_linker(page: Page) -> Callable[[int], str]:
    return lambda number: page.base + url_path(page_name(number))


def static_asset(name: str) -> str:
    return (templates_dir() / name).read_text(encoding="utf-8")


def render_gallery(rows: Sequence[Row], class_names: Sequence[str], manifest: dict, metrics: dict | None,
                   page_size: int = DEFAULT_PAGE_SIZE, boxes: Boxes | None = None,
                   reviews: dict[str, Review] | None = None, runs: Sequence[dict] = (),
                   positive: Sequence[int] | None = None) -> dict[str, str]:
    """The gallery's files, relative to REPORT, name -> text; ``index.html`` is the entry page.

    ``rows`` must be in the order the gallery shows them (the CSV's, by path). ``boxes`` (from
    ``evaluate --boxes``: path -> boxes in original pixels) are drawn over the large view. ``reviews``
    (row path -> the current decision from reviews.csv) and ``runs`` (runs.jsonl, this run last) feed
    the review tools and the "what changed" summary. ``positive``: the classes the summary's histogram
    adds up, as the binary metrics score them.
    """
    reviews = reviews or {}
    pages = paginate(len(rows), page_size)
    env = environment()
    shared = {"manifest": manifest, "class_names": list(class_names), "pages": pages, "page_size": page_size,
              "total": len(rows), "labels_known": any(row.correct is not None for row in rows),
              "csp": CONTENT_SECURITY_POLICY, "attention_threshold": ATTENTION_THRESHOLD,
              "heat_scale": heat_scale_text(manifest.get("cam", {})), "legend_stops": heatmap_legend_stops(),
              "page_first_paths": [rows[p.start].path if p.stop > p.start else "" for p in pages],
              "page_last_paths": [rows[p.stop - 1].path if p.stop > p.start else "" for p in pages],
              "report_id": manifest.get("report_id", "")}
    files = {f"{GALLERY_DIR}/{name}": static_asset(name) for name in STATIC_ASSETS}
    found = records(rows, boxes, reviews)
    files[ROWS_SCRIPT] = rows_script(found, pages, page_size, boxes)
    index, other = env.get_template("index.html"), env.get_template("gallery_page.html")
    summary = summarise(rows, class_names, metrics, positive)
    review, changes = review_table(rows, reviews, class_names), changes_view(rows, runs)
    for page in pages:
        template: Template = index if page.number == 1 else other
        files[page.name] = template.render(shared, page=page, rows=rows[page.start:page.stop], base=page.base,
                                           page_rows=page_rows(page, found, boxes), page_url=page_linker(page),
                                           nearby=page_numbers_near(page.number, len(pages)),
                                           summary=summary, metrics=metrics, review=review, changes=changes)
    return files
