"""DICOM files as the same faithful 8-bit grayscale ``DecodedImage`` that imaging gives.

The display pipeline is the standard's: stored values -> modality LUT (rescale slope/intercept or
a Modality LUT) -> VOI LUT or window -> MONOCHROME1 inverted so bone is bright -> 8 bits. Without
a VOI LUT or window the modality values are min-max stretched, as viewers do.

Only the image pixel, modality LUT and VOI LUT modules and the three coded tags that say what the
film is (Modality, BodyPartExamined, ViewPosition: ``decode.selection``) are parsed
(``specific_tags``): patient, study and institution elements are skipped unread, so no patient
identifier can reach a row, a log line or the gallery, whatever the file holds. Needs the
optional extra ``dicom`` (pydicom 3 plus the pylibjpeg plugins for compressed transfer syntaxes);
without it every DICOM file is an error row that says how to install it.

What a file may cost is checked before it is spent: a deflated data set is inflated by batchcam,
up to ``MAX_INFLATED_BYTES``, before pydicom sees it (pydicom alone would inflate it whole); an
encapsulated frame's own header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ) must agree with Rows
and Columns, which the decompression-bomb guard has already checked; and an RLE frame is never
handed to pydicom's own RLE decoder, which expands a segment whole, without first counting what
its segments expand to. Reasons and warnings name an element and its problem, never its text.
"""
from __future__ import annotations

import functools
import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from batchcam.config import Selection
from batchcam.decode.pixels import (
    MARKER_AFTER_SCAN,
    STANDALONE_MARKERS,
    DecodedImage,
    DecodeError,
    NotSelected,
    gray_from_unit,
    has_dicom_magic,
    one_line,
    refuse_too_many_pixels,
)
from batchcam.decode.selection import SELECTION_TAGS, acquisition_of, skip_reason

if TYPE_CHECKING:  # pydicom itself is imported where a DICOM is read: it is optional and slow to import
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels.decoders.base import Decoder
    from pydicom.uid import UID

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
    *SELECTION_TAGS,
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
# The defined terms of (0028,0004) (PS3.3 C.7.6.3.1.2, retired ones included): the only values a
# reason may quote, and then as this spelling, not the file's.
DEFINED_PHOTOMETRIC = (*MONOCHROME, *COLOUR, "PALETTE COLOR", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "XYB")
# Display elements that must hold numbers (DS) when present.
DECIMAL_ELEMENTS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
# A deflated data set is inflated up to this many bytes and refused beyond: the largest image the
# decompression-bomb guard lets through (Image.MAX_IMAGE_PIXELS, 89.5 M pixels) at 8 bytes a
# pixel is 716 MB, so 1 GiB leaves room for the other elements and no real radiograph comes near.
MAX_INFLATED_BYTES = 2 ** 30
INFLATE_CHUNK = 16 * 2 ** 20  # what comes out of zlib at a time
DEFLATE_INPUT_CHUNK = 2 ** 20  # what goes in at a time
# Values longer than this are read only when used (pixel data, say): an undefined-length element
# outside DISPLAY_TAGS, which pydicom would otherwise gather whole before dropping it, is skipped.
DEFER_SIZE = 2 ** 20
# pydicom reads a file object once or twice per element or item it parses; past this many reads
# the data set is refused (see _BudgetedReader). A single-frame radiograph needs a few thousand.
MAX_DICOM_READS = 200_000
# An RLE segment holds one byte of each pixel; pydicom's own decoder keeps what it expands beyond
# that as padding, so a segment may expand to this much before it is refused (see _check_rle_segments).
RLE_SEGMENT_SLACK = 256
# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC), DHP (hierarchical
# mode's whole size) and JPEG-LS SOF55; DNL (a height given after the scan) and a JPEG-LS LSE of
# type 4 (oversize dimensions) move the size out of the header, so a frame using them is refused.
JPEG_FRAME_HEADERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0),
                                0xDE, 0xF7})
