"""DICOM files as the same faithful 8-bit grayscale ``DecodedImage`` that imaging gives.

The display pipeline is the standard's: stored values -> modality LUT (rescale slope/intercept or
a Modality LUT) -> VOI LUT or window -> MONOCHROME1 inverted so bone is bright -> 8 bits. Without
a VOI LUT or window the modality values are min-max stretched, as viewers do.

Only the image pixel, modality LUT and VOI LUT modules are parsed (``specific_tags``): patient,
study and institution elements are skipped unread, so no patient identifier can reach a row, a
log line or the gallery, whatever the file holds. Needs the optional extra ``dicom`` (pydicom 3
plus the pylibjpeg plugins for compressed transfer syntaxes); without it every DICOM file is an
error row that says how to install it.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np

from batchcam.imaging import DecodedImage, DecodeError, gray_from_unit, refuse_too_many_pixels

INSTALL_HINT = 'pip install "batchcam[dicom]"'
PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Everything pydicom needs to decode the pixels and batchcam needs to display them; nothing else.
DISPLAY_TAGS = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    *PIXEL_DATA_TAGS,
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def decode_dicom(data: bytes, has_preamble: bool = True) -> DecodedImage:
    """Decode one DICOM file's bytes; every failure is a ``DecodeError`` with a one-line reason.

    ``has_preamble`` False reads a bare data set (a ``.dcm`` file without the Part 10 header).
    """
    pydicom = _import_pydicom()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble, specific_tags=list(DISPLAY_TAGS))
            truncated = any("end of file" in str(w.message).lower() for w in caught)
            unit = _display_unit(ds, truncated, forced=not has_preamble)
        except DecodeError:
            raise
        except Exception as e:  # pydicom raises many types on hostile files; each is one bad row
            raise DecodeError(f"cannot decode DICOM: {type(e).__name__}: {_one_line(e)}") from None
    return DecodedImage(gray=gray_from_unit(unit), width=int(ds.Columns), height=int(ds.Rows),
                        warnings=tuple(f"DICOM: {_one_line(w.message)}" for w in caught))


def _import_pydicom():
    """pydicom, configured not to validate values (its warnings would quote them), or a DecodeError."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom 3: the pixel pipeline used below)
    except ImportError:
        raise DecodeError(f"DICOM support (pydicom 3) is not installed: {INSTALL_HINT}") from None
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _display_unit(ds, truncated: bool, forced: bool) -> np.ndarray:
    """The frame's display values in 0..1, bright meaning dense (bone)."""
    _check_decodable(ds, truncated, forced)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    arr = ds.pixel_array
    if photometric in COLOUR:  # pydicom hands YBR over as RGB
        depth = int(ds.get("BitsStored", 8))
        return (arr.astype(np.float64) @ LUMA_WEIGHTS) / (2 ** depth - 1)
    return _monochrome_unit(arr, ds, invert=photometric == "MONOCHROME1")


