"""serve's limits: files per request, model batches, pixels per request, the Host and Origin checks,
option validation, no CDN docs page, and (slow) the server's peak memory under hostile requests."""
from __future__ import annotations

import gc
import http.client
import importlib.util
import io
import json
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchcam.cli import main
from batchcam.model.checkpoint import load_checkpoint
from batchcam.serving.explain import Explainer
from batchcam.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1:8000"
MEMORY_BOUND_MB = 2048   # the README's bound on serve's peak RSS under the requests below

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fastapi") is None,
                                reason="fastapi is not installed (pip install -e '.[test]' brings it)")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", compression="tiff_deflate")
    return buffer.getvalue()


def xray(seed: int = 0, size: tuple[int, int] = (96, 80)) -> bytes:
    return png_bytes(generate(seed, ("NORMAL", "PNEUMONIA")[seed % 2], size).image)


def parts(*files: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in files]


def multipart_body(files: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    chunks = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def explainer(tiny_model) -> Explainer:
    return Explainer(load_checkpoint(tiny_model), torch.device("cpu"))


def make_client(explainer: Explainer, **limits):
    """A TestClient that talks to the app as a browser on http://127.0.0.1:8000/ would."""
    from fastapi.testclient import TestClient

    from batchcam.commands.serve import create_app

    return TestClient(create_app(explainer, **limits), base_url=f"http://{HOST}")


@pytest.fixture(scope="module")
def client(explainer):
    with make_client(explainer) as test_client:
        yield test_client


class Spy:
    """Records the Explainer's decode and explain calls, in order, and passes them on."""

    def __init__(self, explainer: Explainer, monkeypatch):
        self.events: list[tuple[str, int]] = []
        decode, explain = explainer.decode, explainer.explain

        def spied_decode(name, data, *args, **kwargs):
            self.events.append(("decode", 1))
            return decode(name, data, *args, **kwargs)

        def spied_explain(samples, *args, **kwargs):
            self.events.append(("explain", len(samples)))
            return explain(samples, *args, **kwargs)

        monkeypatch.setattr(explainer, "decode", spied_decode)
        monkeypatch.setattr(explainer, "explain", spied_explain)

    def batches(self) -> list[int]:
        return [size for kind, size in self.events if kind == "explain"]

    def decodes(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "decode")


# --- files per request ---------------------------------------------------------------------------


def test_more_than_32_files_are_refused_with_413_before_any_decoding(client, explainer, monkeypatch):
    spy = Spy(explainer, monkeypatch)
    pixel = png_bytes(Image.new("L", (1, 1), 128))
    response = client.post("/api/predict", files=parts(*[(f"p{i}.png", pixel) for i in range(33)]))
    assert response.status_code == 413
    assert response.json()["detail"] == "too many files: more than 32 in one request (see --max-files)"
    assert spy.events == []


def test_32_files_are_accepted(client):
    pixel = png_bytes(Image.new("L", (1, 1), 128))
    response = client.post("/api/predict", files=parts(*[(f"p{i}.png", pixel) for i in range(32)]))
    assert response.status_code == 200 and len(response.json()["results"]) == 32


def test_max_files_is_a_parameter_of_the_app(explainer):
    with make_client(explainer, max_files=2) as small:
        assert small.post("/api/predict", files=parts(("a.png", xray(1)), ("b.png", xray(2)))).status_code == 200
        response = small.post("/api/predict", files=parts(*[(f"{i}.png", xray(i)) for i in range(3)]))
        assert response.status_code == 413 and "more than 2 in one request" in response.json()["detail"]
        assert small.get("/healthz").json()["max_files"] == 2


def test_100000_parts_are_refused_quickly_and_none_is_decoded(client, explainer, monkeypatch):
    """A 12 MB body of 100,000 empty parts: refused once the 33rd part ends, without parsing the rest."""
    spy = Spy(explainer, monkeypatch)
    body, content_type = multipart_body([(f"{i}.png", b"") for i in range(100_000)])
    assert len(body) < 50 * 1024 * 1024
    started = time.perf_counter()
    response = client.post("/api/predict", content=body, headers={"content-type": content_type})
    elapsed = time.perf_counter() - started
    assert response.status_code == 413 and "too many files" in response.json()["detail"]
    assert spy.decodes() == 0
    assert elapsed < 5, f"refusing took {elapsed:.1f} s"


def test_many_form_fields_are_refused_too(client):
    body = b"".join(f"--b\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n".encode() for i in range(100))
    body += (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n" + xray()
             + b"\r\n--b--\r\n")
    response = client.post("/api/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "form fields" in response.json()["detail"]


# --- model batches -------------------------------------------------------------------------------


def test_files_go_through_the_model_in_batches_of_at_most_8_decoded_batch_by_batch(client, explainer, monkeypatch):
    spy = Spy(explainer, monkeypatch)
    files = [(f"x{i:02d}.png", xray(i)) for i in range(20)]
    response = client.post("/api/predict", files=parts(*files))
    assert response.status_code == 200
    assert [r["file"] for r in response.json()["results"]] == [name for name, _ in files]
    assert spy.batches() == [8, 8, 4]
    # decoded per batch: 8 decodes, a batch, 8 decodes, a batch, ... never all 20 up front
    assert [kind for kind, _ in spy.events] == (["decode"] * 8 + ["explain"]) * 2 + ["decode"] * 4 + ["explain"]


def test_batched_results_equal_one_file_at_a_time(client):
    files = [(f"x{i:02d}.png", xray(i)) for i in range(10)]
    together = client.post("/api/predict", files=parts(*files)).json()["results"]
    alone = [client.post("/api/predict", files=parts(file)).json()["results"][0] for file in files]
    assert [r["confidence"] for r in together] == pytest.approx([r["confidence"] for r in alone], abs=1e-5)
    assert [r["sha256"] for r in together] == [r["sha256"] for r in alone]


def test_a_non_image_is_refused_before_any_model_time(client, explainer, monkeypatch):
    spy = Spy(explainer, monkeypatch)
    files = [(f"x{i:02d}.png", xray(i)) for i in range(12)] + [("notes.png", b"not an image")]
    response = client.post("/api/predict", files=parts(*files))
    assert response.status_code == 400
    assert response.json()["detail"].startswith("notes.png: not a supported image")
    assert spy.batches() == []


# --- requests at once ------------------------------------------------------------------------------


def wait_until(condition, what: str, deadline_seconds: float = 120) -> None:
    """Poll ``condition`` (a wait, not a timing assertion: the deadline only stops a hung test)."""
    deadline = time.monotonic() + deadline_seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.05)


def test_requests_beyond_the_concurrent_limit_get_503_with_retry_after_and_the_others_their_results(
        explainer, monkeypatch):
    """Two requests hold the two slots (their decoding is held back); three more are answered 503
    with Retry-After before their bodies are kept; then the two finish with their results, and the
    slots are free again."""
    release = threading.Event()
    decode = explainer.decode

    def held_decode(name, data, *args, **kwargs):
        release.wait()
        return decode(name, data, *args, **kwargs)

    monkeypatch.setattr(explainer, "decode", held_decode)
    with make_client(explainer, max_concurrent_requests=2) as small, ThreadPoolExecutor(max_workers=2) as pool:
        assert small.get("/healthz").json()["max_concurrent_requests"] == 2
        held = [pool.submit(small.post, "/api/predict", files=parts((f"held{i}.png", xray(i)))) for i in range(2)]
        wait_until(lambda: small.get("/healthz").json()["busy_requests"] == 2, "both requests hold a slot")
        refused = [small.post("/api/predict", files=parts((f"more{i}.png", xray(i)))) for i in range(3)]
        release.set()
        answered = [future.result() for future in held]
        after = small.post("/api/predict", files=parts(("after.png", xray(7))))
        assert small.get("/healthz").json()["busy_requests"] == 0
    assert [r.status_code for r in refused] == [503, 503, 503]
    assert [r.headers.get("retry-after") for r in refused] == ["2", "2", "2"]
    assert "--max-concurrent-requests" in refused[0].json()["detail"]
    assert [r.status_code for r in answered] == [200, 200]
    assert [[result["file"] for result in r.json()["results"]] for r in answered] == [["held0.png"], ["held1.png"]]
    assert after.status_code == 200 and after.json()["results"][0]["status"] == "ok"


def test_a_refused_or_failed_request_gives_its_slot_back(explainer):
    with make_client(explainer, max_concurrent_requests=1) as small:
        assert small.post("/api/predict", files=parts(("notes.png", b"not an image"))).status_code == 400
        assert small.post("/api/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 400
        assert small.post("/api/predict", files=parts(("a.png", xray()))).status_code == 200
        assert small.get("/healthz").json()["busy_requests"] == 0


class StreamedRequest:
    """What read_uploads reads of a Starlette request: its headers and its body in chunks."""

    def __init__(self, body: bytes, content_type: str, chunk: int = 65536):
        self.headers = {"content-type": content_type, "content-length": str(len(body))}
        self._chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]

    async def stream(self):
        while self._chunks:
            yield self._chunks.pop(0)


def test_an_uploads_bytes_are_freed_with_its_request():
    """Not some requests later, when Python's cycle collector runs: python-multipart's parser and its
    callbacks form a reference cycle, and the bodies must not hang on it (a server kept 48 MB more
    after each of 8 requests of a 48 MB file)."""
    import asyncio

    from batchcam.serving.uploads import Limits, read_uploads

    data = np.random.default_rng(2).bytes(4_000_000)
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        body, content_type = multipart_body([("noise.png", data)])
        uploads = asyncio.run(read_uploads(StreamedRequest(body, content_type), Limits(50 * 2**20, 32, 10**8)))
        assert uploads == [("noise.png", data)]
        del uploads, body
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        gc.enable()
    assert after - before < len(data) // 4, (after - before, len(data))


@pytest.mark.parametrize("upload_mb, expected", [(50, 4), (1, 16), (100, 2), (4096, 1)])
def test_the_default_concurrent_limit_follows_the_upload_cap(upload_mb, expected):
    from batchcam.config import ServeConfig

    assert ServeConfig(max_upload_mb=upload_mb).concurrent_requests == expected
    assert ServeConfig(max_upload_mb=upload_mb, max_concurrent_requests=9).concurrent_requests == 9


# --- pixels per request --------------------------------------------------------------------------


def test_pixels_over_the_request_cap_are_refused_from_the_headers_before_decoding(client, explainer, monkeypatch):
    """12 blank 8-bit PNGs of 3000x3000 are 108 megapixels, over the default 100; each alone is fine."""
    spy = Spy(explainer, monkeypatch)
    blank = png_bytes(Image.new("L", (3000, 3000), 0))
    response = client.post("/api/predict", files=parts(*[(f"b{i}.png", blank) for i in range(12)]))
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "108.0 megapixels" in detail and "100 megapixels" in detail and "--max-megapixels" in detail
    assert spy.decodes() == 0


def test_a_float_image_counts_four_times_its_pixels(explainer):
    """Images with more than 8 bits a sample (and DICOM) decode through 64-bit floats: four times
    the memory per pixel, so one may have at most a quarter of the request's pixels."""
    with make_client(explainer, max_pixels_per_request=1_000_000) as small:
        fine = tiff_bytes(Image.fromarray(np.zeros((400, 600), dtype=np.float32), mode="F"))    # 0.24 MP
        over = tiff_bytes(Image.fromarray(np.zeros((600, 600), dtype=np.float32), mode="F"))    # 0.36 MP
        eight_bit = png_bytes(Image.new("L", (1000, 900), 0))                                   # 0.9 MP
        assert small.post("/api/predict", files=parts(("fine.tif", fine))).status_code == 200
        assert small.post("/api/predict", files=parts(("gray.png", eight_bit))).status_code == 200
        response = small.post("/api/predict", files=parts(("over.tif", over)))
        assert response.status_code == 413
        assert response.json()["detail"].startswith("over.tif: 600x600 TIFF F image")
        assert "0.25 megapixels" in response.json()["detail"]
        assert small.get("/healthz").json()["max_pixels_per_request"] == 1_000_000


def test_the_9400_px_float_tiff_bomb_is_refused_without_decoding(client, explainer, monkeypatch):
    spy = Spy(explainer, monkeypatch)
    bomb = tiff_bytes(Image.fromarray(np.zeros((9400, 9400), dtype=np.float32), mode="F"))
    assert len(bomb) < 1024 * 1024
    response = client.post("/api/predict", files=parts(("bomb.tif", bomb)))
    assert response.status_code == 413 and response.json()["detail"].startswith("bomb.tif: 9400x9400 TIFF F image")
    assert spy.decodes() == 0


def dicom_bytes(rows: int, columns: int, deflated: bool = False, colour: bool = False) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if colour else (1, "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(rows * columns * ds.SamplesPerPixel)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.skipif(importlib.util.find_spec("pydicom") is None, reason="pydicom is not installed")
def test_a_dicom_counts_four_times_its_rows_times_columns(explainer):
    with make_client(explainer, max_pixels_per_request=1_000_000) as small:
        assert small.post("/api/predict", files=parts(("small.dcm", dicom_bytes(400, 500)))).status_code == 200
        response = small.post("/api/predict", files=parts(("big.dcm", dicom_bytes(500, 600))))
        assert response.status_code == 413 and response.json()["detail"].startswith("big.dcm: 600x500 DICOM image")
        # a colour DICOM's three samples each go through floats: 0.27 million of them is too many
        assert small.post("/api/predict", files=parts(("grey.dcm", dicom_bytes(300, 300)))).status_code == 200
        response = small.post("/api/predict", files=parts(("colour.dcm", dicom_bytes(300, 300, colour=True))))
        assert response.status_code == 413
        assert response.json()["detail"].startswith("colour.dcm: 300x300 DICOM image has 0.1 megapixels x 3 samples")


@pytest.mark.skipif(importlib.util.find_spec("pydicom") is None, reason="pydicom is not installed")
def test_a_deflated_dicom_that_inflates_past_the_upload_cap_is_refused(explainer, monkeypatch):
    """pydicom inflates a deflated data set whole, unbounded: 60 KB here would become 64 MB."""
    import pydicom.filereader

    bomb = dicom_bytes(8000, 8000, deflated=True)
    assert len(bomb) < 200_000
    inflated = []
    real = zlib.decompress
    monkeypatch.setattr(pydicom.filereader.zlib, "decompress",
                        lambda *args, **kwargs: inflated.append(1) or real(*args, **kwargs))
    with make_client(explainer, max_upload_bytes=1024 * 1024) as small:
        response = small.post("/api/predict", files=parts(("bomb.dcm", bomb)))
        assert response.status_code == 413
        assert response.json()["detail"] == "bomb.dcm: a deflated DICOM that inflates to more than the 1 MB upload " \
                                            "limit (see --max-upload-mb)"
        assert inflated == []
        fine = dicom_bytes(300, 400, deflated=True)
        assert small.post("/api/predict", files=parts(("fine.dcm", fine))).status_code == 200


# --- Host and Origin -----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://evil.example", "http://127.0.0.1:8001", "https://127.0.0.1:8000",
                                   "null", "http://127.0.0.1:8000/path", "http://localhost.evil:8000"])
