"""What both decoders share (Pillow formats in imaging.py, DICOM in dicom.py): the decoded picture,
the per-file error, the pixel-count guard, the DICOM magic, and one-line reasons."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

DICOM_MAGIC, DICOM_MAGIC_OFFSET = b"DICM", 128


class DecodeError(Exception):
    """The file is not an image batchcam can read; the message is a one-line reason for the CSV."""


class NotSelected(Exception):
    """The file was read but is not what the model is for (decode.selection); the message is the
    one-line reason of its ``skipped`` row. Raised before any pixel is decoded."""


@dataclass
class DecodedImage:
    """A grayscale picture (possibly decoded at reduced scale), the original oriented size, and
    notes worth a log line that did not stop the image (malformed EXIF ignored, say)."""

    gray: Image.Image
    width: int
    height: int
    warnings: tuple[str, ...] = ()


def has_dicom_magic(data: bytes) -> bool:
    """A DICOM Part 10 file: ``DICM`` right after its 128-byte preamble."""
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM by its magic, or by a ``.dcm`` name (old files may lack the preamble and magic)."""
    return has_dicom_magic(data) or name.lower().endswith(".dcm")


def gray_from_unit(values: np.ndarray) -> Image.Image:
    """Values in 0..1 (clipped there) as an 8-bit grayscale image; non-finite values refuse it."""
    if not np.all(np.isfinite(values)):
        raise DecodeError("cannot decode image: pixel values are not finite (NaN or infinity)")
    return Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8), mode="L")


def stretch(values: np.ndarray) -> np.ndarray:
    """Min-max scale to 0..1; a flat image becomes all zeros."""
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values, dtype=np.float64) if high <= low else (values - low) / (high - low)


def refuse_too_many_pixels(width: int, height: int) -> None:
    """Pillow's decompression-bomb limit, applied before any pixel is decoded.

    Pillow only warns between ``MAX_IMAGE_PIXELS`` and twice that; batchcam refuses from the
    limit itself, here and not through the warnings machinery, so the guard holds in every thread
    and for DICOM too.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise DecodeError(f"refused: {width}x{height} is more than {limit} pixels (decompression bomb guard)")


MARKER_AFTER_SCAN = re.compile(rb"\xff(?![\x00\xd0-\xd7\xff])")
STANDALONE_MARKERS = frozenset({0x00, 0x01, *range(0xD0, 0xD9)})


def one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
