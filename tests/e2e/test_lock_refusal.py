"""A run refused by the lock says so at once: nothing heavy is imported before the lock is tried,
so it stays quick while the run holding the lock keeps every core busy."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import lock_held_elsewhere, write_xrays

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "jinja2", "pandas", "ray", "fastapi")


def test_a_second_run_on_a_locked_report_exits_75_without_torch_while_every_core_is_busy(tmp_path, tiny_model):
    root, out = tmp_path / "root", tmp_path / "out"
    write_xrays(root, count=2)
    with lock_held_elsewhere(out):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        try:
            probe = ("import sys, runpy\nsys.argv = ['batchcam', *sys.argv[1:]]\n"
                     "try:\n    runpy.run_module('batchcam', run_name='__main__')\n"
                     "except SystemExit as e:\n"
                     f"    print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
                     "    raise")
            started = time.monotonic()
            run = subprocess.run([sys.executable, "-c", probe, "scan", str(root), "--out", str(out), "--model",
                                  str(tiny_model)], cwd=REPO, capture_output=True, text=True, timeout=60)
            seconds = time.monotonic() - started
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    assert run.returncode == 75, run.stderr
    assert "another batchcam run is writing" in run.stderr and "LOADED []" in run.stderr
    # Measured here: about 0.3 s with both cores busy (it took 8 s when torch loaded first). The bound
    # leaves room for a loaded CI machine; what the test pins down is that no heavy import happens.
    assert seconds < 5, f"the refusal took {seconds:.1f} s"
