"""What one hostile file may cost before it is refused, and what its refusal may say.

A file's size is checked before it is read; a deflated DICOM is inflated only up to a bound; an
encapsulated DICOM frame's own header must agree with Rows and Columns before it is decoded; and
a DICOM reason or warning names the element and the problem, never the element's text.

The bombs run in a child process under an address-space limit (``RLIMIT_AS``), so a regression
fails the test instead of taking the machine's memory; the child imports only the decoding
modules (torch alone needs gigabytes of address space), except where it needs ``ScanDataset``.
"""
from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchcam.config import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILE_MB
from batchcam.decode.dataset import ScanDataset
from batchcam.decode.imaging import decode_grayscale
from batchcam.decode.pixels import DecodeError
from batchcam.runtime import bounded
from batchcam.runtime.bounded import FileInFlux, FileTooLarge, read_consistently, read_file_bounded
from tests.dicom_films import empty_dataset

HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM, reason="pydicom is not installed (pip install -e '.[test]')")
REPO = Path(__file__).resolve().parents[2]
GIB = 2 ** 30
MIB = 2 ** 20
# What a child that only decodes may grow by; every bomb below costs far more when not refused.
SMALL_GROWTH_MB = 100
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# ---- helpers ---------------------------------------------------------------------------------

CHILD_PRELUDE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))


def peak_rss_mb():
    # VmHWM is this program's own peak; ru_maxrss would start from the forking parent's size
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


def run_limited(body: str, address_space_gib: float, timeout: float = 120) -> dict:
    """Run ``body`` in a fresh interpreter under an address-space limit; it prints one JSON line.

    ``body`` may call ``peak_rss_mb()``, the child's peak resident memory so far.
    """
    cap = int(address_space_gib * GIB)
    code = CHILD_PRELUDE.format(cap=cap) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          check=False)
    assert done.returncode == 0, f"child failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


DECODE_IN_CHILD = """
from batchcam.decode.imaging import decode_grayscale
from batchcam.decode.pixels import DecodeError
{setup}
data = open({path!r}, "rb").read()
before = peak_rss_mb()
result = {{"error": None}}
try:
    decoded = decode_grayscale(data, name={name!r})
    result["size"] = [decoded.width, decoded.height]
    result["warnings"] = list(decoded.warnings)
except DecodeError as e:
    result["error"] = str(e)
except MemoryError:
    result["error"] = "MemoryError"
result["growth_mb"] = peak_rss_mb() - before
print(json.dumps(result))
"""


def decode_in_child(path: Path, address_space_gib: float = 2.0, setup: str = "") -> dict:
    """decode_grayscale on a file, in a child limited to ``address_space_gib``: its outcome and RSS growth."""
    return run_limited(DECODE_IN_CHILD.format(path=str(path), name=path.name, setup=setup), address_space_gib)


@contextlib.contextmanager
def lenient_writing():
    """Let pydicom write values its validation would refuse (hostile files are made that way), quietly."""
    import warnings

    import pydicom

    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.writing_validation_mode = before


