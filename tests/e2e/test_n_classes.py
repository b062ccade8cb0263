"""N classes end to end (issue 23 point 4): a NORMAL / BACTERIA / VIRUS model and a five-class one.

Every number the report gives is checked against a recount made here from predictions.csv with plain
Python (never ``batchcam.checks.metrics``): the confusion matrix, accuracy, the binary metrics of the
``--positive`` set against the rest, each class's one-vs-rest precision, recall and ROC AUC (counted pair
by pair), their macro means, and what the gallery draws from them.

A randomly initialised head predicts one class for nearly every image, which would let most of these
checks pass on nothing; the models here get a random head centred on the tree's own features
(``spread_checkpoint``), and the fixtures assert that every class is predicted, some rightly, some not.
"""
from __future__ import annotations

import html.parser
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import manifest, read_rows, scan
from PIL import Image

from batchcam.cli import main
from batchcam.decode.dataset import collate_samples, decode_sample
from batchcam.model.checkpoint import ModelSpec, build_model, load_checkpoint, model_input, save_checkpoint
from conftest import TINY_SIZE

THREE = ("NORMAL", "BACTERIA", "VIRUS")
FIVE = ("NORMAL", "BACTERIA", "VIRUS", "FUNGAL", "TB")
PNEUMONIA = ("BACTERIA", "VIRUS")
IMAGE_SIZE = (48, 40)          # width, height of the tree's images
PER_CLASS = 7
UNLABELLED = "other/x.png"     # in a folder named for no class: its row has no label


# ---- the tree and the models ---------------------------------------------------------------------

def noise_image(rng: np.random.Generator, brightness: float, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    width, height = size
    return Image.fromarray(np.clip(rng.normal(brightness, 40, (height, width)), 0, 255).astype(np.uint8))


def class_brightness(class_names: tuple[str, ...]) -> dict[str, float]:
    """Each class's mean grey level, so the model's features (and its predictions) differ by class."""
    return {name: float(level) for name, level in zip(class_names, np.linspace(50, 200, len(class_names)))}


def write_tree(root: Path, class_names: tuple[str, ...], per_class: int, seed: int = 0,
               unlabelled: bool = True) -> list[Path]:
    """``ROOT/<CLASS>/NNN.png`` noise images of a class-dependent brightness, and ``ROOT/other/x.png``."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, brightness in class_brightness(class_names).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            paths.append(root / name / f"{i:03d}.png")
            noise_image(rng, brightness).save(paths[-1])
    if unlabelled:
        (root / "other").mkdir(parents=True, exist_ok=True)
        noise_image(rng, 128).save(root / UNLABELLED)
    return paths


def spread_checkpoint(path: Path, class_names: tuple[str, ...], images: list[Path], seed: int = 0) -> Path:
    """A seeded ResNet18 whose head is random but centred on ``images``' features (its logits' standard
    deviation over them 2), so that its predictions spread over the classes on images like these."""
    torch.manual_seed(seed)
    model = build_model(len(class_names), 0.0).eval()
    spec = ModelSpec(class_names=class_names, image_size=TINY_SIZE, dropout=0.0)
    _, gray = collate_samples([decode_sample(p.name, p.read_bytes(), TINY_SIZE) for p in images])   # as scan sees them
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.no_grad():
        features = model(model_input(gray, spec))
        model.fc = head
        centre = features.mean(0)
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(len(class_names), features.shape[1], generator=generator)
        weight *= 2 / ((features - centre) @ weight.T).std()
        head.weight.copy_(weight)
        head.bias.copy_(-(weight @ centre))
    save_checkpoint(path, model, spec)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three") / "xrays"
    write_tree(root, THREE, PER_CLASS)
    return root


@pytest.fixture(scope="module")
def model3(tree, tmp_path_factory) -> Path:
    images = sorted(tree.rglob("*.png"))
    return spread_checkpoint(tmp_path_factory.mktemp("model3") / "three.pt", THREE, images, seed=4)


def scanned(root: Path, out: Path, model: Path, *extra: str) -> Path:
    assert scan(root, out, model, "--quiet", *extra) == 0
    return out


@pytest.fixture(scope="module")
def default_report(tree, model3, tmp_path_factory) -> Path:
    """The three-class tree scanned without --positive; its predictions spread over every class."""
    report = scanned(tree, tmp_path_factory.mktemp("default") / "report", model3)
    assert_spread(read_rows(report), THREE)
    return report


@pytest.fixture(scope="module")
def pneumonia_report(tree, model3, tmp_path_factory) -> Path:
    """The three-class tree scanned with --positive BACTERIA,VIRUS (pneumonia against normal)."""
    return scanned(tree, tmp_path_factory.mktemp("pneumonia") / "report", model3, "--positive", "BACTERIA,VIRUS")


def assert_spread(rows: list[dict], class_names: tuple[str, ...]) -> None:
    """The guard against vacuous checks: every class predicted on the labelled images, some right, some wrong."""
    labelled = labelled_rows(rows)
    assert {row["prediction"] for row in labelled} == set(class_names)
    assert {row["label"] for row in labelled} == set(class_names)
    outcomes = {row["label"] == row["prediction"] for row in labelled}
    assert outcomes == {True, False}


# ---- the recount, from predictions.csv alone -----------------------------------------------------

def labelled_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["status"] == "ok" and row["label"]]


def probabilities(row: dict, class_names: tuple[str, ...]) -> list[float]:
    return [float(row[f"p_{name}"]) for name in class_names]


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class Auc:
    """A pairwise-count ROC AUC and how far a rounding of the CSV's scores may have moved it: pairs whose
    rounded scores tie count one half here, but may have been ordered in the scan's unrounded scores."""
    value: float | None
    slack: float = 0.0