def _check_decodable(ds, truncated: bool, forced: bool) -> None:
    """Refuse, with a specific reason, what pixel decoding would refuse vaguely (or not at all)."""
    from pydicom.pixels import get_decoder

    if not any(tag in ds for tag in PIXEL_DATA_TAGS):
        if truncated:
            raise DecodeError("truncated DICOM: the file ends before its pixel data does")
        if forced and "Rows" not in ds:
            raise DecodeError("not a DICOM file (no DICM header, no image elements)")
        raise DecodeError("DICOM file has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in MONOCHROME + COLOUR:
        raise DecodeError(f"unsupported DICOM photometric interpretation {_safe_code(photometric)}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DecodeError(f"DICOM with {frames} frames: only single-frame images are supported")
    refuse_too_many_pixels(int(ds.Columns), int(ds.Rows))
    _ensure_transfer_syntax(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DecodeError(f"unsupported DICOM transfer syntax {_syntax_label(syntax)}") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise DecodeError(f"DICOM transfer syntax {_syntax_label(syntax)} needs a decoder plugin that is not "
                          f"installed ({missing}): {INSTALL_HINT}")
    if not syntax.is_compressed and "PixelData" in ds:
        _check_native_length(ds, frames)


def _check_native_length(ds, frames: int) -> None:
    """Uncompressed pixel data shorter than its geometry needs is a cut file, said as such."""
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * frames * int(ds.BitsAllocated)
    expected, present = (bits + 7) // 8, len(ds.PixelData)
    if present < expected:
        raise DecodeError(f"truncated DICOM: pixel data has {present} of {expected} bytes")


def _ensure_transfer_syntax(ds) -> None:
    """A bare data set has no file meta; its encoding, as pydicom read it, names the syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _monochrome_unit(arr: np.ndarray, ds, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    window = _voi_output_range(ds)
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        values = _apply_voi_table(values, ds) if _has_voi_lut(ds) else apply_windowing(values, ds)
        low, high = window
    return _unit(values, low, high, invert)


def _apply_voi_table(values: np.ndarray, ds) -> np.ndarray:
    """The first VOI LUT of the VOI LUT Sequence, as PS3.3 C.11.2.1.1 defines it.

    Applied here rather than with pydicom's ``apply_voi``, which in pydicom 3.0 holds the table
    indices in the table's own 8-bit type and so wraps every stored value above 255.
    """
    item = ds.VOILUTSequence[0]
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    if int(ds.get("PixelRepresentation", 0)) == 1 and first >= 2 ** 15:
        first -= 2 ** 16  # the descriptor's first value is signed for signed pixels
    table = _lut_values(item, ds)
    last = min(entries or 2 ** 16, len(table)) - 1
    return table[np.clip(np.round(values).astype(np.int64) - first, 0, last)]


def _lut_values(item, ds) -> np.ndarray:
    element = item["LUTData"]
    if element.VR == "OW":  # raw 16-bit words in the data set's byte order
        little = ds.file_meta.TransferSyntaxUID.is_little_endian
        return np.frombuffer(element.value, dtype="<u2" if little else ">u2").astype(np.float64)
    return np.asarray(element.value, dtype=np.float64).ravel()


def _unit(values: np.ndarray, low: float, high: float, invert: bool) -> np.ndarray:
    """Scale low..high to 0..1, or high..low when inverting.

    Inverting as (high - v) rather than 1 - (v - low) keeps the arithmetic exact on integer
    values, so a MONOCHROME1 file and its MONOCHROME2 twin give the very same 8-bit image.
    """
    if high <= low:
        return np.zeros(values.shape)
    return ((high - values) if invert else (values - low)) / (high - low)


def _voi_output_range(ds) -> tuple[float, float] | None:
    """The (low, high) output range of the VOI transform, or None when there is none.

    A VOI LUT's output spans 0..2^n-1 (n from its descriptor); a window's spans what pydicom
    derives from the bit depth and rescale, which the window of -inf and +inf reveals exactly.
    """
    from pydicom.pixels import apply_windowing

    if _has_voi_lut(ds):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** depth - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
    low, high = float(ends.min()), float(ends.max())
    return (low, high) if high > low else None


def _has_voi_lut(ds) -> bool:
    """A usable VOI LUT, which (as in pydicom's apply_voi_lut) is preferred to a window."""
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _syntax_label(uid) -> str:
    """A transfer syntax's name and UID; an odd value is shown only if it looks like a UID."""
    code = str(uid)
    if not re.fullmatch(r"[0-9.]{1,64}", code):
        return "(not a valid UID)"
    name = getattr(uid, "name", code)
    return code if name == code else f"{name} ({code})"


def _safe_code(text: str) -> str:
    return repr(text) if re.fullmatch(r"[A-Z0-9_ ]{0,32}", text) else "(unreadable value)"


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__