def test_cross_origin_api_requests_are_refused_with_403(client, explainer, monkeypatch, origin):
    spy = Spy(explainer, monkeypatch)
    response = client.post("/api/predict", files=parts(("a.png", xray())), headers={"origin": origin})
    assert response.status_code == 403
    assert response.json()["detail"].startswith("cross-origin request refused")
    assert spy.events == []


@pytest.mark.parametrize("origin", [None, "http://127.0.0.1:8000", "http://localhost:8000"])
def test_same_origin_and_origin_less_requests_pass(client, origin):
    headers = {"origin": origin} if origin else {}
    assert client.post("/api/predict", files=parts(("a.png", xray())), headers=headers).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1:8001", "127.0.0.1",
                                  "attacker.127.0.0.1.nip.io:8000", "", "127.0.0.1:8000:8000"])
def test_a_foreign_host_header_is_refused_on_every_path(explainer, host):
    """DNS rebinding: a page of evil.example, its name re-pointed at 127.0.0.1, sends Host evil.example."""
    with make_client(explainer) as test_client:
        for method, path in (("GET", "/"), ("GET", "/healthz"), ("GET", "/openapi.json"), ("POST", "/api/predict")):
            response = test_client.request(method, path, headers={"host": host})
            assert response.status_code == 403, (method, path)
            assert response.json()["detail"].startswith("refused: Host")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000"])
