"""How much memory does `batchcam serve` take under hostile requests? Peak RSS per request.

    python benchmarks/bench_serve_memory.py                  # the demo model on the CPU
    python benchmarks/bench_serve_memory.py --only normal,tiff

Starts ``python -m batchcam serve --device cpu`` on a free loopback port (the bundled demo model),
then sends, one after the other:
  0. 100,000 empty file parts in one request (a 15 MB body);
  1. 1,000 PNG parts of 1x1 px in one request (a 211 KB body);
  2. 200 such parts (42 KB);
  3. one 9400x9400 float TIFF, deflated: about 0.6 MB on the wire, 88 megapixels of 32-bit floats;
  4. the largest images the defaults accept: a float TIFF and a 16-bit DICOM of 5000x5000 (25
     megapixels, a quarter of --max-megapixels), a colour DICOM of 2886x2886 (a third of that
     again), an 8-bit RGB PNG of 9400x9400 (Pillow's own limit is 89 megapixels); and a colour
     DICOM of 5000x5000, refused (the DICOM ones need pydicom, and pylibjpeg-rle for RLE);
  5. a normal request: 3 small X-ray-like PNGs (batchcam.synthetic).
Before each request the server's peak RSS (``VmHWM``) is reset through ``/proc/PID/clear_refs``, so
each row shows the peak during that request (what earlier requests left allocated included); the
last line gives the RSS after start-up and the highest of those peaks. Prints a markdown table.
tests/e2e/test_serve_limits.py runs the same requests (marked slow) and asserts the
bound the README states (under 2 GB).

    python benchmarks/bench_serve_memory.py --concurrent 24

Concurrent uploads instead: 24 clients send one large upload each at the same moment (a 16-bit
DX film of 5000x5000, 47.7 MB, the largest the defaults accept; a PNG of noise without pydicom),
once to a server whose --max-concurrent-requests is 24 (no request waits: no limit in effect) and
once to one with the default limit. Per server: the answers (200, or 503 with Retry-After), the
server's peak RSS over the burst and its RSS after the last answer (and 5 s later).
tests/e2e/test_serve_limits.py fires concurrent uploads beyond the limit (marked slow).
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIFF_SIDE = 9400
START_TIMEOUT = 180.0   # seconds for the server to load the model and answer /healthz
REQUEST_TIMEOUT = 300.0


@dataclass
class Attack:
    name: str
    files: Callable[[], list[tuple[str, bytes]]]


@dataclass
class Outcome:
    name: str
    status: int
    seconds: float
    peak_rss_mb: float | None   # this request's peak, or the run's so far when it cannot be reset
    body_kb: float
    detail: str


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tiny_pngs(count: int) -> list[tuple[str, bytes]]:
    pixel = png_bytes(Image.new("L", (1, 1), 128))
    return [(f"p{i:05d}.png", pixel) for i in range(count)]


def float_tiff(side: int = TIFF_SIDE) -> bytes:
    """A side x side mode "F" TIFF of zeros, deflated: tiny on the wire, 4 bytes a pixel decoded."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.float32), mode="F").save(
        buffer, format="TIFF", compression="tiff_deflate")
    return buffer.getvalue()


