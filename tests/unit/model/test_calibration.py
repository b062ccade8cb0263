"""The OOD statistics, the temperature, ECE, and how the checkpoint carries them."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from batchcam.checks.metrics import expected_calibration_error, reliability_bins
from batchcam.model.calibration import (
    MIN_FIT_PER_CLASS,
    MIN_HELD_OUT,
    OodStatistics,
    fit_calibration,
    fit_ood,
    fit_temperature,
    ledoit_wolf,
    temperature_at_edge,
    temperature_warning,
    too_few_images,
)
from batchcam.model.checkpoint import load_checkpoint, save_calibrated
from batchcam.records import Row, columns, read_csv, write_csv
from tests.conftest import tiny_checkpoint


def gaussian_features(n: int, dims: int = 64, shift: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.zeros(2, dims)
    centres[1, :4] = 3.0
    features = centres[labels] + torch.randn(n, dims, generator=generator) + shift
    return features, labels


def test_ledoit_wolf_keeps_a_covariance_from_fewer_images_than_features_invertible():
    centred = torch.randn(40, 128, dtype=torch.float64)
    covariance, shrinkage = ledoit_wolf(centred - centred.mean(0))
    assert 0 < shrinkage <= 1
    assert torch.linalg.eigvalsh(covariance).min() > 0
    assert torch.isfinite(torch.linalg.inv(covariance)).all()


def test_threshold_flags_about_the_held_out_tail_and_shifted_features():
    train, train_labels = gaussian_features(400)
    held, _ = gaussian_features(400, seed=1)
    stats = fit_ood(train, train_labels, held, num_classes=2)
    fresh, _ = gaussian_features(1000, seed=2)
    assert (stats.distances(fresh) > stats.threshold).float().mean() <= 0.02
    far, _ = gaussian_features(50, shift=2.0, seed=3)
    assert (stats.distances(far) > stats.threshold).all()
    assert set(stats.percentiles) == {"95.0", "99.5"} and stats.threshold == stats.percentiles["99.5"]


def test_distance_is_to_the_nearest_class_mean():
    stats = OodStatistics(means=torch.tensor([[0.0, 0.0], [10.0, 0.0]]), precision=torch.eye(2), threshold=1.0,
                          percentiles={}, shrinkage=0.0, images=2)
    assert torch.allclose(stats.distances(torch.tensor([[9.0, 0.0], [0.0, 3.0]])), torch.tensor([1.0, 3.0]))


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 2, generator=generator) * 6       # an overconfident model
    labels = torch.multinomial(torch.softmax(logits / 3.0, 1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(3.0, rel=0.1)


def test_temperature_lowers_the_held_out_nll_and_never_changes_the_winner():
    train, train_labels = gaussian_features(200)
    held, held_labels = gaussian_features(200, seed=1)
    logits = torch.randn(200, 2) * 8
    calibration = fit_calibration(train, train_labels, held, logits, held_labels, 2)
    assert calibration.nll_after <= calibration.nll_before
    assert torch.equal((logits / calibration.temperature).argmax(1), logits.argmax(1))


def test_ece_is_the_weighted_gap_between_accuracy_and_confidence():
    assert expected_calibration_error([True] * 10, [1.0] * 10) == pytest.approx(0.0)
    # half right at confidence 0.9: gap 0.4 for all of them
    assert expected_calibration_error([True, False] * 5, [0.9] * 10) == pytest.approx(0.4)
    # two bins, 0.55 (all right: gap 0.45) and 0.95 (all right: gap 0.05), equal counts
    assert expected_calibration_error([True] * 4, [0.55, 0.55, 0.95, 0.95]) == pytest.approx(0.25)
    assert expected_calibration_error([], []) is None
    bins = reliability_bins([True, False], [0.0, 1.0])
    assert [(b["n"], b["accuracy"]) for b in bins] == [(1, 1.0), (1, 0.0)]


def test_ood_columns_follow_the_check_columns_and_survive_the_csv():
    names = columns(("NORMAL", "PNEUMONIA"))
    end = names.index("faith_drop_random")      # the last of the explanation checks
    assert tuple(names[end + 1:end + 3]) == ("ood_score", "ood_flag")
    rows = [Row(path="a.png", status="ok", prediction="NORMAL", confidence=0.9, probabilities=[0.9, 0.1],
                ood_score=12.5, ood_flag=True),
            Row(path="b.png", status="ok", prediction="NORMAL", confidence=0.9, probabilities=[0.9, 0.1]),
            Row(path="c.png", status="error", error="bad")]
    stream = io.StringIO()
    write_csv(stream, rows, ("NORMAL", "PNEUMONIA"))
    values = list(csv.DictReader(io.StringIO(stream.getvalue())))
    assert [(v["ood_score"], v["ood_flag"]) for v in values] == [("12.500000", "true"), ("", ""), ("", "")]
    back = read_csv(io.StringIO(stream.getvalue()), ("NORMAL", "PNEUMONIA"))
    assert [(r.ood_score, r.ood_flag) for r in back] == [(12.5, True), (None, None), (None, None)]


def test_a_checkpoint_without_statistics_loads_at_temperature_one(tmp_path):
    loaded = load_checkpoint(tiny_checkpoint(tmp_path / "m.pt"))
    assert loaded.temperature == 1.0 and loaded.ood is None
    assert loaded.calibration_summary()["ood"]["statistics"] is False


@pytest.mark.parametrize("plain", [False, True])
def test_save_calibrated_adds_statistics_and_keeps_the_weights(tmp_path, plain):
    source = tiny_checkpoint(tmp_path / "m.pt")
    if plain:
        state = load_checkpoint(source).model.state_dict()
        source = tmp_path / "plain.pt"
        torch.save(state, source)
    train, labels = gaussian_features(100, dims=512)
    stats = fit_ood(train, labels, gaussian_features(20, dims=512, seed=1)[0], 2)
    save_calibrated(source, tmp_path / "out.pt", 1.7, stats)
    before, after = load_checkpoint(source), load_checkpoint(tmp_path / "out.pt")
    assert after.temperature == pytest.approx(1.7) and after.ood is not None
    assert after.ood.threshold == pytest.approx(stats.threshold)
    assert torch.equal(after.ood.precision, stats.precision)
    for name, tensor in before.model.state_dict().items():
        assert torch.equal(tensor, after.model.state_dict()[name]), name
    raw = torch.load(tmp_path / "out.pt", weights_only=True)
    assert isinstance(raw["ood"]["means"], torch.Tensor) and raw["temperature"] == pytest.approx(1.7)


def test_distances_cost_nothing_to_batch_shape(tmp_path):
    stats = fit_ood(*gaussian_features(100, dims=512), gaussian_features(20, dims=512, seed=1)[0], 2)
    out = stats.distances(torch.randn(7, 512))
    assert out.shape == (7,) and out.dtype == torch.float32 and np.isfinite(out.numpy()).all()


def test_the_minimums_follow_from_the_statistics_they_protect():
    assert MIN_HELD_OUT == 200          # 0.5% of 200 is one held-out distance beyond the 99.5th percentile
    assert too_few_images([MIN_FIT_PER_CLASS] * 2, MIN_HELD_OUT, ("NORMAL", "PNEUMONIA")) is None
    assert too_few_images([14, 14], 12, ("NORMAL", "PNEUMONIA")) == (
        "the 99.5th-percentile threshold and the temperature need at least 200 held-out images (got 12); the class "
        "means and the covariance need at least 30 fitting images in each class (got NORMAL 14, PNEUMONIA 14)")
    assert "got PNEUMONIA 29" in too_few_images([500, 29], 300, ("NORMAL", "PNEUMONIA"))


def test_a_held_out_set_the_model_never_gets_wrong_gives_no_temperature_and_an_odd_one_is_warned_about():
    labels = torch.arange(300) % 2
    logits = torch.stack([1.0 - 2.0 * labels, 2.0 * labels - 1.0], dim=1).float()   # every one right, margin 2
    temperature = fit_temperature(logits, labels)
    assert temperature < 0.06 and temperature_at_edge(temperature)
    assert temperature_at_edge(fit_temperature(-logits, labels))                   # every one wrong
    assert not temperature_at_edge(0.3) and "outside 0.5..5" in temperature_warning(0.3)
    assert "sharpens every confidence towards 1" in temperature_warning(0.3)
    assert temperature_warning(1.3) is None and "flattens" in temperature_warning(7.0)
