"""Decoding X-ray files into a faithful 8-bit grayscale picture, and resizing it.

Every mode Pillow can produce is rendered as grayscale by what its values mean, not by a blind
``convert("RGB")``: 16-bit images are scaled by their bit depth (a plain conversion clips them to
white), float images by their range. Only an allowlist of formats is decoded, so a file that merely
carries an image extension (an EPS, say) never reaches a decoder it did not ask for.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
# JPEGs decode at a reduced DCT scale but never below this longer side; training and scanning use
# the same value so the model sees the same pixels in both, and overlays are capped at it.
WORKING_LONG_SIDE = 1024
EIGHT_BIT_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


class DecodeError(Exception):
    """The file is not an image batchcam can read; the message is a one-line reason for the CSV."""


@dataclass
class DecodedImage:
    """A grayscale picture (possibly decoded at reduced scale) and the original, oriented size."""

    gray: Image.Image
    width: int
    height: int


def decode_grayscale(data: bytes, min_long_side: int | None = None) -> DecodedImage:
    """Decode image bytes into an 8-bit grayscale image, EXIF orientation applied.

    ``min_long_side`` lets a JPEG decode at a reduced DCT scale (1/2, 1/4, 1/8) as long as its
    longer side stays at least that many pixels: a 2048 px radiograph decodes several times faster
    when the model and the overlay need 1024 px at most.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            original_size = image.size
            if image.format == "JPEG" and min_long_side:
                _draft_for(image, min_long_side)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DecodeError(f"refused: too many pixels (decompression bomb guard): {e}") from None
        except UnidentifiedImageError:
            raise DecodeError(f"not a supported image (allowed: {', '.join(ALLOWED_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise DecodeError(f"cannot decode image: {_one_line(e)}") from None
    width, height = _oriented_size(image, original_size)
    image = _apply_orientation(image)
    return DecodedImage(gray=to_grayscale(image), width=width, height=height)


def to_grayscale(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale rendering of any Pillow mode, scaled by what the values mean."""
    if image.mode == "L":
        return image
    if image.mode in EIGHT_BIT_MODES:
        return image.convert("L")
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    elif image.mode == "I":
        values = np.asarray(image, dtype=np.int64).astype(np.float32)
        values = values / 65535.0 if values.min() >= 0 and values.max() <= 65535 else _stretch(values)
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        values = values if values.min() >= 0 and values.max() <= 1 else _stretch(values)
    else:
        raise DecodeError(f"unsupported image mode {image.mode}")
    return Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8), mode="L")


def resize_square(gray: Image.Image, size: int) -> np.ndarray:
    """The model's view: the whole image squashed to size x size (as in training), uint8."""
    return np.asarray(gray.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def fit_within(gray: Image.Image, max_side: int) -> Image.Image:
    """The image scaled down (never up) so its longer side is at most max_side, aspect kept."""
    scale = max_side / max(gray.size)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    return gray.resize(size, Image.BILINEAR)


def _draft_for(image: Image.Image, min_long_side: int) -> None:
    width, height = image.size
    scale = min_long_side / max(width, height)
    if scale < 1:
        image.draft("L" if image.mode == "L" else image.mode,
                    (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))


def _oriented_size(image: Image.Image, original_size: tuple[int, int]) -> tuple[int, int]:
    orientation = _orientation(image)
    width, height = original_size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF: Pillow raises many types; orientation is then ignored
        return 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    if _orientation(image) == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not lose the image; it is shown unrotated
        return image


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
