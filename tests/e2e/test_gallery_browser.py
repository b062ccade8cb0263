"""The gallery driven in real headless Chromium, opened from file:// as a reviewer opens it.

Uses Debian's /usr/bin/chromium and /usr/bin/chromedriver through Selenium; nothing downloads a
browser or a driver. Skipped, saying why, where they are absent (CI installs them).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_gallery import HOSTILE_NAME, NBV, error_row, labelled_rows, three_class_rows, write_gallery_report

from batchcam import records
from batchcam.cli import main
from batchcam.records import Row
from batchcam.report.review import Review
from batchcam.schema import Number, Schema, Shown, derived
from conftest import write_xrays

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    webdriver is None or not CHROMIUM.is_file() or not CHROMEDRIVER.is_file(),
    reason="needs selenium (pip install -e '.[test]') and Debian's chromium + chromedriver in /usr/bin "
           "(apt-get install chromium chromium-driver); CI installs both")]

BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000")
PAGE_SIZE = 5


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def labelled_report(tmp_path_factory) -> Path:
    """Rows built in the test (known predictions): 8 rows on pages of 5, one wrong, an error on each page."""
    return write_gallery_report(tmp_path_factory.mktemp("labelled") / "report", labelled_rows(), PAGE_SIZE)


@pytest.fixture(scope="module")
def scanned_report(tmp_path_factory, tiny_model) -> Path:
    """A real scan: synthetic X-rays, a file named like a script, and an undecodable file."""
    root = tmp_path_factory.mktemp("scanned") / "xrays"
    write_xrays(root, count=4)
    hostile = root / HOSTILE_NAME           # the '/' in '</script>' makes a folder '<script>alert(1)<'
    hostile.parent.mkdir(parents=True)
    Image.new("L", (96, 80), 140).save(hostile, format="PNG")
    (root / "NORMAL" / "broken.png").write_bytes(b"not an image")
    out = root.parent / "report"
    assert main(["scan", str(root), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--page-size", "3", "--quiet"]) == 3
    return out


def open_page(driver, page: Path) -> None:
    driver.get(page.as_uri())
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && !document.getElementById('filters').hidden"))


def wait_images(driver, selector: str) -> list[int]:
    """naturalWidth of every image matched, once all have finished loading (or failing)."""
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).every((img) => img.complete)", selector))
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map((img) => img.naturalWidth)", selector)


def visible_cards(driver) -> list[dict]:
    return driver.execute_script("""
        const grid = document.getElementById('run-view').hidden ? 'cards' : 'run-cards';
        return Array.from(document.querySelectorAll('#' + grid + ' .card')).filter((c) => !c.hidden).map((c) => ({
            pred: c.dataset.pred, conf: c.dataset.conf === undefined ? null : Number(c.dataset.conf),
            status: c.dataset.status, path: c.querySelector('.name').textContent, index: Number(c.dataset.index)}));""")


def choose(driver, control_id: str, value: str) -> None:
    Select(driver.find_element(By.ID, control_id)).select_by_value(value)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_every_thumbnail_on_the_first_page_loads(browser, scanned_report):
    open_page(browser, scanned_report / "index.html")
    widths = wait_images(browser, "#cards .card img")
    assert len(widths) == 2 and all(w > 0 for w in widths)      # page 1: the hostile file, the broken one, one X-ray
    assert [c["status"] for c in visible_cards(browser)].count("error") == 1


def test_a_file_named_like_a_script_shows_its_name_as_text_and_its_image_loads(browser, scanned_report):
    open_page(browser, scanned_report / "index.html")
    with pytest.raises(NoAlertPresentException):
        _ = browser.switch_to.alert.text
    names = [card["path"] for card in visible_cards(browser)]
    assert HOSTILE_NAME in names
    card = browser.find_elements(By.CSS_SELECTOR, "#cards .card")[names.index(HOSTILE_NAME)]
    image = card.find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    assert image.get_attribute("alt") == f"Grad-CAM overlay of {HOSTILE_NAME}"
    inline = browser.find_elements(By.XPATH, "//body//script[not(@src)]")     # the page's rows alone, never run
    assert [(s.get_attribute("id"), s.get_attribute("type")) for s in inline] == [("page-rows", "application/json")]
    card.find_element(By.CSS_SELECTOR, "a.thumb").click()
    assert browser.find_element(By.ID, "viewer-path").text == HOSTILE_NAME
    assert wait_images(browser, "#viewer-image")[0] > 0
    browser.find_element(By.ID, "viewer-close").click()


def test_the_gallery_requests_nothing_outside_the_report_folder(browser, scanned_report):
    requested_urls(browser)     # drop what the browser did before this test
    open_page(browser, scanned_report / "index.html")
    wait_images(browser, "#cards .card img")
    browser.find_element(By.CSS_SELECTOR, "#cards a.thumb").click()
    browser.find_element(By.ID, "viewer-toggle").click()
    wait_images(browser, "#viewer-image")
    browser.find_element(By.ID, "viewer-close").click()
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    wait_images(browser, "#run-cards img")
    open_page(browser, scanned_report / "gallery" / "page-2.html")
    wait_images(browser, "#cards .card img")
    urls = requested_urls(browser)
    inside = scanned_report.resolve().as_uri() + "/"
    assert any(url.endswith("/gallery/rows.js") for url in urls) and any(".orig.jpg" in url for url in urls)
    assert urls and all(url.startswith(inside) for url in urls), [u for u in urls if not u.startswith(inside)]


def test_the_content_security_policy_is_in_force_from_file_urls(browser, scanned_report):
    open_page(browser, scanned_report / "gallery" / "page-2.html")
    ran = browser.execute_script("""
        const script = document.createElement('script');
        script.textContent = 'window.inlineRan = true';
        document.head.appendChild(script);
        return window.inlineRan === true;""")
    assert ran is False                                       # inline script refused...
    assert all(w > 0 for w in wait_images(browser, "#cards .card img"))   # ...while the report's own files load


def test_class_filter_shows_only_that_class_on_the_page_and_across_the_run(browser, labelled_report):
    open_page(browser, labelled_report / "index.html")
    assert len(visible_cards(browser)) == PAGE_SIZE
    choose(browser, "f-class", "PNEUMONIA")
    page_cards = visible_cards(browser)
    expected_on_page = [r.path for r in labelled_rows()[:PAGE_SIZE] if r.prediction == "PNEUMONIA"]
    assert sorted(c["path"] for c in page_cards) == sorted(expected_on_page)
    assert {c["pred"] for c in page_cards} == {"PNEUMONIA"}
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    run_cards = visible_cards(browser)
    predicted_pneumonia = [r.path for r in labelled_rows() if r.prediction == "PNEUMONIA"]
    assert sorted(c["path"] for c in run_cards) == sorted(predicted_pneumonia)
    assert len(run_cards) > len(page_cards)         # one PNEUMONIA prediction sits on page 2
    assert all(w > 0 for w in wait_images(browser, "#run-cards img"))


def test_whole_run_results_come_a_page_at_a_time(browser, labelled_report):
    open_page(browser, labelled_report / "index.html")
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    assert [c["index"] for c in visible_cards(browser)] == list(range(PAGE_SIZE))
    assert browser.find_element(By.ID, "run-prev").get_attribute("disabled") is not None
    browser.find_element(By.ID, "run-next").click()
    assert [c["index"] for c in visible_cards(browser)] == list(range(PAGE_SIZE, len(labelled_rows())))
    assert browser.find_element(By.ID, "run-next").get_attribute("disabled") is not None
    choose(browser, "f-scope", "page")
    assert [c["index"] for c in visible_cards(browser)] == list(range(PAGE_SIZE))


def test_confidence_sort_orders_the_cards_and_errors_go_last(browser, labelled_report):
    open_page(browser, labelled_report / "index.html")
    choose(browser, "f-sort", "conf-desc")
    shown = visible_cards(browser)
    confidences = [c["conf"] for c in shown if c["conf"] is not None]
    assert confidences == sorted(confidences, reverse=True) and len(confidences) == len(shown) - 1
    assert shown[-1]["status"] == "error"
    choose(browser, "f-sort", "conf-asc")
    confidences = [c["conf"] for c in visible_cards(browser) if c["conf"] is not None]
    assert confidences == sorted(confidences)
    choose(browser, "f-sort", "path")
    assert [c["index"] for c in visible_cards(browser)] == list(range(PAGE_SIZE))


def test_confidence_range_outcome_and_errors_only_filters(browser, labelled_report):
    open_page(browser, labelled_report / "index.html")
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    choose(browser, "f-outcome", "wrong")
    assert [c["path"] for c in visible_cards(browser)] == [r.path for r in labelled_rows() if r.correct is False]
    choose(browser, "f-outcome", "")
    low = browser.find_element(By.ID, "f-min")
    low.clear()
    low.send_keys("90")
    assert sorted(c["conf"] for c in visible_cards(browser)) == [0.91, 0.97]
    browser.find_element(By.ID, "f-errors").click()
    errors = visible_cards(browser)
    assert [c["path"] for c in errors] == [r.path for r in labelled_rows() if not r.ok]
    assert errors[-1]["index"] >= PAGE_SIZE                                      # one is on page 2
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#run-cards .where a")]
    assert links[0].endswith(f"/index.html#r{errors[0]['index']}")
    assert links[-1].endswith(f"/gallery/page-2.html#r{errors[-1]['index']}")


def test_large_view_opens_toggles_and_follows_the_keyboard(browser, labelled_report):
    open_page(browser, labelled_report / "index.html")
    cards = visible_cards(browser)
    browser.find_element(By.CSS_SELECTOR, "#cards a.thumb").click()
    viewer = browser.find_element(By.ID, "viewer")
    assert viewer.get_attribute("open") is not None and viewer.get_attribute("data-showing") == "overlay"
    assert browser.find_element(By.ID, "viewer-path").text == cards[0]["path"]
    overlay_src = browser.find_element(By.ID, "viewer-image").get_attribute("src")
    assert wait_images(browser, "#viewer-image")[0] > 0

    def send(key):
        webdriver.ActionChains(browser).send_keys(key).perform()

    send("o")
    assert viewer.get_attribute("data-showing") == "original"
    original_src = browser.find_element(By.ID, "viewer-image").get_attribute("src")
    assert original_src != overlay_src and original_src.endswith(".orig.jpg")
    assert wait_images(browser, "#viewer-image")[0] > 0
    send(" ")
    assert viewer.get_attribute("data-showing") == "overlay"
    send(Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "viewer-path").text == cards[1]["path"]
    send(Keys.ARROW_LEFT)
    send(Keys.ARROW_LEFT)                                  # wraps round to the last ok image of the page
    ok_paths = [c["path"] for c in cards if c["status"] == "ok"]
    assert browser.find_element(By.ID, "viewer-path").text == ok_paths[-1]
    send(Keys.ESCAPE)
    WebDriverWait(browser, 5).until(lambda d: viewer.get_attribute("open") is None)


def test_names_with_special_characters_load_in_the_script_built_views(browser, labelled_report):
    open_page(browser, labelled_report / "gallery" / "page-2.html")
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    paths = [c["path"] for c in visible_cards(browser)]
    assert "NORMAL/c d#?%é.png" in paths and HOSTILE_NAME in paths
    assert all(w > 0 for w in wait_images(browser, "#run-cards img"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#run-cards .card")
    cards[paths.index("NORMAL/c d#?%é.png")].find_element(By.CSS_SELECTOR, "a.thumb").click()
    assert wait_images(browser, "#viewer-image")[0] > 0
    browser.find_element(By.ID, "viewer-toggle").click()
    assert wait_images(browser, "#viewer-image")[0] > 0
    assert browser.find_element(By.ID, "viewer-path").text == "NORMAL/c d#?%é.png"



@pytest.fixture(scope="module")
def evaluated_report(tmp_path_factory, tiny_model) -> Path:
    """A real scan of four synthetic X-rays (160 x 128), then `evaluate` with one box on img01."""
    root = tmp_path_factory.mktemp("evaluated") / "xrays"
    write_xrays(root, count=4)
    out = root.parent / "report"
    assert main(["scan", str(root), "--out", str(out), "--model", str(tiny_model), "--workers", "0", "--quiet"]) == 0
    boxes = root.parent / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nPNEUMONIA/img01.png,40,32,120,96\n")
    assert main(["evaluate", str(out), "--boxes", str(boxes)]) == 0
    return out


def box_geometry(driver) -> dict:
    """Where the large view's image and its ground-truth boxes are, once the box layer has caught up
    with the image's displayed size (it is laid out again when the image loads)."""
    WebDriverWait(driver, 5).until(lambda d: d.execute_script("""
        const layer = document.getElementById('viewer-boxes'), image = document.getElementById('viewer-image');
        return layer.hidden
            || Math.abs(layer.getBoundingClientRect().width - image.getBoundingClientRect().width) < 1;"""))
    return driver.execute_script("""
        const rect = (node) => { const r = node.getBoundingClientRect();
                                 return {left: r.left, top: r.top, width: r.width, height: r.height}; };
        const boxes = Array.from(document.querySelectorAll('#viewer-boxes .gt-box'));
        return {image: rect(document.getElementById('viewer-image')), boxes: boxes.map(rect),
                shown: boxes.map((b) => b.checkVisibility()),
                legend: !document.getElementById('viewer-boxes-legend').hidden,
                legendText: document.getElementById('viewer-boxes-legend').textContent};""")