def secondary_capture(side: int, samples: int, photometric: str, bits: int, pixels: np.ndarray,
                      syntax: str | None = None, modality: str | None = None) -> bytes:
    """A side x side DICOM (needs pydicom; RLE also the pylibjpeg-rle encoder); without ``modality``
    serve's default selection skips it (HTTP 200, "skipped") without decoding its pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, min(bits, 12), min(bits, 12) - 1, 0
    ds.PixelData = pixels.tobytes()
    if modality is not None:
        ds.Modality = modality
    if syntax is not None:
        ds.compress(syntax, pixels, encoding_plugin="pylibjpeg")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom16(side: int, modality: str | None = None) -> bytes:
    """A side x side 16-bit MONOCHROME2 DICOM, uncompressed."""
    pixels = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16).reshape(side, side)
    return secondary_capture(side, 1, "MONOCHROME2", 16, pixels, modality=modality)


def dicom_rgb_rle(side: int) -> bytes:
    """A side x side RGB DICOM, RLE Lossless: colour DICOM costs the most memory a pixel to decode
    (a float64 luma conversion)."""
    from pydicom.uid import RLELossless

    return secondary_capture(side, 3, "RGB", 8, np.zeros((side, side, 3), dtype=np.uint8), RLELossless)


def xray_pngs(count: int = 3) -> list[tuple[str, bytes]]:
    from batchcam.synthetic import generate

    labels = ("NORMAL", "PNEUMONIA")
    return [(f"xray{i}.png", png_bytes(generate(i, labels[i % 2], (640, 512)).image)) for i in range(count)]


ATTACKS = {
    "parts100000": Attack("100,000 empty parts", lambda: [(f"{i}.png", b"") for i in range(100_000)]),
    "parts1000": Attack("1,000 PNG parts of 1x1 px", lambda: tiny_pngs(1000)),
    "parts200": Attack("200 PNG parts of 1x1 px", lambda: tiny_pngs(200)),
    "tiff": Attack(f"{TIFF_SIDE}x{TIFF_SIDE} deflated float TIFF", lambda: [("bomb.tif", float_tiff())]),
    # The largest images serve's defaults accept: 16/32-bit and DICOM images decode through 64-bit
    # floats, so one may hold a quarter of --max-megapixels (25 of 100 megapixels).
    "float-max": Attack("largest float TIFF accepted: 5000x5000", lambda: [("max.tif", float_tiff(5000))]),
    "dicom-max": Attack("largest DICOM accepted: 5000x5000, 16-bit", lambda: [("max.dcm", dicom16(5000))]),
    "dicom-rgb-max": Attack("largest colour DICOM accepted: 2886x2886 RGB, RLE",
                            lambda: [("rgb.dcm", dicom_rgb_rle(2886))]),
    "dicom-rgb-over": Attack("colour DICOM refused: 5000x5000 RGB, RLE", lambda: [("rgb.dcm", dicom_rgb_rle(5000))]),
    "rgb-max": Attack("largest 8-bit image accepted: 9400x9400 RGB PNG",
                      lambda: [("rgb.png", png_bytes(Image.new("RGB", (9400, 9400))))]),
    "normal": Attack("normal: 3 X-ray-like PNGs of 640x512", xray_pngs),
}


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = bytearray()
    for name, data in files:
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n").encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "batchcam", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", *extra]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def wait_until_healthy(port: int, process: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode} before answering /healthz")
        try:
            status, _ = request(port, "GET", "/healthz", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"serve did not answer /healthz within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    status, _, answer = request_with_headers(port, method, path, body, headers, timeout)
    return status, answer


def request_with_headers(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                         timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def status_kb(pid: int, field: str) -> int | None:
    """VmHWM (peak RSS) or VmRSS of a process, in kB; None where /proc does not say."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Linux resets a process's VmHWM to its current RSS when "5" is written to clear_refs."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def send(port: int, pid: int, attack: Attack) -> Outcome:
    body, content_type = multipart(attack.files())
    reset_peak(pid)
    started = time.perf_counter()
    status, answer = request(port, "POST", "/api/predict", body, {"Content-Type": content_type})
    seconds = time.perf_counter() - started
    peak = status_kb(pid, "VmHWM")
    try:
        parsed = json.loads(answer)
        detail = parsed.get("detail") or f"{len(parsed.get('results', []))} results"
    except (ValueError, AttributeError):
        detail = answer[:120].decode("utf-8", "replace")
    return Outcome(attack.name, status, seconds, peak / 1024 if peak is not None else None, len(body) / 1024,
                   str(detail)[:160])


