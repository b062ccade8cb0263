"""What an install ships: setup.cfg lists packages by name (templates/ is mapped into the package from
the top level, which ``find:`` cannot express), so a new subpackage left out of the list would import
in a checkout and be missing from every install."""
from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def listed_packages() -> set[str]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg", encoding="utf-8")
    return {line.strip() for line in setup["options"]["packages"].splitlines() if line.strip()}


def test_every_subpackage_of_batchcam_is_listed_in_setup_cfg():
    found = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "batchcam").rglob("__init__.py")}
    assert found - listed_packages() == set(), "add these to setup.cfg's [options] packages"


def test_every_listed_package_exists():
    listed = listed_packages() - {"batchcam.templates"}    # templates/ at the top level, mapped by package_dir
    missing = {name for name in listed if not (REPO / Path(*name.split(".")) / "__init__.py").is_file()}
    assert missing == set()
    assert (REPO / "templates" / "index.html").is_file()
