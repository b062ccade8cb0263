"""Input that is bad or hostile: every bad file is its own error row, nothing else is disturbed.

One module-scoped scan runs over a folder holding every case (generated here, DICOM included) and
the tests below read its report; unit tests pin the decoding rules where they are clearer alone.
"""
from __future__ import annotations

import html.parser
import importlib.util
import io
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import page_cards, read_rows, rows_by_path, scan_said
from PIL import Image, ImageFile

from batchcam.cam import overlay as overlays
from batchcam.config import OVERLAY_LONG_SIDE
from batchcam.decode.discover import discover
from batchcam.decode.imaging import decode_grayscale, fit_within, resize_square
from batchcam.decode.pixels import DecodeError
from batchcam.records import display_path
from batchcam.synthetic import generate
from conftest import tiny_checkpoint
from tests.dicom_films import dx_dataset
from tests.unprivileged import make_unreadable, unprivileged_run

HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM, reason="pydicom is not installed (pip install -e '.[test]')")

PHI_NAME, PHI_ID = "ZZPHIMARKER^SECRET", "PHI-ID-884213"


# ---- small file makers ------------------------------------------------------------------------

def xray(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    return generate(seed, ("NORMAL", "PNEUMONIA")[seed % 2], size).image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def forged_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's calling card."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def forged_tiff(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII" if kind == 4 else "<HHIHxx", tag, kind, count, value)
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def forged_jpeg(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("L", (16, 16), 90), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_with_app1(image: Image.Image, payload: bytes) -> bytes:
    data = encoded(image, "JPEG")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def exif_block(orientation_entry: bytes) -> bytes:
    """b"Exif" + a little-endian TIFF header + one IFD entry (tag, type, count, value)."""
    return b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00" + orientation_entry + b"\x00\x00\x00\x00"


def eps_bytes() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"(batchcam must never run Ghostscript) print\nshowpage\n%%EOF\n")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- DICOM makers ----------------------------------------------------------------------------

def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", syntax: str | None = None,
                bits_stored: int = 12, preamble: bool = True, **elements) -> bytes:
    """A DX DICOM file with the patient markers set, written with pydicom."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = dx_dataset()
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = PHI_NAME, PHI_ID, PHI_ID
    ds.PatientBirthDate, ds.InstitutionName, ds.StudyDescription = "19700101", PHI_NAME, PHI_NAME
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if syntax is not None:
        ds.compress(syntax, pixels.astype(np.uint16))
    buffer = io.BytesIO()
    if preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare data set, as old ACR-NEMA style .dcm files are
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buffer.getvalue()


def anatomy(size: int = 64) -> np.ndarray:
    """12-bit stored values (multiples of 4 up to 4080) with some structure: a 'rib cage' pattern."""
    y, x = np.mgrid[0:size, 0:size]
    values = (np.sin(x / 5.0) * np.cos(y / 7.0) + 1) * 510 + x * 8
    return (np.clip(values, 0, 1020).astype(np.uint16) * 4)


def dicom_without_pixels() -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(anatomy(16))))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_with_syntax(uid: str) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(anatomy(16))))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\x00" * 32])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---- the hostile folder ----------------------------------------------------------------------

# Printable names that must reach the CSV exactly as they are (path column = the relative path).
PRINTABLE_NAMES = ["with space, comma 'single' \"double\" #?%&.png", "-leading-dash.png", "=SUM(1+1).png",
                   "+plus.png", "@at.png", "<svg onload=alert(1)>.png", "<img src=x onerror=alert(1)>.png",
                   'x" onmouseover="alert(1).png', "back\\slash.png", "L" * 240 + ".png", "肺 Ünïcödé.png"]


@dataclass
class Hostile:
    root: Path
    out: Path
    code: int
    rows: dict[str, dict]
    ok: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)   # relpath -> a word its reason must contain
    said: str = ""                                          # everything the run printed


def build_hostile_folder(root: Path, outside: Path) -> tuple[set[str], dict[str, str]]:
    ok: set[str] = set()
    errors: dict[str, str] = {}

    def good(rel: str, data: bytes) -> None:
        write(root / rel, data)
        ok.add(display_path(rel))

    def bad(rel: str, data: bytes, reason: str) -> None:
        write(root / rel, data)
        errors[rel] = reason

    png, jpeg, tiff = (encoded(xray(1), fmt) for fmt in ("PNG", "JPEG", "TIFF"))
    good("NORMAL/plain.png", encoded(xray(0), "PNG"))
    good("PNEUMONIA/plain.jpg", jpeg)
    good("tiny/one_by_one.png", encoded(Image.new("L", (1, 1), 200), "PNG"))
    good("tiny/wide.png", encoded(Image.new("L", (4000, 3), 120), "PNG"))
    good("tiny/tall.png", encoded(Image.new("L", (3, 4000), 120), "PNG"))
    good("tiny/wide.jpg", encoded(Image.new("L", (4000, 3), 120), "JPEG"))
    good("disguised/tiff_named.png", tiff)  # an allowed format: decoded by what it is
    gradient = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (40, 1))
    for mode, image in mode_renderings(gradient).items():
        fmt = "JPEG" if mode == "CMYK" else "TIFF"
        good(f"modes/{mode.replace(';', '_')}.{fmt.lower()}", encoded(image, fmt))
    good("exif/malformed.jpg", jpeg_with_app1(xray(2), b"Exif\x00\x00" + b"\x13\x37" * 20))
    good("exif/orientation_9.jpg", jpeg_with_app1(xray(2), exif_block(struct.pack("<HHIHH", 0x0112, 3, 1, 9, 0))))
    for name in PRINTABLE_NAMES:
        good(f"names/{name}", png)

    bad("bad/empty.png", b"", "empty")
    bad("bad/garbage.jpg", np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(), "supported")
    bad("bad/text.png", b"this is not an image\n" * 20, "supported")
    bad("bad/truncated_half.jpg", jpeg[: len(jpeg) // 2], "truncated")
    bad("bad/truncated_eoi.jpg", jpeg[:-2], "truncated")
    bad("bad/truncated_half.png", png[: len(png) // 2], "truncated")
    bad("bad/truncated_iend.png", png[:-12], "truncated")
    bad("bad/truncated.tif", tiff[: len(tiff) // 2], "truncated")
    bad("disguised/eps.png", eps_bytes(), "supported")
    bad("disguised/gif.png", encoded(xray(3), "GIF"), "supported")
    bad("disguised/webp.jpg", encoded(xray(3), "WEBP"), "supported")
    bad("disguised/pdf.png", encoded(xray(3).convert("RGB"), "PDF"), "supported")
    bad("bombs/bomb.png", forged_png(20000, 20000), "decompression bomb")
    bad("bombs/bomb_warning_level.png", forged_png(10000, 10000), "decompression bomb")
    bad("bombs/bomb.tif", forged_tiff(20000, 20000), "decompression bomb")
    bad("bombs/bomb.jpg", forged_jpeg(65000, 65000), "decompression bomb")

    if HAVE_PYDICOM:
        values = anatomy()
        good("dicom/mono2.dcm", dicom_bytes(values))
        good("dicom/mono1.dcm", dicom_bytes(4095 - values, "MONOCHROME1"))
        good("dicom/windowed.dcm", dicom_bytes(values, RescaleSlope=2, RescaleIntercept=-1000,
                                               WindowCenter=3000, WindowWidth=2000))
        good("dicom/rle.dcm", dicom_bytes(values, syntax="1.2.840.10008.1.2.5"))
        good("dicom/IM000001", dicom_bytes(values))
        good("dicom/1.2.826.0.1.3680043.8.498.1", dicom_bytes(values))
        bad("dicom/no_pixels.dcm", dicom_without_pixels(), "no pixel data")
        bad("dicom/unsupported.dcm", dicom_with_syntax("1.2.840.10008.1.2.4.92"), "transfer syntax")
        bad("dicom/truncated.dcm", dicom_bytes(values)[:-100], "DICOM")
        write(root / "dicom" / "DICOMDIR", dicom_without_pixels())  # an index, not an image: no row
        write(root / "dicom" / "README", b"not DICOM, no extension: no row\n" * 10)

    (root / "special").mkdir()
    os.mkfifo(root / "special" / "fifo.png")
    write(outside / "ext.png", png)
    (root / "linked_outside").symlink_to(outside, target_is_directory=True)
    ok.add("linked_outside/ext.png")
    (root / "NORMAL" / "loop").symlink_to(root, target_is_directory=True)
    return ok, errors


def mode_renderings(gradient: np.ndarray) -> dict[str, Image.Image]:
    """The same uint8 gradient in every mode an X-ray file may come in."""
    gray = Image.fromarray(gradient)
    return {"L": gray, "I;16": Image.fromarray(gradient.astype(np.uint16) * 257),
            "I": Image.fromarray(gradient.astype(np.int32) * 257),
            "F": Image.fromarray(gradient.astype(np.float32) / 255),
            "RGB": gray.convert("RGB"), "RGBA": gray.convert("RGBA"), "LA": gray.convert("LA"),
            "P": gray.convert("P"), "CMYK": gray.convert("CMYK")}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model) -> Hostile:
    base = tmp_path_factory.mktemp("hostile")
    root, out = base / "root", base / "report"
    ok, errors = build_hostile_folder(root, base / "outside")
    code, said = scan_said(root, out, tiny_model)
    rows = rows_by_path(out)
    return Hostile(root=root, out=out, code=code, rows=rows, ok=ok, errors=errors, said=said)


# ---- the scan over the hostile folder --------------------------------------------------------

def test_every_file_has_exactly_one_row_bad_ones_are_errors_and_the_scan_exits_3(hostile):
    assert hostile.code == 3
    paths = [row["path"] for row in read_rows(hostile.out)]
    assert len(paths) == len(set(paths))
    assert set(paths) == hostile.ok | set(hostile.errors)
    for rel, reason in hostile.errors.items():
        row = hostile.rows[rel]
        assert row["status"] == "error", rel
        assert reason.lower() in row["error"].lower(), (rel, row["error"])
        assert "\n" not in row["error"] and not row["prediction"] and not row["confidence"] and not row["overlay"]
    for rel in hostile.ok:
        row = hostile.rows[rel]
        assert row["status"] == "ok", (rel, row["error"])
        assert row["prediction"] in ("NORMAL", "PNEUMONIA") and (hostile.out / row["overlay"]).is_file()
        assert 0 <= int(row["cam_peak_x"]) < int(row["width"]) and 0 <= int(row["cam_peak_y"]) < int(row["height"])


def test_a_fifo_named_like_an_image_is_reported_and_never_read(hostile):
    assert "special/fifo.png" not in hostile.rows
    assert "special/fifo.png" in hostile.said and "not a regular file" in hostile.said


def test_symbolic_links_out_of_root_are_followed_and_loops_entered_once(hostile):
    assert hostile.rows["linked_outside/ext.png"]["status"] == "ok"
    assert not any(path.startswith("NORMAL/loop/") for path in hostile.rows)
    assert "already visited" in hostile.said


def test_tiny_and_elongated_images_keep_their_size_and_get_overlays(hostile):
    for rel, size in (("tiny/one_by_one.png", (1, 1)), ("tiny/wide.png", (4000, 3)), ("tiny/tall.png", (3, 4000)),
                      ("tiny/wide.jpg", (4000, 3))):
        row = hostile.rows[rel]
        assert (int(row["width"]), int(row["height"])) == size
        overlay = Image.open(hostile.out / row["overlay"])
        assert max(overlay.size) == min(max(size), OVERLAY_LONG_SIDE) and min(overlay.size) >= 1


def test_printable_names_reach_the_csv_exactly_even_with_a_leading_formula_sign(hostile):
    for name in PRINTABLE_NAMES:
        assert hostile.rows[display_path(f"names/{name}")]["status"] == "ok"
    assert {display_path(f"names/{name}") for name in PRINTABLE_NAMES if "\\" not in name} <= set(hostile.rows)
    assert hostile.rows["names/=SUM(1+1).png"]["path"] == "names/=SUM(1+1).png"  # faithful: see README


@needs_pydicom
def test_no_patient_identifier_from_dicom_reaches_the_report_or_the_output(hostile):
    assert hostile.rows["dicom/mono2.dcm"]["status"] == "ok"
    for marker in (PHI_NAME, PHI_ID, "ZZPHIMARKER"):
        assert marker not in hostile.said
        for path in hostile.out.rglob("*"):
            if path.is_file():
                assert marker.encode() not in path.read_bytes(), f"{marker} found in {path}"


@needs_pydicom
def test_monochrome1_and_monochrome2_twins_get_the_same_prediction(hostile):
    mono1, mono2 = hostile.rows["dicom/mono1.dcm"], hostile.rows["dicom/mono2.dcm"]
    for column in ("prediction", "confidence", "p_NORMAL", "cam_peak_x", "cam_peak_y", "width", "height"):
        assert mono1[column] == mono2[column]


class PageStructure(html.parser.HTMLParser):
    """Tags, attribute names, scripts and text of one HTML page."""

    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.scripts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        if tag == "script":
            found = dict(attrs)
            data = found.get("type") == "application/json" and found.get("id") == "page-rows"   # never run
            self.scripts.append(found.get("src") or ("(the page's rows)" if data else "(inline)"))

    def handle_data(self, data):
        self.text.append(data)


def page_structures(report: Path) -> dict[str, PageStructure]:
    pages = {}
    for path in sorted(report.rglob("*.html")):
        parser = PageStructure()
        parser.feed(path.read_text(encoding="utf-8"))
        parser.close()
        pages[path.relative_to(report).as_posix()] = parser
    return pages


def test_the_gallery_shows_hostile_names_as_text_and_gains_no_element_or_attribute(hostile, tiny_model,
                                                                                   tmp_path):
    plain = tmp_path / "plain"
    write(plain / "NORMAL" / "a.png", encoded(xray(0), "PNG"))
    write(plain / "bad" / "b.png", b"not an image")
    scan_said(plain, tmp_path / "baseline", tiny_model)
    baseline = page_structures(tmp_path / "baseline")
    allowed_tags = set().union(*(page.tags for page in baseline.values()))
    allowed_attributes = set().union(*(page.attributes for page in baseline.values()))
    allowed_scripts = {Path(src).name for page in baseline.values() for src in page.scripts}

    pages = page_structures(hostile.out)
    assert "index.html" in pages
    for name, page in pages.items():
        assert page.tags <= allowed_tags, (name, page.tags - allowed_tags)
        assert page.attributes <= allowed_attributes, (name, page.attributes - allowed_attributes)
        assert not any(attribute.startswith("on") for attribute in page.attributes)
        assert {Path(src).name for src in page.scripts} <= allowed_scripts and "(inline)" not in page.scripts
    shown = "".join(text for page in pages.values() for text in page.text)
    cards = {card["path"] for name in pages for card in page_cards((hostile.out / name).read_text(encoding="utf-8"))}
    for name in ("<svg onload=alert(1)>.png", "<img src=x onerror=alert(1)>.png"):
        assert name in shown  # displayed as text, which is how html.parser saw it
        assert any(path.endswith(name) for path in cards)   # and in the rows gallery.js builds the cards from


# ---- names that are not printable text -------------------------------------------------------

def test_display_path_keeps_printable_names_and_escapes_the_rest_unambiguously():
    assert display_path("a b/c, 'd' \"e\" #?%&=.png") == "a b/c, 'd' \"e\" #?%&=.png"
    assert display_path("肺/Ünïcödé.png") == "肺/Ünïcödé.png"
    assert display_path(os.fsdecode(b"bad\xff\xfe.png")) == "bad\\xff\\xfe.png"
    assert display_path("new\nline\r\ttab.png") == "new\\nline\\r\\ttab.png"
    assert display_path("bell\x07 del\x7f.png") == "bell\\x07 del\\x7f.png"
    assert display_path("bidi\u202egnp.png") == "bidi\\u202egnp.png"
    assert display_path("back\\slash.png") == "back\\\\slash.png"  # a backslash is always doubled,
    assert display_path("back\\slash\n.png") == "back\\\\slash\\n.png"  # so escapes read back unambiguously
    tricky = [os.fsdecode(b"a\xff.png"), "a\xff.png", "a\n.png", "a\u0080.png", os.fsdecode(b"a\x80.png"),
              "a\\\n.png", "a\\n.png", "a\\xff.png", "a\\\\n.png"]
    assert len({display_path(name) for name in tricky}) == len(tricky)
    for name in tricky:
        shown = display_path(name)
        assert shown.isprintable() and shown.encode("utf-8")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses file names that are not UTF-8")
def test_names_with_undecodable_bytes_and_control_characters_are_escaped_in_csv_and_gallery(tiny_model, tmp_path):
    root = tmp_path / "root"
    png = encoded(xray(0), "PNG")
    names = {b"bad\xff\xfe.png": "bad\\xff\\xfe.png", b"new\nline.png": "new\\nline.png",
             b"tab\there.png": "tab\\there.png", "bidi\u202egnp.png".encode(): "bidi\\u202egnp.png"}
    root.mkdir()
    for raw in names:
        fd = os.open(os.path.join(os.fsencode(root), raw), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, png)
        os.close(fd)
    code, _ = scan_said(root, tmp_path / "out", tiny_model)
    assert code == 0
    rows = read_rows(tmp_path / "out")
    assert sorted(row["path"] for row in rows) == sorted(names.values())
    assert all(row["status"] == "ok" and (tmp_path / "out" / row["overlay"]).is_file() for row in rows)
    shown = "".join(text for page in page_structures(tmp_path / "out").values() for text in page.text)
    for escaped in names.values():
        assert escaped in shown


# ---- checkpoints -----------------------------------------------------------------------------

class Payload:
    """Unpickling this creates ``marker``: proof that a checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["plain", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_with_exit_2_and_never_runs(
        force_unsafe_env, tmp_path, monkeypatch):
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload_ran"
    checkpoint = torch.load(tiny_checkpoint(tmp_path / "honest.pt"), weights_only=True)
    checkpoint["payload"] = Payload(str(marker))
    torch.save(checkpoint, tmp_path / "evil.pt")
    root = tmp_path / "root"
    write(root / "a.png", encoded(xray(0), "PNG"))

    code, said = scan_said(root, tmp_path / "out", tmp_path / "evil.pt")

    assert code == 2 and "error" in said
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---- decoding rules, one at a time -----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_a_truncated_file_never_decodes_half(fmt):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encoded(xray(4, (120, 90)), fmt)
    for keep in (len(data) // 3, len(data) // 2, len(data) - 40):
        with pytest.raises(DecodeError, match="truncated"):
            decode_grayscale(data[:keep])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_png_or_jpeg_missing_only_its_end_is_refused_too(fmt):
    data = encoded(xray(5, (120, 90)), fmt, **({"progressive": True} if fmt == "JPEG" else {}))
    for cut in range(1, 21 if fmt == "PNG" else 3):
        with pytest.raises(DecodeError, match=f"truncated {fmt}"):
            decode_grayscale(data[:-cut])


def test_a_complete_jpeg_decodes_with_restart_markers_an_app_segment_holding_eoi_and_trailing_data():
    image = xray(6, (120, 90))
    thumbnail = encoded(Image.new("L", (8, 8), 40), "JPEG")  # its own SOI..EOI, inside APP1
    for data in (encoded(image, "JPEG", progressive=True), encoded(image, "JPEG", restart_marker_rows=1),
                 jpeg_with_app1(image, b"Exif\x00\x00" + thumbnail), encoded(image, "JPEG") + b"\xff\xda junk"):
        assert decode_grayscale(data).width == 120


@pytest.mark.parametrize("name,data", [("eps", eps_bytes()), ("gif", encoded(xray(0), "GIF")),
                                       ("webp", encoded(xray(0), "WEBP")),
                                       ("pdf", encoded(xray(0).convert("RGB"), "PDF")),
                                       ("ppm", encoded(xray(0), "PPM")), ("text", b"%PDF-1.4 just text")])
def test_formats_outside_the_allowlist_are_refused_and_ghostscript_never_runs(name, data, monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was asked to run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(DecodeError, match="not a supported image"):
        decode_grayscale(data)


@pytest.mark.parametrize("forge", [forged_png, forged_tiff, forged_jpeg])
@pytest.mark.parametrize("side", [10000, 20000], ids=["warning-level", "error-level"])
def test_the_decompression_bomb_guard_refuses_from_the_header(forge, side):
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's limit, kept
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_grayscale(forge(side, side))


def test_the_bomb_guard_holds_without_pillows_own_check(monkeypatch):
    """Pillow's check goes through the warnings machinery, which is process-wide and not
    thread-safe; batchcam's own check of the header size must refuse on its own."""
    monkeypatch.setattr(Image, "_decompression_bomb_check", lambda size: None)
    for forge in (forged_png, forged_tiff, forged_jpeg):
        with pytest.raises(DecodeError, match="decompression bomb"):
            decode_grayscale(forge(10000, 10000))


def test_each_mode_renders_the_same_gray_as_l():
    gradient = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (40, 1))
    for mode, image in mode_renderings(gradient).items():
        assert image.mode == mode
        formats = ["TIFF"] + (["PNG"] if mode in ("L", "I;16", "RGB", "RGBA", "LA", "P") else []) + \
                  (["JPEG"] if mode == "CMYK" else [])
        for fmt in formats:
            gray = np.asarray(decode_grayscale(encoded(image, fmt)).gray).astype(int)
            assert np.abs(gray - gradient).max() <= (2 if fmt == "JPEG" else 0), (mode, fmt)  # JPEG is lossy


def test_sixteen_bit_gray_is_scaled_by_its_depth_never_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    gray = np.asarray(decode_grayscale(encoded(Image.fromarray(values), "PNG")).gray)
    assert gray.tolist() == [[0, 1, 128, 255]]


def test_malformed_exif_is_ignored_with_a_warning_and_a_good_orientation_still_applies():
    image = Image.new("L", (100, 60), 50)
    malformed = decode_grayscale(jpeg_with_app1(image, b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff"))
    assert (malformed.width, malformed.height) == (100, 60)
    assert any("malformed EXIF" in note for note in malformed.warnings)
    odd = decode_grayscale(jpeg_with_app1(image, exif_block(struct.pack("<HHI4s", 0x0112, 2, 4, b"abc\0"))))
    assert (odd.width, odd.height) == (100, 60) and any("orientation" in note for note in odd.warnings)
    rotated = decode_grayscale(jpeg_with_app1(image, exif_block(struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0))))
    assert (rotated.width, rotated.height) == (60, 100) and rotated.gray.size == (60, 100) and not rotated.warnings


@pytest.mark.parametrize("size", [(1, 1), (4000, 3), (3, 4000), (2, 1)])
def test_tiny_and_elongated_images_survive_resize_overlay_thumbnail_and_peak(size):
    decoded = decode_grayscale(encoded(Image.new("L", size, 100), "PNG"))
    assert resize_square(decoded.gray, 64).shape == (64, 64)
    display = np.asarray(fit_within(decoded.gray, 1024), dtype=np.uint8)
    rendered = overlays.render(display, torch.rand(2, 2), *size)
    assert 0 <= rendered.peak_x < size[0] and 0 <= rendered.peak_y < size[1]
    for jpeg in (rendered.overlay_jpeg, rendered.thumb_jpeg, rendered.original_jpeg):
        assert min(Image.open(io.BytesIO(jpeg)).size) >= 1


# ---- DICOM -----------------------------------------------------------------------------------

@needs_pydicom
def test_monochrome1_and_monochrome2_of_the_same_anatomy_give_the_same_model_input():
    values = anatomy()
    mono2 = decode_grayscale(dicom_bytes(values))
    mono1 = decode_grayscale(dicom_bytes(4095 - values, "MONOCHROME1"))
    assert np.array_equal(np.asarray(mono1.gray), np.asarray(mono2.gray))
    assert np.array_equal(resize_square(mono1.gray, 64), resize_square(mono2.gray, 64))
    gray = np.asarray(mono2.gray).astype(int)
    assert gray.min() == 0 and gray.max() == 255  # no window: stretched over the stored range
    assert np.corrcoef(gray.ravel(), values.ravel())[0, 1] > 0.999  # dense (high) values are bright


@needs_pydicom
def test_rescale_then_window_then_eight_bits():
    values = anatomy()
    decoded = decode_grayscale(dicom_bytes(values, RescaleSlope=2, RescaleIntercept=-1000,
                                           WindowCenter=3000, WindowWidth=2000))
    modality = values * 2.0 - 1000
    expected = np.clip((modality - 2999.5) / 1999 + 0.5, 0, 1) * 255  # PS3.3 C.11.2.1.2.1, LINEAR
    assert np.abs(np.asarray(decoded.gray).astype(int) - np.round(expected)).max() <= 1
    inverted = decode_grayscale(dicom_bytes(values, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                                            WindowCenter=3000, WindowWidth=2000))
    assert np.abs(np.asarray(inverted.gray).astype(int) - np.round(255 - expected)).max() <= 1


@needs_pydicom
def test_a_voi_lut_sequence_is_preferred_to_the_window():
    from pydicom.dataset import Dataset

    values = anatomy()
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 8])
    item.add_new("LUTData", "US", [min(255, v // 8) for v in range(4096)])  # saturates at stored value 2040
    decoded = decode_grayscale(dicom_bytes(values, VOILUTSequence=[item], WindowCenter=100, WindowWidth=10))
    expected = np.minimum(255, values // 8)
    assert np.array_equal(np.asarray(decoded.gray), expected.astype(np.uint8))


@needs_pydicom
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"], ids=["RLE", "JPEG2000"])
def test_compressed_dicom_decodes_like_the_uncompressed_file(syntax):
    if syntax.endswith(".90") and importlib.util.find_spec("openjpeg") is None:
        pytest.skip("pylibjpeg-openjpeg is not installed (the dicom extra brings it)")
    values = anatomy()
    plain = np.asarray(decode_grayscale(dicom_bytes(values)).gray)
    assert np.array_equal(np.asarray(decode_grayscale(dicom_bytes(values, syntax=syntax)).gray), plain)


@needs_pydicom
def test_colour_dicom_is_rendered_by_luminance_and_palette_colour_is_refused():
    import pydicom

    values = anatomy(16)
    base = pydicom.dcmread(io.BytesIO(dicom_bytes(values)))
    base.SamplesPerPixel, base.PhotometricInterpretation, base.PlanarConfiguration = 3, "RGB", 0
    base.BitsAllocated, base.BitsStored, base.HighBit = 8, 8, 7
    gray = (values // 16).astype(np.uint8)
    base.PixelData = np.repeat(gray[..., None], 3, axis=2).tobytes()
    buffer = io.BytesIO()
    base.save_as(buffer, enforce_file_format=True)
    assert np.abs(np.asarray(decode_grayscale(buffer.getvalue()).gray).astype(int) - gray).max() <= 1
    base.PhotometricInterpretation = "PALETTE COLOR"
    buffer = io.BytesIO()
    base.save_as(buffer, enforce_file_format=True)
    with pytest.raises(DecodeError, match="unsupported DICOM photometric interpretation 'PALETTE COLOR'"):
        decode_grayscale(buffer.getvalue())


@needs_pydicom
def test_a_dcm_file_without_the_preamble_is_read_by_its_name():
    values = anatomy()
    bare = dicom_bytes(values, preamble=False)
    assert bare[128:132] != b"DICM"
    with pytest.raises(DecodeError, match="not a supported image"):
        decode_grayscale(bare)
    assert np.array_equal(np.asarray(decode_grayscale(bare, name="study/IMG.DCM").gray),
                          np.asarray(decode_grayscale(dicom_bytes(values)).gray))
    with pytest.raises(DecodeError, match="not a DICOM file"):
        decode_grayscale(b"plain text, named .dcm\n" * 8, name="x.dcm")


@needs_pydicom
def test_dicom_failures_each_have_their_own_reason(monkeypatch):
    from pydicom.pixels import get_decoder

    values = anatomy()
    cases = {"no pixel data": dicom_without_pixels(),
             "unsupported DICOM transfer syntax": dicom_with_syntax("1.2.840.10008.1.2.4.92"),
             "decompression bomb": dicom_bytes(values, Rows=20000, Columns=20000),
             "only single-frame": dicom_bytes(np.concatenate([values, values]), NumberOfFrames=2, Rows=64),
             "truncated DICOM": dicom_bytes(values, syntax="1.2.840.10008.1.2.5")[:-200],
             "truncated DICOM: pixel data": dicom_bytes(values)[:-100]}
    for reason, data in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode_grayscale(data)

    decoder = get_decoder("1.2.840.10008.1.2.5")
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-rle>=2.0")})
    with pytest.raises(DecodeError, match=r'needs a decoder plugin.*pylibjpeg-rle.*pip install "batchcam\[dicom\]"'):
        decode_grayscale(dicom_bytes(values, syntax="1.2.840.10008.1.2.5"))


@needs_pydicom
def test_without_pydicom_a_dicom_file_is_an_error_row_that_says_how_to_install_it(tiny_model, tmp_path,
                                                                                   monkeypatch):
    root = tmp_path / "root"
    write(root / "a.dcm", dicom_bytes(anatomy()))
    write(root / "b.png", encoded(xray(0), "PNG"))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    code, _ = scan_said(root, tmp_path / "out", tiny_model)
    rows = rows_by_path(tmp_path / "out")
    assert code == 3 and rows["b.png"]["status"] == "ok"
    assert rows["a.dcm"]["status"] == "error" and 'pip install "batchcam[dicom]"' in rows["a.dcm"]["error"]


@needs_pydicom
def test_dicom_warnings_errors_and_logs_never_quote_patient_elements(caplog):
    invalid = "X" * 80 + PHI_NAME  # too long for its VR: pydicom's validation would quote it
    values = anatomy(16)
    with caplog.at_level("DEBUG"):
        decoded = decode_grayscale(dicom_bytes(values, PatientName=invalid, PatientID=invalid))
        with pytest.raises(DecodeError) as refused:
            decode_grayscale(dicom_bytes(values, PatientName=invalid, NumberOfFrames=3))
    said = " ".join(decoded.warnings) + str(refused.value) + caplog.text
    assert PHI_NAME not in said and PHI_ID not in said


# ---- discovery -------------------------------------------------------------------------------

@needs_pydicom
def test_discovery_finds_dcm_and_extensionless_dicom_by_magic_and_reads_only_their_head(tmp_path, monkeypatch):
    write(tmp_path / "IM0001", dicom_bytes(anatomy(8)))
    write(tmp_path / "1.2.3.4", dicom_bytes(anatomy(8)))
    write(tmp_path / "scan.DCM", dicom_bytes(anatomy(8)))
    write(tmp_path / "Makefile", b"all:\n\techo\n" * 100)
    write(tmp_path / "DICOMDIR", dicom_bytes(anatomy(8)))
    write(tmp_path / "notes.txt", b"x" * 200)
    reads: list[tuple[str, int]] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        reads.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, size))
        return real_read(fd, size)

    with monkeypatch.context() as patch:
        patch.setattr(os, "read", counting_read)
        found = discover(tmp_path)
    assert [c.relpath for c in found.candidates] == ["1.2.3.4", "IM0001", "scan.DCM"]
    assert sorted(reads) == [("1.2.3.4", 132), ("IM0001", 132), ("Makefile", 132)]


UNPRIVILEGED_DISCOVERY = """
import json, sys
from batchcam.decode.discover import discover
found = discover(sys.argv[1])
print(json.dumps({"candidates": [c.relpath for c in found.candidates], "problems": found.problems,
                  "unlisted": found.unlisted}))
"""


def test_an_unreadable_folder_is_reported_not_skipped_in_silence(tmp_path):
    write(tmp_path / "open" / "a.png", encoded(xray(0), "PNG"))
    write(tmp_path / "locked" / "b.png", encoded(xray(0), "PNG"))
    make_unreadable(tmp_path / "locked")
    try:
        run = unprivileged_run([sys.executable, "-c", UNPRIVILEGED_DISCOVERY, str(tmp_path)], timeout=60)
    finally:
        (tmp_path / "locked").chmod(0o755)
    found = json.loads(run.stdout)
    assert found["candidates"] == ["open/a.png"] and found["unlisted"] == ["locked"]
    assert "cannot list folder locked: Permission denied" in found["problems"]


def test_an_unreadable_file_is_its_own_error_row(tiny_model, tmp_path):
    write(tmp_path / "root" / "a.png", encoded(xray(0), "PNG"))
    secret = write(tmp_path / "root" / "b.png", encoded(xray(1), "PNG"))
    make_unreadable(secret)
    try:
        code = unprivileged_run([sys.executable, "-m", "batchcam", "scan", str(tmp_path / "root"), "--out",
                                 str(tmp_path / "out"), "--model", str(tiny_model), "--workers", "0"]).returncode
    finally:
        secret.chmod(0o644)
    rows = rows_by_path(tmp_path / "out")
    assert code == 3 and rows["a.png"]["status"] == "ok"
    assert rows["b.png"]["status"] == "error" and "permission" in rows["b.png"]["error"].lower()