def test_large_view_draws_the_ground_truth_boxes_after_evaluate(browser, evaluated_report):
    open_page(browser, evaluated_report / "index.html")
    paths = [c["path"] for c in visible_cards(browser)]
    cards = browser.find_elements(By.CSS_SELECTOR, "#cards .card")
    cards[paths.index("PNEUMONIA/img01.png")].find_element(By.CSS_SELECTOR, "a.thumb").click()
    for showing in ("overlay", "original"):
        assert browser.find_element(By.ID, "viewer").get_attribute("data-showing") == showing
        assert wait_images(browser, "#viewer-image")[0] > 0
        geometry = box_geometry(browser)
        image, boxes = geometry["image"], geometry["boxes"]
        assert len(boxes) == 1 and geometry["shown"] == [True], geometry
        assert geometry["legend"] and "ground-truth box" in geometry["legendText"]
        box = boxes[0]
        assert box["width"] > 0 and box["height"] > 0
        # the box 40..120 x 32..96 of a 160 x 128 image, scaled to the displayed image (2 px tolerance)
        scale_x, scale_y = image["width"] / 160, image["height"] / 128
        assert box["left"] == pytest.approx(image["left"] + 40 * scale_x, abs=2)
        assert box["top"] == pytest.approx(image["top"] + 32 * scale_y, abs=2)
        assert box["width"] == pytest.approx(80 * scale_x, abs=2)
        assert box["height"] == pytest.approx(64 * scale_y, abs=2)
        browser.find_element(By.ID, "viewer-toggle").click()
    webdriver.ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()     # an image without boxes
    assert browser.find_element(By.ID, "viewer-path").text != "PNEUMONIA/img01.png"
    geometry = box_geometry(browser)
    assert geometry["boxes"] == [] and not geometry["legend"]
    browser.find_element(By.ID, "viewer-close").click()
    # the whole-run view reads the boxes from rows.js
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    paths = [c["path"] for c in visible_cards(browser)]
    cards = browser.find_elements(By.CSS_SELECTOR, "#run-cards .card")
    cards[paths.index("PNEUMONIA/img01.png")].find_element(By.CSS_SELECTOR, "a.thumb").click()
    assert wait_images(browser, "#viewer-image")[0] > 0
    geometry = box_geometry(browser)
    assert len(geometry["boxes"]) == 1 and geometry["boxes"][0]["width"] > 0 and geometry["shown"] == [True]
    browser.find_element(By.ID, "viewer-close").click()