def test_the_bound_address_and_localhost_are_accepted(client, host):
    assert client.get("/healthz", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host, port, good, bad", [
    ("127.0.0.1", 8000, ["127.0.0.1:8000", "localhost:8000"], ["[::1]:8000", "evil.example:8000", "127.0.0.1:80"]),
    ("::1", 9000, ["[::1]:9000", "localhost:9000"], ["127.0.0.1:9000", "[::1]:9001", "::1:9000"]),
    ("localhost", 8000, ["localhost:8000", "127.0.0.1:8000", "[::1]:8000"], ["evil.example:8000"]),
    ("192.168.1.20", 8000, ["192.168.1.20:8000"], ["localhost:8000", "127.0.0.1:8000", "evil.example:8000"]),
    ("0.0.0.0", 8000, ["192.168.1.20:8000", "10.0.0.1:8000", "localhost:8000", "[fe80::1]:8000"],
     ["evil.example:8000", "192.168.1.20:8001"]),
    ("127.0.0.1", 80, ["127.0.0.1", "127.0.0.1:80", "localhost"], ["127.0.0.1:8000"]),
])
def test_allowed_hosts_follow_the_bound_address(host, port, good, bad):
    from batchcam.serving.guard import allowed_hosts_for, host_allowed

    allowed = allowed_hosts_for(host, port)
    assert [h for h in good if not host_allowed(h, allowed)] == []
    assert [h for h in bad if host_allowed(h, allowed)] == []


