"""``batchcam serve``: upload-and-test in a browser, on a small local web app.

The model is loaded once, before the server starts, and shared by every request through
``explain.Explainer`` (whose lock serialises the forward pass). Uploads never touch the disk:
the body is read into memory under a size cap and parsed there (Starlette's own form parser would
spool any file over 1 MB to a temporary file), and overlays go back inline as data URLs.

FastAPI, uvicorn and python-multipart come with the optional ``serve`` extra and are imported only
here, so ``scan`` and ``predict`` never need them.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# at run time, and their types are imported inside create_app (the extra is optional).
import ipaddress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from batchcam.config import UsageError, resolve_device
from batchcam.console import Console
from batchcam.explain import Explainer, Explanation, jpeg_data_url
from batchcam.pipeline import load_model
from batchcam.resources import templates_dir

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_MAX_UPLOAD_MB = 50
MEGABYTE = 1024 * 1024
UPLOAD_FIELD = "files"
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


@dataclass(frozen=True)
class ServeConfig:
    model: Path | None = None        # None: the bundled demo model
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB

    def validate(self) -> None:
        if self.model is not None and not self.model.is_file():
            raise UsageError(f"--model {self.model} does not exist")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0..65535, got {self.port}")
        if not self.max_upload_mb > 0:
            raise UsageError(f"--max-upload-mb must be more than 0, got {self.max_upload_mb}")
        resolve_device(self.device)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MEGABYTE)


class UploadRejected(Exception):
    """A request the client must fix; carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def serve(config: ServeConfig, console: Console) -> int:
    """Load the model, then serve until interrupted; raises UsageError/CheckpointError before binding."""
    config.validate()
    require_serve_extra()
    import uvicorn

    device = resolve_device(config.device)
    explainer = Explainer(load_model(config.model, console), device)
    app = create_app(explainer, config.max_upload_bytes)
    if not is_loopback(config.host):
        console.warn(f"serving on {config.host}, not a loopback address: anyone who can reach this machine "
                     "can upload images and read predictions (there is no authentication)")
    console.info(f"batchcam: serving {explainer.loaded.path.name} on {device} at "
                 f"http://{_url_host(config.host)}:{config.port}/ (API docs at /docs); Ctrl-C stops")
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(explainer: Explainer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MEGABYTE) -> "FastAPI":
    """The web app around an already loaded model: the page, ``POST /api/predict`` and ``/healthz``."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from batchcam import __version__

    app = FastAPI(title="batchcam", version=__version__,
                  description="Chest X-ray prediction (NORMAL/PNEUMONIA) with a Grad-CAM overlay. "
                              "Uploads are processed in memory and never written to disk.")
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

    @app.get("/healthz", summary="the loaded model and device")
    def healthz() -> dict:
        return {"status": "ok", "model": explainer.describe(), "device": str(explainer.device),
                "max_upload_bytes": max_upload_bytes}

    @app.post("/api/predict", summary="predict and explain one or more uploaded X-rays",
              openapi_extra={"requestBody": REQUEST_BODY_SCHEMA},
              responses={200: {"description": "one result per file, in upload order: file, prediction, confidence, "
                                     "probabilities, cam_target, cam_peak_x/y, width, height, sha256, and the "
                                     "overlay and the original as JPEG data URLs"},
                         400: {"description": "not multipart, no file, or a file that is not an image"},
                         413: {"description": "the upload is larger than --max-upload-mb"}})
    async def predict(request: Request) -> JSONResponse:
        """Every file must be an image; results come back in upload order with inline JPEG overlays."""
        try:
            body = await read_capped_body(request, max_upload_bytes)
            uploads = parse_uploads(request.headers.get("content-type", ""), body, max_upload_bytes)
            explanations = await run_in_threadpool(explain_uploads, explainer, uploads)
        except UploadRejected as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        return JSONResponse({"model": {"name": explainer.loaded.path.name, "sha256": explainer.loaded.sha256,
                                       "demo": explainer.loaded.demo},
                             "results": [result_json(explanation) for explanation in explanations]})

    return app


async def read_capped_body(request, limit: int) -> bytes:
    """The request body in memory, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, too_large(limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise UploadRejected(413, too_large(limit))
    return bytes(body)


def too_large(limit: int) -> str:
    return f"upload larger than the {limit / MEGABYTE:g} MB limit (see --max-upload-mb)"


def parse_uploads(content_type: str, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part, parsed in memory: python-multipart's in-memory
    threshold is set above the body cap, so no part can ever be flushed to a temporary file."""
    from python_multipart import FormParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRejected(400, f"send multipart/form-data with one or more '{UPLOAD_FIELD}' file parts")
    files = []
    config = {"MAX_MEMORY_FILE_SIZE": limit + 1, "MAX_BODY_SIZE": limit}
    parser = FormParser("multipart/form-data", on_field=None, on_file=files.append,
                        boundary=params[b"boundary"], config=config)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise UploadRejected(400, f"malformed multipart body: {e}") from None
    uploads = []
    for part in files:
        if not part.in_memory:  # cannot happen with the threshold above; never go on if it did
            raise RuntimeError("an upload part was spooled to disk")
        uploads.append((upload_name(part.file_name), part.file_object.getvalue()))
    if not uploads:
        raise UploadRejected(400, f"no file in the upload (expected '{UPLOAD_FIELD}' file parts)")
    return uploads


def upload_name(raw: bytes | None) -> str:
    """The file's base name as the browser sent it (some send a whole Windows path)."""
    name = (raw or b"").decode("utf-8", "replace")
    name = PureWindowsPath(PurePosixPath(name).name).name
    return "".join(ch for ch in name if ch.isprintable())[:200] or "upload"


def explain_uploads(explainer: Explainer, uploads: list[tuple[str, bytes]]) -> list[Explanation]:
    """Decode everything first, so a request with a non-image file costs no model time."""
    samples = [explainer.decode(name, data) for name, data in uploads]
    bad = [f"{sample.relpath}: {sample.error}" for sample in samples if not sample.ok]
    if bad:
        raise UploadRejected(400, "; ".join(bad))
    return explainer.explain(samples)


def result_json(explanation: Explanation) -> dict:
    rendered = explanation.rendered
    return {**explanation.as_dict(), "overlay": jpeg_data_url(rendered.overlay_jpeg),
            "original": jpeg_data_url(rendered.original_jpeg)}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
