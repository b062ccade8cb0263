"""batchcam.checks.metrics: the numbers training and scan report, checked against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from batchcam.checks.metrics import classification_metrics, roc_auc, roc_curve
from batchcam.config import default_positive_index

CLASSES = ("NORMAL", "PNEUMONIA")


def _probabilities(pneumonia_scores):
    scores = np.asarray(pneumonia_scores, dtype=np.float64)
    return np.stack([1 - scores, scores], axis=1)


# Seven cases, PNEUMONIA (index 1) is positive:
#   positives: scores 0.9 0.8 0.6 0.4 -> predicted 1 1 1 0  (TP 3, FN 1)
#   negatives: scores 0.1 0.4 0.7     -> predicted 0 0 1    (TN 2, FP 1)
LABELS = [1, 1, 1, 1, 0, 0, 0]
PREDICTIONS = [1, 1, 1, 0, 0, 0, 1]
SCORES = [0.9, 0.8, 0.6, 0.4, 0.1, 0.4, 0.7]
# ROC AUC by counting pairs (positive, negative), ties worth one half:
#   0.9 -> 3, 0.8 -> 3, 0.6 -> 2 (beats 0.1 and 0.4), 0.4 -> 1 + 0.5 (beats 0.1, ties 0.4) = 9.5 of 12
EXPECTED_AUC = 9.5 / 12


def test_classification_metrics_match_a_hand_computed_example():
    m = classification_metrics(LABELS, PREDICTIONS, _probabilities(SCORES), CLASSES)

    assert m["n"] == 7
    assert m["positive_classes"] == ["PNEUMONIA"]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(EXPECTED_AUC)
    assert m["class_names"] == ["NORMAL", "PNEUMONIA"]
    # rows: true class, columns: predicted class
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]


def test_f1_is_the_harmonic_mean_of_precision_and_sensitivity():
    # TP 1, FN 2, FP 1: sensitivity 1/3, precision 1/2, F1 = 2 * (1/2 * 1/3) / (1/2 + 1/3) = 0.4
    labels = [1, 1, 1, 0, 0]
    predictions = [1, 0, 0, 1, 0]
    m = classification_metrics(labels, predictions, _probabilities([0.9, 0.2, 0.3, 0.8, 0.1]), CLASSES)
    assert m["sensitivity"] == pytest.approx(1 / 3)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.4)


def test_roc_auc_counts_ties_as_one_half():
    is_positive = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)
    assert roc_auc(is_positive, np.array(SCORES)) == pytest.approx(EXPECTED_AUC)


def test_roc_auc_of_all_tied_scores_is_one_half():
    assert roc_auc(np.array([True, False, True, False]), np.full(4, 0.3)) == pytest.approx(0.5)


def test_roc_auc_is_one_for_a_perfect_ranking_and_zero_for_a_reversed_one():
    is_positive = np.array([False, False, True, True])
    assert roc_auc(is_positive, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert roc_auc(is_positive, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)


def test_roc_auc_is_none_when_only_one_class_is_present():
    assert roc_auc(np.array([True, True]), np.array([0.2, 0.7])) is None
    assert roc_auc(np.array([False, False]), np.array([0.2, 0.7])) is None


def test_undefined_metrics_are_none_not_made_up_numbers():
    # Only NORMAL cases, all predicted NORMAL: no positives at all.
    m = classification_metrics([0, 0, 0], [0, 0, 0], _probabilities([0.1, 0.2, 0.3]), CLASSES)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["sensitivity"] is None
    assert m["precision"] is None
    assert m["f1"] is None
    assert m["roc_auc"] is None
    assert m["confusion_matrix"] == [[3, 0], [0, 0]]


def test_f1_is_zero_when_nothing_positive_is_found():
    # Positives exist but none is predicted: sensitivity 0, precision undefined, F1 = 2TP / (2TP + FP + FN) = 0.
    m = classification_metrics([1, 0], [0, 0], _probabilities([0.4, 0.1]), CLASSES)
    assert m["sensitivity"] == 0.0
    assert m["precision"] is None
    assert m["f1"] == 0.0
    assert m["roc_auc"] == pytest.approx(1.0)


def test_empty_input_gives_none_rather_than_dividing_by_zero():
    m = classification_metrics([], [], np.zeros((0, 2)), CLASSES)
    assert m["n"] == 0
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        assert m[name] is None, name
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]


def test_positive_class_is_pneumonia_in_any_case_else_the_last_class():
    assert default_positive_index(["NORMAL", "PNEUMONIA"]) == 1
    assert default_positive_index(["pneumonia", "normal"]) == 0
    assert default_positive_index(["cat", "dog", "bird"]) == 2


def test_three_class_metrics_treat_the_positive_class_against_all_others():
    names = ("NORMAL", "PNEUMONIA", "OTHER")
    labels = [0, 1, 2, 1, 2]
    predictions = [0, 1, 1, 2, 2]
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3],
                              [0.1, 0.3, 0.6], [0.1, 0.1, 0.8]])
    m = classification_metrics(labels, predictions, probabilities, names)
    assert m["positive_classes"] == ["PNEUMONIA"]
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    # PNEUMONIA vs rest: TP 1, FN 1, FP 1, TN 2
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # PNEUMONIA scores: positives 0.8, 0.3; negatives 0.1, 0.5, 0.1 -> (3 + 2) / 6
    assert m["roc_auc"] == pytest.approx(5 / 6)


def test_roc_curve_runs_from_origin_to_one_one_and_merges_tied_scores():
    points = roc_curve(np.array([True, False, True, False]), np.array([0.9, 0.5, 0.5, 0.1]))
    assert points == [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]


# NORMAL / BACTERIA / VIRUS, eight images. Rows: label, prediction, probabilities.
NBV = ("NORMAL", "BACTERIA", "VIRUS")
NBV_LABELS = [0, 0, 0, 1, 1, 2, 2, 2]
NBV_PROBABILITIES = np.array([
    [0.70, 0.20, 0.10],   # NORMAL   -> NORMAL
    [0.50, 0.10, 0.40],   # NORMAL   -> NORMAL
    [0.20, 0.30, 0.50],   # NORMAL   -> VIRUS
    [0.10, 0.60, 0.30],   # BACTERIA -> BACTERIA
    [0.45, 0.40, 0.15],   # BACTERIA -> NORMAL
    [0.10, 0.20, 0.70],   # VIRUS    -> VIRUS
    [0.20, 0.50, 0.30],   # VIRUS    -> BACTERIA
    [0.30, 0.30, 0.40],   # VIRUS    -> VIRUS
])
NBV_PREDICTIONS = NBV_PROBABILITIES.argmax(axis=1).tolist()


def pairwise_auc(is_positive, scores) -> float:
    """The AUC by counting every (positive, negative) pair, ties one half: the definition, not a rank formula."""
    positives = [s for s, p in zip(scores, is_positive) if p]
    negatives = [s for s, p in zip(scores, is_positive) if not p]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_several_positive_classes_score_pneumonia_of_any_kind_against_normal():
    m = classification_metrics(NBV_LABELS, NBV_PREDICTIONS, NBV_PROBABILITIES, NBV, positive=[1, 2])
    assert m["positive_classes"] == ["BACTERIA", "VIRUS"]
    # Pneumonia (BACTERIA or VIRUS) vs NORMAL, whichever kind was predicted:
    #   truly pneumonia: 5 images, predicted pneumonia: 4 (the BACTERIA one predicted NORMAL is missed)
    #   truly normal: 3 images, one predicted VIRUS
    assert m["sensitivity"] == pytest.approx(4 / 5)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(0.8)
    pneumonia = NBV_PROBABILITIES[:, 1] + NBV_PROBABILITIES[:, 2]
    assert m["roc_auc"] == pytest.approx(pairwise_auc([label > 0 for label in NBV_LABELS], pneumonia))
    assert m["confusion_matrix"] == [[2, 0, 1], [1, 1, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_a_virus_predicted_as_bacteria_is_still_a_found_pneumonia():
    """Confusing the two positive classes costs accuracy, not sensitivity."""
    m = classification_metrics([1, 2], [2, 1], np.array([[0.1, 0.3, 0.6], [0.1, 0.6, 0.3]]), NBV, positive=[1, 2])
    assert m["accuracy"] == 0.0
    assert m["sensitivity"] == 1.0


def test_each_class_against_the_rest_and_their_macro_averages():
    m = classification_metrics(NBV_LABELS, NBV_PREDICTIONS, NBV_PROBABILITIES, NBV)
    assert list(m["per_class"]) == list(NBV)
    expected = {"NORMAL": (3, 2 / 3, 2 / 3), "BACTERIA": (2, 1 / 2, 1 / 2), "VIRUS": (3, 2 / 3, 2 / 3)}
    for c, name in enumerate(NBV):
        found = m["per_class"][name]
        n, precision, recall = expected[name]
        assert (found["n"], found["precision"], found["recall"]) == (n, pytest.approx(precision),
                                                                     pytest.approx(recall)), name
        assert found["roc_auc"] == pytest.approx(
            pairwise_auc([label == c for label in NBV_LABELS], NBV_PROBABILITIES[:, c])), name
    macro = m["macro"]
    assert macro["classes"] == 3
    assert macro["precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert macro["roc_auc"] == pytest.approx(np.mean([m["per_class"][name]["roc_auc"] for name in NBV]))
    assert m["positive_classes"] == ["VIRUS"]   # no PNEUMONIA: the last class


def test_macro_averages_leave_out_a_class_without_images_rather_than_counting_it_as_zero():
    labels, predictions = [0, 1, 0, 1], [0, 1, 1, 1]
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(labels, predictions, probabilities, NBV)
    assert m["per_class"]["VIRUS"] == {"n": 0, "precision": None, "recall": None, "f1": None, "roc_auc": None}
    assert m["macro"]["classes"] == 2
    assert m["macro"]["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["sensitivity"] is None and m["roc_auc"] is None   # VIRUS, the default positive, has no image


def test_a_class_the_model_always_gets_wrong_pulls_the_macro_f1_down_rather_than_dropping_out():
    """BACTERIA and VIRUS swapped: their precision and recall are 0, so is their F1, and the macro F1 is 1/3."""
    labels, predictions = [0, 0, 1, 1, 2, 2], [0, 0, 2, 2, 1, 1]
    m = classification_metrics(labels, predictions, np.eye(3)[predictions] * 0.8 + 0.2 / 3, NBV)
    assert [m["per_class"][name]["f1"] for name in NBV] == [1.0, 0.0, 0.0]
    assert m["macro"]["f1"] == pytest.approx(1 / 3)


def test_macro_means_are_over_the_classes_with_images_a_class_never_predicted_counting_precision_zero():
    # NORMAL 2 images, BACTERIA 2 (never predicted), VIRUS none (predicted once).
    labels, predictions = [0, 0, 1, 1], [0, 0, 0, 2]
    m = classification_metrics(labels, predictions, np.eye(3)[predictions] * 0.8 + 0.2 / 3, NBV)
    assert m["per_class"]["BACTERIA"]["precision"] is None                 # undefined on its own...
    assert m["macro"]["classes"] == 2
    assert m["macro"]["precision"] == pytest.approx((2 / 3 + 0) / 2)      # ...0 in the mean over NORMAL, BACTERIA
    assert m["macro"]["recall"] == pytest.approx((1 + 0) / 2)
