"""``batchcam serve``: upload-and-test in a browser, on a small local web app.

The model is loaded once, before the server starts, and shared by every request through
``explain.Explainer`` (whose lock serialises the forward pass). Uploads never touch the disk:
the body is parsed in memory as it arrives, under a size cap (Starlette's own form parser would
spool any file over 1 MB to a temporary file), and overlays go back inline as data URLs.

What one request may cost is bounded before any pixel is decoded (serving/uploads.py), and so is
the number of requests in the decoding stage at once (``--max-concurrent-requests``; one more
gets 503 with Retry-After), so memory does not grow with the number of clients either. Files are
decoded one at a time server-wide and go through the model in batches of at most ``BATCH_SIZE``,
decoded batch by batch, so memory does not grow with the number of files. After each request the
memory it freed goes back to the operating system (``release_freed_memory``): without that, glibc
keeps what the busiest moment needed for the server's whole life. With the defaults, the server's
peak memory is bounded whatever a request holds (benchmarks/bench_serve_memory.py measures it;
benchmarks/RESULTS.md has the figures).

Every request must name this server in its Host header, and the API answers only this server's own
page (serving/guard.py).

FastAPI, uvicorn and python-multipart come with the optional ``serve`` extra and are imported only
here, so ``scan`` and ``predict`` never need them.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# at run time, and their types are imported inside create_app (the extra is optional).
import threading
from typing import TYPE_CHECKING

from batchcam.config import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    MEGABYTE,
    MEGAPIXEL,
    ServeConfig,
    default_concurrent_requests,
)
from batchcam.decode.dataset import Sample
from batchcam.errors import UsageError
from batchcam.model.checkpoint import load_model
from batchcam.resources import templates_dir
from batchcam.runtime.allocator import release_freed_memory
from batchcam.runtime.console import Console
from batchcam.runtime.devices import resolve_device
from batchcam.serving.explain import Explainer, Explanation, jpeg_data_url
from batchcam.serving.guard import RequestGuard, allowed_hosts_for, is_loopback
from batchcam.serving.uploads import (
    BATCH_SIZE,
    RETRY_AFTER_SECONDS,
    UPLOAD_FIELD,
    Limits,
    RequestSlots,
    UploadRejected,
    check_pixels,
    discard_rest,
    image_extent,
    read_uploads,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

STATIC_FILES = {"serve.js": "text/javascript; charset=utf-8", "serve.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere and shows overlays from data URLs.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REQUEST_BODY_SCHEMA = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [UPLOAD_FIELD],
        "properties": {UPLOAD_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                      "description": "one or more X-ray files (JPEG, PNG, BMP, TIFF; "
                                                     "DICOM with the dicom extra)"}},
    }}},
}


def serve(config: ServeConfig, console: Console) -> int:
    """Load the model, then serve until interrupted; raises UsageError/CheckpointError before binding."""
    config.validate()
    require_serve_extra()
    import uvicorn

    device = resolve_device(config.device)
    explainer = Explainer(load_model(config.model, console.warn), device, selection=config.selection)
    app = create_app(explainer, config.max_upload_bytes, max_files=config.max_files,
                     max_pixels_per_request=config.max_pixels_per_request,
                     allowed_hosts=allowed_hosts_for(config.host, config.port),
                     max_concurrent_requests=config.concurrent_requests)
    if not is_loopback(config.host):
        console.warn(f"serving on {config.host}, not a loopback address: anyone who can reach this machine "
                     "can upload images and read predictions (there is no authentication)")
    console.info(f"batchcam: serving {explainer.loaded.path.name} on {device} at "
                 f"http://{_url_host(config.host)}:{config.port}/ (OpenAPI schema at /openapi.json; a request "
                 f"may hold {config.max_files} files, {config.max_upload_mb:g} MB, {config.max_megapixels:g} "
                 f"megapixels; {config.concurrent_requests} requests are decoded at once, more get 503); Ctrl-C stops")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind (port taken, address not local)
        if e.code:
            raise UsageError(f"cannot serve on {config.host}:{config.port} (see uvicorn's error above)") from None
    return 0


def require_serve_extra() -> None:
    missing = [name for name, module in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart")) if not _importable(module)]
    if missing:
        raise UsageError(f"serve needs the 'serve' extra (missing: {', '.join(missing)}): "
                         "pip install 'batchcam[serve]'")


DEFAULT_ALLOWED_HOSTS = allowed_hosts_for(ServeConfig.host, ServeConfig.port)


# --- the app -----------------------------------------------------------------------------------


def create_app(explainer: Explainer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MEGABYTE, *,
               max_files: int = DEFAULT_MAX_FILES, max_pixels_per_request: int = DEFAULT_MAX_MEGAPIXELS * MEGAPIXEL,
               allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS, batch_size: int = BATCH_SIZE,
               max_concurrent_requests: int = default_concurrent_requests(DEFAULT_MAX_UPLOAD_MB)) -> "FastAPI":
    """The web app around an already loaded model: the page, ``POST /api/predict`` and ``/healthz``.

    ``allowed_hosts``: the ``host:port`` values requests must name in Host (and in Origin, when they
    carry one), as ``allowed_hosts_for`` derives them from the bound address.
    """
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.background import BackgroundTask

    from batchcam import __version__

    limits = Limits(max_upload_bytes, max_files, max_pixels_per_request, batch_size)
    slots = RequestSlots(max_concurrent_requests)
    decode_lock = threading.Lock()  # one full-resolution image in memory at a time, server-wide
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN. /openapi.json stays.
    app = FastAPI(title="batchcam", version=__version__, docs_url=None, redoc_url=None,
                  description=f"Chest X-ray prediction ({'/'.join(explainer.class_names)}) with a Grad-CAM overlay. "
                              "Uploads are processed in memory and never written to disk.")
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    page = (templates_dir() / "serve.html").read_text(encoding="utf-8")
    static = {name: (templates_dir() / name).read_bytes() for name in STATIC_FILES}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            return JSONResponse({"detail": "not found"}, status_code=404)
        return Response(static[name], media_type=STATIC_FILES[name])

    @app.get("/healthz", summary="the loaded model, the device and the request limits")
    def healthz() -> dict:
        return {"status": "ok", "model": explainer.describe(), "device": str(explainer.device),
                "max_upload_bytes": limits.max_upload_bytes, "max_files": limits.max_files,
                "max_pixels_per_request": limits.max_pixels, "max_concurrent_requests": slots.limit,
                "busy_requests": slots.busy}

    @app.post("/api/predict", summary="predict and explain one or more uploaded X-rays",
              openapi_extra={"requestBody": REQUEST_BODY_SCHEMA},
              responses={200: {"description": "one result per file, in upload order: file, prediction, confidence, "
                                     "probabilities, cam_target, cam_peak_x/y, width, height, sha256, and the "
                                     "overlay and the original as JPEG data URLs"},
                         400: {"description": "not multipart, no file, or a file that is not an image"},
                         403: {"description": "a Host that is not this server's address, or a cross-origin call"},
                         413: {"description": "more than --max-upload-mb, more than --max-files files, or more "
                                              "pixels than --max-megapixels allows"},
                         503: {"description": "--max-concurrent-requests requests are being decoded: retry after "
                                              "the seconds the Retry-After header gives"}})
    async def predict(request: Request) -> JSONResponse:
        """Every file must be an image; results come back in upload order with inline JPEG overlays."""
        if not slots.take():
            await discard_rest(request.stream(), limits.max_upload_bytes)  # the answer, not a reset connection
            return JSONResponse({"detail": slots.busy_reason()}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        try:
            answer = await explained(request)
        finally:
            slots.give_back()
        answer.background = BackgroundTask(release_freed_memory)  # once the answer is sent
        return answer

    async def explained(request: Request) -> JSONResponse:
        try:
            uploads = await read_uploads(request, limits)
            results = await run_in_threadpool(explain_uploads, explainer, uploads, limits, decode_lock)
        except UploadRejected as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        return JSONResponse({"model": {"name": explainer.loaded.path.name, "sha256": explainer.loaded.sha256,
                                       "demo": explainer.loaded.demo},
                             "results": results})

    return app


# --- reading the upload ------------------------------------------------------------------------


def explain_uploads(explainer: Explainer, uploads: list[tuple[str, bytes]], limits: Limits,
                    decode_lock: "threading.Lock | None" = None) -> list[dict]:
    """The JSON results of every upload, in order.

    First every header is read and the pixel limits are checked (no pixel decoded yet); a file
    whose header cannot be read is decoded at once (it fails as fast) so that a request with a
    non-image costs no model time. Then the files are decoded batch by batch, one at a time under
    ``decode_lock``, each batch explained before the next is decoded. A file that fails only when
    decoded (a truncated image, say) still refuses the whole request (400), after the batches before
    it went through the model.
    """
    lock = decode_lock or threading.Lock()
    extents = []
    for name, data in uploads:
        with lock:
            extents.append(image_extent(name, data, limits.max_upload_bytes))
    check_pixels(uploads, extents, limits)
    decoded: dict[int, Sample] = {}
    for index, extent in enumerate(extents):
        if extent is None:
            with lock:
                decoded[index] = explainer.decode(*uploads[index])
    refuse_bad(list(decoded.values()))
    results = []
    for start in range(0, len(uploads), limits.batch_size):
        samples = []
        for index in range(start, min(start + limits.batch_size, len(uploads))):
            if index not in decoded:
                with lock:
                    decoded[index] = explainer.decode(*uploads[index])
            samples.append(decoded.pop(index))
        refuse_bad(samples)
        results += [result_json(explanation) for explanation in explainer.explain(samples)]
    return results


def refuse_bad(samples: list[Sample]) -> None:
    bad = [f"{sample.relpath}: {sample.error}" for sample in samples if sample.error]
    if bad:
        raise UploadRejected(400, "; ".join(bad))


def result_json(explanation: Explanation) -> dict:
    """A file's JSON result; a skipped file (not scored: no image) has its reason and no images."""
    rendered = explanation.rendered
    if rendered is None:
        return {**explanation.as_dict(), "overlay": None, "original": None}
    return {**explanation.as_dict(), "overlay": jpeg_data_url(rendered.overlay_jpeg),
            "original": jpeg_data_url(rendered.original_jpeg)}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