JPEG_SOS, JPEG_EOI, JPEG_DNL, JPEG_SOF55, JPEG_LSE = 0xDA, 0xD9, 0xDC, 0xF7, 0xF8
# Inside a JPEG-LS scan 0xFF is followed by a byte below 0x80 (a stuffed bit); a marker is 0xFF
# then 0x80 or more, restart markers (0xD0-0xD7) staying inside the scan.
_JPEG_LS_MARKER_AFTER_SCAN = re.compile(rb"\xff[\x80-\xcf\xd8-\xfe]")
# JPEG 2000 (PS3.5 A.4.4, ISO 15444-1 A.5.1): a tile-part index is 16 bits, so no more tiles than this.
J2K_MAX_TILES = 65535


@dataclass(frozen=True)
class Geometry:
    """What the checks found, as numbers batchcam chose to trust."""

    rows: int
    columns: int
    samples: int
    photometric: str


def decode_dicom(data: bytes, has_preamble: bool = True, selection: Selection | None = None) -> DecodedImage:
    """Decode one DICOM file's bytes; every failure is a ``DecodeError`` with a one-line reason.

    ``has_preamble`` False reads a bare data set (a ``.dcm`` file without the Part 10 header).
    A film that ``selection`` does not score raises ``NotSelected`` before its pixels are decoded
    (None scores every film).
    """
    pydicom = _import_pydicom()
    forced = not has_preamble
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem, source = "malformed data set", None
        try:
            source = _bounded_source(data, forced)
            ds = pydicom.dcmread(source, force=forced, specific_tags=list(DISPLAY_TAGS), defer_size=DEFER_SIZE)
            _refuse_if_over_budget(source)
            truncated = any("end of file" in str(w.message).lower() for w in caught)
            if selection is not None and (reason := skip_reason(acquisition_of(ds), selection)):
                raise NotSelected(reason)
            problem = "pixel data could not be decoded"
            unit, geometry = _display_unit(ds, truncated, forced)
        except (DecodeError, NotSelected):
            raise
        except Exception as e:  # pydicom raises many types on hostile files; each is one bad row
            _refuse_if_over_budget(source)  # pydicom may have wrapped the budget's exception in its own
            # Its messages quote element values, so only the exception's type is said.
            raise DecodeError(f"cannot decode DICOM: {problem} ({type(e).__name__})") from None
    return DecodedImage(gray=gray_from_unit(unit), width=geometry.columns, height=geometry.rows,
                        warnings=_safe_warnings(w.message for w in caught))


def _import_pydicom() -> ModuleType:
    """pydicom, configured not to validate values (its warnings would quote them), or a DecodeError."""
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (pydicom 3: the pixel pipeline used below)
    except ImportError:
        raise DecodeError(f"DICOM support (pydicom 3) is not installed: {INSTALL_HINT}") from None
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    return pydicom


def _display_unit(ds: Dataset, truncated: bool, forced: bool) -> tuple[np.ndarray, Geometry]:
    """The frame's display values in 0..1, bright meaning dense (bone), and the checked geometry."""
    geometry, decoder = _check_decodable(ds, truncated, forced)
    arr = _first_frame_pixels(ds, decoder, geometry)
    if geometry.photometric in COLOUR:  # pydicom hands YBR over as RGB
        depth = _int_element(ds, "BitsStored", default=8, minimum=1)
        return (arr.astype(np.float64) @ LUMA_WEIGHTS) / (2 ** depth - 1), geometry
    return _monochrome_unit(arr, ds, invert=geometry.photometric == "MONOCHROME1"), geometry


