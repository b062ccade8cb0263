"""``batchcam serve``: upload-and-test in a browser, on a small local web app.

The model is loaded once, before the server starts, and shared by every request through
``explain.Explainer`` (whose lock serialises the forward pass). Uploads never touch the disk:
the body is parsed in memory as it arrives, under a size cap (Starlette's own form parser would
spool any file over 1 MB to a temporary file), and overlays go back inline as data URLs.

What one request may cost is bounded before any pixel is decoded:
  * at most ``max_files`` files, counted while the body is parsed, so a body of 100,000 tiny parts
    is refused at the 33rd part, never materialised whole (HTTP 413);
  * at most ``max_pixels_per_request`` pixels in all, as the images' headers state them (Pillow's
    ``Image.open`` without loading, DICOM Rows x Columns), and for any one image that is decoded
    through 64-bit floats (16- or 32-bit samples, float images, every DICOM: four to eight times the
    memory a pixel of an 8-bit image takes) a quarter of that, a third of that again for a colour
    DICOM (HTTP 413);
  * a deflated DICOM may not inflate past the upload cap (pydicom inflates it whole, unbounded).
Then files are decoded one at a time server-wide and go through the model in batches of at most
``BATCH_SIZE``, decoded batch by batch, so memory does not grow with the number of files. With the
defaults, the server's peak RSS stays under 2 GB with the demo model on the CPU
(benchmarks/bench_serve_memory.py measures it).

Every request must name this server in its Host header (a DNS-rebinding page names its own), and a
request to the API that carries an Origin header must come from this server's own page (HTTP 403).

FastAPI, uvicorn and python-multipart come with the optional ``serve`` extra and are imported only
here, so ``scan`` and ``predict`` never need them.
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations
# at run time, and their types are imported inside create_app (the extra is optional).
import io
import ipaddress
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from batchcam.commands.explain import Explainer, Explanation, jpeg_data_url
from batchcam.config import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    MEGABYTE,
    MEGAPIXEL,
    ServeConfig,
)
from batchcam.decode.dataset import Sample
from batchcam.decode.imaging import ALLOWED_FORMATS, EIGHT_BIT_MODES
from batchcam.decode.pixels import has_dicom_magic, is_dicom
from batchcam.errors import UsageError
from batchcam.model.checkpoint import load_model
from batchcam.resources import templates_dir
from batchcam.runtime.console import Console
from batchcam.runtime.devices import resolve_device

if TYPE_CHECKING:
    from fastapi import FastAPI

FLOAT_DECODE_WEIGHT = 4              # an image decoded through 64-bit floats may hold 1/4 of the pixel cap
BATCH_SIZE = 8                       # images a forward pass; memory does not grow with a request's files
MAX_FORM_FIELDS = 16                 # non-file parts of a request (the page sends none)
SAFE_METHODS = ("GET", "HEAD")
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
# A Host header (or an Origin's authority): a bracketed IPv6 address or a name/IPv4 address, and a port.
HOST_PATTERN = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")


@dataclass(frozen=True)
class Limits:
    """What one request may hold; see the module's docstring."""

    max_upload_bytes: int
    max_files: int
    max_pixels: int
    batch_size: int = BATCH_SIZE

    @property
    def max_float_pixels(self) -> int:
        """Pixels of one image decoded through 64-bit floats."""
        return self.max_pixels // FLOAT_DECODE_WEIGHT


class UploadRejected(Exception):
    """A request the client must fix; carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class TooManyParts(Exception):
    """Raised from the multipart parser's callbacks: stops parsing at the first part too many."""


def serve(config: ServeConfig, console: Console) -> int:
    """Load the model, then serve until interrupted; raises UsageError/CheckpointError before binding."""
    config.validate()
    require_serve_extra()
    import uvicorn

    device = resolve_device(config.device)
    explainer = Explainer(load_model(config.model, console.warn), device)
    app = create_app(explainer, config.max_upload_bytes, max_files=config.max_files,
                     max_pixels_per_request=config.max_pixels_per_request,
                     allowed_hosts=allowed_hosts_for(config.host, config.port))
    if not is_loopback(config.host):
        console.warn(f"serving on {config.host}, not a loopback address: anyone who can reach this machine "
                     "can upload images and read predictions (there is no authentication)")
    console.info(f"batchcam: serving {explainer.loaded.path.name} on {device} at "
                 f"http://{_url_host(config.host)}:{config.port}/ (OpenAPI schema at /openapi.json; a request "
                 f"may hold {config.max_files} files, {config.max_upload_mb:g} MB, {config.max_megapixels:g} "
                 "megapixels); Ctrl-C stops")
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