# ---- one card for the pages and the whole-run view -----------------------------------------------

ODD_NAME = "NORMAL/c d#?%\u00e9.png"
NOTE = "<b>pleural</b> line"


@pytest.fixture(scope="module")
def marked_report(tmp_path_factory) -> Path:
    """Every mark a card can show, on pages of 5: wrong, unlike the training images, heat outside the
    lungs, new or changed in this run, an imported decision with a note, skipped and error cards."""
    skipped = Row(path="PNEUMONIA/ct.dcm", status="skipped", error="not a chest radiograph: Modality CT",
                  sha256="c" * 64, change="new")
    rows = labelled_rows() + [skipped]
    rows.sort(key=lambda row: row.path)
    for i, row in enumerate(rows):
        row.sha256 = row.sha256 or f"{i:064x}"
        row.first_seen = "2026-12-01T02:00:00+00:00"
    marked = {row.path: row for row in rows}
    marked["NORMAL/a.png"].attention_outside = 0.8
    marked["NORMAL/b.png"].ood_score, marked["NORMAL/b.png"].ood_flag = 41.5, True
    marked["PNEUMONIA/e.png"].change = "prediction changed"
    review = Review("NORMAL/b.png", marked["NORMAL/b.png"].sha256, "PNEUMONIA", "0.62", "disagree", NOTE,
                    "2026-12-02T08:00:00.000+00:00")
    return write_gallery_report(tmp_path_factory.mktemp("marked") / "report", rows, PAGE_SIZE,
                                reviews={review.path: review})


