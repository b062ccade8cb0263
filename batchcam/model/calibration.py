"""How far to trust a prediction: the out-of-distribution statistics and the temperature.

Out of distribution: the Mahalanobis distance of an image's penultimate features (ResNet18's
512-d pooled ``layer4`` vector) to the nearest class mean under one shared covariance (Lee et al.,
"A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks",
NeurIPS 2018). The means and the covariance are fitted on the training images; with 512 features
and a few hundred images the sample covariance is singular, so it is shrunk towards a scaled
identity by the Ledoit-Wolf estimate. Training images sit closer to their own fit than new images
of the same distribution do, so the distances that set the threshold are taken on held-out images
(the validation split): an image is flagged beyond their 99.5th percentile.

Confidence: temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML
2017): one scalar T divides the logits, fitted by minimising the negative log-likelihood on the
validation split. It never changes which class wins, only how sure the model says it is.

Both are stored in the checkpoint as plain tensors and floats (``weights_only`` loading).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

FLAG_PERCENTILE = 99.5      # of the held-out distances: beyond it an image is "unlike the training images"
REPORTED_PERCENTILES = (95.0, 99.5)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# How many images the statistics need (``enough_images``). The 99.5th percentile of n held-out
# distances lies beyond all of them but n * 0.5%: below 100 / 0.5 = 200 that is less than one, so the
# "percentile" is the sample maximum or an interpolation towards it. The temperature is fitted on the
# same held-out images, and 200 of them also carry its fit.
MIN_HELD_OUT = math.ceil(100 / (100 - FLAG_PERCENTILE))
# A class mean from n fitting images adds 1/n of the expected squared distance (D/n on D features)
# to every distance to it; 30 keeps that near 3%, and gives the shared covariance at least 30 - 1
# degrees of freedom per class for the Ledoit-Wolf shrinkage to estimate its spread from.
MIN_FIT_PER_CLASS = 30
# A fitted temperature outside this range is warned about: T < 1 sharpens every confidence towards 1,
# T > 1 flattens them; Guo et al. report fitted temperatures of about 1 to 3 for modern networks. One
# at an end of the range searched is no estimate at all and is refused (``temperature_at_edge``).
SANE_TEMPERATURE = (0.5, 5.0)


@dataclass(frozen=True)
class OodStatistics:
    """Per-class feature means, the inverse of the shared shrunk covariance, and the threshold."""

    means: torch.Tensor        # (classes, features) float32
    precision: torch.Tensor    # (features, features) float32, symmetric positive definite
    threshold: float           # distance beyond which an image is flagged
    percentiles: dict[str, float]   # held-out distance percentiles ("95.0" -> distance), for the record
    shrinkage: float
    images: int                # training images behind the means and covariance

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, features) -> (B,) Mahalanobis distance to the nearest class mean (float32, on the CPU)."""
        centred = features.float().cpu()[:, None, :] - self.means[None]          # (B, C, D)
        squared = ((centred @ self.precision) * centred).sum(-1)
        return squared.min(dim=1).values.clamp_(min=0).sqrt_()

    def to_checkpoint(self) -> dict:
        return {"means": self.means.clone(), "precision": self.precision.clone(), "threshold": float(self.threshold),
                "percentiles": {k: float(v) for k, v in self.percentiles.items()},
                "shrinkage": float(self.shrinkage), "images": int(self.images), "flag_percentile": FLAG_PERCENTILE}

    @classmethod
    def from_checkpoint(cls, raw: dict) -> "OodStatistics":
        """Raises KeyError, TypeError or ValueError on anything malformed (the caller names the file)."""
        means, precision = raw["means"], raw["precision"]
        if not (isinstance(means, torch.Tensor) and isinstance(precision, torch.Tensor) and means.ndim == 2
                and precision.shape == (means.shape[1], means.shape[1])):
            raise ValueError("ood statistics: means (C, D) and precision (D, D) tensors expected")
        return cls(means=means.float(), precision=precision.float(), threshold=float(raw["threshold"]),
                   percentiles={str(k): float(v) for k, v in raw.get("percentiles", {}).items()},
                   shrinkage=float(raw.get("shrinkage", 0.0)), images=int(raw.get("images", 0)))

    def summary(self) -> dict:
        """What manifest.json records about the statistics (no tensors)."""
        return {"statistics": True, "score": "Mahalanobis distance to the nearest class mean",
                "threshold": round(self.threshold, 6), "flag_percentile": FLAG_PERCENTILE,
                "held_out_percentiles": {k: round(v, 6) for k, v in self.percentiles.items()},
                "shrinkage": round(self.shrinkage, 6), "training_images": self.images}