def dicom_file(pixels: np.ndarray | None = None, syntax: str = EXPLICIT_LE, pixel_data: bytes | None = None,
               rows: int | None = None, columns: int | None = None, bits: int = 8, **elements) -> bytes:
    """A small DICOM file: native pixels, or ``pixel_data`` already encapsulated for ``syntax``.

    A text value in ``elements`` is written as it is (raw), valid for its VR or not.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import SecondaryCaptureImageStorage

    ds = empty_dataset(SecondaryCaptureImageStorage, syntax)
    ds.Modality = "OT"
    shape = pixels.shape if pixels is not None else (rows, columns)
    ds.Rows, ds.Columns = rows or shape[0], columns or shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    with lenient_writing():
        for keyword, value in elements.items():
            if isinstance(value, tuple):  # (tag, VR, value): a private element
                ds.add_new(*value)
            elif isinstance(value, str):
                tag, raw = tag_for_keyword(keyword), value.encode("latin-1")
                raw += b" " * (len(raw) % 2)
                ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
            else:
                setattr(ds, keyword, value)
        ds.PixelData = pixel_data if pixel_data is not None else pixels.astype(f"uint{bits}").tobytes()
        if pixel_data is not None:
            ds["PixelData"].VR = "OB"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def gradient(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((x * 3 + y) % 256).astype(np.uint8)


def meta_end(data: bytes) -> int:
    """Where a Part 10 file's body starts: after (0002,0000) File Meta Information Group Length's count."""
    assert data[132:136] == b"\x02\x00\x00\x00"
    return 144 + struct.unpack_from("<I", data, 140)[0]


PLACEHOLDER = b"BOMB-GOES-HERE!!"


def deflated_dicom(zero_bytes: int = 0) -> bytes:
    """A deflated 64x64 DICOM whose private element (0009,1001) OB holds ``zero_bytes`` zeros.

    The zeros are deflated once in 16 MiB blocks, each ending in a full flush (byte aligned, no
    history), and those blocks repeated: a gibibyte of zeros costs a megabyte and milliseconds.
    """
    private = {"creator": (0x00090010, "LO", "BATCHCAM TEST"), "blob": (0x00091001, "OB", PLACEHOLDER)}
    plain = dicom_file(gradient(), **private)
    small = dicom_file(gradient(), syntax=DEFLATED, **private)
    body = plain[meta_end(plain):]
    at = body.index(PLACEHOLDER)
    assert struct.unpack_from("<I", body, at - 4)[0] == len(PLACEHOLDER)
    chunk = 16 * MIB
    assert zero_bytes % chunk == 0
    before, after = body[:at - 4] + struct.pack("<I", zero_bytes), body[at + len(PLACEHOLDER):]
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = block.compress(bytes(chunk)) + block.flush(zlib.Z_FULL_FLUSH)
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = (stream.compress(before) + stream.flush(zlib.Z_FULL_FLUSH) + zeros * (zero_bytes // chunk)
                + stream.compress(after) + stream.flush())
    return small[:meta_end(small)] + deflated + b"\x00" * (len(deflated) % 2)


def baseline_jpeg(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gradient(size)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def with_sof_size(jpeg: bytes, width: int, height: int, marker: bytes = b"\xff\xc0") -> bytes:
    """The JPEG with its frame header (SOFn) claiming width x height; the scan is left as it was."""
    forged = bytearray(jpeg)
    at = forged.index(marker)
    struct.pack_into(">HH", forged, at + 5, height, width)
    return bytes(forged)


def jpeg_ls_header_only(width: int, height: int) -> bytes:
    """A JPEG-LS codestream (SOF55) claiming width x height with a token scan: refusable by its header."""
    sof55 = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + b"\x00\x00\x00"
    return b"\xff\xd8" + sof55 + sos + b"\x00" * 64 + b"\xff\xd9"


def encapsulated(frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    return encapsulate([frame])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- a file's size is checked before it is read -----------------------------------------------

def test_the_default_cap_is_512_mib():
    assert DEFAULT_MAX_FILE_MB == 512 and DEFAULT_MAX_FILE_BYTES == 512 * MIB


def test_a_file_at_the_cap_is_read_and_one_byte_more_is_refused(tmp_path):
    at_cap = write(tmp_path / "at_cap.png", b"x" * 1000)
    over = write(tmp_path / "over.png", b"x" * 1001)
    assert read_file_bounded(at_cap, 1000) == b"x" * 1000
    data, size, mtime_ns = read_consistently(at_cap, max_bytes=1000)
    assert (data, size, mtime_ns) == (b"x" * 1000, 1000, os.stat(at_cap).st_mtime_ns)
    for read in (lambda: read_file_bounded(over, 1000), lambda: read_consistently(over, max_bytes=1000)):
        with pytest.raises(FileTooLarge) as refused:
            read()
        assert str(refused.value) == "file too large: 1001 bytes (limit 1000 bytes, --max-file-mb)"
        assert "\n" not in str(refused.value)


def test_a_refused_file_is_an_error_decided_again_on_every_run(tmp_path):
    over = write(tmp_path / "over.png", b"x" * 2048)
    with pytest.raises(FileTooLarge) as refused:
        read_consistently(over, max_bytes=1024)
    assert (refused.value.size, refused.value.mtime_ns) == (2048, os.stat(over).st_mtime_ns)

    class Item:
        relpath, path = "over.png", over

    sample = ScanDataset([Item()], image_size=32, max_file_bytes=1024)[0]
    assert sample.error == "file too large: 2.0 KiB (limit 1 KiB, --max-file-mb)"
    assert sample.transient and (sample.size, sample.mtime_ns) == (2048, os.stat(over).st_mtime_ns)


def test_missing_files_and_read_errors_keep_their_meaning(tmp_path):
    with pytest.raises(FileInFlux, match="vanished"):
        read_consistently(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError):
        read_file_bounded(tmp_path / "gone.png", 1000)
    with pytest.raises(OSError):
        read_file_bounded(tmp_path, 1000)  # a folder


def test_a_file_growing_past_the_cap_while_it_is_read_is_not_read_beyond_it(tmp_path, monkeypatch):
    path = write(tmp_path / "growing.png", b"x" * 900)
    real = bounded._read_at_most
    asked: list[int] = []

    def read_while_a_writer_appends(fd: int, limit: int) -> bytes:
        asked.append(limit)
        with open(path, "ab") as f:
            f.write(b"y" * 300)
        return real(fd, limit)

    monkeypatch.setattr(bounded, "_read_at_most", read_while_a_writer_appends)
    with pytest.raises(FileInFlux, match="changed while it was being read"):
        read_consistently(path, max_bytes=1000)
    with pytest.raises(FileTooLarge, match=r"^file too large: 1.5 KiB \(limit 1.4 KiB, --max-file-mb\)$"):
        read_file_bounded(path, 1400)  # 1200 bytes when opened, 1500 as it is read: past the cap
    assert asked == [1001, 1401]


def test_a_file_changed_while_it_is_read_is_in_flux(tmp_path, monkeypatch):
    path = write(tmp_path / "slow.png", b"x" * 100)
    real = bounded._read_at_most

    def read_then_append(fd: int, limit: int) -> bytes:
        data = real(fd, limit)
        with open(path, "ab") as f:
            f.write(b"more bytes from a slow writer")
        return data

    monkeypatch.setattr(bounded, "_read_at_most", read_then_append)
    with pytest.raises(FileInFlux, match="changed while it was being read"):
        read_consistently(path)


def test_a_sparse_40_gib_file_is_an_error_row_and_is_never_read(tmp_path):
    huge = tmp_path / "huge.png"
    huge.touch()
    os.truncate(huge, 40 * GIB)  # sparse: no disk used
    result = run_limited(f"""
        from pathlib import Path
        from batchcam.decode.dataset import ScanDataset

        class Item:
            relpath, path = "huge.png", Path({str(huge)!r})

        before = peak_rss_mb()
        try:
            sample = ScanDataset([Item()], image_size=32)[0]
            out = {{"error": sample.error, "transient": sample.transient, "size": sample.size}}
        except MemoryError:
            out = {{"error": "MemoryError"}}
        out["growth_mb"] = peak_rss_mb() - before
        print(json.dumps(out))
    """, address_space_gib=8)
    assert result["error"] == "file too large: 40.0 GiB (limit 512 MiB, --max-file-mb)"
    assert result["transient"] is True and result["size"] == 40 * GIB
    assert result["growth_mb"] < SMALL_GROWTH_MB


# ---- a deflated DICOM inflates only up to a bound ---------------------------------------------

@needs_pydicom
def test_a_deflated_dicom_decodes_like_its_plain_twin():
    from batchcam.decode.dicom import decode_dicom

    plain = decode_grayscale(dicom_file(gradient()))
    deflated = deflated_dicom()
    assert DEFLATED.encode() in deflated[:meta_end(deflated)] and b"MONOCHROME2" not in deflated
    decoded = decode_grayscale(deflated)
    assert (decoded.width, decoded.height) == (64, 64)
    assert np.array_equal(np.asarray(decoded.gray), np.asarray(plain.gray))
    assert np.array_equal(np.asarray(decode_dicom(deflated).gray), np.asarray(plain.gray))


@needs_pydicom
def test_a_deflated_dicom_bomb_is_refused_without_inflating_it(tmp_path):
    bomb = write(tmp_path / "bomb.dcm", deflated_dicom(zero_bytes=65 * 16 * MIB))  # 1040 MiB inflated
    assert len(bomb.read_bytes()) < 2 * MIB
    result = decode_in_child(bomb)
    assert result["error"] == "refused: deflated DICOM inflates beyond 1024 MiB"
    assert result["growth_mb"] < SMALL_GROWTH_MB


@needs_pydicom
def test_a_deflated_dicom_that_is_not_valid_deflate_is_one_bad_row():
    broken = bytearray(deflated_dicom())
    body = meta_end(bytes(broken))
    broken[body:body + 16] = b"\xff" * 16
    with pytest.raises(DecodeError, match=r"^cannot decode DICOM: deflated data set is corrupt$"):
        decode_grayscale(bytes(broken))


def private_element_file(path: Path, value_bytes: int, undefined_length: bool) -> Path:
    """A 64x64 DICOM whose private OB (0009,1001) holds ``value_bytes`` zeros, written sparse."""
    plain = dicom_file(gradient(), creator=(0x00090010, "LO", "BATCHCAM TEST"), blob=(0x00091001, "OB", PLACEHOLDER))
    at = plain.index(PLACEHOLDER)
    with open(path, "wb") as f:
        f.write(plain[:at - 4] + (b"\xff\xff\xff\xff" if undefined_length else struct.pack("<I", value_bytes)))
        f.truncate(f.tell() + value_bytes)  # sparse zeros
        f.seek(0, os.SEEK_END)
        f.write((b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" if undefined_length else b"") + plain[at + len(PLACEHOLDER):])
    return path


@needs_pydicom
@pytest.mark.parametrize("undefined_length", [False, True], ids=["defined length", "undefined length"])
def test_a_huge_private_element_in_a_plain_dicom_is_skipped_not_gathered(tmp_path, undefined_length):
    """Elements outside ``specific_tags`` are skipped: by a seek when their length is given, and
    (with ``defer_size``) by a scan that keeps nothing when it is not."""
    path = private_element_file(tmp_path / "private.dcm", 200 * MIB, undefined_length)
    # the file's own 200 MB are in memory before decoding; decoding adds little to them
    result = decode_in_child(path, address_space_gib=2)
    assert result["error"] is None and result["size"] == [64, 64]
    assert result["growth_mb"] < SMALL_GROWTH_MB


@needs_pydicom
def test_a_data_set_of_countless_empty_items_is_refused_before_it_fills_memory(tmp_path):
    """pydicom parses an undefined-length sequence into objects even outside ``specific_tags``:
    a few hundred bytes of memory for each 16-byte empty item, unless the reads are counted."""
    plain = dicom_file(gradient(), creator=(0x00090010, "LO", "BATCHCAM TEST"), blob=(0x00091001, "OB", PLACEHOLDER))
    at = plain.index(PLACEHOLDER)
    assert plain[at - 8:at - 4] == b"OB\x00\x00"
    items = (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00") * 2_500_000  # 38 MiB
    sequence = plain[:at - 8] + b"SQ\x00\x00\xff\xff\xff\xff" + items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    path = write(tmp_path / "items.dcm", sequence + plain[at + len(PLACEHOLDER):])
    result = decode_in_child(path)
    assert result["error"] == "refused: DICOM data set has too many elements and items (over 200000 reads)"
    assert result["growth_mb"] < SMALL_GROWTH_MB
    few = plain[:at - 8] + b"SQ\x00\x00\xff\xff\xff\xff" + items[:16 * 1000] + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert decode_grayscale(few + plain[at + len(PLACEHOLDER):]).width == 64


@needs_pydicom
def test_pixel_data_read_when_used_decodes_as_when_read_at_once(monkeypatch):
    """Pixel data over ``DEFER_SIZE`` is read when it is used; nothing about the result changes."""
    from batchcam.decode import dicom

    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (1024, 1100)).astype(np.uint8)  # noise: RLE cannot shrink it below 1 MiB
    native = dicom_file(values)
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(native))
    ds.compress(RLE, values)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    rle = buffer.getvalue()
    assert len(ds.PixelData) > dicom.DEFER_SIZE and len(values.tobytes()) > dicom.DEFER_SIZE

    def outcome(data: bytes) -> tuple:
        try:
            decoded = decode_grayscale(data, name="x.dcm")
            return decoded.width, decoded.height, np.asarray(decoded.gray).tobytes(), decoded.warnings
        except DecodeError as e:
            return (str(e),)

    cases = [native, native[:-1000], native[:len(native) // 2], rle, rle[:-1000]]
    deferred = [outcome(data) for data in cases]
    monkeypatch.setattr(dicom, "DEFER_SIZE", None)
    assert [outcome(data) for data in cases] == deferred
    assert deferred[0][:2] == (1100, 1024) and np.array_equal(np.frombuffer(deferred[0][2], np.uint8), values.ravel())
    assert deferred[3][2] == deferred[0][2]
    pixels_at = len(native) - 1100 * 1024
    assert [d[0] for d in deferred[1:3]] == [
        "truncated DICOM: pixel data has 1125400 of 1126400 bytes",
        f"truncated DICOM: pixel data has {len(native) // 2 - pixels_at} of 1126400 bytes"]
    assert deferred[4][0].startswith("truncated DICOM")


# ---- an encapsulated frame's header must agree with Rows and Columns --------------------------

@needs_pydicom
def test_a_jpeg_frame_larger_than_the_dicom_says_is_refused_before_decoding(tmp_path):
    forged = with_sof_size(baseline_jpeg(16), 16000, 16000)
    path = write(tmp_path / "jpeg_bomb.dcm", dicom_file(syntax=JPEG_BASELINE, pixel_data=encapsulated(forged),
                                                       rows=64, columns=64))
    result = decode_in_child(path)
    assert result["error"] == "refused: encapsulated frame is 16000x16000 but the DICOM says 64x64"
    assert result["growth_mb"] < SMALL_GROWTH_MB


@needs_pydicom
def test_a_jpeg_frame_of_the_right_size_still_decodes():
    data = dicom_file(syntax=JPEG_BASELINE, pixel_data=encapsulated(baseline_jpeg(64)), rows=64, columns=64)
    decoded = decode_grayscale(data)
    assert (decoded.width, decoded.height) == (64, 64)
    assert np.abs(np.asarray(decoded.gray).astype(int) - gradient()).mean() < 4


@needs_pydicom
def test_a_jpeg_frame_that_disagrees_either_way_or_has_no_frame_header_is_refused():
    jpeg = baseline_jpeg(64)
    unreadable = "refused: cannot read the size of the encapsulated JPEG frame"
    cases = [("refused: encapsulated frame is 32x64 but the DICOM says 64x64", with_sof_size(jpeg, 32, 64)),
             ("refused: encapsulated frame is 64x0 but the DICOM says 64x64", with_sof_size(jpeg, 64, 0)),
             (unreadable, b"\xff\xd8\xff\xd9"),
             (unreadable, b"not a jpeg at all"),
             (unreadable, jpeg[:jpeg.index(b"\xff\xc0") + 6])]  # cut inside the frame header
    for reason, frame in cases:
        data = dicom_file(syntax=JPEG_BASELINE, pixel_data=encapsulated(frame), rows=64, columns=64)
        with pytest.raises(DecodeError) as refused:
            decode_grayscale(data)
        assert str(refused.value) == reason


@needs_pydicom
def test_a_jpeg_ls_frame_larger_than_the_dicom_says_is_refused_before_decoding(tmp_path):
    frame = jpeg_ls_header_only(16000, 16000)
    path = write(tmp_path / "jls_bomb.dcm", dicom_file(syntax=JPEG_LS_LOSSLESS, pixel_data=encapsulated(frame),
                                                      rows=64, columns=64))
    result = decode_in_child(path)
    assert result["error"] == "refused: encapsulated frame is 16000x16000 but the DICOM says 64x64"
    assert result["growth_mb"] < SMALL_GROWTH_MB


@needs_pydicom
def test_a_jpeg_2000_frame_larger_than_the_dicom_says_is_refused_before_decoding(tmp_path):
    if importlib.util.find_spec("openjpeg") is None:
        pytest.skip("pylibjpeg-openjpeg is not installed (the dicom extra brings it)")
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_file(gradient())))
    ds.compress(JPEG2000_LOSSLESS, gradient())
    from pydicom.encaps import get_frame

    codestream = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    siz = codestream.index(b"\xff\x51")
    assert siz == 2
    good = bytes(codestream)
    struct.pack_into(">II", codestream, siz + 6, 16000, 16000)  # Xsiz, Ysiz
    path = write(tmp_path / "j2k_bomb.dcm", dicom_file(syntax=JPEG2000_LOSSLESS, rows=64, columns=64,
                                                      pixel_data=encapsulated(bytes(codestream))))
    result = decode_in_child(path)
    assert result["error"] == "refused: encapsulated frame is 16000x16000 but the DICOM says 64x64"
    assert result["growth_mb"] < SMALL_GROWTH_MB

    # the image offset counts: 16064 wide from 16000 is 64 wide (the tiles moved with it)
    offset = bytearray(good)
    struct.pack_into(">IIII", offset, siz + 6, 16064, 16064, 16000, 16000)
    struct.pack_into(">II", offset, siz + 30, 16000, 16000)
    try:
        moved = decode_grayscale(dicom_file(syntax=JPEG2000_LOSSLESS, rows=64, columns=64,
                                            pixel_data=encapsulated(bytes(offset))))
        assert (moved.width, moved.height) == (64, 64)
    except DecodeError as e:  # whether openjpeg takes it is its business, not the size check's
        assert "encapsulated frame is" not in str(e) and "cannot read the size" not in str(e)

    # a JP2 file (boxes around the codestream) is checked by the codestream's own SIZ
    jp2 = jp2_file(bytes(codestream))
    with pytest.raises(DecodeError, match=r"^refused: encapsulated frame is 16000x16000 but the DICOM says 64x64$"):
        decode_grayscale(dicom_file(syntax=JPEG2000_LOSSLESS, rows=64, columns=64, pixel_data=encapsulated(jp2)))
    decoded = decode_grayscale(dicom_file(syntax=JPEG2000_LOSSLESS, rows=64, columns=64,
                                          pixel_data=encapsulated(jp2_file(good))))
    assert np.array_equal(np.asarray(decoded.gray), np.asarray(decode_grayscale(dicom_file(gradient())).gray))


def jp2_file(codestream: bytes) -> bytes:
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    header = box(b"jp2h", box(b"ihdr", struct.pack(">IIHBBBB", 64, 64, 1, 7, 7, 0, 0))
                 + box(b"colr", struct.pack(">BBBI", 1, 0, 0, 17)))
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 " + b"\x00" * 4 + b"jp2 ") + header
            + box(b"jp2c", codestream))


def rle_frame(segment: bytes, first_offset: int = 64) -> bytes:
    """One RLE segment behind a header; a first offset other than 64 only pydicom's own decoder takes."""
    header = struct.pack("<16L", 1, first_offset, *([0] * 14))
    return header + b"\x00" * (first_offset - 64) + segment