CARD_HTML = """
    return Array.from(document.querySelectorAll(arguments[0])).filter((c) => !c.hidden).map((card) => {
      const copy = card.cloneNode(true);
      copy.removeAttribute('id');                      // a page's card: the target of the run view's links
      const where = copy.querySelector('.where');      // a whole-run result: the link to its page
      if (where) where.remove();
      return [card.querySelector('.name').textContent, copy.outerHTML];
    });"""


def show_run(driver) -> None:
    choose(driver, "f-scope", "run")
    WebDriverWait(driver, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))


def test_a_card_is_the_same_on_its_page_and_in_the_whole_run_view(browser, marked_report):
    open_page(browser, marked_report / "index.html")
    browser.execute_script("localStorage.clear()")
    seen = 0
    for page in (marked_report / "index.html", marked_report / "gallery" / "page-2.html"):
        open_page(browser, page)
        on_page = dict(browser.execute_script(CARD_HTML, "#cards .card"))
        show_run(browser)                       # from the same page: links relative to it alike
        in_run = dict(browser.execute_script(CARD_HTML, "#run-cards .card"))
        browser.find_element(By.ID, "run-next").click()
        in_run.update(browser.execute_script(CARD_HTML, "#run-cards .card"))
        assert len(in_run) == 9 and {path: in_run[path] for path in on_page} == on_page
        seen += len(on_page)
    assert seen == 9