def run(names: list[str], log, extra: tuple[str, ...] = ()) -> tuple[list[Outcome], dict]:
    """Start a server, send the chosen attacks in order, stop it; the outcomes and the run's figures."""
    port = free_port()
    process = start_server(port, log, extra)
    try:
        wait_until_healthy(port, process)
        started_kb = status_kb(process.pid, "VmRSS")
        outcomes = [send(port, process.pid, ATTACKS[name]) for name in names]
        # Since clear_refs resets VmHWM, the run's peak is the largest per-request peak (or the
        # start-up RSS); without clear_refs, VmHWM never went down and is the run's peak itself.
        peaks = [o.peak_rss_mb for o in outcomes if o.peak_rss_mb is not None]
        figures = {"pid": process.pid, "rss_after_start_mb": (started_kb or 0) / 1024,
                   "peak_rss_mb": max(peaks + [(started_kb or 0) / 1024]), "alive": process.poll() is None}
    finally:
        stop_server(process)
    return outcomes, figures


# --- concurrent uploads --------------------------------------------------------------------------


CONCURRENT_SETTLE_SECONDS = 5.0


@dataclass
class Burst:
    """What a server did with N uploads sent at once."""

    label: str
    statuses: list[int]
    retry_after: list[str | None]   # the Retry-After header of each answer
    results: list[int]              # results in each answer's JSON (0 for a refusal)
    seconds: float
    rss_after_start_mb: float
    peak_rss_mb: float
    rss_after_mb: float             # right after the last answer
    rss_settled_mb: float           # CONCURRENT_SETTLE_SECONDS later

    def count(self, status: int) -> int:
        return self.statuses.count(status)


def large_upload() -> tuple[str, bytes]:
    """The largest upload the defaults accept in bytes: a 5000x5000 16-bit DX film (47.7 MB,
    decoded through 64-bit floats), or without pydicom a 7000x7000 8-bit PNG of noise (47 MB)."""
    if importlib.util.find_spec("pydicom") is not None:
        return "large.dcm", dicom16(5000, modality="DX")
    noise = np.random.default_rng(0).integers(0, 256, (7000, 7000), dtype=np.uint8)
    return "large.png", png_bytes(Image.fromarray(noise))


