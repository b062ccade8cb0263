"""Where the files that ship with batchcam live: Jinja2 templates and the demo checkpoint.

In an installed package the top-level ``templates/`` folder is mapped to ``batchcam/templates``
(see setup.cfg); in a source checkout it sits beside the package. Both are looked up here so the
rest of the code never cares which it is.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = PACKAGE_DIR / "data" / "demo_model.pt"
DEMO_NOTICE = ("batchcam: using the bundled demo model (trained on synthetic X-ray-like images; "
               "not for clinical use). Pass --model to use your own checkpoint.")


def templates_dir() -> Path:
    for candidate in (PACKAGE_DIR / "templates", PACKAGE_DIR.parent / "templates"):
        if (candidate / "index.html").is_file():
            return candidate
    raise FileNotFoundError("batchcam's templates are missing: the installation is incomplete")