def test_allowed_hosts_is_a_parameter_of_the_app(explainer):
    from fastapi.testclient import TestClient

    from batchcam.commands.serve import create_app

    app = create_app(explainer, allowed_hosts=("myhost.example:9000",))
    with TestClient(app, base_url="http://myhost.example:9000") as test_client:
        assert test_client.get("/healthz").status_code == 200
        assert test_client.get("/healthz", headers={"host": HOST}).status_code == 403
        ok = test_client.post("/api/predict", files=parts(("a.png", xray())),
                              headers={"origin": "http://myhost.example:9000"})
        assert ok.status_code == 200


# --- docs pages ----------------------------------------------------------------------------------


def test_no_docs_pages_that_load_from_a_cdn_but_the_schema_stays(client):
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json")
    assert schema.status_code == 200 and "/api/predict" in schema.json()["paths"]
    assert "403" in schema.json()["paths"]["/api/predict"]["post"]["responses"]


# --- option validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--max-upload-mb", "inf"], "--max-upload-mb must be a finite number, got inf"),
    (["--max-upload-mb", "nan"], "--max-upload-mb must be a finite number, got nan"),
    (["--max-upload-mb", "1e-9"], "--max-upload-mb must be at least 1 (MB), got 1e-09"),
    (["--max-upload-mb", "0.5"], "--max-upload-mb must be at least 1 (MB), got 0.5"),
    (["--max-upload-mb", "5000"], "--max-upload-mb must be at most 4096 (MB), got 5000"),
    (["--max-upload-mb", "-3"], "--max-upload-mb must be more than 0, got -3"),
])
def test_bad_upload_caps_exit_2_before_binding(extra, message, capsys, monkeypatch):
    import uvicorn

    def no_serving(*args, **kwargs):
        raise AssertionError("serve got past validation")

    monkeypatch.setattr(uvicorn, "run", no_serving)  # a cap accepted by mistake must not serve for ever
    assert main(["serve", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    ({"max_upload_mb": float("inf")}, "--max-upload-mb must be a finite number, got inf"),
    ({"max_upload_mb": 1e-9}, "--max-upload-mb must be at least 1 (MB), got 1e-09"),
    ({"max_files": 0}, "--max-files must be at least 1, got 0"),
    ({"max_files": 1025}, "--max-files must be at most 1024, got 1025"),
    ({"max_files": 2.5}, "--max-files must be a whole number, got 2.5"),
    ({"max_megapixels": 0.5}, "--max-megapixels must be at least 1 (megapixels), got 0.5"),
    ({"max_megapixels": float("inf")}, "--max-megapixels must be a finite number, got inf"),
    ({"max_megapixels": 5000}, "--max-megapixels must be at most 4096 (megapixels), got 5000"),
    ({"max_concurrent_requests": 0}, "--max-concurrent-requests must be at least 1, got 0"),
    ({"max_concurrent_requests": 65}, "--max-concurrent-requests must be at most 64, got 65"),
])
def test_serve_config_refuses_limits_out_of_range(fields, message):
    from batchcam.config import ServeConfig
    from batchcam.errors import UsageError

    with pytest.raises(UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ServeConfig(**fields).validate()


def test_serve_config_limits_reach_the_app(tiny_model, monkeypatch):
    import uvicorn

    from batchcam.commands.serve import serve
    from batchcam.config import ServeConfig
    from batchcam.runtime.console import Console

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: apps.append(app))
    config = ServeConfig(model=tiny_model, port=8123, max_upload_mb=2, max_files=3, max_megapixels=7,
                         max_concurrent_requests=5)
    assert config.max_pixels_per_request == 7_000_000
    assert serve(config, Console()) == 0
    from fastapi.testclient import TestClient

    with TestClient(apps[0], base_url="http://localhost:8123") as test_client:
        health = test_client.get("/healthz").json()
    assert (health["max_upload_bytes"], health["max_files"], health["max_pixels_per_request"],
            health["max_concurrent_requests"]) == (2 * 1024 * 1024, 3, 7_000_000, 5)