def send_at_once(port: int, body: bytes, content_type: str, clients: int) -> list[tuple[int, dict, bytes]]:
    """``clients`` threads POST the same body, released together by a barrier; answers in client order."""
    answers: list[tuple[int, dict, bytes] | None] = [None] * clients
    start = threading.Barrier(clients)

    def client(index: int) -> None:
        start.wait()
        try:
            answers[index] = request_with_headers(port, "POST", "/api/predict", body, {"Content-Type": content_type})
        except OSError as e:
            answers[index] = (0, {}, str(e).encode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def result_count(answer: bytes) -> int:
    try:
        return len(json.loads(answer).get("results", []))
    except (ValueError, AttributeError):
        return 0


def burst(label: str, clients: int, upload: tuple[str, bytes], log, extra: tuple[str, ...] = ()) -> Burst:
    """Start a server with ``extra`` arguments, send ``clients`` copies of ``upload`` at once, stop it."""
    body, content_type = multipart([upload])
    port = free_port()
    process = start_server(port, log, extra)
    try:
        wait_until_healthy(port, process)
        started_kb = status_kb(process.pid, "VmRSS") or 0
        reset_peak(process.pid)
        started = time.perf_counter()
        answers = send_at_once(port, body, content_type, clients)
        seconds = time.perf_counter() - started
        peak_kb, after_kb = status_kb(process.pid, "VmHWM") or 0, status_kb(process.pid, "VmRSS") or 0
        time.sleep(CONCURRENT_SETTLE_SECONDS)
        settled_kb = status_kb(process.pid, "VmRSS") or 0
    finally:
        stop_server(process)
    return Burst(label, [a[0] for a in answers], [a[1].get("retry-after") for a in answers],
                 [result_count(a[2]) for a in answers], seconds, started_kb / 1024, peak_kb / 1024, after_kb / 1024,
                 settled_kb / 1024)


def burst_table(bursts: list[Burst], clients: int, upload: tuple[str, bytes]) -> str:
    name, data = upload
    lines = [f"{clients} concurrent uploads of one {name} ({len(data) / 2**20:.1f} MB) each.\n",
             "| server | 200 (with results) | 503 (with Retry-After) | other | seconds | RSS after start-up (MB) | "
             "peak RSS (MB) | RSS after the requests (MB) | 5 s later (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in bursts:
        with_results = sum(1 for status, n in zip(b.statuses, b.results) if status == 200 and n == 1)
        with_retry = sum(1 for status, retry in zip(b.statuses, b.retry_after) if status == 503 and retry)
        other = len(b.statuses) - b.count(200) - b.count(503)
        lines.append(f"| {b.label} | {b.count(200)} ({with_results}) | {b.count(503)} ({with_retry}) | {other} | "
                     f"{b.seconds:.1f} | {b.rss_after_start_mb:.0f} | {b.peak_rss_mb:.0f} | {b.rss_after_mb:.0f} | "
                     f"{b.rss_settled_mb:.0f} |")
    return "\n".join(lines)


def table(outcomes: list[Outcome], figures: dict) -> str:
    lines = ["| request | body | HTTP status | seconds | peak RSS (MB) | answer |",
             "|---|---:|---:|---:|---:|---|"]
    for o in outcomes:
        peak = f"{o.peak_rss_mb:.0f}" if o.peak_rss_mb is not None else "n/a"
        lines.append(f"| {o.name} | {o.body_kb:.0f} KB | {o.status} | {o.seconds:.2f} | {peak} | "
                     f"{o.detail.replace('|', '/')} |")
    lines.append(f"\nRSS after start-up {figures['rss_after_start_mb']:.0f} MB; "
                 f"peak RSS over the run {figures['peak_rss_mb']:.0f} MB.")
    return "\n".join(lines)


def available() -> list[str]:
    """The requests this machine can make: the DICOM ones need pydicom (and pylibjpeg-rle for RLE)."""
    has = {module: importlib.util.find_spec(module) is not None for module in ("pydicom", "rle")}
    needs = {"dicom-max": ("pydicom",), "dicom-rgb-max": ("pydicom", "rle"), "dicom-rgb-over": ("pydicom", "rle")}
    return [name for name in ATTACKS if all(has[module] for module in needs.get(name, ()))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(available()),
                        help=f"comma-separated requests to send, in order (default: {','.join(available())})")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for `batchcam serve` (repeat for several)")
    parser.add_argument("--concurrent", type=int, default=None, metavar="N",
                        help="instead of the requests above: N concurrent large uploads, without and with the "
                        "default --max-concurrent-requests")
    args = parser.parse_args(argv)
    if args.concurrent is not None:
        return main_concurrent(args.concurrent, tuple(args.serve_arg))
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown:
        parser.error(f"unknown requests {unknown}; choose from {', '.join(ATTACKS)}")
    with tempfile.TemporaryFile("w+") as log:
        try:
            outcomes, figures = run(names, log, tuple(args.serve_arg))
        except (RuntimeError, OSError) as e:
            log.seek(0)
            print(f"bench_serve_memory: {e}\n{log.read()[-4000:]}", file=sys.stderr)
            return 1
    print(f"batchcam serve, demo model, --device cpu; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}\n")
    print(table(outcomes, figures))
    return 0


def main_concurrent(clients: int, extra: tuple[str, ...]) -> int:
    upload = large_upload()
    servers = [(f"--max-concurrent-requests {clients} (no limit in effect)",
                ("--max-concurrent-requests", str(clients))), ("default --max-concurrent-requests", ())]
    bursts = []
    with tempfile.TemporaryFile("w+") as log:
        try:
            for label, arguments in servers:
                bursts.append(burst(label, clients, upload, log, (*arguments, *extra)))
        except (RuntimeError, OSError) as e:
            log.seek(0)
            print(f"bench_serve_memory: {e}\n{log.read()[-4000:]}", file=sys.stderr)
            return 1
    print(f"batchcam serve, demo model, --device cpu{' ' + ' '.join(extra) if extra else ''}; {os.cpu_count()} "
          f"CPUs; Python {sys.version.split()[0]}\n")
    print(burst_table(bursts, clients, upload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
