"""``batchcam sanity ROOT``: the model-randomisation check of the heatmaps (checks/sanity.py) on a
sample of the images under ROOT. Writes ``sanity.md`` (a table of layer -> mean correlation),
``sanity.json`` and ``sanity.png`` (the maps of a few images per step) into ``--out``."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from batchcam.cam import overlay as overlays
from batchcam.checks.sanity import SEED, SanityResult, cascading_randomisation
from batchcam.config import DEFAULT_MAX_FILE_BYTES, DEFAULT_SANITY_SAMPLE, SanityConfig, shown
from batchcam.decode.dataset import Sample, collate_samples, decode_sample, read_sample
from batchcam.decode.discover import Candidate, discover
from batchcam.errors import ReportWriteError, UsageError
from batchcam.model.checkpoint import LoadedModel, load_model
from batchcam.runtime.console import Console
from batchcam.runtime.devices import resolve_device
from batchcam.runtime.fsutil import SafeDir

FIGURE_IMAGES = 4      # rows of the figure
FIGURE_CELL = 96       # px per map in the figure


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


def sample_files(root: Path, count: int, seed: int = SEED) -> list[Candidate]:
    candidates = discover(root).candidates
    if not candidates:
        raise UsageError(f"no image files under {root}")
    if len(candidates) <= count:
        return list(candidates)
    chosen = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
    return [candidates[i] for i in sorted(chosen)]


def read_and_decode(candidate: Candidate, image_size: int, resize: str = "squash") -> Sample:
    """A sampled file decoded; one that cannot be read (a broken link, say) is an error sample, left out."""
    return read_sample(Path(candidate.path), candidate.relpath, DEFAULT_MAX_FILE_BYTES,
                       lambda relpath, data: decode_sample(relpath, data, image_size, resize=resize))


def sanity_check(loaded: LoadedModel, root: Path, sample: int = DEFAULT_SANITY_SAMPLE, device: str = "auto",
                 seed: int = SEED) -> SanityResult:
    if not root.is_dir():
        raise UsageError(f"ROOT {root} is not a folder")
    where = resolve_device(device)
    samples = [read_and_decode(c, loaded.spec.image_size, loaded.spec.resize)
               for c in sample_files(root, sample, seed)]
    samples, views = collate_samples([s for s in samples if s.ok])
    if views is None:
        raise UsageError(f"none of the sampled images under {root} could be decoded")
    return cascading_randomisation(loaded, views, where, [s.relpath for s in samples], seed)


def write_sanity(result: SanityResult, out: Path, model_name: str) -> None:
    """``sanity.md``, ``sanity.json`` and ``sanity.png`` in ``out`` (made when missing), each written
    atomically relative to the folder's descriptor: a link planted at one of these names is replaced,
    never written through."""
    lines = ["# Sanity check: cascading model randomisation", "",
             f"Model `{model_name}`, {len(result.paths)} images; layers re-initialised from the top down "
             "(Adebayo et al., NeurIPS 2018). Spearman rank correlation of each image's exact Grad-CAM map "
             "with its original map; maps that depend on the learned weights fall towards 0.", "",
             "| randomised | mean correlation | min | max |", "|---|---|---|---|"]
    for step in result.steps[1:]:
        values = result.correlations[step]
        lines.append(f"| {step} | {np.mean(values):.3f} | {np.min(values):.3f} | {np.max(values):.3f} |")
    lines += ["", "![maps per randomisation step](sanity.png)", ""]
    summary = {"model": model_name, "images": result.paths, "steps": result.steps[1:],
               "mean_correlation": {s: round(result.mean(s), 6) for s in result.steps[1:]},
               "correlations": {s: [round(v, 6) for v in result.correlations[s]] for s in result.steps[1:]}}
    png = io.BytesIO()
    figure(result).save(png, format="PNG")
    with SafeDir.open(out, create=True) as folder:
        folder.write_bytes("sanity.md", "\n".join(lines).encode("utf-8"))
        folder.write_bytes("sanity.json", json.dumps(summary, indent=2).encode("utf-8"))
        folder.write_bytes("sanity.png", png.getvalue())


def figure(result: SanityResult) -> Image.Image:
    """A grid: one row per image (up to FIGURE_IMAGES), one column per step, maps in jet colours."""
    shown = min(FIGURE_IMAGES, len(result.paths))
    header = 28
    image = Image.new("RGB", (FIGURE_CELL * len(result.steps), header + FIGURE_CELL * shown), "white")
    draw = ImageDraw.Draw(image)
    for column, step in enumerate(result.steps):
        label = "+".join(result.cascade[column - 1]) if column else "original"
        draw.text((column * FIGURE_CELL + 4, 2), f"+{label}" if column > 1 else label, fill="black")
        if column:
            draw.text((column * FIGURE_CELL + 4, 14), f"rho {result.mean(step):.2f}", fill="black")
        for row in range(shown):
            levels = overlays.heat_levels(result.maps[step][row], FIGURE_CELL, FIGURE_CELL)
            levels.putpalette(overlays.JET_LUT.tobytes())
            image.paste(levels.convert("RGB"), (column * FIGURE_CELL, header + row * FIGURE_CELL))
    return image
