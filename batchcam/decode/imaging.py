"""Decoding X-ray files into a faithful 8-bit grayscale picture, and resizing it.

Every mode Pillow can produce is rendered as grayscale by what its values mean, not by a blind
``convert("RGB")``: 16-bit images are scaled by their bit depth (a plain conversion clips them to
white), 32-bit integer and float images by the range their values imply. Only an allowlist of
formats is decoded, so a file that merely carries an image extension (an EPS, say) never reaches a
decoder it did not ask for (Pillow's EPS plugin runs Ghostscript). DICOM files, recognised by
their ``DICM`` magic, go to ``batchcam.decode.dicom`` and come back as the same ``DecodedImage``.

Nothing is accepted half-decoded: Pillow raises on missing pixel data (``LOAD_TRUNCATED_IMAGES``
stays False), and a PNG or JPEG whose pixels all decoded but whose end (IEND chunk, EOI marker) is
missing is refused too, since a cut file is a sign that what is there may not be what was meant.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from batchcam.config import RESIZE_MODES, Selection
from batchcam.decode.pixels import (
    MARKER_AFTER_SCAN,
    STANDALONE_MARKERS,
    DecodedImage,
    DecodeError,
    gray_from_unit,
    has_dicom_magic,
    is_dicom,
    one_line,
    refuse_too_many_pixels,
    stretch,
)

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
# JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) but never below this longer side: training
# and scanning use the same value, and the model's view stays within the agreement target (1e-3
# in probability) of a full decode, where lower floors do not (benchmarks/RESULTS.md, "Where the
# time goes", has the measurements).
DECODE_MIN_LONG_SIDE = 1024
# How a model's view is made from an image (a checkpoint declares one): the whole image squashed to
# a square, or torchvision's evaluation transform (shorter side to size / 0.875, then the centre crop).
CENTER_CROP_RATIO = 0.875
# The overlay's longer side by default (scan --overlay-size): the display copy made at decode time.
# Display copies (overlay base, thumbnail) shrink by whole factors first, down to this many times their size.
DISPLAY_REDUCING_GAP = 1.0
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"}
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                         8: Image.Transpose.ROTATE_90}
# The full ranges a 32-bit integer or float image's values are read against, smallest first.
IMPLIED_RANGES = {"I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}


def decode_grayscale(data: bytes, min_long_side: int | None = None, name: str = "",
                     selection: Selection | None = None) -> DecodedImage:
    """Decode image bytes into an 8-bit grayscale image, EXIF orientation applied.

    ``min_long_side`` lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as its
    longer side stays at least that many pixels: a 2048 px radiograph decodes several times faster
    when the model and the overlay need 1024 px at most (``DECODE_MIN_LONG_SIDE``). ``name`` (the
    file's name or relative path) only lets a ``.dcm`` file without the DICOM preamble be read as
    DICOM. ``selection`` decides which DICOM films are scored (``NotSelected`` for the others;
    None scores them all); other formats carry no tags to decide by and are always decoded.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    if is_dicom(data, name):
        from batchcam.decode.dicom import decode_dicom

        return decode_dicom(data, has_preamble=has_dicom_magic(data), selection=selection)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image, original_size = _open_and_load(data, min_long_side)
        orientation, orientation_note = exif_orientation(image)
    notes = [one_line(w.message) for w in caught]
    if orientation_note:  # Pillow's own EXIF complaints are said once, in the note
        notes = [note for note in notes if note not in orientation_note] + [orientation_note]
    width, height = original_size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if orientation in ORIENTATION_TRANSPOSE:
        image = image.transpose(ORIENTATION_TRANSPOSE[orientation])
    return DecodedImage(gray=to_grayscale(image), width=width, height=height, warnings=tuple(notes))


def to_grayscale(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale rendering of any Pillow mode, scaled by what the values mean.

    8-bit modes convert as Pillow does (alpha is ignored: it is not X-ray density); ``I;16*`` is
    scaled by its 16-bit depth; ``I`` (32-bit integer) and ``F`` (float) have no stated depth, so
    their values are read against the smallest usual full range that holds them (0..1 for float,
    then 0..255, then 0..65535), and min-max stretched only when none does.
    """
    if image.mode == "L":
        return image
    if image.mode in EIGHT_BIT_MODES:
        try:
            return image.convert("L")
        except ValueError:
            raise DecodeError(f"unsupported image mode {image.mode}") from None
    if image.mode.startswith("I;16"):
        return gray_from_unit(np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0)
    if image.mode in IMPLIED_RANGES:
        return gray_from_unit(_implied_unit(np.asarray(image, dtype=np.float64), IMPLIED_RANGES[image.mode]))
    raise DecodeError(f"unsupported image mode {image.mode}")


def resize_square(gray: Image.Image, size: int) -> np.ndarray:
    """The model's view: the whole image squashed to size x size (as in training), uint8."""
    return np.asarray(gray.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def model_view(gray: Image.Image, size: int, resize: str = "squash") -> np.ndarray:
    """The model's view of an image under a checkpoint's declared resize, uint8 (size, size).

    ``squash`` is ``transforms.Resize((size, size))`` (``resize_square``); ``center-crop`` is
    torchvision's evaluation transform, ``Resize(round(size / 0.875))`` on the shorter side then
    ``CenterCrop(size)``, computed with the same sizes and rounding as torchvision so the pixels are
    the ones a model trained that way saw.
    """
    if resize == "squash":
        return resize_square(gray, size)
    if resize != "center-crop":
        raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    resized = gray.resize(shorter_side_resized(gray.size, round(size / CENTER_CROP_RATIO)), Image.Resampling.BILINEAR)
    left, top = center_crop_origin(resized.size, size)
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def shorter_side_resized(image_size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) after ``transforms.Resize(shorter)``: the longer side truncated, as torchvision does."""
    width, height = image_size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def center_crop_origin(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """(left, top) of ``transforms.CenterCrop(size)`` in an image at least size x size."""
    width, height = image_size
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def view_box(width: int, height: int, size: int, resize: str = "squash") -> tuple[float, float, float, float]:
    """The part of the original image (left, top, right, bottom, in its pixels) the model view shows.

    The whole image for ``squash``; the centred crop for ``center-crop``, so a map of the view can
    be placed back on the original image.
    """
    if resize == "squash":
        return 0.0, 0.0, float(width), float(height)
    resized_width, resized_height = shorter_side_resized((width, height), round(size / CENTER_CROP_RATIO))
    left, top = center_crop_origin((resized_width, resized_height), size)
    scale_x, scale_y = width / resized_width, height / resized_height
    return left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y


def fit_within(gray: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down (never up) so its longer side is at most max_side, aspect kept.

    For display only: an integer box reduction first (``reducing_gap=1``) makes a large downscale
    much cheaper (timed in benchmarks/RESULTS.md) and differs from the plain filter by about a
    quarter of a grey level on average; the model's view never goes through this.
    """
    scale = max_side / max(gray.size)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    return gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=DISPLAY_REDUCING_GAP)


def _open_and_load(data: bytes, min_long_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    image_format = "image"
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        image_format = image.format or image_format
        original_size = image.size
        refuse_too_many_pixels(*original_size)
        if image.format == "JPEG" and min_long_side:
            _draft_for(image, min_long_side)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"refused: too many pixels (decompression bomb guard): {one_line(e)}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not a supported image (allowed: {', '.join(ALLOWED_FORMATS)}, DICOM)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        reason = f"truncated {image_format}" if "truncated" in str(e).lower() else one_line(e)
        raise DecodeError(f"cannot decode image: {reason}") from None
    if not ends_complete(data, image.format):
        raise DecodeError(f"cannot decode image: truncated {image.format} (its end is missing)")
    return image, original_size


def _draft_for(image: Image.Image, min_long_side: int) -> None:
    width, height = image.size
    scale = min_long_side / max(width, height)
    if scale < 1:
        image.draft("L" if image.mode == "L" else image.mode,
                    (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))


def exif_orientation(image: Image.Image) -> tuple[int, str]:
    """The EXIF orientation (1..8) and, when it was not used, a one-line note saying why."""
    problem = _exif_problem(image.info.get("exif"))
    if not problem:
        try:
            value = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception as e:  # malformed EXIF: Pillow raises many types; the image is still good
            problem = f"{type(e).__name__}: {one_line(e)}"
        else:
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8:
                return value, ""
            return 1, f"EXIF orientation {one_line(repr(value))[:40]} is not 1..8: ignored, image shown unrotated"
    return 1, f"malformed EXIF ignored, image shown unrotated: {problem}"


def _exif_problem(raw: bytes | None) -> str:
    """Why a file's EXIF block cannot be trusted ("" when there is none or it parses cleanly).

    Pillow parses EXIF leniently, warning and skipping what it cannot read; an orientation read
    from such a block may be garbage, so any complaint means the block is not used at all.
    """
    if not raw:
        return ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exif = Image.Exif()
            exif.load(raw)
            entries = len(exif)
        except Exception as e:
            return f"{type(e).__name__}: {one_line(e)}"
    if caught:
        return one_line(caught[0].message)
    return "" if entries else "no readable entries"


def _implied_unit(values: np.ndarray, full_ranges: tuple[float, ...]) -> np.ndarray:
    if values.size and np.all(np.isfinite(values)) and values.min() >= 0:
        for full in full_ranges:
            if values.max() <= full:
                return values / full
    return stretch(values)


def ends_complete(data: bytes, image_format: str | None) -> bool:
    if image_format == "PNG":
        return _png_has_iend(data)
    if image_format == "JPEG":
        return _jpeg_reaches_eoi(data)
    return True  # TIFF and BMP: Pillow raises when pixel data is missing


def _png_has_iend(data: bytes) -> bool:
    """Walk the PNG's chunks: complete only if the IEND chunk is reached whole."""
    position = 8
    while position + 12 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        if data[position + 4:position + 8] == b"IEND":
            return True
        position += 12 + length
    return False


# Inside a JPEG scan, 0xFF is followed by 0x00 (a stuffed byte), 0xD0-0xD7 (a restart marker) or
# 0xFF (fill); anything else is the marker that ends the scan.
def _jpeg_reaches_eoi(data: bytes) -> bool:
    """Walk the JPEG's segments and scans from SOI: complete only if an EOI marker is reached.

    Walking (rather than looking at the last two bytes) skips embedded EXIF thumbnails, which have
    their own EOI, and tolerates the trailing data some cameras and phones append after EOI.
    """
    position, end = 2, len(data)
    while position + 1 < end:
        if data[position] != 0xFF:  # stray bytes between segments (libjpeg skips them too)
            position = data.find(b"\xff", position)
            if position < 0:
                return False
            continue
        marker = data[position + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:
            position += 1
            continue
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        if position + 4 > end:
            return False
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            found = MARKER_AFTER_SCAN.search(data, position)
            if found is None:
                return False
            position = found.start()
    return False