# --- Host and Origin ---------------------------------------------------------------------------


def _host_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _shown(value: str) -> str:
    """A header value quoted for an error message, cut short."""
    return repr(value[:100])


def allowed_hosts_for(host: str, port: int) -> tuple[str, ...]:
    """The ``host:port`` values a server bound to ``host``:``port`` answers to.

    The bound address itself; ``localhost`` too when that is a loopback address (and 127.0.0.1 and
    [::1] when it is ``localhost``); for a wildcard bind (0.0.0.0, ::) any IP address and
    ``localhost``, written ``*``: a DNS-rebinding page can only send its own *name* as Host, never an
    address. Port 0 (the system picks one) is written ``*`` too.
    """
    port_text = str(port) if port else "*"
    name = host.strip().lower()
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        names = ["*", "localhost"]
    else:
        names = [_host_name(address) if address is not None else name]
        if is_loopback(host):
            names.append("localhost")
        if name == "localhost":
            names += ["127.0.0.1", "[::1]"]
    return tuple(dict.fromkeys(f"{entry}:{port_text}" for entry in names))


def split_host(value: str) -> tuple[str, int] | None:
    """(name, port) of a Host header, the address normalised and the port 80 when left out; None
    when it is not one."""
    match = HOST_PATTERN.fullmatch(value.lower())
    if match is None:
        return None
    name, port = match.group(1), int(match.group(2) or 80)
    try:
        name = _host_name(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        if name.startswith("["):
            return None
    return name, port


def host_allowed(value: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header value names this server (``allowed`` as from ``allowed_hosts_for``)."""
    parsed = split_host(value)
    if parsed is None:
        return False
    name, port = parsed
    for entry in allowed:
        entry_name, _, entry_port = entry.lower().rpartition(":")
        if entry_port not in ("*", str(port)):
            continue
        if entry_name == "*" and _is_address(name) or (split_host(entry_name) or ("",))[0] == name:
            return True
    return False


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether an Origin header is this server's own page: ``http://`` and an allowed host, no path."""
    return origin.startswith("http://") and host_allowed(origin[len("http://"):], allowed)


def request_refusal(scope: dict, allowed: tuple[str, ...]) -> str | None:
    """Why a request is refused (403), or None: a Host that is not this server's, or a cross-origin
    call of the API (or of any method but GET and HEAD)."""
    headers = scope.get("headers") or []
    hosts = [value.decode("latin-1") for key, value in headers if key == b"host"]
    if len(hosts) != 1 or not host_allowed(hosts[0], allowed):
        shown = _shown(hosts[0]) if len(hosts) == 1 else f"({len(hosts)} Host headers)"
        expected = " or ".join(entry.replace("*:", "<any IP address>:").replace(":*", ":<port>") for entry in allowed)
        return f"refused: Host {shown} is not this server's address (expected {expected}); open the page there"
    origins = [value.decode("latin-1") for key, value in headers if key == b"origin"]
    api = scope.get("path", "").startswith("/api/") or scope.get("method") not in SAFE_METHODS
    if origins and api and (len(origins) != 1 or not origin_allowed(origins[0], allowed)):
        return (f"cross-origin request refused: Origin {_shown(origins[0])} is not this server; only its own page "
                "may call the API")
    return None


class RequestGuard:
    """ASGI middleware: every HTTP request passes ``request_refusal`` or gets 403 with a JSON reason."""

    def __init__(self, app, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed_hosts = app, tuple(allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            reason = request_refusal(scope, self.allowed_hosts)
            if reason is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse({"detail": reason}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


DEFAULT_ALLOWED_HOSTS = allowed_hosts_for(ServeConfig.host, ServeConfig.port)


# --- the app -----------------------------------------------------------------------------------


def create_app(explainer: Explainer, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MEGABYTE, *,
               max_files: int = DEFAULT_MAX_FILES, max_pixels_per_request: int = DEFAULT_MAX_MEGAPIXELS * MEGAPIXEL,
               allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS, batch_size: int = BATCH_SIZE) -> "FastAPI":
    """The web app around an already loaded model: the page, ``POST /api/predict`` and ``/healthz``.

    ``allowed_hosts``: the ``host:port`` values requests must name in Host (and in Origin, when they
    carry one), as ``allowed_hosts_for`` derives them from the bound address.
    """
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from batchcam import __version__

    limits = Limits(max_upload_bytes, max_files, max_pixels_per_request, batch_size)
    decode_lock = threading.Lock()  # one full-resolution image in memory at a time, server-wide
    # No /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN. /openapi.json stays.
    app = FastAPI(title="batchcam", version=__version__, docs_url=None, redoc_url=None,
                  description="Chest X-ray prediction (NORMAL/PNEUMONIA) with a Grad-CAM overlay. "
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
                "max_pixels_per_request": limits.max_pixels}

    @app.post("/api/predict", summary="predict and explain one or more uploaded X-rays",
              openapi_extra={"requestBody": REQUEST_BODY_SCHEMA},
              responses={200: {"description": "one result per file, in upload order: file, prediction, confidence, "
                                     "probabilities, cam_target, cam_peak_x/y, width, height, sha256, and the "
                                     "overlay and the original as JPEG data URLs"},
                         400: {"description": "not multipart, no file, or a file that is not an image"},
                         403: {"description": "a Host that is not this server's address, or a cross-origin call"},
                         413: {"description": "more than --max-upload-mb, more than --max-files files, or more "
                                              "pixels than --max-megapixels allows"}})
    async def predict(request: Request) -> JSONResponse:
        """Every file must be an image; results come back in upload order with inline JPEG overlays."""
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


async def read_uploads(request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part, parsed as the body streams in.

    Refused with 413 as soon as the body passes ``max_upload_bytes`` or the parser has seen one
    file (or form field) too many; with 400 when it is not multipart or is malformed. After a
    refusal that is not about size, the rest of the body is read and dropped (up to the cap), so the
    client gets the answer rather than a reset connection.
    """
    from python_multipart.exceptions import FormParserError

    limit = limits.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, too_large(limit))
    stream = request.stream()
    uploads: list[tuple[str, bytes]] = []
    received = 0
    try:
        parser = upload_parser(request.headers.get("content-type", ""), limits, uploads)
        async for chunk in stream:
            received += len(chunk)
            if received > limit:
                raise UploadRejected(413, too_large(limit))
            try:
                parser.write(chunk)
            except TooManyParts as e:
                await discard_rest(stream, limit - received)
                raise UploadRejected(413, str(e)) from None
        parser.finalize()
    except FormParserError as e:
        await discard_rest(stream, limit - received)
        raise UploadRejected(400, f"malformed multipart body: {e}") from None
    except UploadRejected as e:
        if e.status == 400:
            await discard_rest(stream, limit - received)
        raise
    if not uploads:
        raise UploadRejected(400, f"no file in the upload (expected '{UPLOAD_FIELD}' file parts)")
    return uploads


def upload_parser(content_type: str, limits: Limits, uploads: list[tuple[str, bytes]]):
    """A python-multipart parser that appends each file part to ``uploads`` as it ends, all in
    memory (its in-memory threshold is above the body cap, so no part is ever flushed to a
    temporary file), and raises TooManyParts at the first file or form field too many."""
    from python_multipart import FormParser
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRejected(400, f"send multipart/form-data with one or more '{UPLOAD_FIELD}' file parts")
    fields = 0

    def on_file(part) -> None:
        if len(uploads) >= limits.max_files:
            raise TooManyParts(f"too many files: more than {limits.max_files} in one request (see --max-files)")
        if not part.in_memory:  # cannot happen with the threshold above; never go on if it did
            raise RuntimeError("an upload part was spooled to disk")
        uploads.append((upload_name(part.file_name), part.file_object.getvalue()))
        part.close()  # the bytes above are the only copy kept

    def on_field(field) -> None:
        nonlocal fields
        fields += 1
        if fields > MAX_FORM_FIELDS:
            raise TooManyParts(f"too many form fields: more than {MAX_FORM_FIELDS} besides the files")

    config = {"MAX_MEMORY_FILE_SIZE": limits.max_upload_bytes + 1, "MAX_BODY_SIZE": limits.max_upload_bytes}
    return FormParser("multipart/form-data", on_field=on_field, on_file=on_file, boundary=params[b"boundary"],
                      config=config)


async def discard_rest(stream, budget: int) -> None:
    """Read and drop what is left of a refused request's body, stopping once past ``budget`` bytes."""
    async for chunk in stream:
        budget -= len(chunk)
        if budget < 0:
            return


def too_large(limit: int) -> str:
    return f"upload larger than the {limit / MEGABYTE:g} MB limit (see --max-upload-mb)"


def upload_name(raw: bytes | None) -> str:
    """The file's base name as the browser sent it (some send a whole Windows path)."""
    name = (raw or b"").decode("utf-8", "replace")
    name = PureWindowsPath(PurePosixPath(name).name).name
    return "".join(ch for ch in name if ch.isprintable())[:200] or "upload"


# --- pixels, before decoding -------------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """An image's size as its header states it, and whether decoding goes through 64-bit floats."""

    width: int
    height: int
    kind: str          # "PNG L", "TIFF F", "DICOM"...
    float_decode: bool
    samples: int = 1   # a colour DICOM's three samples a pixel each go through floats

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def float_samples(self) -> int:
        """What counts against the float limit: every sample decoded through 64-bit floats."""
        return self.pixels * max(1, self.samples) if self.float_decode else 0


def image_extent(name: str, data: bytes, max_inflated: int) -> Extent | None:
    """The image's header, read without decoding a pixel; None when it cannot be read (decoding
    then says why, at once: it fails at the same place). Raises UploadRejected for a deflated DICOM
    that would inflate past ``max_inflated`` bytes. Call it under the decode lock: Pillow's
    decompression-bomb warning is caught through the (process-wide) warnings filters."""
    if not data:
        return None
    if is_dicom(data, name):
        return dicom_extent(name, data, max_inflated)
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                (width, height), mode, image_format = image.size, image.mode, image.format
        except Exception:  # noqa: BLE001 - not an image, or too many pixels: decoding refuses it as scan does
            return None
    return Extent(width, height, f"{image_format} {mode}", mode not in EIGHT_BIT_MODES)


def dicom_extent(name: str, data: bytes, max_inflated: int) -> Extent | None:
    """Rows x Columns of a DICOM file (always decoded through 64-bit floats), read without its
    pixel data; None without pydicom or when the header is unreadable."""
    try:
        import pydicom
    except ImportError:
        return None
    refuse_deflate_bomb(name, data, max_inflated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_dicom_magic(data), stop_before_pixels=True,
                                 specific_tags=["Rows", "Columns", "SamplesPerPixel"])
            return Extent(int(ds.Columns), int(ds.Rows), "DICOM", True, int(ds.get("SamplesPerPixel", 1) or 1))
    except Exception:  # noqa: BLE001 - pydicom raises many types on hostile files; decoding says why
        return None


def refuse_deflate_bomb(name: str, data: bytes, limit: int) -> None:
    """A deflated DICOM must not inflate past the upload cap: pydicom would hold all of it at once."""
    from batchcam.decode.dicom import deflated_size

    inflated = deflated_size(data, limit)
    if inflated is not None and inflated > limit:
        raise UploadRejected(413, f"{name}: a deflated DICOM that inflates to more than the {limit / MEGABYTE:g} MB "
                                  "upload limit (see --max-upload-mb)")


def check_pixels(uploads: list[tuple[str, bytes]], extents: list[Extent | None], limits: Limits) -> None:
    """413 when one image decoded through floats has more than a quarter of the request's pixel cap,
    or when all of them together have more than the cap."""
    total = 0
    for (name, _), extent in zip(uploads, extents):
        if extent is None:
            continue
        if extent.float_samples > limits.max_float_pixels:
            colour = f" x {extent.samples} samples" if extent.samples > 1 else ""
            raise UploadRejected(413, (
                f"{name}: {extent.width}x{extent.height} {extent.kind} image has {extent.pixels / MEGAPIXEL:.1f} "
                f"megapixels{colour}; an image of more than 8 bits a sample, or a DICOM, is decoded through 64-bit "
                f"floats (4 times the memory a pixel), so it may have at most {limits.max_float_pixels / MEGAPIXEL:g} "
                f"megapixels (colour DICOM: a third of that), a quarter of the {limits.max_pixels / MEGAPIXEL:g} a "
                "request may hold (see --max-megapixels)"))
        total += extent.pixels
    if total > limits.max_pixels:
        counted = sum(extent is not None for extent in extents)
        raise UploadRejected(413, (
            f"too many pixels: the {counted} image{'s' if counted != 1 else ''} hold {total / MEGAPIXEL:.1f} "
            f"megapixels, more than the {limits.max_pixels / MEGAPIXEL:g} megapixels one request may hold "
            "(see --max-megapixels); send them in several requests"))


# --- decoding and explaining, batch by batch ---------------------------------------------------


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
    bad = [f"{sample.relpath}: {sample.error}" for sample in samples if not sample.ok]
    if bad:
        raise UploadRejected(400, "; ".join(bad))


def result_json(explanation: Explanation) -> dict:
    rendered = explanation.rendered
    return {**explanation.as_dict(), "overlay": jpeg_data_url(rendered.overlay_jpeg),
            "original": jpeg_data_url(rendered.original_jpeg)}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
