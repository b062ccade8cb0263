"""serve: the JSON API through FastAPI's TestClient, and the page in real headless Chromium."""
from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchcam.cli import main
from batchcam.model.checkpoint import file_sha256, load_checkpoint
from batchcam.serving.explain import Explainer
from batchcam.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "docs" / "serve.png"
SCREENSHOT_MAX_BYTES = 150_000

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fastapi") is None,
                                reason="fastapi is not installed (pip install -e '.[test]' brings it)")


def browser_missing() -> str:
    """Why the browser test cannot run here, or '' when it can (CI installs all of these)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]' brings it)"
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.is_file():
            return f"{binary} is missing (apt-get install {package})"
    return ""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def xray(seed: int = 0, label: str = "PNEUMONIA", size: tuple[int, int] = (160, 128)) -> Image.Image:
    return generate(seed, label, size).image


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


def upload(client, *files: tuple[str, bytes]):
    return client.post("/api/predict", files=[("files", (name, data, "application/octet-stream"))
                                              for name, data in files])


@pytest.fixture(scope="module")
def explainer(tiny_model) -> Explainer:
    return Explainer(load_checkpoint(tiny_model), torch.device("cpu"))


def make_client(explainer: Explainer, max_upload_bytes: int = 50 * 1024 * 1024):
    """The app as a browser on http://127.0.0.1:8000/ (the default bind) reaches it: the app
    refuses any other Host header."""
    from fastapi.testclient import TestClient

    from batchcam.commands.serve import create_app

    return TestClient(create_app(explainer, max_upload_bytes), base_url="http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def client(explainer):
    with make_client(explainer) as test_client:
        yield test_client


def test_a_png_gets_prediction_probabilities_and_overlay_at_its_geometry(client):
    response = upload(client, ("chest.png", png_bytes(xray())))
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["file"] == "chest.png" and result["status"] == "ok"
    assert set(result["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert result["prediction"] == max(result["probabilities"], key=result["probabilities"].get)
    assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))
    assert 0 <= result["cam_peak_x"] < 160 and 0 <= result["cam_peak_y"] < 128
    assert decode_data_url(result["overlay"]).size == (160, 128)
    assert decode_data_url(result["original"]).size == (160, 128)


def test_a_16_bit_png_predicts_like_its_8_bit_twin_and_is_not_clipped(client):
    eight = xray(seed=3)
    sixteen = Image.fromarray(np.asarray(eight, dtype=np.uint16) * 257)
    assert sixteen.mode == "I;16"
    response = upload(client, ("eight.png", png_bytes(eight)), ("sixteen.png", png_bytes(sixteen)))
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert second["confidence"] == pytest.approx(first["confidence"], abs=1e-5)
    shown = np.asarray(decode_data_url(second["original"]), dtype=np.float32)
    assert abs(shown.mean() - np.asarray(eight, dtype=np.float32).mean()) < 3  # a clipped X-ray is white


def test_results_come_back_in_upload_order(client):
    files = [(f"{label}-{seed}.png", png_bytes(xray(seed, label))) for seed, label in
             ((1, "NORMAL"), (2, "PNEUMONIA"), (3, "NORMAL"))]
    response = upload(client, *files)
    assert [r["file"] for r in response.json()["results"]] == [name for name, _ in files]


def test_garbage_gets_400_with_the_reason(client):
    response = upload(client, ("notes.png", b"this is not an image at all"))
    assert response.status_code == 400
    assert response.json()["detail"].startswith("notes.png: not a supported image (allowed: JPEG, PNG, BMP, TIFF")


def test_one_bad_file_rejects_the_request_and_names_that_file(client):
    response = upload(client, ("good.png", png_bytes(xray())), ("empty.png", b""))
    assert response.status_code == 400
    assert response.json()["detail"] == "empty.png: empty file (0 bytes)"


def test_a_request_without_files_gets_400(client):
    assert client.post("/api/predict", data={"note": "hello"}).status_code == 400
    response = client.post("/api/predict", content=b"raw bytes", headers={"content-type": "image/png"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["detail"]


def test_an_oversized_upload_gets_413(explainer):
    with make_client(explainer, max_upload_bytes=4096) as small:
        big = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8)))
        assert len(big) > 4096
        response = upload(small, ("big.png", big))
        assert response.status_code == 413
        assert "limit" in response.json()["detail"]
        assert small.get("/healthz").json()["max_upload_bytes"] == 4096


def test_uploads_never_touch_the_disk(client, monkeypatch):
    """A 1.5 MB upload is above Starlette's 1 MB spooling threshold: it must still stay in memory."""
    def no_temporary_files(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_temporary_files)
    noise = np.random.default_rng(1).integers(0, 256, (1250, 1250), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    assert len(data) > 1024 * 1024
    response = upload(client, ("large.png", data))
    assert response.status_code == 200 and response.json()["results"][0]["width"] == 1250


def test_two_concurrent_requests_both_succeed(client):
    files = [("a.png", png_bytes(xray(5, "NORMAL"))), ("b.png", png_bytes(xray(6, "PNEUMONIA")))]
    expected = [upload(client, f).json()["results"][0]["confidence"] for f in files]
    start = threading.Barrier(2)

    def post(file):
        start.wait()
        return upload(client, file)

    with ThreadPoolExecutor(max_workers=2) as pool:
        responses = list(pool.map(post, files))
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["results"][0]["confidence"] for r in responses] == pytest.approx(expected)


