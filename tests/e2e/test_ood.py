"""The out-of-distribution flag and the calibrated confidence, end to end.

The demo model must stay quiet on held-out synthetic films of its own distribution and flag what it
has never seen: real films and CT/MR/US images (pydicom's public test data), photographs, noise and
blank images. Non-chest DICOMs go through the Python API: a scan's selection rule may skip them.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import page_cards, read_rows, rows_by_path
from PIL import Image

from batchcam.cam.explainer import CamExplainer
from batchcam.cli import main
from batchcam.decode.dataset import collate_samples, decode_sample
from batchcam.model.checkpoint import load_checkpoint, model_input
from batchcam.resources import DEMO_MODEL
from batchcam.synthetic import generate
from tests.conftest import write_xrays

# The demo model was trained on seeds 1_000_003 onwards and calibrated on 3_000_009 onwards; the
# samples are seed 7 (7_000_021 onwards); other tests hold out 90_000 onwards.
HELD_OUT_SEED = 50_000
HELD_OUT_COUNT = 40


@pytest.fixture(scope="module")
def demo():
    return load_checkpoint(DEMO_MODEL, demo=True)


def ood_of(loaded, named_bytes: list[tuple[str, bytes]]) -> dict[str, tuple[float, bool]]:
    """name -> (ood_score, ood_flag) through scan's decoder and engine."""
    samples, views = collate_samples([decode_sample(name, data, loaded.spec.image_size) for name, data in named_bytes])
    assert all(sample.ok for sample in samples), [sample.error for sample in samples if not sample.ok]
    with CamExplainer(loaded.model, temperature=loaded.temperature) as engine:
        batch = engine(model_input(views, loaded.spec))
    distances = loaded.ood.distances(batch.features)
    return {s.relpath: (float(d), float(d) > loaded.ood.threshold) for s, d in zip(samples, distances)}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def photograph(seed: int = 0) -> Image.Image:
    """A natural-looking colour scene: a sky gradient, a sun, rolling green hills, sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = 480, 640
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    picture = np.stack([0.4 + 0.3 * y, 0.6 + 0.2 * y, 0.95 - 0.3 * y], -1)
    hills = y > 0.6 + 0.1 * np.sin(x * 9)
    picture[hills] = np.stack([0.2 + 0.1 * x, 0.5 + 0.1 * y, 0.15 + 0 * x], -1)[hills]
    picture[(x - 0.75) ** 2 + (y - 0.2) ** 2 < 0.006] = (1.0, 0.9, 0.3)
    picture += rng.normal(0, 0.04, picture.shape)
    return Image.fromarray((np.clip(picture, 0, 1) * 255).astype(np.uint8))


def test_the_demo_model_ships_with_statistics_and_a_temperature(demo):
    assert demo.ood is not None and demo.ood.means.shape == (2, 512)
    assert demo.ood.threshold == pytest.approx(demo.ood.percentiles["99.5"])
    assert 0.2 < demo.temperature < 5


def test_the_demo_model_flags_at_most_5_percent_of_held_out_synthetic_films(demo):
    films = []
    for i in range(HELD_OUT_COUNT):
        rng = np.random.default_rng(i)
        size = (int(rng.integers(512, 1600)), int(rng.integers(512, 1600)))
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        films.append((f"{label}/{i}.png", png_bytes(generate(HELD_OUT_SEED + i, label, size).image)))
    flags = [flag for _, flag in ood_of(demo, films).values()]
    assert sum(flags) <= 0.05 * len(flags)


def test_the_demo_model_flags_photographs_noise_and_blank_images(demo):
    rng = np.random.default_rng(0)
    images = {"photo.png": photograph(), "photo_grey.png": photograph(1).convert("L"),
              "noise.png": Image.fromarray(rng.integers(0, 256, (600, 500), dtype=np.uint8)),
              "noise_rgb.png": Image.fromarray(rng.integers(0, 256, (600, 500, 3), dtype=np.uint8)),
              "black.png": Image.new("L", (512, 512), 0), "white.png": Image.new("L", (512, 512), 255),
              "grey.png": Image.new("L", (512, 512), 128)}
    results = ood_of(demo, [(name, png_bytes(image)) for name, image in images.items()])
    assert all(flag for _, flag in results.values()), results


def public_dicom_files() -> list[Path]:
    data_store = pytest.importorskip("data_store", reason="pydicom-data (the test extra) is not installed")
    pydicom = pytest.importorskip("pydicom")
    store = Path(data_store.__file__).parent / "data"
    own = Path(pydicom.__file__).parent / "data" / "test_files"
    return [store / name for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm",
                                      "MR2_UNCR.dcm", "US1_UNCR.dcm")] + [own / "CT_small.dcm", own / "MR_small.dcm"]


def test_the_demo_model_flags_real_films_and_ct_mr_us_images(demo):
    files = public_dicom_files()
    results = ood_of(demo, [(path.name, path.read_bytes()) for path in files])
    assert set(results) == {path.name for path in files}
    assert all(flag for _, flag in results.values()), results


def test_scan_writes_ood_columns_manifest_and_metrics_with_the_demo_model(tmp_path):
    root = tmp_path / "xrays"
    write_xrays(root, count=4, size=(512, 600), start_seed=HELD_OUT_SEED + 100)
    (root / "NORMAL" / "noise.png").write_bytes(png_bytes(Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (512, 512), dtype=np.uint8))))
    out = tmp_path / "report"
    assert main(["scan", str(root), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    rows = rows_by_path(out)
    assert rows["NORMAL/noise.png"]["ood_flag"] == "true"
    assert all(float(row["ood_score"]) > 0 and row["ood_flag"] in ("true", "false") for row in rows.values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ood"]["statistics"] is True and manifest["ood"]["flagged"] >= 1
    assert manifest["model"]["temperature"] == pytest.approx(load_checkpoint(DEMO_MODEL).temperature, abs=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ood"]["flagged"] == manifest["ood"]["flagged"] and metrics["ece_bins"] == 15
    assert 0 <= metrics["ece"] <= 1
    index = (out / "index.html").read_text()
    assert "unlike the training images" in index and "Reliability diagram" in index
    flagged = [card["path"] for card in page_cards(index) if card["ood_flag"]]   # each card's mark (gallery.js)
    assert len(flagged) == manifest["ood"]["flagged"] and "NORMAL/noise.png" in flagged


def test_a_model_without_statistics_leaves_the_columns_empty_and_says_so(tmp_path, tiny_model, xray_folder):
    out = tmp_path / "report"
    assert main(["scan", str(xray_folder), "--out", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--quiet"]) == 0
    rows = read_rows(out)
    assert rows and all(row["ood_score"] == "" and row["ood_flag"] == "" for row in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ood"]["statistics"] is False and "no feature statistics" in manifest["ood"]["note"]
    assert manifest["model"]["temperature"] == 1.0
    assert "unlike the training images" not in (out / "index.html").read_text()


ENOUGH = 680     # 340 per class: 102 held out of each (204 >= 200), 238 fitting each


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """A labelled tree just big enough to calibrate on (calibrate asks for about 667 images)."""
    root = tmp_path_factory.mktemp("labelled") / "labelled"
    write_xrays(root, count=ENOUGH, size=(72, 64))
    return root


def test_calibrate_writes_a_new_checkpoint_that_scan_then_flags_with(tmp_path, tiny_model, labelled):
    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(labelled), "--model", str(tiny_model), "--out", str(out), "--batch-size", "64"]) == 0
    before, after = load_checkpoint(tiny_model), load_checkpoint(out)
    assert after.ood is not None and after.ood.images == ENOUGH - 204 and after.temperature > 0
    assert all(torch.equal(v, after.model.state_dict()[k]) for k, v in before.model.state_dict().items())
    root = tmp_path / "some"
    write_xrays(root, count=4, size=(96, 80))
    report = tmp_path / "report"
    assert main(["scan", str(root), "--out", str(report), "--model", str(out), "--workers", "0", "--quiet"]) == 0
    rows = read_rows(report)
    assert all(row["ood_flag"] in ("true", "false") for row in rows)
    probabilities = np.array([[float(row["p_NORMAL"]), float(row["p_PNEUMONIA"])] for row in rows])
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_calibrate_replaces_an_existing_out_only_with_force_and_never_writes_a_temperature_it_did_not_estimate(
        tmp_path, tiny_model, labelled, capsys, monkeypatch):
    """The images' forward passes are stood in for by random features (the test above runs them)."""
    from batchcam.commands import calibrate
    from batchcam.model import calibration

    def random_features(files, loaded, config, device, console):
        generator = torch.Generator().manual_seed(0)
        return (torch.randn(len(files), 512, generator=generator), torch.randn(len(files), 2, generator=generator),
                torch.tensor([f.label for f in files]), torch.tensor([f.held_out for f in files]), 0)

    monkeypatch.setattr(calibrate, "forward_all", random_features)
    out = tmp_path / "calibrated.pt"
    out.write_bytes(b"someone's file")
    assert main(["calibrate", str(labelled), "--model", str(tiny_model), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"batchcam: error: --out {out} exists: give --force to replace it, or name a "
                                       "new file\n")
    force = ["calibrate", str(labelled), "--model", str(tiny_model), "--out", str(out), "--force", "--batch-size", "64"]
    monkeypatch.setattr(calibration, "fit_temperature", lambda logits, labels: 0.0526)   # what 40 images once gave
    assert main(force) == 2
    err = capsys.readouterr().err
    assert "the 204 held-out images give no estimate of the temperature" in err and "1.000" in err
    assert out.read_bytes() == b"someone's file"
    monkeypatch.setattr(calibration, "fit_temperature", lambda logits, labels: 0.3)
    assert main(force) == 0
    assert "batchcam: warning: the fitted temperature 0.3000 is outside 0.5..5" in capsys.readouterr().err
    assert load_checkpoint(out).temperature == pytest.approx(0.3)


def test_calibrate_refuses_to_overwrite_its_model_or_write_through_a_link(tmp_path, tiny_model, capsys):
    root = tmp_path / "labelled"
    write_xrays(root, count=4, size=(96, 80))
    model = tmp_path / "model.pt"
    model.write_bytes(tiny_model.read_bytes())
    original = model.read_bytes()
    assert main(["calibrate", str(root), "--model", str(model), "--out", str(model)]) == 2
    link = tmp_path / "link.pt"
    link.symlink_to(tmp_path / "elsewhere.pt")
    assert main(["calibrate", str(root), "--model", str(model), "--out", str(link), "--force"]) == 2
    hard = tmp_path / "hard.pt"
    hard.hardlink_to(model)
    assert main(["calibrate", str(root), "--model", str(model), "--out", str(hard), "--force"]) == 2
    assert "too few" not in capsys.readouterr().err
    assert model.read_bytes() == original and not (tmp_path / "elsewhere.pt").exists()


def test_calibrate_refuses_a_held_out_set_too_small_for_its_statistics(tmp_path, tiny_model, capsys):
    """40 images once gave temperature 0.0526 and every confidence 1.000: now refused, saying what it needs."""
    root = tmp_path / "labelled"
    write_xrays(root, count=40, size=(96, 80))
    assert main(["calibrate", str(root), "--model", str(tiny_model), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too few images to calibrate on" in err
    assert "need at least 200 held-out images (got 12)" in err
    assert "at least 30 fitting images in each class (got NORMAL 14, PNEUMONIA 14)" in err
    assert "about 667 labelled images in all" in err
    assert not (tmp_path / "o.pt").exists()


def test_predict_reports_the_flag_in_json_and_warns_on_stderr(tmp_path, capsys):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (400, 400), dtype=np.uint8)).save(noise)
    film = tmp_path / "film.png"
    generate(HELD_OUT_SEED + 200, "NORMAL", (600, 600)).image.save(film)
    assert main(["predict", str(noise), str(film), "--json"]) == 0
    out, err = capsys.readouterr()
    records = {Path(record["file"]).name: record for record in map(json.loads, out.splitlines())}
    assert records["noise.png"]["ood_flag"] is True and records["noise.png"]["ood_score"] > 0
    assert records["film.png"]["ood_flag"] is False
    assert "noise.png: unlike the training images" in err and "film.png: unlike" not in err


def rows_but_change(report: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "change"} for row in read_rows(report)]


def test_a_reused_row_keeps_its_ood_columns(tmp_path, capsys):
    root = tmp_path / "xrays"
    write_xrays(root, count=2, size=(400, 400), start_seed=HELD_OUT_SEED + 300)
    Image.new("L", (400, 400), 0).save(root / "NORMAL" / "blank.png")
    out = tmp_path / "report"
    assert main(["scan", str(root), "--out", str(out), "--workers", "0"]) == 0
    first = rows_but_change(out)
    assert main(["scan", str(root), "--out", str(out), "--workers", "0"]) == 0
    assert "0 to process, 3 unchanged" in capsys.readouterr().err
    assert rows_but_change(out) == first   # only "change" says what this run changed
    assert rows_by_path(out)["NORMAL/blank.png"]["ood_flag"] == "true"
