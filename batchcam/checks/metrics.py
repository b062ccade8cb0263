"""Classification metrics shared by training (validation/test) and scan (metrics.json)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from batchcam.config import default_positive_index


def classification_metrics(labels: ArrayLike, predictions: ArrayLike, probabilities: ArrayLike,
                           class_names: Sequence[str], positive: Sequence[int] | None = None) -> dict:
    """Accuracy and the confusion matrix over every class, the binary metrics of the positive classes
    against the rest, and each class's one-vs-rest precision, recall and ROC AUC with their macro averages.

    ``probabilities`` is (n, classes). ``positive`` (class indices; default ``config.default_positive_index``)
    is one set: a NORMAL / BACTERIA / VIRUS model with BACTERIA and VIRUS positive is scored as
    pneumonia vs normal, an image counting as predicted positive when its predicted class is any of
    them and scored by the sum of their probabilities. The confusion matrix has true classes as rows and
    predicted classes as columns, in checkpoint order. A metric that is undefined on the data (no
    positives, say) is ``None`` rather than a made-up number.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(labels), len(class_names))
    positive_set = sorted(set(positive)) if positive is not None else [default_positive_index(class_names)]
    n_classes = len(class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    binary = binary_metrics(np.isin(labels, positive_set), np.isin(predictions, positive_set),
                            probabilities[:, positive_set].sum(axis=1))
    per_class = {name: one_vs_rest(labels == c, predictions == c, probabilities[:, c])
                 for c, name in enumerate(class_names)}
    return {
        "n": int(len(labels)),
        "positive_classes": [class_names[c] for c in positive_set],
        "accuracy": _ratio(int(np.sum(labels == predictions)), len(labels)),
        **binary,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro": macro_averages(per_class.values()),
        # Of the predicted class's probability, as reported (after the checkpoint's temperature).
        "ece": expected_calibration_error(labels == predictions, probabilities[np.arange(len(labels)), predictions]),
        "ece_bins": ECE_BINS,
    }


def binary_metrics(is_positive: np.ndarray, said_positive: np.ndarray, scores: np.ndarray) -> dict:
    """Sensitivity, specificity, precision, F1 and ROC AUC of one yes/no question (``scores``: P(yes))."""
    tp = int(np.sum(is_positive & said_positive))
    tn = int(np.sum(~is_positive & ~said_positive))
    fp = int(np.sum(~is_positive & said_positive))
    fn = int(np.sum(is_positive & ~said_positive))
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp), "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),   # the harmonic mean of the two; 0 when either is 0
            "roc_auc": roc_auc(is_positive, scores) if len(is_positive) else None}


def one_vs_rest(is_class: np.ndarray, said_class: np.ndarray, scores: np.ndarray) -> dict:
    """One class against the others: how many images it has, its precision, recall, F1 and ROC AUC."""
    binary = binary_metrics(is_class, said_class, scores)
    return {"n": int(is_class.sum()), "precision": binary["precision"], "recall": binary["sensitivity"],
            "f1": binary["f1"], "roc_auc": binary["roc_auc"]}


def macro_averages(per_class: Iterable[dict]) -> dict:
    """The unweighted means over the classes that have labelled images (``classes``: how many), so every
    mean is over one set: a class the model never predicts counts precision 0 (it finds none of its
    images), and the AUC is averaged where it is defined (a class alone among the labels has none); None
    where no class has images. A class predicted but never a label is left out, as its recall is undefined;
    its false positives already cost the other classes their recall."""
    present = [metrics for metrics in per_class if metrics["n"]]
    averages: dict = {"classes": len(present)}
    for name in ("precision", "recall", "f1"):
        averages[name] = float(np.mean([metrics[name] or 0.0 for metrics in present])) if present else None
    aucs = [metrics["roc_auc"] for metrics in present if metrics["roc_auc"] is not None]
    averages["roc_auc"] = float(np.mean(aucs)) if aucs else None
    return averages


def roc_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half)."""
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    u = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(is_positive: np.ndarray, scores: np.ndarray) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from the highest threshold down."""
    is_positive = np.asarray(is_positive, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores = np.asarray(scores)[order]
    hits = is_positive[order]
    n_pos, n_neg = max(1, int(hits.sum())), max(1, int((~hits).sum()))
    points = [(0.0, 0.0)]
    tp = fp = 0
    for i, hit in enumerate(hits):
        tp += int(hit)
        fp += int(not hit)
        if i + 1 == len(hits) or sorted_scores[i + 1] != sorted_scores[i]:
            points.append((fp / n_neg, tp / n_pos))
    return points


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


ECE_BINS = 15


def reliability_bins(correct: ArrayLike, confidence: ArrayLike,
                     bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins (lower edge excluded, the first includes 0): for each non-empty
    one, its edges, how many predictions fall in it, their mean confidence and their accuracy."""
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    result = []
    for b in range(bins):
        members = which == b
        if members.any():
            result.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(members.sum()),
                           "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    return result


def expected_calibration_error(correct: ArrayLike, confidence: ArrayLike,
                               bins: int = ECE_BINS) -> float | None:
    """ECE (Naeini et al. 2015; Guo et al. 2017): the count-weighted mean |accuracy - confidence|
    over equal-width confidence bins of the predicted class's probability. None without predictions."""
    total = len(np.asarray(confidence))
    if total == 0:
        return None
    return float(sum(b["n"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in reliability_bins(correct, confidence, bins)))
