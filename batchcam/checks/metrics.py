"""Classification metrics shared by training (validation/test) and scan (metrics.json)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def positive_class_index(class_names: Sequence[str]) -> int:
    """The class whose recall is 'sensitivity': PNEUMONIA when present, else the last class."""
    upper = [name.upper() for name in class_names]
    return upper.index("PNEUMONIA") if "PNEUMONIA" in upper else len(class_names) - 1


def classification_metrics(labels: ArrayLike, predictions: ArrayLike,
                           probabilities: ArrayLike, class_names: Sequence[str]) -> dict:
    """Accuracy, sensitivity, specificity, precision, F1, ROC AUC and the confusion matrix.

    ``probabilities`` is (n, classes). Sensitivity, specificity, precision and F1 treat the positive
    class (see :func:`positive_class_index`) against all others; the confusion matrix has true
    classes as rows and predicted classes as columns, in checkpoint order. A metric that is
    undefined on the data (no positives, say) is ``None`` rather than a made-up number.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(len(labels), len(class_names))
    positive = positive_class_index(class_names)
    n_classes = len(class_names)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    is_pos, said_pos = labels == positive, predictions == positive
    tp = int(np.sum(is_pos & said_pos))
    tn = int(np.sum(~is_pos & ~said_pos))
    fp = int(np.sum(~is_pos & said_pos))
    fn = int(np.sum(is_pos & ~said_pos))
    sensitivity = _ratio(tp, tp + fn)
    precision = _ratio(tp, tp + fp)
    f1 = (None if sensitivity is None or precision is None or sensitivity + precision == 0
          else 2 * precision * sensitivity / (precision + sensitivity))
    return {
        "n": int(len(labels)),
        "positive_class": class_names[positive],
        "accuracy": _ratio(int(np.sum(labels == predictions)), len(labels)),
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": f1,
        "roc_auc": roc_auc(is_pos, probabilities[:, positive]) if len(labels) else None,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        # Of the predicted class's probability, as reported (after the checkpoint's temperature).
        "ece": expected_calibration_error(labels == predictions, probabilities[np.arange(len(labels)), predictions]),
        "ece_bins": ECE_BINS,
    }


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