def test_cards_show_every_mark_their_row_calls_for(browser, marked_report):
    open_page(browser, marked_report / "index.html")
    browser.execute_script("localStorage.clear()")
    open_page(browser, marked_report / "index.html")
    cards = {card.find_element(By.CSS_SELECTOR, ".name").text: card
             for card in browser.find_elements(By.CSS_SELECTOR, "#cards .card")}
    assert list(cards) == ["<script>alert(1)</script>#?%.png", "NORMAL/a.png", "NORMAL/b.png", "NORMAL/broken.png",
                           ODD_NAME]

    def text(card, selector):
        found = card.find_elements(By.CSS_SELECTOR, selector)
        return found[0].get_attribute("textContent") if found else None

    heat, wrong, broken, odd = (cards[name] for name in ("NORMAL/a.png", "NORMAL/b.png", "NORMAL/broken.png",
                                                          ODD_NAME))
    assert text(heat, ".attention strong") == "\u26a0 heat outside the lungs 80.0%" and not text(heat, ".ood")
    assert text(heat, ".truth") == "true NORMAL \u2713 correct" and text(heat, ".conf") == "91.0%"
    assert "wrong" in wrong.get_attribute("class").split() and text(wrong, ".truth .mark-wrong") == "\u2717 wrong"
    assert text(wrong, ".ood strong") == "\u26a0 unlike the training images"
    assert "Mahalanobis distance 41.5" in wrong.find_element(By.CSS_SELECTOR, ".ood strong").get_attribute("title")
    assert "review-disagree" in wrong.get_attribute("class").split()
    assert text(wrong, ".review-mark") == f"\u2717 disagree: {NOTE}" and not wrong.find_elements(By.TAG_NAME, "b")
    attributes = browser.execute_script("return Object.assign({}, arguments[0].dataset)", wrong)
    assert attributes == {"index": "2", "status": "ok", "pred": "PNEUMONIA", "conf": "0.62", "label": "NORMAL",
                          "correct": "false", "sha": f"{2:064x}", "firstSeen": "2026-12-01T02:00:00+00:00",
                          "review": "disagree", "reviewNote": NOTE, "reviewedAt": "2026-12-02T08:00:00.000+00:00"}
    assert wrong.find_element(By.TAG_NAME, "meter").get_attribute("value") == "0.62"
    assert text(broken, ".placeholder") == "no image" and text(broken, ".error-text") == \
        "error: cannot decode image: truncated file"
    assert "data-conf" not in browser.execute_script("return arguments[0].outerHTML", broken)
    link = odd.find_element(By.CSS_SELECTOR, "a.thumb")
    assert link.get_attribute("href").endswith("/overlays/c%20d%23%3F%25%C3%A9.jpg")
    assert link.get_attribute("data-original").endswith("overlays/c%20d%23%3F%25%C3%A9.orig.jpg")
    open_page(browser, marked_report / "gallery" / "page-2.html")
    later = {card.find_element(By.CSS_SELECTOR, ".name").text: card
             for card in browser.find_elements(By.CSS_SELECTOR, "#cards .card")}
    skipped = later["PNEUMONIA/ct.dcm"]
    assert "skipped" in skipped.get_attribute("class").split() and text(skipped, ".placeholder") == "not scored"
    assert text(skipped, ".error-text") == "skipped: not a chest radiograph: Modality CT"
    assert text(skipped, ".change-mark") == "new in this run"
    changed = later["PNEUMONIA/e.png"].find_element(By.CSS_SELECTOR, ".change-mark")
    assert changed.text == "prediction changed in this run" and "change-prediction-changed" in changed.get_attribute(
        "class")