@needs_pydicom
@pytest.mark.parametrize("plugins", ["installed", "pydicom only"])
def test_an_rle_segment_that_decodes_far_beyond_rows_x_columns_is_bounded(tmp_path, plugins):
    bomb = b"\x81\x00" * (4 * MIB)  # 8 MiB of runs, each 128 zeros: 512 MiB for a 64x64 image
    setup = ("" if plugins == "installed" else
             "from pydicom.pixels import get_decoder\n"
             f"d = get_decoder({RLE!r}); d._available = {{'pydicom': d._available['pydicom']}}")
    for name, frame in {"odd_header.dcm": rle_frame(bomb, first_offset=68), "plain.dcm": rle_frame(bomb)}.items():
        path = write(tmp_path / name, dicom_file(syntax=RLE, pixel_data=encapsulated(frame), rows=64, columns=64))
        result = decode_in_child(path, setup=setup)
        assert result["growth_mb"] < SMALL_GROWTH_MB, (name, result)
        if result["error"] is None:
            assert result["size"] == [64, 64]
        else:
            assert result["error"].startswith(("refused: ", "cannot decode DICOM: ")), result


@needs_pydicom
def test_rle_without_pylibjpeg_rle_still_decodes_and_is_refused_beyond_its_size(monkeypatch):
    from pydicom.pixels import get_decoder

    values = gradient()
    plain = np.asarray(decode_grayscale(dicom_file(values)).gray)
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_file(values)))
    ds.compress(RLE, values, encoding_plugin="pydicom")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    decoder = get_decoder(RLE)
    monkeypatch.setattr(decoder, "_available", {"pydicom": decoder._available["pydicom"]})
    assert np.array_equal(np.asarray(decode_grayscale(buffer.getvalue()).gray), plain)
    bomb = dicom_file(syntax=RLE, pixel_data=encapsulated(rle_frame(b"\x81\x00" * 1000)), rows=64, columns=64)
    with pytest.raises(DecodeError, match=r"^refused: an RLE segment decodes far beyond Rows x Columns$"):
        decode_grayscale(bomb)


