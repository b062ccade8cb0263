"""The review gallery without a browser: pages, links, escaping, the CSP and the summary charts.

Rows are built directly (no model); ``write_gallery_report`` also writes small JPEGs where the rows
say the images are, so the browser tests (test_gallery_browser.py) reuse it.
"""
from __future__ import annotations

import html.parser
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from helpers import page_cards, page_data, records
from PIL import Image

from batchcam.cli import main
from batchcam.config import ScanConfig
from batchcam.errors import UsageError
from batchcam.records import Row, overlay_path
from batchcam.report.folder import ReportFolder, csv_content, json_content
from batchcam.report.gallery import CONTENT_SECURITY_POLICY, ROC_MAX_POINTS, ROWS_SCRIPT, render_gallery, summarise
from batchcam.report.review import Review
from batchcam.report.summary import scan_metrics

CLASSES = ("NORMAL", "PNEUMONIA")
HOSTILE_NAME = "<script>alert(1)</script>#?%.png"
HOSTILE_ERROR = "cannot decode image: <img src=x onerror=alert(2)> & \"quotes\""
MANIFEST = {"root": "/data/<u>xrays</u>", "finished_at": "2026-11-25T02:03:10+00:00", "batchcam_version": "test",
            "model": {"name": "model.pt", "demo": False}, "cam": {"method": "gradcam", "target_layer": "layer4"}}


def ok_row(path: str, prediction: str, confidence: float, label: str = "", overlay: str | None = None) -> Row:
    p_pneumonia = confidence if prediction == "PNEUMONIA" else 1 - confidence
    return Row(path=path, status="ok", prediction=prediction, confidence=confidence,
               probabilities=[1 - p_pneumonia, p_pneumonia], label=label, cam_target=prediction,
               overlay=overlay or overlay_path(path), width=64, height=48)


def error_row(path: str, error: str = "cannot decode image: truncated file") -> Row:
    return Row(path=path, status="error", error=error)


def labelled_rows() -> list[Row]:
    """Eight rows over two pages of five: both classes, one wrong, an error on each page, hostile names."""
    return sorted([
        ok_row("NORMAL/a.png", "NORMAL", 0.91, "NORMAL"),
        ok_row("NORMAL/b.png", "PNEUMONIA", 0.62, "NORMAL"),                       # wrong
        ok_row("NORMAL/c d#?%é.png", "NORMAL", 0.55, "NORMAL", overlay="overlays/c d#?%é.jpg"),
        ok_row("PNEUMONIA/e.png", "PNEUMONIA", 0.97, "PNEUMONIA"),
        ok_row("PNEUMONIA/f.png", "PNEUMONIA", 0.73, "PNEUMONIA"),
        ok_row(HOSTILE_NAME, "NORMAL", 0.80),
        error_row("NORMAL/broken.png"),
        error_row("PNEUMONIA/zz-broken.png", HOSTILE_ERROR),
    ], key=lambda row: row.path)


def write_gallery_report(folder: Path, rows: list[Row], page_size: int, class_names=CLASSES,
                         reviews: dict[str, Review] | None = None) -> Path:
    """A report folder holding the gallery (with ``reviews`` as if imported), the CSV and manifest,
    and an overlay, thumbnail and original per ok row.

    Overlay and original differ in colour, so a test can tell which one the large view shows.
    """
    report = ReportFolder(folder)
    report.prepare()
    for row in rows:
        if row.ok:
            for name, colour, size in ((row.overlay, (200, 40, 40), (64, 48)), (row.thumb, (200, 40, 40), (32, 24)),
                                       (row.original, (90, 90, 90), (64, 48))):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", size, colour).save(folder / name, format="JPEG")
    metrics = scan_metrics(rows, class_names)
    files = render_gallery(rows, class_names, MANIFEST, metrics, page_size, reviews=reviews)
    files.update({"predictions.csv": csv_content(rows, class_names), "manifest.json": json_content(MANIFEST)})
    report.publish(files)
    report.tidy()
    report.close()
    return folder