def test_healthz_reports_the_loaded_model_and_device(client, tiny_model):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    model = health["model"]
    assert model["name"] == tiny_model.name and model["sha256"] == file_sha256(tiny_model)
    assert model["classes"] == ["NORMAL", "PNEUMONIA"] and model["demo"] is False


def test_the_page_and_its_assets_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset in ("/static/serve.js", "/static/serve.css"):
        response = client.get(asset)
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text
    assert client.get("/static/../serve.py").status_code == 404


def test_openapi_documents_the_multipart_predict_endpoint(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["items"]["format"] == "binary"
    assert {"400", "413"} <= set(schema["paths"]["/api/predict"]["post"]["responses"])


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("192.168.1.20", False),
                                            ("::", False), ("example.org", False)])
def test_only_loopback_addresses_count_as_local(host, loopback):
    from batchcam.serving.guard import is_loopback

    assert is_loopback(host) is loopback


def test_serve_warns_when_bound_beyond_loopback(tiny_model, monkeypatch, capsys):
    """uvicorn.run is replaced, so nothing is bound: this checks the start-up path and the warning."""
    import uvicorn

    bound = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: bound.append((host, port)))
    assert main(["serve", "--model", str(tiny_model), "--port", "8123"]) == 0
    assert bound == [("127.0.0.1", 8123)] and "warning" not in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_model), "--host", "0.0.0.0"]) == 0
    assert bound[-1] == ("0.0.0.0", 8000)
    assert "warning: serving on 0.0.0.0, not a loopback address" in capsys.readouterr().err


def test_a_port_already_in_use_exits_2(tiny_model, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_model), "--port", str(port)]) == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--max-upload-mb", "0"], "--max-upload-mb must be more than 0"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["--model", "no/such.pt"], "--model no/such.pt does not exist"),
])
def test_serve_usage_errors_exit_2_before_binding(extra, message, capsys):
    assert main(["serve", *extra]) == 2
    assert message in capsys.readouterr().err


# --- the page in a real browser ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_serve(tmp_path: Path, *extra: str):
    """``python -m batchcam serve`` (demo model) on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "batchcam", "serve", "--host", "127.0.0.1", "--port",
                                str(port), *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def server(tmp_path):
    with running_serve(tmp_path) as url:
        yield url


def wait_until_healthy(url: str, process: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"serve exited with {process.returncode}:\n{log.read()}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"serve did not answer /healthz within {timeout} s")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1200,800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager never runs, so nothing is ever downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_page_uploads_files_shows_predictions_overlays_and_toggles(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    samples = [REPO / "samples" / "PNEUMONIA" / "xray_00001.png", REPO / "samples" / "NORMAL" / "xray_00002.jpg"]
    browser.get(server)
    WebDriverWait(browser, 30).until(lambda d: "demo_model.pt" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in samples))
    WebDriverWait(browser, 120).until(lambda d: [c.get_attribute("data-status") for c in
                                                 d.find_elements(By.CSS_SELECTOR, ".card")] == ["done", "done"])

    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert [c.find_element(By.CSS_SELECTOR, ".file-name").text for c in cards] == [p.name for p in samples]
    first = cards[0]
    assert first.find_element(By.CSS_SELECTOR, ".prediction").text in ("NORMAL", "PNEUMONIA")
    assert "% confidence" in first.find_element(By.CSS_SELECTOR, ".confidence-text").text
    assert len(first.find_elements(By.CSS_SELECTOR, ".probabilities tbody tr")) == 2
    image = first.find_element(By.CSS_SELECTOR, ".result-image")
    overlay_src = image.get_attribute("src")
    assert overlay_src.startswith("data:image/jpeg;base64,")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    download = first.find_element(By.CSS_SELECTOR, ".download")
    assert download.get_attribute("href") == overlay_src
    assert download.get_attribute("download") == "xray_00001.overlay.jpg"

    toggle = first.find_element(By.CSS_SELECTOR, ".toggle")
    toggle.click()
    assert first.get_attribute("data-showing") == "original" and toggle.text == "Show overlay"
    original_src = image.get_attribute("src")
    assert original_src.startswith("data:image/jpeg;base64,") and original_src != overlay_src
    WebDriverWait(browser, 10).until(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0)
    toggle.click()
    assert first.get_attribute("data-showing") == "overlay" and image.get_attribute("src") == overlay_src

    save_screenshot(browser.get_screenshot_as_png(), tmp_path / "serve.png")


def displayed(card, selector: str) -> bool:
    return card.find_element("css selector", selector).is_displayed()


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_an_error_card_shows_its_reason_and_no_result_controls(server, browser, tmp_path):
    """A file the server refuses: the card says why, and shows no empty bar, no "Show original" and
    no "Download overlay" link that leads nowhere (the hidden attribute against .card-body's flex)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    notes = tmp_path / "notes.png"
    notes.write_bytes(b"not an image")
    browser.get(server)
    WebDriverWait(browser, 30).until(lambda d: "demo_model.pt" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "file-input").send_keys(str(notes))
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.CSS_SELECTOR, ".card").get_attribute("data-status")
                                      == "error")
    card = browser.find_element(By.CSS_SELECTOR, ".card")
    assert card.find_element(By.CSS_SELECTOR, ".status-text").text == "Not processed"
    assert displayed(card, ".error-text")
    assert card.find_element(By.CSS_SELECTOR, ".error-text").text.startswith("notes.png: not a supported image")
    assert [selector for selector in (".card-body", ".confidence", ".toggle", ".download", ".result-image")
            if displayed(card, selector)] == []