def test_the_cli_limits_reach_the_app_and_bad_ones_exit_2(tiny_model, monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: apps.append(app))
    assert main(["serve", "--model", str(tiny_model), "--max-files", "3", "--max-megapixels", "7",
                 "--max-upload-mb", "2", "--max-concurrent-requests", "6"]) == 0
    with TestClient(apps[0], base_url=f"http://{HOST}") as test_client:
        health = test_client.get("/healthz").json()
    assert (health["max_upload_bytes"], health["max_files"], health["max_pixels_per_request"],
            health["max_concurrent_requests"]) == (2 * 1024 * 1024, 3, 7_000_000, 6)
    capsys.readouterr()
    for extra, message in ((["--max-files", "0"], "--max-files must be at least 1, got 0"),
                           (["--max-megapixels", "inf"], "--max-megapixels must be a finite number, got inf"),
                           (["--max-concurrent-requests", "0"], "--max-concurrent-requests must be at least 1")):
        assert main(["serve", "--model", str(tiny_model), *extra]) == 2
        assert message in capsys.readouterr().err
    assert len(apps) == 1


# --- the server's memory under hostile requests (a real process) --------------------------------


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_serve_memory", REPO / "benchmarks" / "bench_serve_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak RSS")
def test_peak_memory_of_a_real_server_stays_under_2_gb_under_hostile_requests():
    """``python -m batchcam serve`` gets 100,000, 1,000 and 200 parts, the 9400x9400 float TIFF,
    the largest images the defaults accept (and a colour DICOM too large), then a normal request
    of 3 X-ray-like images: the benchmark's requests, all of those this machine can make."""
    bench = load_benchmark()
    assert len(bench.float_tiff()) < 1024 * 1024  # the bomb is small on the wire
    names = bench.available()
    assert {"parts1000", "parts200", "tiff", "float-max", "rgb-max"} <= set(names) and names[-1] == "normal"
    with tempfile.TemporaryFile("w+") as log:
        try:
            outcomes, figures = bench.run(names, log)
        except RuntimeError as e:
            log.seek(0)
            pytest.fail(f"{e}\n{log.read()[-4000:]}")
    print("\n" + bench.table(outcomes, figures))
    refused = {"parts100000", "parts1000", "parts200", "tiff", "dicom-rgb-over"}
    assert {name: o.status for name, o in zip(names, outcomes)} == \
        {name: 413 if name in refused else 200 for name in names}, bench.table(outcomes, figures)
    assert outcomes[-1].detail == "3 results"
    assert figures["alive"]
    assert figures["peak_rss_mb"] < MEMORY_BOUND_MB, bench.table(outcomes, figures)


