"""batchcam: batch predictions and Grad-CAM explanations over folders of chest X-rays."""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: in a scan the model's threads share the cores with
# decoding workers and overlay threads, which spinning would starve.
# Set before torch is first imported; a caller that imported torch earlier keeps its own policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

__version__ = "0.1.0"


def read_report(report: str | Path):
    """A scan's ``predictions.csv`` as a typed pandas DataFrame, the manifest in ``.attrs["manifest"]``.

    See ``batchcam.report.reader``; pandas (and nothing else heavy) is imported only when called.
    """
    from batchcam.report.reader import read_report as read

    return read(report)