def pairwise_auc(is_positive: list[bool], scores: list[float]) -> Auc:
    positives = [s for s, p in zip(scores, is_positive) if p]
    negatives = [s for s, p in zip(scores, is_positive) if not p]
    if not positives or not negatives:
        return Auc(None)
    pairs = len(positives) * len(negatives)
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    ties = sum(p == n for p in positives for n in negatives)
    return Auc(wins / pairs, 0.5 * ties / pairs + 1e-9)


def binary_recount(is_positive: list[bool], said_positive: list[bool], scores: list[float]) -> dict:
    tp = sum(p and s for p, s in zip(is_positive, said_positive))
    tn = sum(not p and not s for p, s in zip(is_positive, said_positive))
    fp = sum(not p and s for p, s in zip(is_positive, said_positive))
    fn = sum(p and not s for p, s in zip(is_positive, said_positive))
    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "precision": ratio(tp, tp + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "roc_auc": pairwise_auc(is_positive, scores)}


def positive_set_recount(rows: list[dict], positive: tuple[str, ...]) -> dict:
    """The positive classes together against the rest, each image scored by their probabilities' sum."""
    labelled = labelled_rows(rows)
    return binary_recount([row["label"] in positive for row in labelled],
                          [row["prediction"] in positive for row in labelled],
                          [sum(float(row[f"p_{name}"]) for name in positive) for row in labelled])


def per_class_recount(rows: list[dict], class_names: tuple[str, ...]) -> dict[str, dict]:
    labelled = labelled_rows(rows)
    recount = {}
    for name in class_names:
        binary = binary_recount([row["label"] == name for row in labelled],
                                [row["prediction"] == name for row in labelled],
                                [float(row[f"p_{name}"]) for row in labelled])
        recount[name] = {"n": sum(row["label"] == name for row in labelled), "precision": binary["precision"],
                         "recall": binary["sensitivity"], "f1": binary["f1"], "roc_auc": binary["roc_auc"]}
    return recount


def confusion_recount(rows: list[dict], class_names: tuple[str, ...]) -> list[list[int]]:
    index = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    for row in labelled_rows(rows):
        matrix[index[row["label"]]][index[row["prediction"]]] += 1
    return matrix


def assert_same(reported: float | None, recounted: float | Auc | None, what: str) -> None:
    """A reported metric equals the recount: both undefined (None), or equal (within an AUC's slack)."""
    value, slack = (recounted.value, recounted.slack) if isinstance(recounted, Auc) else (recounted, 1e-12)
    if value is None:
        assert reported is None, f"{what}: reported {reported}, undefined in the recount"
    else:
        assert reported is not None and abs(reported - value) <= slack, f"{what}: reported {reported}, recount {value}"