@pytest.mark.slow
def test_a_real_server_answers_its_own_page_and_refuses_foreign_hosts_and_origins():
    """What a browser sends: the page's own POST carries Origin http://127.0.0.1:PORT (allowed);
    a page elsewhere sends its own Origin, and a DNS-rebinding page its own name as Host."""
    bench = load_benchmark()
    port = bench.free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = bench.start_server(port, log)
        try:
            bench.wait_until_healthy(port, process)
            body, content_type = bench.multipart([("a.png", xray())])
            own = f"http://127.0.0.1:{port}"

            def post(**headers):
                return bench.request(port, "POST", "/api/predict", body, {"Content-Type": content_type, **headers})

            assert post(Origin=own)[0] == 200
            assert post(Origin=f"http://localhost:{port}", Host=f"localhost:{port}")[0] == 200
            status, answer = post(Origin="http://evil.example")
            assert status == 403 and json.loads(answer)["detail"].startswith("cross-origin request refused")
            status, answer = bench.request(port, "GET", "/", headers={"Host": f"evil.example:{port}"})
            assert status == 403 and json.loads(answer)["detail"].startswith("refused: Host 'evil.example")
            assert post(Host=f"evil.example:{port}")[0] == 403
            assert bench.request(port, "GET", "/docs")[0] == 404
            assert bench.request(port, "GET", "/openapi.json")[0] == 200
        finally:
            bench.stop_server(process)