# ---- DICOM reasons and warnings name the element, never its text ------------------------------

HOSTILE_TEXT = "<script>alert(1)</script>"


@needs_pydicom
@pytest.mark.parametrize("value", [HOSTILE_TEXT, "2\\bad", "1.5", "-3"])
def test_a_malformed_number_of_frames_is_named_not_quoted(value):
    with pytest.raises(DecodeError) as refused:
        decode_grayscale(dicom_file(gradient(), NumberOfFrames=value))
    assert str(refused.value) == "malformed DICOM element NumberOfFrames"


@needs_pydicom
@pytest.mark.parametrize("value", [HOSTILE_TEXT, "ALERT ONE", "MONOCHROME3"])
def test_an_unknown_photometric_interpretation_is_not_quoted(value):
    with pytest.raises(DecodeError) as refused:
        decode_grayscale(dicom_file(gradient(), PhotometricInterpretation=value))
    assert str(refused.value) == "unsupported DICOM photometric interpretation (not a defined term)"


@needs_pydicom
def test_a_defined_but_unsupported_photometric_interpretation_is_still_named():
    with pytest.raises(DecodeError) as refused:
        decode_grayscale(dicom_file(gradient(), PhotometricInterpretation="HSV"))
    assert str(refused.value) == "unsupported DICOM photometric interpretation 'HSV'"