def _check_decodable(ds: Dataset, truncated: bool, forced: bool) -> tuple[Geometry, Decoder]:
    """Refuse, with a specific reason, what pixel decoding would refuse vaguely (or not at all),
    or what it would only refuse after spending too much; the geometry and the pixel decoder."""
    from pydicom.pixels import get_decoder

    if not any(tag in ds for tag in PIXEL_DATA_TAGS):
        if truncated:
            raise DecodeError("truncated DICOM: the file ends before its pixel data does")
        if forced and "Rows" not in ds:
            raise DecodeError("not a DICOM file (no DICM header, no image elements)")
        raise DecodeError("DICOM file has no pixel data")
    photometric = _photometric(ds)
    frames = _int_element(ds, "NumberOfFrames", default=1, minimum=0) or 1
    if frames != 1:
        raise DecodeError(f"DICOM with {frames} frames: only single-frame images are supported")
    rows = _int_element(ds, "Rows", minimum=1)
    columns = _int_element(ds, "Columns", minimum=1)
    refuse_too_many_pixels(columns, rows)
    samples = _int_element(ds, "SamplesPerPixel", default=1, minimum=1)
    for keyword in ("BitsAllocated", "BitsStored"):
        _int_element(ds, keyword, default=1, minimum=1)
    _int_element(ds, "PixelRepresentation", default=0, minimum=0)
    for keyword in DECIMAL_ELEMENTS:
        _check_decimal(ds, keyword)
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
    geometry = Geometry(rows=rows, columns=columns, samples=samples, photometric=photometric)
    if not syntax.is_compressed and "PixelData" in ds:
        _check_native_length(ds, geometry)
    if syntax.is_encapsulated and "PixelData" in ds:
        _check_encapsulated_frame(_encapsulated_frame(ds), syntax, geometry)
    return geometry, decoder


def _photometric(ds: Dataset) -> str:
    """(0028,0004) as one of the supported terms, or a reason that quotes only a defined term."""
    try:
        value = ds.get("PhotometricInterpretation")
    except Exception:
        raise DecodeError("malformed DICOM element PhotometricInterpretation") from None
    if value is None or value == "":
        raise DecodeError("missing DICOM element PhotometricInterpretation")
    if not isinstance(value, str):  # several values, or bytes pydicom could not read as text
        raise DecodeError("malformed DICOM element PhotometricInterpretation")
    photometric = value.strip().upper()
    if photometric in MONOCHROME + COLOUR:
        return photometric
    if photometric in DEFINED_PHOTOMETRIC:
        raise DecodeError(f"unsupported DICOM photometric interpretation '{photometric}'")
    raise DecodeError("unsupported DICOM photometric interpretation (not a defined term)")


def _int_element(ds: Dataset, keyword: str, default: int | None = None, minimum: int = 0) -> int:
    """One whole number at least ``minimum``; ``default`` when absent or empty, else a reason."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if default is None:
                raise DecodeError(f"missing DICOM element {keyword}")
            return default
        if isinstance(value, (str, bytes)) or not isinstance(value, (int, float)):
            raise TypeError  # a text pydicom could not convert, or several values
        number = float(value)
    except DecodeError:
        raise
    except Exception:
        raise DecodeError(f"malformed DICOM element {keyword}") from None
    if not number.is_integer() or number < minimum:
        raise DecodeError(f"malformed DICOM element {keyword}")
    return int(number)


def _check_decimal(ds: Dataset, keyword: str) -> None:
    """A decimal display element, when present, is one or more finite numbers."""
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return
        values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
        numbers = [float(v) for v in values if not isinstance(v, (str, bytes))]
        readable = len(numbers) == len(values) > 0 and all(math.isfinite(n) for n in numbers)
    except Exception:
        readable = False
    if not readable:
        raise DecodeError(f"malformed DICOM element {keyword}")


def _check_native_length(ds: Dataset, geometry: Geometry) -> None:
    """Uncompressed pixel data shorter than its geometry needs is a cut file, said as such."""
    bits = geometry.rows * geometry.columns * geometry.samples * _int_element(ds, "BitsAllocated", minimum=1)
    expected, present = (bits + 7) // 8, len(ds.PixelData)
    if present < expected:
        raise DecodeError(f"truncated DICOM: pixel data has {present} of {expected} bytes")


# ---- what a file may cost: deflate, encapsulated frames --------------------------------------

class _ReadBudgetSpent(Exception):
    """Raised inside pydicom's parsing once its reads pass ``MAX_DICOM_READS``."""


class _BudgetedReader(io.BytesIO):
    """The bytes pydicom parses, counting its reads and stopping it after ``MAX_DICOM_READS``.

    ``specific_tags`` lets pydicom skip a defined-length element by seeking past it, but an
    undefined-length sequence is parsed item by item into Python objects wherever it is, a few
    hundred bytes each for the 16 bytes an empty item takes in the file, so a file of empty items
    costs many times its size in memory (benchmarks/RESULTS.md has the figure). Every element and
    item pydicom reads starts with a read of this file object, so counting reads bounds what a
    data set can cost, whatever its shape.
    """

    def __init__(self, data: bytes = b""):
        super().__init__(data)
        self.reads, self.spent = 0, False

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_DICOM_READS:
            self.spent = True
            raise _ReadBudgetSpent
        return super().read(size)