def start_upload(port: int, body: bytes, content_type: str) -> http.client.HTTPConnection:
    """A POST whose headers and first half of the body are sent; the rest waits for finish_upload."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.putrequest("POST", "/api/predict")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    connection.send(body[:len(body) // 2])
    return connection


def finish_upload(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
    connection.send(body[len(body) // 2:])
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc for the peak RSS")
def test_a_real_server_answers_uploads_beyond_its_concurrent_limit_with_503_and_stays_under_2_gb():
    """The tester's attack: 24 uploads of 48 MB at once. The default limit's requests hold their
    slots while their bodies are half sent; the 20 others, sent at once, are each answered 503
    with Retry-After; then the held ones finish and each gets its result. The server's peak RSS
    stays under the README's 2 GB (24 such uploads at once took it to 2.3 GB before the limit)."""
    bench = load_benchmark()
    body, content_type = bench.multipart([bench.large_upload()])
    port = bench.free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = bench.start_server(port, log)
        held: list[http.client.HTTPConnection] = []
        try:
            bench.wait_until_healthy(port, process)

            def health() -> dict:
                return json.loads(bench.request(port, "GET", "/healthz")[1])

            limit = health()["max_concurrent_requests"]
            assert limit == 4
            bench.reset_peak(process.pid)
            held = [start_upload(port, body, content_type) for _ in range(limit)]
            wait_until(lambda: health()["busy_requests"] == limit, f"{limit} uploads hold the slots")
            refused = bench.send_at_once(port, body, content_type, 24 - limit)
            finished = [finish_upload(connection, body) for connection in held]
            peak_mb = (bench.status_kb(process.pid, "VmHWM") or 0) / 1024
            alive = process.poll() is None
        except RuntimeError as e:
            log.seek(0)
            pytest.fail(f"{e}\n{log.read()[-4000:]}")
        finally:
            for connection in held:
                connection.close()
            bench.stop_server(process)
    assert [status for status, _, _ in refused] == [503] * 20
    assert [headers.get("retry-after") for _, headers, _ in refused] == ["2"] * 20
    assert [status for status, _ in finished] == [200] * limit
    assert [[r["status"] for r in answer["results"]] for _, answer in finished] == [["ok"]] * limit
    assert alive
    assert 0 < peak_mb < MEMORY_BOUND_MB