def assert_binary_metrics(metrics: dict, recount: dict) -> None:
    for name in ("sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert_same(metrics[name], recount[name], name)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def metrics_of(report: Path) -> dict:
    return read_json(report / "metrics.json")


# ---- the gallery, parsed -------------------------------------------------------------------------

VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    children: list = field(default_factory=list)     # Elements and strings

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def own_text(self) -> str:
        return "".join(c for c in self.children if isinstance(c, str))

    def find_all(self, tag: str, *classes: str, **attrs: str) -> list[Element]:
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if (child.tag == tag and set(classes) <= child.classes
                        and all(child.attrs.get(k) == v for k, v in attrs.items())):
                    found.append(child)
                found += child.find_all(tag, *classes, **attrs)
        return found

    def one(self, tag: str, *classes: str, **attrs: str) -> Element:
        found = self.find_all(tag, *classes, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag}> with {classes} {attrs}"
        return found[0]


class _Tree(html.parser.HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self._open = [self.root]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self._open[-1].children.append(element)
        if tag not in VOID_ELEMENTS:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self._open[-1].children.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data):
        self._open[-1].children.append(data)


def gallery(report: Path) -> Element:
    return _Tree((report / "index.html").read_text(encoding="utf-8")).root


def class_options(page: Element) -> list[str]:
    return [option.text().strip() for option in page.one("select", id="f-class").find_all("option")]


def predicted_stats(page: Element) -> dict[str, int]:
    """The summary's "predicted CLASS" counts."""
    stats = {}
    for stat in page.find_all("div", "stat"):
        label = " ".join(stat.own_text().split())
        if label.startswith("predicted "):
            stats[label.removeprefix("predicted ")] = int(stat.one("b").text())
    return stats


def confusion_cells(page: Element) -> dict[tuple[str, str], int]:
    """(true, predicted) -> count, from the titles of the confusion matrix's cells."""
    cells = {}
    for rect in page.one("figure", "chart", "confusion").find_all("rect"):
        found = re.fullmatch(r"true (.+), predicted (.+): (\d+)", rect.one("title").text().strip())
        assert found, rect.one("title").text()
        assert (found[1], found[2]) not in cells
        cells[(found[1], found[2])] = int(found[3])
    return cells


def roc_curves(page: Element) -> tuple[list[str], int, str]:
    """The ROC chart's one-vs-rest curves (their data-class), how many positive-set curves, its caption."""
    figure = page.one("figure", "chart", "roc")
    curves = figure.find_all("polyline", "curve")
    per_class = [curve.attrs.get("data-class", "") for curve in curves if "positive-set" not in curve.classes]
    positive_sets = sum("positive-set" in curve.classes for curve in curves)
    return per_class, positive_sets, " ".join(figure.one("figcaption").text().split())


def per_class_table(page: Element) -> dict[str, list[str]]:
    """The per-class table's rows by their first cell: each cell's text."""
    table = page.one("table", "metrics", "per-class")
    rows = {}
    for tr in table.find_all("tr"):
        cells = [" ".join(c.text().split()) for c in tr.children if isinstance(c, Element) and c.tag in ("th", "td")]
        rows[cells[0]] = cells
    return rows


def matrix_as_cells(matrix: list[list[int]], class_names: tuple[str, ...]) -> dict[tuple[str, str], int]:
    return {(true, predicted): matrix[t][p] for t, true in enumerate(class_names)
            for p, predicted in enumerate(class_names)}


# ---- 1. the CSV, the confusion matrix and accuracy -------------------------------------------------

def test_three_classes_each_get_a_probability_column_and_the_matrix_is_three_by_three(default_report):
    header = (default_report / "predictions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[header.index("confidence") + 1:][:4] == ["p_NORMAL", "p_BACTERIA", "p_VIRUS", "label"]
    rows = read_rows(default_report)
    assert len(rows) == 3 * PER_CLASS + 1 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        p = probabilities(row, THREE)
        assert abs(sum(p) - 1) <= 1e-4
        assert float(row[f"p_{row['prediction']}"]) == max(p)
        assert float(row["confidence"]) == max(p)
        assert row["label"] == ("" if row["path"] == UNLABELLED else row["path"].split("/")[0])
    metrics = metrics_of(default_report)
    labelled = labelled_rows(rows)
    assert metrics["n"] == len(labelled) == 3 * PER_CLASS      # other/x.png is not counted
    assert metrics["class_names"] == list(THREE)
    assert metrics["confusion_matrix"] == confusion_recount(rows, THREE)
    assert_same(metrics["accuracy"], sum(r["label"] == r["prediction"] for r in labelled) / len(labelled), "accuracy")
    assert metrics["positive_classes"] == ["VIRUS"]             # the last class: the model has no PNEUMONIA
    assert manifest(default_report)["settings"]["positive"] == ["VIRUS"]
    assert_binary_metrics(metrics, positive_set_recount(rows, ("VIRUS",)))


# ---- 2. --positive: pneumonia (bacteria or virus) against normal ------------------------------------

def test_positive_bacteria_and_virus_scores_pneumonia_against_normal(pneumonia_report, default_report):
    rows = read_rows(pneumonia_report)
    metrics = metrics_of(pneumonia_report)
    assert metrics["positive_classes"] == ["BACTERIA", "VIRUS"]
    assert manifest(pneumonia_report)["settings"]["positive"] == ["BACTERIA", "VIRUS"]
    recount = positive_set_recount(rows, PNEUMONIA)
    assert_binary_metrics(metrics, recount)
    assert recount["roc_auc"].value is not None and recount["sensitivity"] is not None
    # --positive changes the scoring, never the rows, nor what is over all classes
    drop = {"change", "first_seen"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in read_rows(default_report)]
    default = metrics_of(default_report)
    assert metrics["confusion_matrix"] == default["confusion_matrix"] and metrics["accuracy"] == default["accuracy"]
    assert metrics["per_class"] == default["per_class"]


def test_positive_names_are_case_insensitive_and_kept_in_the_models_order(tree, model3, pneumonia_report, tmp_path):
    report = scanned(tree, tmp_path / "report", model3, "--positive", "virus, Bacteria")
    assert manifest(report)["settings"]["positive"] == ["BACTERIA", "VIRUS"]
    assert metrics_of(report) == metrics_of(pneumonia_report)


def test_the_default_positive_class_is_pneumonia_when_the_model_has_it_wherever_it_sits(tmp_path):
    classes = ("Pneumonia", "NORMAL", "COVID")
    root = tmp_path / "xrays"
    model = spread_checkpoint(tmp_path / "model.pt", classes, write_tree(root, classes, 3))
    report = scanned(root, tmp_path / "report", model)
    metrics = metrics_of(report)
    assert metrics["positive_classes"] == ["Pneumonia"] and manifest(report)["settings"]["positive"] == ["Pneumonia"]
    assert_binary_metrics(metrics, positive_set_recount(read_rows(report), ("Pneumonia",)))


# ---- 3. each class against the rest, and the macro means --------------------------------------------

def test_per_class_metrics_and_their_macro_means_match_a_pairwise_recount(default_report):
    rows = read_rows(default_report)
    metrics = metrics_of(default_report)
    recount = per_class_recount(rows, THREE)
    assert list(metrics["per_class"]) == list(THREE)
    for name in THREE:
        reported = metrics["per_class"][name]
        assert reported["n"] == recount[name]["n"] == PER_CLASS
        for key in ("precision", "recall", "f1", "roc_auc"):
            assert_same(reported[key], recount[name][key], f"{name} {key}")
    assert metrics["macro"]["classes"] == 3
    assert_macro_means(metrics, recount, THREE)


def assert_macro_means(metrics: dict, recount: dict[str, dict], over: tuple[str, ...]) -> None:
    """The macro means are over the classes ``over`` (those with labelled images): a precision undefined
    there (the class never predicted) counts 0, an undefined AUC is left out."""
    for key in ("precision", "recall", "f1"):
        values = [recount[name][key] or 0.0 for name in over]
        assert metrics["macro"][key] == pytest.approx(sum(values) / len(values), abs=1e-6), key
    aucs = [recount[name]["roc_auc"] for name in over if recount[name]["roc_auc"].value is not None]
    mean, slack = (sum(auc.value for auc in aucs) / len(aucs), sum(auc.slack for auc in aucs) / len(aucs)) if aucs \
        else (None, 0.0)
    assert_same(metrics["macro"]["roc_auc"], Auc(mean, slack), "macro roc_auc")


def test_a_class_without_labelled_images_is_left_out_of_the_macro_means(tree, model3, tmp_path):
    """VIRUS's folder renamed: VIRUS has no labelled image, so its recall and AUC are undefined (None) and
    the macro means are over NORMAL and BACTERIA only; its precision is defined where it was predicted."""
    root = tmp_path / "xrays"
    for name in ("NORMAL", "BACTERIA"):
        (root / name).mkdir(parents=True)
        for path in (tree / name).iterdir():
            (root / name / path.name).write_bytes(path.read_bytes())
    (root / "viral").mkdir()
    for path in (tree / "VIRUS").iterdir():
        (root / "viral" / path.name).write_bytes(path.read_bytes())
    report = scanned(root, tmp_path / "report", model3, "--positive", "BACTERIA")
    rows = read_rows(report)
    metrics = metrics_of(report)
    assert metrics["n"] == 2 * PER_CLASS and metrics["confusion_matrix"] == confusion_recount(rows, THREE)
    recount = per_class_recount(rows, THREE)
    virus = metrics["per_class"]["VIRUS"]
    assert virus["n"] == 0 and virus["recall"] is None and virus["roc_auc"] is None
    for name in THREE:
        for key in ("precision", "recall", "f1", "roc_auc"):
            assert_same(metrics["per_class"][name][key], recount[name][key], f"{name} {key}")
    assert metrics["macro"]["classes"] == 2
    assert_macro_means(metrics, recount, ("NORMAL", "BACTERIA"))


# ---- 4. a rescan with another --positive reuses every row -------------------------------------------

def test_a_rescan_with_another_positive_reuses_every_row_and_rescores(tree, model3, tmp_path):
    report = scanned(tree, tmp_path / "report", model3)
    first = read_rows(report)
    assert metrics_of(report)["positive_classes"] == ["VIRUS"]
    scanned(tree, report, model3, "--positive", "BACTERIA,VIRUS")
    counts = manifest(report)["counts"]
    assert counts["reused"] == counts["found"] == len(first) and counts["processed"] == 0
    rows = read_rows(report)
    assert [{k: v for k, v in r.items() if k != "change"} for r in rows] == \
           [{k: v for k, v in r.items() if k != "change"} for r in first]
    metrics = metrics_of(report)
    assert metrics["positive_classes"] == ["BACTERIA", "VIRUS"]
    assert manifest(report)["settings"]["positive"] == ["BACTERIA", "VIRUS"]
    assert_binary_metrics(metrics, positive_set_recount(rows, PNEUMONIA))
    assert gallery(report).find_all("polyline", "curve", "positive-set")   # the gallery is rescored too
    scanned(tree, report, model3, "--positive", "normal")
    assert manifest(report)["counts"]["processed"] == 0
    assert metrics_of(report)["positive_classes"] == ["NORMAL"]
    assert_binary_metrics(metrics_of(report), positive_set_recount(rows, ("NORMAL",)))


# ---- 5. refusals ----------------------------------------------------------------------------------

def report_files(report: Path) -> dict[str, bytes]:
    return {str(p.relative_to(report)): p.read_bytes() for p in sorted(report.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("positive, named", [("FOO", "FOO"), ("VIRUS,FOO", "FOO"), ("NORMAL,BACTERIA,VIRUS", None),
                                             ("virus,Normal,BACTERIA", None), ("", None), ("VIRUS,", None)])
def test_an_unknown_or_every_class_as_positive_is_exit_2_in_one_line_and_report_untouched(
        tree, model3, default_report, tmp_path, capsys, positive, named):
    fresh = tmp_path / "fresh"
    assert scan(tree, fresh, model3, "--positive", positive) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "--positive" in err and "Traceback" not in err
    if named:
        assert named in err
    assert all(name in err for name in THREE), err        # the model's classes, to choose from
    assert not fresh.exists()

    before = report_files(default_report)
    assert scan(tree, default_report, model3, "--positive", positive) == 2
    assert capsys.readouterr().err == err.replace(str(fresh), str(default_report))
    assert report_files(default_report) == before


# ---- 6. the gallery -------------------------------------------------------------------------------

def assert_gallery(report: Path, class_names: tuple[str, ...], positive_sets: int) -> None:
    """The class filter, the summary's counts, the confusion matrix, the ROC curves and the per-class
    table of ``report``'s index.html, each against the recount from its CSV."""
    rows = read_rows(report)
    metrics = metrics_of(report)
    page = gallery(report)
    assert class_options(page) == ["any class", *class_names]
    ok = [row for row in rows if row["status"] == "ok"]
    assert predicted_stats(page) == {name: sum(row["prediction"] == name for row in ok) for name in class_names}
    assert confusion_cells(page) == matrix_as_cells(confusion_recount(rows, class_names), class_names)
    recount = per_class_recount(rows, class_names)
    defined = [name for name in class_names if recount[name]["roc_auc"].value is not None]
    curves, sets, caption = roc_curves(page)
    assert sorted(curves) == sorted(defined) and sets == positive_sets
    for name in defined:
        auc = metrics["per_class"][name]["roc_auc"]
        assert re.search(rf"(?<!\w){re.escape(name)}\W{{0,3}}AUC {auc:.3f}", caption), (name, auc, caption)
    table = per_class_table(page)
    for name in class_names:
        assert name in table and str(recount[name]["n"]) in table[name][1:], (name, table.get(name))
    assert sum(name in table for name in class_names) == len(class_names)


def test_the_gallery_draws_every_class(default_report):
    assert_gallery(default_report, THREE, positive_sets=0)


def test_the_gallery_adds_the_positive_set_curve_when_positive_names_several(pneumonia_report):
    assert_gallery(pneumonia_report, THREE, positive_sets=1)
    _, _, caption = roc_curves(gallery(pneumonia_report))
    assert f"AUC {metrics_of(pneumonia_report)['roc_auc']:.3f}" in caption


def test_two_classes_keep_one_roc_curve_and_no_per_class_table(xray_folder, tiny_model, tmp_path):
    report = scanned(xray_folder, tmp_path / "report", tiny_model)
    page = gallery(report)
    assert class_options(page) == ["any class", "NORMAL", "PNEUMONIA"]
    curves = page.one("figure", "chart", "roc").find_all("polyline", "curve")
    assert len(curves) == 1 and "positive-set" not in curves[0].classes
    assert not page.find_all("table", "per-class")
    assert len(confusion_cells(page)) == 4
    assert metrics_of(report)["positive_classes"] == ["PNEUMONIA"]


# ---- re-rendering keeps the scan's positive set ----------------------------------------------------

def test_evaluate_and_review_import_rescore_with_the_scans_positive_set(tree, model3, tmp_path):
    report = scanned(tree, tmp_path / "report", model3, "--positive", "BACTERIA,VIRUS")
    rows = read_rows(report)
    scanned_metrics = metrics_of(report)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nBACTERIA/000.png,1,2,30,30\n", encoding="utf-8")
    assert main(["evaluate", str(report), "--boxes", str(boxes)]) == 0
    after = metrics_of(report)
    assert "localisation" in after and after["positive_classes"] == ["BACTERIA", "VIRUS"]
    assert {k: v for k, v in after.items() if k != "localisation"} == scanned_metrics
    assert len(gallery(report).find_all("polyline", "curve", "positive-set")) == 1

    (report / "metrics.json").unlink()        # computed again from predictions.csv, as the scan scored it
    row = rows[0]
    export = tmp_path / "review.csv"
    export.write_text("path,sha256,prediction,confidence,decision,note,reviewed_at,report_id\n"
                      f"{row['path']},{row['sha256']},{row['prediction']},{row['confidence']},agree,,"
                      f"2026-12-02T08:00:00.000Z,{manifest(report)['report_id']}\n", encoding="utf-8")
    assert main(["review", str(report), "--import", str(export)]) == 0
    reviewed = metrics_of(report)
    assert reviewed["review"] and reviewed["positive_classes"] == ["BACTERIA", "VIRUS"]
    assert_binary_metrics(reviewed, positive_set_recount(rows, PNEUMONIA))
    assert len(gallery(report).find_all("polyline", "curve", "positive-set")) == 1


# ---- 7. five classes ------------------------------------------------------------------------------

def test_a_five_class_model_scans_and_its_gallery_draws_five_classes(tmp_path):
    root = tmp_path / "xrays"
    model = spread_checkpoint(tmp_path / "five.pt", FIVE, write_tree(root, FIVE, 4, seed=5), seed=5)
    report = scanned(root, tmp_path / "report", model)
    rows = read_rows(report)
    assert_spread(rows, FIVE)
    header = (report / "predictions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert [name for name in header if name.startswith("p_")] == [f"p_{name}" for name in FIVE]
    for row in rows:
        assert abs(sum(probabilities(row, FIVE)) - 1) <= 1e-4
    metrics = metrics_of(report)
    assert metrics["positive_classes"] == ["TB"] and metrics["n"] == 5 * 4
    assert metrics["confusion_matrix"] == confusion_recount(rows, FIVE)
    assert_gallery(report, FIVE, positive_sets=0)
    assert len(confusion_cells(gallery(report))) == 25


# ---- 8. calibrate on three classes ----------------------------------------------------------------

CALIBRATE_PER_CLASS = 230     # 69 held out of each (207 >= 200 in all), 161 fitting each (>= 30)


@pytest.mark.slow
def test_calibrate_fits_three_class_statistics_that_scan_then_uses(tree, model3, tmp_path):
    labelled = tmp_path / "labelled"
    write_tree(labelled, THREE, CALIBRATE_PER_CLASS, seed=1, unlabelled=False)
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(labelled), "--model", str(model3), "--out", str(out), "--batch-size", "64"]) == 0
    calibrated = load_checkpoint(out)
    assert calibrated.spec.class_names == THREE and calibrated.temperature > 0
    assert calibrated.ood is not None and calibrated.ood.means.shape == (3, 512)
    assert calibrated.ood.images == 3 * (CALIBRATE_PER_CLASS - 69)
    assert all(torch.equal(v, calibrated.model.state_dict()[k])
               for k, v in load_checkpoint(model3).model.state_dict().items())
    report = scanned(tree, tmp_path / "report", out, "--positive", "BACTERIA,VIRUS")
    rows = read_rows(report)
    assert all(row["ood_flag"] in ("true", "false") for row in rows)
    metrics = metrics_of(report)
    assert metrics["ood"]["n"] == len(rows)
    assert metrics["ood"]["flagged"] == sum(row["ood_flag"] == "true" for row in rows)
    assert metrics["positive_classes"] == ["BACTERIA", "VIRUS"]
    assert_binary_metrics(metrics, positive_set_recount(rows, PNEUMONIA))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_calibrate_names_the_one_class_with_too_few_images(model3, tmp_path, capsys):
    """340 NORMAL and BACTERIA images but 20 VIRUS: enough held out (102 + 102 + 6), too few VIRUS to fit."""
    root = tmp_path / "labelled"
    image = png_bytes(noise_image(np.random.default_rng(0), 128))
    for name, count in (("NORMAL", 340), ("BACTERIA", 340), ("VIRUS", 20)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i:03d}.png").write_bytes(image)
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(root), "--model", str(model3), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too few images to calibrate on" in err, err
    assert "(got VIRUS 14)" in err and "need at least 200 held-out" not in err
    assert "about 667 labelled images" in err
    assert not out.exists()


# ---- predict and serve --------------------------------------------------------------------------

def test_predict_json_gives_every_class_its_probability(tree, model3, capsys):
    files = [tree / name / "000.png" for name in THREE]
    assert main(["predict", *map(str, files), "--model", str(model3), "--json"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 3
    for result in results:
        assert list(result["probabilities"]) == list(THREE)
        assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert result["prediction"] == max(result["probabilities"], key=result["probabilities"].get)


def test_the_serve_api_gives_every_class_its_probability(tree, model3):
    from fastapi.testclient import TestClient

    from batchcam.commands.serve import create_app
    from batchcam.serving.explain import Explainer

    app = create_app(Explainer(load_checkpoint(model3), torch.device("cpu")), 50 * 1024 * 1024)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/api/predict", files=[("files", (name, (tree / name / "001.png").read_bytes(),
                                                              "application/octet-stream")) for name in THREE])
        described = client.get("/openapi.json").json()["info"]["description"]
    assert "NORMAL/BACTERIA/VIRUS" in described
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [list(result["probabilities"]) for result in results] == [list(THREE)] * 3
    assert all(sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5) for result in results)
