"""The package's shape: every module imports only its own layer or the layers before it, there are
no import circles, and the command line starts without heavy libraries (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "batchcam"
# ARCHITECTURE.md's table, in order: a module may import its own layer and the ones before it.
LAYERS = [
    {"batchcam", "batchcam.errors", "batchcam.options", "batchcam.schema", "batchcam.records", "batchcam.config",
     "batchcam.resources",
     "batchcam.synthetic", "batchcam.data"},
    {"batchcam.runtime"},
    {"batchcam.decode"},
    {"batchcam.model"},
    {"batchcam.cam"},
    {"batchcam.checks"},
    {"batchcam.report"},
    {"batchcam.engines"},
    {"batchcam.serving"},
    {"batchcam.commands"},
    {"batchcam.cli", "batchcam.__main__"},
]
HEAVY = ("torch", "torchvision", "jinja2", "fastapi", "ray", "pandas", "pydicom", "pytorch_grad_cam")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or (m != "batchcam" and module.startswith(m + ".")) for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md")


def imports(path: Path) -> set[str]:
    """Every batchcam module ``path`` imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("batchcam"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("batchcam"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts}


# The package's own __init__ is its public face: batchcam.read_report reaches report/ when called.
FACADE = "batchcam"


@pytest.mark.parametrize("module", sorted(set(MODULES) - {FACADE}))
def test_a_module_imports_only_its_own_layer_or_those_before_it(module):
    mine = layer_of(module)
    above = sorted(m for m in imports(MODULES[module]) - {module} if m != "batchcam" and layer_of(m) > mine)
    assert not above, f"{module} (layer {mine}) imports {above} from a later layer"


def test_there_are_no_import_circles():
    graph = {m: {i for i in imports(p) if i in MODULES and i != m and i != "batchcam"} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        if state.get(module) == 2:
            return
        assert state.get(module) != 1, f"import circle: {' -> '.join(path + (module,))}"
        state[module] = 1
        for dependency in graph[module]:
            visit(dependency, path + (module,))
        state[module] = 2

    for module in graph:
        visit(module, ())


@pytest.mark.parametrize("argv", [["--help"], ["scan", "--help"], ["predict", "--help"], ["serve", "--help"]])
def test_the_command_line_starts_without_heavy_libraries(argv):
    probe = ("import sys, runpy\nsys.argv = ['batchcam', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('batchcam', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60,
                         cwd=PACKAGE.parent)
    assert "LOADED []" in run.stdout, run.stdout[-500:] + run.stderr[-500:]
