"""What one ``serve`` request may hold, checked before any pixel is decoded, and how many requests
may be in the decoding stage at once.

  * at most ``--max-concurrent-requests`` requests are read, decoded and explained at once
    (``RequestSlots``); one more is answered 503 with Retry-After before its body is kept, so the
    bodies held at any moment are bounded, whatever the number of clients;
  * at most ``max_files`` files, counted while the body is parsed, so a body of 100,000 tiny parts
    is refused at the 33rd part, never materialised whole (HTTP 413);
  * at most ``max_pixels`` pixels in all, as the images' headers state them (Pillow's
    ``Image.open`` without loading, DICOM Rows x Columns), and for any one image that is decoded
    through 64-bit floats (16- or 32-bit samples, float images, every DICOM: four to eight times the
    memory a pixel of an 8-bit image takes) a quarter of that, a third of that again for a colour
    DICOM (HTTP 413);
  * a deflated DICOM may not inflate past the upload cap (pydicom would hold all of it at once).

The body is parsed in memory as it arrives (Starlette's own form parser would spool any file over
1 MB to a temporary file): uploads never touch the disk.
"""
from __future__ import annotations

import io
import threading
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from batchcam.config import MEGABYTE, MEGAPIXEL
from batchcam.decode.imaging import ALLOWED_FORMATS, EIGHT_BIT_MODES
from batchcam.decode.pixels import has_dicom_magic, is_dicom

if TYPE_CHECKING:  # the serve extra's packages, imported when serve runs
    from python_multipart.multipart import Field, File, FormParser
    from starlette.requests import Request

RETRY_AFTER_SECONDS = 2              # what a 503 for a busy server asks the client to wait
FLOAT_DECODE_WEIGHT = 4              # an image decoded through 64-bit floats may hold 1/4 of the pixel cap
BATCH_SIZE = 8                       # images a forward pass; memory does not grow with a request's files
MAX_FORM_FIELDS = 16                 # non-file parts of a request (the page sends none)
UPLOAD_FIELD = "files"


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


class RequestSlots:
    """At most ``limit`` requests in the decoding stage at once; ``take`` never waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        return self._busy

    def take(self) -> bool:
        """A slot for this request, or False when all are taken (the request gets 503)."""
        with self._lock:
            if self._busy >= self.limit:
                return False
            self._busy += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._busy -= 1

    def busy_reason(self) -> str:
        return (f"busy: {self.limit} request{'s are' if self.limit != 1 else ' is'} being decoded, the most at once "
                f"(see --max-concurrent-requests); retry after {RETRY_AFTER_SECONDS} s")


class UploadRejected(Exception):
    """A request the client must fix; carries the HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class TooManyParts(Exception):
    """Raised from the multipart parser's callbacks: stops parsing at the first part too many."""


def upload_parser(content_type: str, limits: Limits, uploads: list[tuple[str, bytes]]) -> FormParser:
    """A python-multipart parser that appends each file part to ``uploads`` as it ends, all in
    memory (its in-memory threshold is above the body cap, so no part is ever flushed to a
    temporary file), and raises TooManyParts at the first file or form field too many."""
    from python_multipart import FormParser
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadRejected(400, f"send multipart/form-data with one or more '{UPLOAD_FIELD}' file parts")
    fields = 0

    def on_file(part: File) -> None:
        if len(uploads) >= limits.max_files:
            raise TooManyParts(f"too many files: more than {limits.max_files} in one request (see --max-files)")
        buffer = part.file_object
        # Always in memory, with the threshold below; never go on if a part was spooled to disk.
        if not part.in_memory or not isinstance(buffer, io.BytesIO):
            raise RuntimeError("an upload part was spooled to disk")
        uploads.append((upload_name(part.file_name), buffer.getvalue()))
        part.close()  # the bytes above are the only copy kept

    def on_field(field: Field) -> None:
        nonlocal fields
        fields += 1
        if fields > MAX_FORM_FIELDS:
            raise TooManyParts(f"too many form fields: more than {MAX_FORM_FIELDS} besides the files")

    config = {"MAX_MEMORY_FILE_SIZE": limits.max_upload_bytes + 1, "MAX_BODY_SIZE": limits.max_upload_bytes}
    return FormParser("multipart/form-data", on_field=on_field, on_file=on_file, boundary=params[b"boundary"],
                      config=config)


async def discard_rest(stream: AsyncIterator[bytes], budget: int) -> None:
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


async def read_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every file part, parsed as the body streams in.

    Refused with 413 as soon as the body passes ``max_upload_bytes`` or the parser has seen one
    file (or form field) too many; with 400 when it is not multipart or is malformed. After a
    refusal that is not about size, the rest of the body is read and dropped (up to the cap), so the
    client gets the answer rather than a reset connection.

    The parser and its callbacks form a reference cycle (python-multipart's FormParser and the
    closures it hands its MultipartParser), which only Python's cycle collector frees, some requests
    later: the list the callbacks fill is handed over as a copy and emptied, so the bodies are freed
    with the request whatever happens to the parser.
    """
    filled: list[tuple[str, bytes]] = []
    try:
        await parse_uploads(request, limits, filled)
        uploads = filled.copy()
    finally:
        filled.clear()
    if not uploads:
        raise UploadRejected(400, f"no file in the upload (expected '{UPLOAD_FIELD}' file parts)")
    return uploads


async def parse_uploads(request: Request, limits: Limits, uploads: list[tuple[str, bytes]]) -> None:
    """Parse the body into ``uploads``; see read_uploads."""
    from python_multipart.exceptions import FormParserError

    limit = limits.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, too_large(limit))
    stream = request.stream()
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
