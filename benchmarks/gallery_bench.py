"""How long the gallery takes to render for a large run, and to show in a browser.

    python benchmarks/gallery_bench.py [--rows 50000] [--page-size 100] [--browser] [--repeat 5]

Builds synthetic rows (labelled, a few errors, some hostile names, the lung-field share of every
scored image, a few images unlike the training images) in memory and times ``render_gallery``
alone: no model, no images, nothing written. Prints the seconds, the number of files and their
total size.

With ``--browser`` the files are also written to a temporary folder and opened from ``file://`` in
headless Chromium (Debian's /usr/bin/chromium and chromedriver, through Selenium), a fresh load
each time: a page of cards until its script has run (the navigation's DOMContentLoaded end, which
comes after deferred scripts), the whole-run view until its first results show (rows.js loaded,
parsed and filtered, one page of cards built), and a class filter applied across the whole run.
The medians are printed. The thumbnails are not written, so image decoding is not timed.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from batchcam.config import DEFAULT_PAGE_SIZE
from batchcam.records import Row, overlay_path
from batchcam.report.gallery import render_gallery
from batchcam.report.summary import scan_metrics

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
MANIFEST = {"root": "/data/xrays", "finished_at": "2026-11-25T02:03:10+00:00", "batchcam_version": "bench",
            "model": {"name": "model.pt", "demo": False}, "cam": {"method": "gradcam", "target_layer": "layer4"}}
# Until the whole-run view shows its first results, or a filter has re-rendered them (resolves with ms).
RUN_VIEW_SHOWN = """
const done = arguments[arguments.length - 1], control = document.getElementById(arguments[0]);
const grid = document.getElementById('run-cards'), view = document.getElementById('run-view');
const before = grid.firstElementChild, started = performance.now();
control.value = arguments[1];
control.dispatchEvent(new Event('change', {bubbles: true}));
(function wait() {
  if (!view.hidden && grid.firstElementChild && grid.firstElementChild !== before) done(performance.now() - started);
  else setTimeout(wait, 1);
})();"""


def synthetic_rows(count: int, seed: int = 0) -> list[Row]:
    """Rows like a real scan's: mostly ok, 1% errors, labels from the folder, sorted by path."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = CLASS_NAMES[i % 2]
        path = f"{label}/patient{i // 3:06d}/view {i % 3} <#{i}>.png"
        if rng.random() < 0.01:
            rows.append(Row(path=path, status="error", error="cannot decode image: truncated <PNG> & more"))
            continue
        p_pneumonia = min(1.0, max(0.0, rng.gauss(0.75 if label == "PNEUMONIA" else 0.25, 0.2)))
        probabilities = [1 - p_pneumonia, p_pneumonia]
        predicted = int(p_pneumonia >= 0.5)
        ood_score = rng.uniform(5.0, 40.0)
        rows.append(Row(path=path, status="ok", prediction=CLASS_NAMES[predicted],
                        confidence=probabilities[predicted], probabilities=probabilities, label=label,
                        cam_target=CLASS_NAMES[predicted], overlay=overlay_path(path), width=2048, height=1536,
                        sha256=f"{i:064x}", attention_outside=rng.uniform(0.1, 0.7), ood_score=ood_score,
                        ood_flag=ood_score > 38.0))
    return sorted(rows, key=lambda row: row.path)


def write_files(files: dict[str, str], folder: Path) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")


def browser_timings(report: Path, repeat: int) -> dict[str, float]:
    """Median milliseconds of a page's load, the whole-run view's first results and a filter across the run."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(120)
    page = (report / "gallery" / "page-2.html").as_uri()
    found: dict[str, list[float]] = {"page of cards": [], "whole-run view": [], "class filter across the run": []}
    try:
        for _ in range(repeat):
            driver.get(page)
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return document.readyState === 'complete' && !document.getElementById('filters').hidden"))
            found["page of cards"].append(driver.execute_script(
                "return performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd"))
            found["whole-run view"].append(driver.execute_async_script(RUN_VIEW_SHOWN, "f-scope", "run"))
            found["class filter across the run"].append(
                driver.execute_async_script(RUN_VIEW_SHOWN, "f-class", CLASS_NAMES[1]))
    finally:
        driver.quit()
    return {name: statistics.median(values) for name, values in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    parser.add_argument("--browser", action="store_true", help="also time the pages in headless Chromium")
    parser.add_argument("--repeat", type=int, default=5, help="browser loads to take the median of")
    args = parser.parse_args()
    rows = synthetic_rows(args.rows)
    metrics = scan_metrics(rows, CLASS_NAMES)
    render_gallery(rows[:10], CLASS_NAMES, MANIFEST, metrics, args.page_size)   # load the templates first
    started = time.perf_counter()
    files = render_gallery(rows, CLASS_NAMES, MANIFEST, metrics, args.page_size)
    seconds = time.perf_counter() - started
    sizes = {name: len(text.encode("utf-8")) for name, text in files.items()}
    pages = [size for name, size in sizes.items() if name.startswith("gallery/page-")]
    print(f"render_gallery: {args.rows} rows, page size {args.page_size}: {seconds:.2f} s, "
          f"{len(files)} files, {sum(sizes.values()) / 1e6:.1f} MB (a page {statistics.median(pages) / 1e3:.0f} KB, "
          f"index.html {sizes['index.html'] / 1e3:.0f} KB, rows.js {sizes['gallery/rows.js'] / 1e6:.1f} MB)")
    if args.browser:
        with tempfile.TemporaryDirectory() as folder:
            write_files(files, Path(folder))
            for name, milliseconds in browser_timings(Path(folder), args.repeat).items():
                print(f"Chromium, {name}: {milliseconds:.0f} ms (median of {args.repeat})")


if __name__ == "__main__":
    main()