def test_a_link_to_a_card_of_another_page_lands_on_it(browser, marked_report):
    browser.get((marked_report / "gallery" / "page-2.html").as_uri() + "#r7")
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return document.readyState === 'complete'"))
    target = browser.execute_script("const t = document.querySelector(':target'); return t && t.id")
    assert target == "r7"
    assert browser.execute_script("const r = document.getElementById('r7').getBoundingClientRect();"
                                  "return r.top >= 0 && r.top < window.innerHeight")


class Spread(Row):
    """A column declared on a property alone (as a column is added: records.Row)."""

    @property
    @derived(Number(4), after="ood_flag", shown=Shown("spread", digits=2))
    def spread(self) -> float | None:
        return max(self.probabilities) - min(self.probabilities) if self.probabilities else None


def test_a_newly_declared_column_reaches_the_card_s_attributes_on_both_views(browser, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "SCHEMA", Schema(Spread))
    rows = [row for row in labelled_rows() if row.ok][:3] + [error_row("NORMAL/zz.png")]
    report = write_gallery_report(tmp_path / "report", rows, page_size=10)
    spreads = {row.path: f"{round(max(row.probabilities) - min(row.probabilities), 2):g}" for row in rows if row.ok}
    open_page(browser, report / "index.html")
    attribute = "return Object.fromEntries(Array.from(document.querySelectorAll(arguments[0]))" \
                ".map((c) => [c.querySelector('.name').textContent, c.dataset.spread || null]))"
    assert browser.execute_script(attribute, "#cards .card") == {**spreads, "NORMAL/zz.png": None}
    show_run(browser)
    assert browser.execute_script(attribute, "#run-cards .card") == {**spreads, "NORMAL/zz.png": None}


def test_three_classes_filter_by_the_third_class_and_draw_a_curve_per_class_in_its_own_colour(browser, tmp_path):
    rows = three_class_rows()
    report = write_gallery_report(tmp_path / "report", rows, PAGE_SIZE, class_names=NBV)
    open_page(browser, report / "index.html")
    choose(browser, "f-class", "VIRUS")
    assert {c["pred"] for c in visible_cards(browser)} == {"VIRUS"}
    choose(browser, "f-scope", "run")
    WebDriverWait(browser, 10).until(lambda d: not d.find_element(By.ID, "run-view").get_attribute("hidden"))
    assert sorted(c["path"] for c in visible_cards(browser)) == sorted(r.path for r in rows if r.prediction == "VIRUS")
    curves = browser.execute_script("""
        return Array.from(document.querySelectorAll('figure.roc polyline.curve')).map((line) => ({
            name: line.dataset.class, stroke: getComputedStyle(line).stroke,
            drawn: line.getBoundingClientRect().width > 0}));""")
    assert [c["name"] for c in curves] == list(NBV)
    assert all(c["drawn"] for c in curves)
    assert len({c["stroke"] for c in curves}) == 3          # the stylesheet does not paint them one colour