class Page(html.parser.HTMLParser):
    """Elements and text of a page (what a reader without JavaScript gets); the cards are built by
    gallery.js from the page's data (``helpers.page_cards``)."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def links(self) -> list[str]:
        return [a[key] for _, a in self.elements for key in ("href", "src") if a.get(key)]


def render(rows: list[Row], page_size: int = 100, class_names=CLASSES) -> dict[str, str]:
    return render_gallery(rows, class_names, MANIFEST, scan_metrics(rows, class_names), page_size)


def many_rows(count: int) -> list[Row]:
    return [ok_row(f"NORMAL/img{i:04d}.png", "NORMAL", 0.9, "NORMAL") for i in range(count)]


# ---- pages ----------------------------------------------------------------------------------------

def test_rows_are_split_into_pages_of_page_size_with_index_as_the_first():
    files = render(many_rows(25), page_size=10)
    pages = sorted(name for name in files if name.endswith(".html"))
    assert pages == ["gallery/page-2.html", "gallery/page-3.html", "index.html"]
    assert [len(page_cards(files[name])) for name in ("index.html", "gallery/page-2.html",
                                                      "gallery/page-3.html")] == [10, 10, 5]
    assert [c["index"] for c in page_cards(files["gallery/page-3.html"])] == list(range(20, 25))


def test_index_links_every_page_and_pages_link_back_and_onwards():
    files = render(many_rows(25), page_size=10)
    index_links = Page(files["index.html"]).links()
    assert {"gallery/page-2.html", "gallery/page-3.html"} <= set(index_links)
    page2_links = Page(files["gallery/page-2.html"]).links()
    assert {"../index.html", "page-3.html"} <= {link.removeprefix("../gallery/") for link in page2_links}
    assert any(a.get("aria-current") == "page" for _, a in Page(files["gallery/page-2.html"]).elements)


def test_one_page_needs_no_other_page_files():
    files = render(many_rows(3))
    assert [name for name in files if name.endswith(".html")] == ["index.html"]
    assert not any("page-2" in link for link in Page(files["index.html"]).links())


def test_every_relative_link_of_every_page_resolves_inside_the_report(tmp_path):
    report = write_gallery_report(tmp_path / "report", labelled_rows(), page_size=5)
    for page in report.rglob("*.html"):
        for link in Page(page.read_text(encoding="utf-8")).links():
            parts = urlsplit(link)
            if not parts.path:
                continue    # a fragment on the same page
            assert not parts.scheme and not link.startswith("//"), f"{page.name}: external link {link}"
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file() and report.resolve() in target.parents, f"{page.name}: broken {link}"


def test_pages_of_a_longer_previous_run_are_removed(tmp_path):
    report = ReportFolder(tmp_path / "report")
    report.prepare()
    report.publish(render(many_rows(30), page_size=10))
    report.tidy()
    assert (tmp_path / "report" / "gallery" / "page-3.html").is_file()
    report.publish(render(many_rows(12), page_size=10))
    report.tidy()
    report.close()
    assert sorted(p.name for p in (tmp_path / "report" / "gallery").glob("*.html")) == ["page-2.html"]


def test_a_symbolic_link_planted_as_the_gallery_folder_is_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    report = ReportFolder(tmp_path / "report")
    report.prepare()
    (tmp_path / "report" / "gallery").symlink_to(outside, target_is_directory=True)
    report.publish(render(many_rows(12), page_size=10))
    report.close()
    assert not any(outside.iterdir())
    gallery = tmp_path / "report" / "gallery"
    assert not gallery.is_symlink() and (gallery / "page-2.html").is_file()


def test_page_size_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="page_size"):
        render(many_rows(3), page_size=0)
    with pytest.raises(UsageError, match="--page-size"):
        ScanConfig(root=tmp_path, out=tmp_path / "out", page_size=0).validate()
    assert main(["scan", str(tmp_path), "--out", str(tmp_path / "out"), "--page-size", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_scan_writes_pages_of_the_page_size_asked_for(xray_folder, tiny_model, tmp_path):
    out = tmp_path / "out"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--page-size", "3", "--quiet"]) == 0
    assert len(page_cards((out / "index.html").read_text(encoding="utf-8"))) == 3
    assert len(page_cards((out / "gallery" / "page-2.html").read_text(encoding="utf-8"))) == 1


# ---- escaping and links ---------------------------------------------------------------------------

def test_hostile_names_error_text_and_class_names_are_text_not_markup():
    """In the page's markup, in its data block (a name holding ``</script>`` cannot end it) and in the
    list a reader without JavaScript gets."""
    classes = ("NORMAL", "<i>PNEU</i>")
    rows = [ok_row(HOSTILE_NAME, "NORMAL", 0.8), error_row("x.png", HOSTILE_ERROR),
            ok_row("<!--<script>x.png", "NORMAL", 0.7)]
    rows[0].label = "<i>PNEU</i>"
    for name, text in render(rows, class_names=classes).items():
        if not name.endswith(".html"):
            continue
        page = Page(text)
        assert not any(tag in ("i", "u") for tag, _ in page.elements), name
        assert not any(key.startswith("on") for _, attrs in page.elements for key in attrs), name
        assert not any(attrs.get("src") == "x" for _, attrs in page.elements), name
        assert [(a.get("src"), a.get("type")) for a in page.all("script")] == [
            ("gallery/review.js", None), ("gallery/gallery.js", None), (None, "application/json")]
        assert [(c["path"], c["label"], c["error"]) for c in page_cards(text)] == [
            (row.path, row.label, row.error) for row in rows]
        assert HOSTILE_NAME in page.text and HOSTILE_ERROR in page.text
        assert "<i>PNEU</i>" in page.text and "/data/<u>xrays</u>" in page.text


def test_rows_script_is_ascii_json_holding_every_row_in_gallery_order():
    rows = labelled_rows()
    files = render(rows, page_size=5)
    script = files[ROWS_SCRIPT]
    assert script.isascii()
    prefix = "window.BATCHCAM_ROWS = "
    assert script.startswith(prefix) and script.rstrip().endswith(";")
    data = json.loads(script[len(prefix):].rstrip().rstrip(";"))
    assert data["pageSize"] == 5 and data["pages"] == ["index.html", "gallery/page-2.html"]
    found = records(data)
    assert [r["path"] for r in found] == [row.path for row in rows]
    assert [r["correct"] for r in found] == [row.correct for row in rows]
    hostile = next(row for row in rows if row.path == HOSTILE_NAME)
    assert next(r for r in found if r["path"] == HOSTILE_NAME)["thumb"] == hostile.thumb
    # each page's own rows are the same records, in the same form
    pages = [page_data(files[name]) for name in data["pages"]]
    assert [record for page in pages for record in page["rows"]] == data["rows"]
    assert all((page["columns"], page["attributes"]) == (data["columns"], data["attributes"]) for page in pages)


def test_links_to_images_are_percent_encoded_on_every_page():
    """In the list a reader without JavaScript gets (the cards' links: test_gallery_browser.py)."""
    rows = [ok_row(f"NORMAL/img{i}.png", "NORMAL", 0.9) for i in range(3)]
    rows.append(ok_row("NORMAL/odd.png", "NORMAL", 0.9, overlay="overlays/c d#?%é.jpg"))
    files = render(rows, page_size=3)
    page = Page(files["gallery/page-2.html"])
    assert [a["href"] for a in page.all("a") if "overlays" in a.get("href", "")] == [
        "../overlays/c%20d%23%3F%25%C3%A9.jpg", "../overlays/c%20d%23%3F%25%C3%A9.orig.jpg"]


def test_every_page_carries_the_csp_and_no_inline_script_or_style():
    files = render(labelled_rows(), page_size=5)
    for name in ("index.html", "gallery/page-2.html"):
        page = Page(files[name])
        csp = page.all("meta", **{"http-equiv": "Content-Security-Policy"})
        assert [m["content"] for m in csp] == [CONTENT_SECURITY_POLICY]
        assert all(a.get("src") or a.get("type") == "application/json" for a in page.all("script")), \
            "an inline script would be refused by the CSP (a JSON data block is never run)"
        assert not page.all("style") and not any("style" in attrs for _, attrs in page.elements)
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "default-src 'none'" in CONTENT_SECURITY_POLICY


def test_each_card_s_data_carries_prediction_confidence_truth_and_the_marks():
    """What gallery.js draws a card from (what it draws: test_gallery_browser.py)."""
    rows = labelled_rows()
    rows[0].attention_outside, rows[1].ood_score, rows[1].ood_flag, rows[2].change = 0.8, 41.5, True, "new"
    data = page_data(render(rows, page_size=10)["index.html"])
    cards = page_cards(render(rows, page_size=10)["index.html"])
    wrong = [c for c in cards if c["correct"] is False]
    assert [(c["prediction"], c["label"], c["correct"]) for c in wrong] == [("PNEUMONIA", "NORMAL", False)]
    assert [c["confidence"] for c in cards if c["status"] == "error"] == [None, None]
    assert [c["confidence"] for c in cards if c["status"] == "ok"] == [round(r.confidence, 4) for r in rows if r.ok]
    assert (cards[0]["attention_flag"], cards[0]["attention_outside"]) == (True, 0.8)
    assert (cards[1]["ood_flag"], cards[1]["ood_score"], cards[2]["change"]) == (True, 41.5, "new")
    assert data["attributes"] == {"status": "status", "prediction": "pred", "confidence": "conf", "label": "label",
                                  "correct": "correct", "sha256": "sha", "first_seen": "first-seen",
                                  "change": "change", "decision": "review", "note": "review-note",
                                  "reviewed_at": "reviewed-at"}


def test_a_reader_without_javascript_gets_every_image_of_the_page_by_name_and_link():
    rows = labelled_rows()
    page = Page(render(rows, page_size=5)["gallery/page-2.html"])
    items = page.all("li")
    assert [item["id"] for item in items] == ["r5", "r6", "r7"]
    assert [a["href"] for a in page.all("a") if a.get("href", "").startswith("../overlays/")] == [
        f"../{name}" for row in rows[5:] if row.ok for name in (row.overlay, row.original)]
    text = "".join(page.text)
    assert all(row.path in text for row in rows[5:]) and HOSTILE_ERROR in text


# ---- summary --------------------------------------------------------------------------------------

def test_metrics_confusion_and_roc_appear_only_when_labels_are_known():
    labelled = Page(render(labelled_rows())["index.html"])
    figures = {a.get("class") for a in labelled.all("figure")}
    assert {"chart histogram", "chart confusion", "chart roc"} <= figures
    assert labelled.all("table", **{"class": "metrics"})
    unlabelled_rows = labelled_rows()
    for row in unlabelled_rows:
        row.label = ""
    unlabelled = Page(render(unlabelled_rows)["index.html"])
    figures = {a.get("class") for a in unlabelled.all("figure")}
    assert "chart histogram" in figures and not {"chart confusion", "chart roc"} & figures
    assert not unlabelled.all("table", **{"class": "metrics"}) and not unlabelled.all("select", id="f-outcome")


def test_summary_charts_only_on_the_index():
    files = render(labelled_rows(), page_size=5)
    assert not Page(files["gallery/page-2.html"]).all("figure", **{"class": "chart histogram"})


def test_histogram_counts_every_ok_image_once_stacked_by_true_label():
    rows = labelled_rows()
    summary = summarise(rows, CLASSES, scan_metrics(rows, CLASSES))
    assert sum(bar.count for bar in summary.histogram.bars) == 6
    assert [name for _, name in summary.histogram.legend] == ["true NORMAL", "true PNEUMONIA", "no label"]
    assert (summary.total, summary.ok, summary.error, summary.wrong, summary.labelled) == (8, 6, 2, 1, 5)
    assert summary.per_class == [("NORMAL", 3), ("PNEUMONIA", 3)]


def test_roc_curve_is_thinned_for_large_runs_and_spans_the_unit_square():
    rows = [ok_row(f"{label}/{i:05d}.png", label, 0.5 + (i % 997) / 2000, label)
            for i, label in ((i, CLASSES[i % 2]) for i in range(5000))]
    rows[0].prediction, rows[0].confidence = "PNEUMONIA", 0.6     # keep both classes and some mistakes
    roc = summarise(rows, CLASSES, scan_metrics(rows, CLASSES)).roc
    points = roc.curves[0].points.split()
    assert len(points) <= ROC_MAX_POINTS
    assert points[0] == "0.0,220.0" and points[-1] == "220.0,0.0"


def test_the_summary_says_how_many_images_had_lung_fields_and_how_many_of_those_were_flagged():
    """"0 of 24 images with lung fields" meant 0 flagged of 24 measured and read as no lungs found."""
    rows = [ok_row(f"NORMAL/{i}.png", "NORMAL", 0.9, "NORMAL") for i in range(4)] + [error_row("NORMAL/x.png")]
    for row, outside in zip(rows, (0.2, 0.3, 0.7, None)):
        row.attention_outside = outside
    text = " ".join("".join(Page(render(rows)["index.html"]).text).split())
    assert ("3 of 4 images with lung fields found (1 without: not like a frontal chest film, see batchcam.log); "
            "1 with most heat off the lungs") in text


# ---- more than two classes ----------------------------------------------------------------------------

NBV = ("NORMAL", "BACTERIA", "VIRUS")


def three_class_rows() -> list[Row]:
    """Nine labelled rows, three per class, each class predicted at least once, one unlabelled row."""
    probabilities = [[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5],      # true NORMAL
                     [0.1, 0.6, 0.3], [0.45, 0.4, 0.15], [0.2, 0.5, 0.3],    # true BACTERIA
                     [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4],      # true VIRUS
                     [0.3, 0.3, 0.4]]                                        # no label
    labels = [name for name in NBV for _ in range(3)] + [""]
    rows = []
    for i, (p, label) in enumerate(zip(probabilities, labels)):
        predicted = NBV[max(range(3), key=p.__getitem__)]
        rows.append(Row(path=f"{label or 'other'}/{i}.png", status="ok", prediction=predicted, confidence=max(p),
                        probabilities=p, label=label, cam_target=predicted, overlay=overlay_path(f"{i}.png"),
                        width=64, height=48))
    return rows


def test_three_classes_get_a_curve_each_and_the_positive_classes_a_dashed_one_of_their_summed_probability():
    rows = three_class_rows()
    metrics = scan_metrics(rows, NBV, positive=[1, 2])
    summary = summarise(rows, NBV, metrics, positive=[1, 2])
    assert [(c.name, c.positive_set) for c in summary.roc.curves] == [
        ("NORMAL", False), ("BACTERIA", False), ("VIRUS", False), ("BACTERIA or VIRUS", True)]
    assert [c.auc for c in summary.roc.curves] == [*(metrics["per_class"][name]["roc_auc"] for name in NBV),
                                                   metrics["roc_auc"]]
    assert len({c.colour for c in summary.roc.curves}) == 4
    assert summary.histogram.title == "P(BACTERIA or VIRUS)"
    assert summary.per_class == [("NORMAL", 3), ("BACTERIA", 3), ("VIRUS", 4)]


def test_a_single_positive_class_among_three_draws_no_extra_curve():
    rows = three_class_rows()
    summary = summarise(rows, NBV, scan_metrics(rows, NBV))
    assert [c.name for c in summary.roc.curves] == list(NBV)
    assert summary.histogram.title == "P(VIRUS)"


def test_two_classes_keep_their_single_roc_curve_of_the_positive_class():
    rows = labelled_rows()
    roc = summarise(rows, CLASSES, scan_metrics(rows, CLASSES)).roc
    assert [(c.name, c.positive_set, c.colour) for c in roc.curves] == [("PNEUMONIA", False, "#D55E00")]
    index = Page(render(rows)["index.html"])
    assert [p.get("data-class") for p in index.all("polyline")] == ["PNEUMONIA"]
    assert not index.all("table", **{"class": "metrics per-class"})


def test_the_three_class_page_shows_each_class_in_the_filter_the_matrix_the_curves_and_the_table():
    rows = three_class_rows()
    metrics = scan_metrics(rows, NBV, positive=[1, 2])
    text = render_gallery(rows, NBV, MANIFEST, metrics, 100, positive=[1, 2])["index.html"]
    index = Page(text)
    class_filter = Page(re.search(r'<select id="f-class">.*?</select>', text, re.S).group(0))
    assert [o.get("value") for o in class_filter.all("option")] == ["", *NBV]
    cells = [data for data in index.text if re.fullmatch(r"true \w+, predicted \w+: \d+", data)]
    assert cells == [f"true {t}, predicted {p}: {metrics['confusion_matrix'][i][j]}"
                     for i, t in enumerate(NBV) for j, p in enumerate(NBV)]
    assert [p.get("data-class") for p in index.all("polyline")] == [*NBV, "BACTERIA or VIRUS"]
    assert len(index.all("table", **{"class": "metrics per-class"})) == 1
    assert any("BACTERIA or VIRUS as positive" in data for data in index.text)


def test_eight_classes_never_draw_two_curves_alike():
    """Six colour-blind-safe colours: from the seventh class on, a dash pattern tells the curves apart."""
    names = tuple(f"C{i}" for i in range(8))
    rows = []
    for i in range(32):
        p = np.full(8, 0.02)
        p[i % 8] += 0.84 - 0.01 * (i // 8)
        p[(i + 1) % 8] += 0.01 * (i // 8)
        rows.append(Row(path=f"C{i % 8}/{i}.png", status="ok", prediction=names[int(p.argmax())],
                        confidence=float(p.max()), probabilities=(p / p.sum()).tolist(), label=names[i % 8],
                        cam_target="x", overlay=overlay_path(f"{i}.png"), width=64, height=48))
    summary = summarise(rows, names, scan_metrics(rows, names))
    assert len(summary.roc.curves) == 8
    assert len({(c.colour, c.dashes) for c in summary.roc.curves}) == 8
    two = labelled_rows()
    assert summarise(two, CLASSES, scan_metrics(two, CLASSES)).confusion.width == 270     # as it always was
    assert summary.confusion.width >= 0.75 * (110 + 8 * 78)                              # its counts stay legible


def test_a_class_alone_among_the_labels_draws_no_curve_and_a_chart_without_curves_is_left_out():
    rows = [row for row in three_class_rows() if row.label in ("", "VIRUS")]       # one labelled class
    summary = summarise(rows, NBV, scan_metrics(rows, NBV, positive=[1, 2]), positive=[1, 2])
    assert summary.roc is None
    rows = [row for row in three_class_rows() if row.label != "BACTERIA"]          # BACTERIA has no image
    curves = summarise(rows, NBV, scan_metrics(rows, NBV, positive=[1, 2]), positive=[1, 2]).roc.curves
    assert [c.name for c in curves] == ["NORMAL", "VIRUS", "BACTERIA or VIRUS"]


def test_a_report_re_rendered_from_an_older_metrics_json_still_draws_each_class():
    """metrics.json written before per-class metrics existed: the curves come from the rows."""
    rows = three_class_rows()
    old = {key: value for key, value in scan_metrics(rows, NBV).items() if key not in ("per_class", "macro")}
    text = render_gallery(rows, NBV, MANIFEST, old, 100)["index.html"]
    assert [p.get("data-class") for p in Page(text).all("polyline")] == list(NBV)
    assert not Page(text).all("table", **{"class": "metrics per-class"})


def test_more_classes_than_colours_stack_the_histogram_by_positive_or_not():
    names = tuple(f"C{i}" for i in range(8))
    rows = [Row(path=f"C{i % 8}/{i}.png", status="ok", prediction=names[i % 8], confidence=0.3,
                probabilities=[0.3 if c == i % 8 else 0.1 for c in range(8)], label=names[i % 8], cam_target="x",
                overlay=overlay_path(f"{i}.png"), width=64, height=48) for i in range(16)]
    histogram = summarise(rows, names, scan_metrics(rows, names)).histogram
    assert [name for _, name in histogram.legend] == ["true C7", "true other classes"]
    assert sum(bar.count for bar in histogram.bars) == 16
