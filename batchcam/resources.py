"""Where the files that ship with batchcam live: Jinja2 templates and the demo checkpoint.

The templates are always at ``batchcam/templates``: an installed package has the top-level
``templates/`` folder copied there (setup.cfg maps it), and a source checkout has a symbolic link
there pointing to it.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEMO_MODEL = PACKAGE_DIR / "data" / "demo_model.pt"
DEMO_NOTICE = ("batchcam: using the bundled demo model (trained on synthetic X-ray-like images; "
               "not for clinical use). Pass --model to use your own checkpoint.")


TEMPLATES = PACKAGE_DIR / "templates"


def templates_dir() -> Path:
    if not (TEMPLATES / "index.html").is_file():
        raise FileNotFoundError(f"batchcam's templates are missing from {TEMPLATES}: the installation is incomplete")
    return TEMPLATES