def _refuse_if_over_budget(source: object) -> None:
    if getattr(source, "spent", False):
        raise DecodeError(f"refused: DICOM data set has too many elements and items (over {MAX_DICOM_READS} reads)")


def _bounded_source(data: bytes, forced: bool) -> _BudgetedReader:
    """What pydicom reads: the file as it is, or a deflated one already inflated, within bounds.

    pydicom inflates a Deflated Explicit VR Little Endian data set whole, with no limit, before
    reading a single element, so a one-megabyte file can become gigabytes. Here the file meta is
    read as pydicom reads it, the deflated stream is first inflated to count its size only
    (``INFLATE_CHUNK`` at a time, refused beyond ``MAX_INFLATED_BYTES``), then inflated into a
    new file whose meta says Explicit VR Little Endian, which is what the data set then is.
    """
    from pydicom.filebase import DicomIO
    from pydicom.filereader import read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    fp = _BudgetedReader(data)
    try:
        preamble = read_preamble(fp, forced)
        meta_start = fp.tell()
        meta = _read_file_meta(fp)
        meta_end = fp.tell()
        _skip_command_set(fp)
    except Exception:
        _refuse_if_over_budget(fp)  # a file meta group of countless elements
        raise
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(0)  # pydicom reads it all again, within what is left of the same budget
        return fp
    body = memoryview(data)[fp.tell():]
    _inflate(body, None)  # counting only: refused here before anything is kept
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength  # its count changed with the UID; pydicom reads on without it
    out = _BudgetedReader()
    out.write(data[:meta_start] if preamble is not None else b"")
    write_file_meta_info(DicomIO(out), meta, enforce_standard=False)
    out.write(data[meta_end:len(data) - len(body)])  # a command set, if any, as it was
    _inflate(body, out)
    out.seek(0)
    return out


def _read_file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The file meta group, read by pydicom's own reader so both agree on the transfer syntax."""
    try:
        from pydicom.filereader import _read_file_meta_info
    except ImportError:  # a later pydicom without it: the same reading, spelled out
        from pydicom.dataset import FileMetaDataset
        from pydicom.filereader import read_dataset

        return FileMetaDataset(read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=lambda tag, vr, length: tag >> 16 != 2))
    return _read_file_meta_info(fp)


def _skip_command_set(fp: BinaryIO) -> None:
    """pydicom reads group 0000 elements (if any) before it inflates; the stream starts after them."""
    try:
        from pydicom.filereader import _read_command_set_elements
    except ImportError:
        return
    _read_command_set_elements(fp)


