"""``batchcam sanity ROOT``: the model-randomisation check of the heatmaps (checks/sanity.py)."""
from __future__ import annotations

from pathlib import Path

from batchcam.checks.sanity import sanity_check, write_sanity
from batchcam.config import SanityConfig, shown
from batchcam.errors import ReportWriteError
from batchcam.model.checkpoint import load_model
from batchcam.runtime.console import Console


def sanity(config: SanityConfig, console: Console) -> tuple[str, Path]:
    """Run the check and write its files into ``config.out``; returns a one-line summary and sanity.md's path.

    UsageError for a bad model or an ``out`` that is not a folder; ReportWriteError (exit 74) when
    the files cannot be written.
    """
    config.validate()
    out = config.out
    loaded = load_model(config.model, console.warn)
    result = sanity_check(loaded, config.root, config.sample, config.device)
    try:
        write_sanity(result, out, loaded.path.name)
    except OSError as e:
        raise ReportWriteError(f"cannot write the sanity check into {shown(out)}: {e.strerror or e}") from None
    steps = ", ".join(f"{'+'.join(names)} {result.mean(step):.2f}"
                      for names, step in zip(result.cascade, result.steps[1:]))
    return (f"sanity check on {len(result.paths)} images, mean rank correlation after randomising {steps}",
            out / "sanity.md")