@pytest.mark.slow
@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "browser available")
def test_the_page_waits_for_a_busy_server_and_then_shows_the_result(browser, tmp_path):
    """With --max-concurrent-requests 1 and the one slot held by a half-sent upload, the page's
    request is answered 503: the card says the server is busy, asks again after Retry-After, and
    shows the result once the slot is free."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sample = REPO / "samples" / "PNEUMONIA" / "xray_00001.png"
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"held.png\"\r\n\r\n"
            + sample.read_bytes() + b"\r\n--b--\r\n")
    with running_serve(tmp_path, "--max-concurrent-requests", "1") as url:
        port = int(url.rsplit(":", 1)[1].strip("/"))
        held = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            held.putrequest("POST", "/api/predict")
            held.putheader("Content-Type", "multipart/form-data; boundary=b")
            held.putheader("Content-Length", str(len(body)))
            held.endheaders()
            held.send(body[:100])

            def busy() -> int:
                with urllib.request.urlopen(url + "healthz", timeout=10) as response:
                    return json.loads(response.read())["busy_requests"]

            WebDriverWait(None, 60, poll_frequency=0.1).until(lambda _: busy() == 1)
            browser.get(url)
            WebDriverWait(browser, 30).until(lambda d: "demo_model.pt" in d.find_element(By.ID, "model-info").text)
            browser.find_element(By.ID, "file-input").send_keys(str(sample))
            WebDriverWait(browser, 60).until(
                lambda d: d.find_element(By.CSS_SELECTOR, ".status-text").text.startswith("Server busy; trying again"))
            held.send(body[100:])
            assert held.getresponse().status == 200
        finally:
            held.close()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.CSS_SELECTOR, ".card").get_attribute(
            "data-status") == "done")
        card = browser.find_element(By.CSS_SELECTOR, ".card")
        assert card.find_element(By.CSS_SELECTOR, ".prediction").text in ("NORMAL", "PNEUMONIA")
        assert displayed(card, ".card-body") and displayed(card, ".download")


def test_every_stylesheet_lets_the_hidden_attribute_win():
    """A class rule with ``display`` (``.card-body { display: flex }``) beats the user agent's
    ``[hidden] { display: none }``: each stylesheet restates it with !important."""
    for sheet in sorted((REPO / "templates").glob("*.css")):
        rules = re.sub(r"/\*.*?\*/", "", sheet.read_text(), flags=re.S).replace(" ", "")
        assert "[hidden]{display:none!important;}" in rules, sheet.name


def save_screenshot(png: bytes, scratch: Path) -> None:
    """Always under tmp_path; into docs/ for the README only when it is missing or asked for
    (BATCHCAM_UPDATE_SCREENSHOT=1), so an ordinary test run never dirties the work tree."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(scratch, optimize=True)
    assert scratch.stat().st_size < SCREENSHOT_MAX_BYTES, f"screenshot is {scratch.stat().st_size} bytes"
    if not SCREENSHOT.exists() or os.environ.get("BATCHCAM_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(scratch.read_bytes())