def deflated_size(data: bytes, limit: int) -> int | None:
    """How many bytes a deflated DICOM's data set inflates to, counted in bounded chunks and never
    past ``limit + 1``; None when the file is not deflated (or its file meta cannot be read).

    For callers with a tighter budget than ``MAX_INFLATED_BYTES`` (serve: the upload cap)."""
    from pydicom.filereader import read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = _BudgetedReader(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_preamble(fp, not has_dicom_magic(data))
            if _read_file_meta(fp).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                return None
            _skip_command_set(fp)
    except Exception:  # noqa: BLE001 - pydicom cannot read this file meta either: decoding says why
        return None
    try:
        return _inflate(memoryview(data)[fp.tell():], None, limit)
    except DecodeError:
        return 0  # corrupt or cut short: decoding refuses it with its own reason


def _inflate(body: memoryview, out: _BudgetedReader | None, limit: int = MAX_INFLATED_BYTES) -> int:
    """Inflate raw deflate data into ``out`` (or only count it), refused beyond ``limit``; returns its size.

    Input goes in ``DEFLATE_INPUT_CHUNK`` at a time and output comes out ``INFLATE_CHUNK`` at a
    time, so neither the input's unconsumed tail nor any one output chunk can be large. As
    pydicom does, whatever follows the end of the deflate stream is ignored.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for start in range(0, len(body), DEFLATE_INPUT_CHUNK):
            pending: memoryview | bytes = body[start:start + DEFLATE_INPUT_CHUNK]
            while True:
                chunk = inflater.decompress(pending, INFLATE_CHUNK)
                total += len(chunk)
                if total > limit:
                    if out is None and limit != MAX_INFLATED_BYTES:
                        return total  # counting for a caller with its own budget: it decides
                    raise DecodeError(f"refused: deflated DICOM inflates beyond {limit // 2 ** 20} MiB")
                if out is not None:
                    out.write(chunk)
                pending = inflater.unconsumed_tail
                if inflater.eof or (not pending and len(chunk) < INFLATE_CHUNK):
                    break  # this input is used up and nothing is left to come out of it
            if inflater.eof:
                break
    except zlib.error:
        raise DecodeError("cannot decode DICOM: deflated data set is corrupt") from None
    if not inflater.eof:
        raise DecodeError("truncated DICOM: the deflated data set is cut short")
    return total


def _encapsulated_frame(ds: Dataset) -> bytes:
    """The one frame's encoded bytes, found exactly as pydicom's decoder finds them for index 0."""
    from pydicom.encaps import get_frame

    extended = None
    if 0x7FE00001 in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        if len(extended[0]) != len(extended[1]):
            extended = None  # pydicom ignores a table whose two halves disagree
    try:
        return get_frame(ds.PixelData, 0, number_of_frames=1, extended_offsets=extended)
    except Exception:
        raise DecodeError("cannot decode DICOM: malformed encapsulated pixel data") from None


def _check_encapsulated_frame(frame: bytes, syntax: UID, geometry: Geometry) -> None:
    """Refuse a frame whose own header says another size than Rows and Columns, before decoding.

    A decoder allocates what the frame's header says, whatever the DICOM claims: a 64x64 DICOM
    holding a 16000x16000 JPEG would cost gigabytes before the mismatch showed.
    """
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

    if syntax == RLELossless:
        return  # no size in its header: decoded within Rows x Columns (see _first_frame_pixels)
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        kind, reader = ("JPEG-LS" if syntax in JPEGLSTransferSyntaxes else "JPEG"), _jpeg_frame_sizes
    elif syntax in JPEG2000TransferSyntaxes:
        kind, reader = "JPEG 2000", _j2k_frame_sizes
    else:
        raise DecodeError(f"refused: cannot check the size of an encapsulated frame in transfer syntax "
                          f"{_syntax_label(syntax)}")
    try:
        sizes = reader(frame)
    except (ValueError, IndexError, struct.error):
        raise DecodeError(f"refused: cannot read the size of the encapsulated {kind} frame") from None
    (width, height, components), *later = sizes
    bigger = [size for size in later if size[0] > width or size[1] > height]
    for frame_width, frame_height, _ in [(width, height, components), *bigger]:
        if (frame_width, frame_height) != (geometry.columns, geometry.rows):
            raise DecodeError(f"refused: encapsulated frame is {frame_width}x{frame_height} but the DICOM says "
                              f"{geometry.columns}x{geometry.rows}")
    if any(size[2] != geometry.samples for size in sizes):
        count = next(size[2] for size in sizes if size[2] != geometry.samples)
        samples = f"{geometry.samples} sample{'s' if geometry.samples != 1 else ''} per pixel"
        raise DecodeError(f"refused: encapsulated frame has {count} components but the DICOM says {samples}")


def _jpeg_frame_sizes(frame: bytes) -> list[tuple[int, int, int]]:
    """(width, height, components) of every frame header in a JPEG or JPEG-LS codestream, in order.

    Walks the marker segments from SOI to EOI, skipping each scan's entropy-coded data; raises
    ValueError where the size cannot be known from the headers.
    """
    if frame[:2] != b"\xff\xd8":
        raise ValueError("no SOI")
    sizes: list[tuple[int, int, int]] = []
    position, end, jpeg_ls = 2, len(frame), False
    while position + 1 < end:
        if frame[position] != 0xFF:  # stray bytes between segments, as decoders tolerate
            position = frame.find(b"\xff", position)
            if position < 0:
                break
            continue
        marker = frame[position + 1]
        if marker == 0xFF:
            position += 1
            continue
        if marker == JPEG_EOI:
            break
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(frame[position + 2:position + 4], "big")
        if position + 4 > end or length < 2 or position + 2 + length > end:
            raise ValueError("cut segment")
        segment = frame[position + 4:position + 2 + length]
        if marker in JPEG_FRAME_HEADERS:
            if len(segment) < 6:
                raise ValueError("short frame header")
            sizes.append((int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"), segment[5]))
            jpeg_ls = jpeg_ls or marker == JPEG_SOF55
        elif marker == JPEG_DNL or (marker == JPEG_LSE and segment[:1] == b"\x04"):
            raise ValueError("size given outside the frame header")
        position += 2 + length
        if marker == JPEG_SOS:
            if not sizes:
                raise ValueError("scan before any frame header")
            found = (_JPEG_LS_MARKER_AFTER_SCAN if jpeg_ls else MARKER_AFTER_SCAN).search(frame, position)
            if found is None:
                break
            position = found.start()
    if not sizes:
        raise ValueError("no frame header")
    return sizes


def _j2k_frame_sizes(frame: bytes) -> list[tuple[int, int, int]]:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker (in a JP2 file, that of
    its contiguous codestream box): the reference grid less the image offset."""
    codestream = _jp2_codestream(frame) if frame[4:8] == b"jP  " else frame
    if codestream[:4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ
        raise ValueError("no SOC and SIZ")
    (x_size, y_size, x_offset, y_offset, x_tile, y_tile, x_tile_offset, y_tile_offset,
     components) = struct.unpack_from(">8IH", codestream, 8)
    if not (x_offset < x_size and y_offset < y_size and x_tile and y_tile and x_tile_offset <= x_offset
            and y_tile_offset <= y_offset and x_tile_offset + x_tile > x_offset
            and y_tile_offset + y_tile > y_offset and components):
        raise ValueError("impossible SIZ")
    tiles = -(-(x_size - x_tile_offset) // x_tile) * -(-(y_size - y_tile_offset) // y_tile)
    if tiles > J2K_MAX_TILES:
        raise ValueError("more tiles than a codestream can index")
    return [(x_size - x_offset, y_size - y_offset, components)]


def _jp2_codestream(data: bytes) -> bytes:
    """The contiguous codestream box (jp2c) of a JP2 file."""
    position = 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if length == 1:
            length, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif length == 0:
            length = len(data) - position
        if length < header:
            raise ValueError("bad box length")
        if kind == b"jp2c":
            return data[position + header:position + length]
        position += length
    raise ValueError("no codestream box")


def _first_frame_pixels(ds: Dataset, decoder: Decoder, geometry: Geometry) -> np.ndarray:
    """The first (only) frame as pydicom decodes it, never by an unbounded RLE decoder.

    Decoding index 0 alone (not ``pixel_array``'s default of every frame) means only the frame
    checked above is decoded: a JPEG frame that ends early cannot drag in excess frames. For RLE,
    pydicom's own decoder (the plugin named "pydicom") expands each segment whole before
    comparing it with Rows x Columns, so a 64x64 image can expand to gigabytes; the other plugins
    stop at Rows x Columns. They are tried first, and pydicom's only after the segments were
    counted (``_check_rle_segments``).
    """
    from pydicom.uid import RLELossless

    if ds.file_meta.TransferSyntaxUID != RLELossless or "PixelData" not in ds:
        ds.pixel_array_options(index=0)
        return ds.pixel_array
    plugins = decoder.available_plugins
    failure: Exception | None = None
    for plugin in [name for name in plugins if name != "pydicom"]:
        try:
            ds.pixel_array_options(index=0, decoding_plugin=plugin)
            return ds.pixel_array
        except Exception as e:
            failure = e
    if "pydicom" not in plugins:
        raise failure or RuntimeError("no RLE decoder")
    _check_rle_segments(_encapsulated_frame(ds), geometry.rows * geometry.columns)
    ds.pixel_array_options(index=0, decoding_plugin="pydicom")
    return ds.pixel_array


def _check_rle_segments(frame: bytes, pixels: int) -> None:
    """Count what each RLE segment expands to, as pydicom's decoder would expand it, and refuse
    one that expands beyond a segment's size (Rows x Columns bytes) plus ``RLE_SEGMENT_SLACK``.

    pydicom keeps expanded bytes past Rows x Columns as padding (and warns); counting stops as
    soon as the bound is passed, so a hostile segment costs no more time than a real one.
    """
    if len(frame) < 64:
        return  # pydicom refuses a header this short itself
    count = struct.unpack_from("<L", frame)[0]
    if count > 15:
        return  # and more than 15 segments
    offsets = [*struct.unpack_from(f"<{count}L", frame, 4), len(frame)]
    limit = pixels + RLE_SEGMENT_SLACK
    for index in range(count):
        if _rle_expanded_length(frame[offsets[index]:offsets[index + 1]], limit) > limit:
            raise DecodeError("refused: an RLE segment decodes far beyond Rows x Columns")


def _rle_expanded_length(segment: bytes, stop_after: int) -> int:
    """The PackBits expansion's length, counted as pydicom's ``_rle_decode_segment`` expands it."""
    total, position, end = 0, 0, len(segment)
    while position < end and total <= stop_after:
        header = segment[position] + 1
        position += 1
        if header > 129:  # a run: the next byte, 258 - header times
            total += 258 - header if position < end else 0
            position += 1
        elif header < 129:  # a literal: the next header bytes
            total += min(header, end - position)
            position += header
    return total


def _ensure_transfer_syntax(ds: Dataset) -> None:
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


def _monochrome_unit(arr: np.ndarray, ds: Dataset, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    window = _voi_output_range(ds)
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        values = _apply_voi_table(values, ds) if _has_voi_lut(ds) else apply_windowing(values, ds)
        low, high = window
    return _unit(values, low, high, invert)


def _apply_voi_table(values: np.ndarray, ds: Dataset) -> np.ndarray:
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


def _lut_values(item: Dataset, ds: Dataset) -> np.ndarray:
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


def _voi_output_range(ds: Dataset) -> tuple[float, float] | None:
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


def _has_voi_lut(ds: Dataset) -> bool:
    """A usable VOI LUT, which (as in pydicom's apply_voi_lut) is preferred to a window."""
    sequence = ds.get("VOILUTSequence")
    return bool(sequence) and None not in (sequence[0].get("LUTDescriptor"), sequence[0].get("LUTData"))


def _syntax_label(uid: str) -> str:
    """A transfer syntax's name and UID; an odd value is shown only if it looks like a UID."""
    code = str(uid)
    if not re.fullmatch(r"[0-9.]{1,64}", code):
        return "(not a valid UID)"
    name = getattr(uid, "name", code)
    return code if name == code else f"{name} ({code})"


# A quoted value in a warning ('...' or "...", escapes included), and what a kept warning may hold.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_WARNING_TEXT = re.compile(r"[A-Za-z0-9 _.,:;()\[\]/+=%'-]*")
WITHHELD = "(value withheld)"


def _quoted_or_withheld(match: re.Match) -> str:
    return match.group(0) if match.group(0)[1:-1] in _element_names() else WITHHELD


@functools.lru_cache(maxsize=1)
def _element_names() -> frozenset[str]:
    from pydicom.datadict import DicomDictionary

    return frozenset(entry[2] for entry in DicomDictionary.values())


def _safe_warnings(messages: Iterable[object]) -> tuple[str, ...]:
    """pydicom's warnings as one-line notes, each quoted value withheld, said once each.

    pydicom quotes element values in its warnings (an unknown character set, say), and element
    names too: a quoted element name from pydicom's dictionary stays (a fixed set, whatever the
    file holds), anything else quoted is withheld. A warning that still holds anything but plain
    words and numbers is replaced by a note that it was withheld.
    """
    notes: list[str] = []
    for message in messages:
        text = " ".join(_QUOTED.sub(_quoted_or_withheld, str(message)).split())
        if not _WARNING_TEXT.fullmatch(text):
            text = "a pydicom warning was withheld: it quoted the file's content"
        note = f"DICOM: {one_line(text)}"
        if note not in notes:
            notes.append(note)
    return tuple(notes)
