"""What a report says about its run: manifest.json, metrics.json's contents, labels from folders."""
from __future__ import annotations

import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

import batchcam
from batchcam.checks.attention import REMOVED_FRACTION
from batchcam.checks.metrics import classification_metrics
from batchcam.config import Selection
from batchcam.model.checkpoint import LoadedModel
from batchcam.records import ATTENTION_THRESHOLD, Row

SCHEMA_VERSION = 1


def scan_metrics(rows: Sequence[Row], class_names: Sequence[str],
                 positive: Sequence[int] | None = None) -> dict | None:
    """Classification metrics when labels are known (``positive``: the classes the binary metrics score as
    positive; default ``config.default_positive_index``'s), with the explanation checks' summaries.

    The attention summary rides along with the classification metrics; the faithfulness averages
    (asked for with --faithfulness) are written even when no label is known.
    """
    labelled = [row for row in rows if row.ok and row.label]
    faithfulness = faithfulness_summary(rows)
    if not labelled:
        return {"faithfulness": faithfulness} if faithfulness else None
    index = {name: i for i, name in enumerate(class_names)}
    metrics = classification_metrics([index[r.label] for r in labelled], [index[r.prediction] for r in labelled],
                                     np.array([r.probabilities for r in labelled]), class_names, positive)
    metrics["attention"] = attention_summary(rows)
    ood = ood_summary(rows)
    if ood:
        metrics["ood"] = ood
    if faithfulness:
        metrics["faithfulness"] = faithfulness
    return metrics


def ood_summary(rows: Sequence[Row]) -> dict | None:
    """How many scored images are unlike the training images, or None when the model has no statistics."""
    scored = [row for row in rows if row.ok and row.ood_flag is not None]
    if not scored:
        return None
    flagged = sum(1 for row in scored if row.ood_flag)
    return {"n": len(scored), "flagged": flagged, "share_flagged": round(flagged / len(scored), 6)}


def attention_summary(rows: Sequence[Row]) -> dict:
    scored = [row for row in rows if row.ok]
    shares = [row.attention_outside for row in scored if row.attention_outside is not None]
    return {"region": "off the estimated lung fields; empty where the estimate was refused",
            "threshold": ATTENTION_THRESHOLD,
            "n": len(shares), "flagged": sum(share > ATTENTION_THRESHOLD for share in shares),
            "no_lung_fields": len(scored) - len(shares),
            "mean_outside": round(float(np.mean(shares)), 6) if shares else None}


def faithfulness_summary(rows: Sequence[Row]) -> dict | None:
    """Average probability drops (top 20% of the map removed vs a random region), or None."""
    measured = [row for row in rows if row.ok and row.faith_drop_top is not None]
    if not measured:
        return None
    top = np.array([row.faith_drop_top for row in measured])
    random = np.array([row.faith_drop_random for row in measured])
    return {"n": len(measured), "removed_fraction": REMOVED_FRACTION, "fill": "image mean",
            "mean_drop_top": round(float(top.mean()), 6), "mean_drop_random": round(float(random.mean()), 6),
            "top_beats_random": round(float(np.mean(top > random)), 6)}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "grad-cam", "pillow", "numpy", "jinja2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def selection_info(selection: Selection) -> dict:
    """The --select rule of the run, as the manifest records it."""
    if selection.everything:
        return {"select": "all"}
    return {"select": selection.mode, "modalities": list(selection.modalities),
            "views": list(selection.views) if selection.views is not None else "any"}


def model_summary(loaded: LoadedModel, temperature: float) -> dict:
    """The manifest's model block: the file, what it is, the preprocessing applied and what was assumed."""
    spec = loaded.spec
    return {"path": str(loaded.path), "name": loaded.path.name, "sha256": loaded.sha256, "arch": spec.arch,
            "description": loaded.description(), "source": loaded.source, "target_layer": loaded.target_layer,
            "class_names": list(spec.class_names), "image_size": spec.image_size, "resize": spec.resize,
            "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std), "dropout": spec.dropout,
            "demo": loaded.demo, "temperature": temperature, "assumptions": list(loaded.assumptions)}


def manifest(*, root: Path, argv: Sequence[str], loaded: LoadedModel, cam: dict, device: str, counts: dict,
             started_at: str, finished_at: str, seconds: float, selection: Selection = Selection(),
             rows: Sequence[Row] = ()) -> dict:
    """``rows`` (the run's) add the count of images flagged as unlike the training images."""
    calibration = loaded.calibration_summary()
    if loaded.ood is not None:
        calibration["ood"].update(ood_summary(rows) or {"n": 0, "flagged": 0, "share_flagged": None})
    return {
        "schema_version": SCHEMA_VERSION,
        "batchcam_version": batchcam.__version__,
        "started_at": started_at,
        "finished_at": finished_at,
        "root": str(root.resolve()),
        "args": list(argv),
        "model": model_summary(loaded, calibration["temperature"]),
        "ood": calibration["ood"],
        "cam": cam,
        "selection": selection_info(selection),
        "device": device,
        "versions": library_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine()},
        "counts": counts,
        "timings": {"seconds": round(seconds, 3),
                    "images_per_second": round(counts.get("processed", 0) / seconds, 3) if seconds > 0 else None},
    }