@needs_pydicom
@pytest.mark.parametrize("element", ["WindowCenter", "RescaleSlope", "BitsStored"])
def test_a_failure_deep_in_decoding_never_quotes_an_element(element):
    value = 12 if element == "BitsStored" else HOSTILE_TEXT  # 12 of 8 bits: pydicom's own check quotes it
    with pytest.raises(DecodeError) as refused:
        decode_grayscale(dicom_file(gradient(), WindowWidth=100, **{element: value}))
    reason = str(refused.value)
    assert "script" not in reason and "<" not in reason and "'" not in reason
    assert reason.startswith(("cannot decode DICOM: ", "malformed DICOM element "))


@needs_pydicom
def test_dicom_warnings_never_quote_element_values():
    decoded = decode_grayscale(dicom_file(gradient(), SpecificCharacterSet=HOSTILE_TEXT))
    assert decoded.warnings, "pydicom complains about the character set; the complaint should stay"
    said = " ".join(decoded.warnings)
    assert "script" not in said and "<" not in said
    assert all(note.startswith("DICOM: ") and "\n" not in note for note in decoded.warnings)


def test_both_decoders_share_one_one_line_helper():
    from batchcam.decode import dicom, imaging, pixels

    assert dicom.one_line is imaging.one_line is pixels.one_line