def fit_ood(train_features: torch.Tensor, train_labels: torch.Tensor, held_out_features: torch.Tensor,
            num_classes: int) -> OodStatistics:
    """Means and shrunk covariance from the training features; the threshold from held-out ones."""
    x = train_features.double().cpu()
    labels = train_labels.long().cpu()
    missing = [c for c in range(num_classes) if not bool((labels == c).any())]
    if missing:
        raise ValueError(f"no training image of class index {missing} to fit the class means on")
    if len(held_out_features) < 2:
        raise ValueError("at least two held-out images are needed to set the threshold")
    means = torch.stack([x[labels == c].mean(0) for c in range(num_classes)])
    covariance, shrinkage = ledoit_wolf(x - means[labels])
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2
    provisional = OodStatistics(means=means.float(), precision=precision.float(), threshold=float("inf"),
                                percentiles={}, shrinkage=shrinkage, images=len(x))
    held_out = provisional.distances(held_out_features).double().numpy()
    percentiles = {str(p): float(np.percentile(held_out, p)) for p in REPORTED_PERCENTILES}
    return OodStatistics(means=means.float(), precision=precision.float(),
                         threshold=percentiles[str(FLAG_PERCENTILE)], percentiles=percentiles,
                         shrinkage=shrinkage, images=len(x))


def ledoit_wolf(centred: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The Ledoit-Wolf (2004) shrunk covariance of already-centred rows, and its shrinkage in [0, 1].

    The target is ``mu * I`` with ``mu`` the mean variance; the shrinkage minimises the expected
    Frobenius error, which is what keeps a 512 x 512 estimate from a few hundred images invertible.
    """
    n, dims = centred.shape
    sample = centred.T @ centred / n
    mu = float(torch.trace(sample)) / dims
    identity = torch.eye(dims, dtype=sample.dtype)
    delta = float(((sample - mu * identity) ** 2).sum()) / dims
    spread = float((centred.pow(2).sum(1) ** 2).sum() - n * (sample ** 2).sum()) / (n * n * dims)
    shrinkage = 1.0 if delta == 0 else min(max(spread / delta, 0.0), 1.0)
    return shrinkage * mu * identity + (1 - shrinkage) * sample, shrinkage


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on held-out labelled logits.

    The NLL is convex in 1/T, so a fine search over log T followed by a golden-section refinement
    finds the optimum without tuning an optimiser's step; T is kept in [0.05, 20].
    """
    logits, labels = logits.double().cpu(), labels.long().cpu()
    if len(labels) == 0:
        raise ValueError("no labelled logits to fit the temperature on")

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / np.exp(log_t), labels))

    grid = np.linspace(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE), 121)
    best = int(np.argmin([nll(t) for t in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def too_few_images(fit_per_class: Sequence[int], held_out: int, class_names: Sequence[str]) -> str | None:
    """Why these counts are too few for the statistics ``fit_calibration`` fits (one line), or None."""
    reasons = []
    if held_out < MIN_HELD_OUT:
        reasons.append(f"the {FLAG_PERCENTILE:g}th-percentile threshold and the temperature need at least "
                       f"{MIN_HELD_OUT} held-out images (got {held_out})")
    short = [f"{name} {count}" for name, count in zip(class_names, fit_per_class) if count < MIN_FIT_PER_CLASS]
    if short:
        reasons.append(f"the class means and the covariance need at least {MIN_FIT_PER_CLASS} fitting images in "
                       f"each class (got {', '.join(short)})")
    return "; ".join(reasons) or None


def temperature_at_edge(temperature: float) -> bool:
    """The fit ran to an end of the range searched: the held-out logits hold no estimate of T (a model
    that gets every held-out image right by a margin drives T towards 0, one that gets them wrong to infinity)."""
    return temperature < MIN_TEMPERATURE * 1.1 or temperature > MAX_TEMPERATURE / 1.1   # within the last steps


def temperature_warning(temperature: float) -> str | None:
    """What a fitted temperature outside ``SANE_TEMPERATURE`` does to the reported confidences, or None."""
    low, high = SANE_TEMPERATURE
    if low <= temperature <= high:
        return None
    effect = "sharpens every confidence towards 1" if temperature < low else "flattens every confidence"
    return (f"the fitted temperature {temperature:.4f} is outside {low:g}..{high:g}: it {effect}; check the "
            "held-out images before using this model")


def scaled_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=1)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and OOD statistics, with the numbers that say how well they fit."""

    temperature: float
    ood: OodStatistics
    nll_before: float          # held-out negative log-likelihood at T = 1
    nll_after: float           # and at the fitted T


def fit_calibration(fit_features: torch.Tensor, fit_labels: torch.Tensor, held_out_features: torch.Tensor,
                    held_out_logits: torch.Tensor, held_out_labels: torch.Tensor, num_classes: int) -> Calibration:
    """Statistics from the fitting images; temperature and threshold from the held-out ones."""
    temperature = fit_temperature(held_out_logits, held_out_labels)
    ood = fit_ood(fit_features, fit_labels, held_out_features, num_classes)
    logits, labels = held_out_logits.double().cpu(), held_out_labels.long().cpu()
    nll = torch.nn.functional.cross_entropy
    return Calibration(temperature=temperature, ood=ood, nll_before=float(nll(logits, labels)),
                       nll_after=float(nll(logits / temperature, labels)))