def test_a_sparse_40_gib_file_is_one_error_row_in_scan_and_predict_and_a_raised_cap_takes_effect(tmp_path,
                                                                                                  tiny_model):
    from batchcam.cli import main
    from conftest import write_xrays

    root = tmp_path / "root"
    write_xrays(root, count=2)
    huge = root / "huge.png"
    huge.touch()
    os.truncate(huge, 40 * GIB)  # sparse: no disk used
    big = root / "big.png"
    Image.new("L", (1200, 1200)).save(big, "PNG", compress_level=0)  # about 1.4 MiB
    out = tmp_path / "out"
    scan = ["scan", str(root), "--out", str(out), "--model", str(tiny_model), "--workers", "0"]
    assert main([*scan, "--max-file-mb", "1"]) == 3
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert rows["huge.png"]["error"] == "file too large: 40.0 GiB (limit 1 MiB, --max-file-mb)"
    assert rows["big.png"]["status"] == "error" and rows["NORMAL/img00.png"]["status"] == "ok"
    assert main(scan) == 3  # the default cap: big.png is read now; huge.png still refused
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert rows["big.png"]["status"] == "ok" and rows["huge.png"]["status"] == "error"
    assert main(["predict", str(huge), "--model", str(tiny_model)]) == 3
    assert main(["scan", str(root), "--out", str(tmp_path / "o2"), "--max-file-mb", "inf"]) == 2
