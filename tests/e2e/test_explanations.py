"""Explanations you can check: localisation against boxes, faithfulness, sanity, attention outside."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import page_cards, read_rows, records, rows_by_path, rows_script

from batchcam.checks.attention import attention_outside
from batchcam.checks.sanity import spearman
from batchcam.cli import main
from batchcam.commands.sanity import sanity_check
from batchcam.decode.imaging import resize_square
from batchcam.decode.lungs import estimate_lung_fields
from batchcam.model.checkpoint import load_checkpoint
from batchcam.records import ATTENTION_THRESHOLD, Row, from_csv_dict, to_csv_dict
from batchcam.resources import DEMO_MODEL
from batchcam.synthetic import generate
from conftest import write_xrays

HELD_OUT_SEED = 90_000  # the demo model was trained on seeds 1_000_003 onwards
COUNT = 6


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Held-out synthetic PNEUMONIA images, a demo-model scan of them (maps saved, faithfulness on)
    and a generic boxes file: one bounding box of each image's opacity mask."""
    base = tmp_path_factory.mktemp("held_out")
    root = base / "xrays"
    (root / "PNEUMONIA").mkdir(parents=True)
    rng = np.random.default_rng(0)
    boxes = []
    for i in range(COUNT):
        size = (int(rng.integers(512, 900)), int(rng.integers(512, 900)))
        xray = generate(HELD_OUT_SEED + i, "PNEUMONIA", size)
        name = f"p{i:02d}.png"
        xray.image.save(root / "PNEUMONIA" / name)
        ys, xs = np.nonzero(xray.mask)
        boxes.append((f"PNEUMONIA/{name}", xs.min(), ys.min(), xs.max(), ys.max()))
    report = base / "report"
    assert main(["scan", str(root), "--out", str(report), "--workers", "0", "--save-cams", "--faithfulness"]) == 0
    boxes_csv = base / "boxes.csv"
    with open(boxes_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x0", "y0", "x1", "y1"])
        writer.writerows(boxes)
    return root, report, boxes_csv, boxes


def read_metrics(report):
    return json.loads((report / "metrics.json").read_text())


def test_evaluate_pointing_game_hits_the_generator_boxes_with_the_demo_model(held_out):
    _, report, boxes_csv, _ = held_out
    before = read_metrics(report)
    assert main(["evaluate", str(report), "--boxes", str(boxes_csv)]) == 0
    metrics = read_metrics(report)
    loc = metrics["localisation"]
    assert loc["n"] == COUNT and loc["format"] == "generic"
    assert loc["pointing_game"]["hit_rate"] >= 0.8
    assert 0 < loc["energy_inside"]["mean"] <= 1 and loc["energy_inside"]["n"] == COUNT
    assert {image["path"] for image in loc["images"]} == {b[0] for b in held_out[3]}
    assert metrics["accuracy"] == before["accuracy"]  # the scan's keys are kept
    index = (report / "index.html").read_text()
    assert "pointing game" in index and f"of {COUNT} images with boxes" in index


def rows_data(report):
    return records(rows_script(report))


def card_boxes(report):
    """path -> the size and boxes its card on the entry page draws in the large view (None when none)."""
    return {card["path"]: {"size": [card["width"], card["height"]], "boxes": card["boxes"]} if card.get("boxes")
            else None for card in page_cards((report / "index.html").read_text(encoding="utf-8"))}


def test_evaluate_puts_the_boxes_into_the_gallery_data_for_the_large_view(held_out, tmp_path):
    root, _, boxes_csv, boxes = held_out
    report = tmp_path / "report"         # a fresh scan: nothing drawn until evaluate
    assert main(["scan", str(root), "--out", str(report), "--workers", "0", "--quiet"]) == 0
    assert "boxes" not in rows_data(report)[0] and set(card_boxes(report).values()) == {None}
    assert "ground-truth box" in (report / "index.html").read_text()     # the large view's legend, hidden
    assert main(["evaluate", str(report), "--boxes", str(boxes_csv)]) == 0
    expected = {path: [[float(x0), float(y0), float(x1), float(y1)]] for path, x0, y0, x1, y1 in boxes}
    sizes = {row["path"]: [int(row["width"]), int(row["height"])] for row in read_rows(report)}
    shown = rows_data(report)
    assert {r["path"]: r["boxes"] for r in shown} == expected
    assert all([r["width"], r["height"]] == sizes[r["path"]] for r in shown)
    assert card_boxes(report) == {path: {"size": sizes[path], "boxes": expected[path]} for path in expected}


def test_evaluate_reads_the_rsna_format(held_out, tmp_path):
    _, report, _, boxes = held_out
    rsna = tmp_path / "stage_2_train_labels.csv"
    with open(rsna, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for path, x0, y0, x1, y1 in boxes[:3]:
            stem = path.rsplit("/", 1)[1].rsplit(".", 1)[0]
            writer.writerow([stem, x0, y0, x1 - x0, y1 - y0, 1])
        writer.writerow(["p05", "", "", "", "", 0])        # no box: not scored
        writer.writerow(["someone-else", "", "", "", "", 0])
    assert main(["evaluate", str(report), "--boxes", str(rsna)]) == 0
    loc = read_metrics(report)["localisation"]
    assert loc["format"] == "rsna" and loc["n"] == 3 and loc["boxes_not_in_report"] == 1


def test_removing_the_top_of_the_map_drops_the_probability_more_than_a_random_region(held_out):
    _, report, _, _ = held_out
    faith = read_metrics(report)["faithfulness"]
    assert faith["n"] == COUNT
    assert faith["mean_drop_top"] > faith["mean_drop_random"]
    rows = read_rows(report)
    assert all(row["faith_drop_top"] and row["faith_drop_random"] for row in rows)
    assert "probability drop, top 20% of the map removed" in (report / "index.html").read_text()


def test_sanity_check_correlation_falls_below_half_once_layer4_is_randomised(held_out):
    root, _, _, _ = held_out
    result = sanity_check(load_checkpoint(DEMO_MODEL, demo=True), root, sample=4, device="cpu")
    assert result.steps[:3] == ["original", "fc", "fc+layer4"]
    assert result.mean("fc+layer4") < 0.5
    assert all(len(values) == 4 for values in result.correlations.values())


def test_sanity_command_writes_a_markdown_report_and_a_figure(held_out, tmp_path):
    root, _, _, _ = held_out
    out = tmp_path / "sanity"
    assert main(["sanity", str(root), "--sample", "2", "--device", "cpu", "--out", str(out)]) == 0
    text = (out / "sanity.md").read_text()
    assert "| fc+layer4 |" in text and (out / "sanity.png").stat().st_size > 0
    assert set(json.loads((out / "sanity.json").read_text())["mean_correlation"]) >= {"fc", "fc+layer4"}


def test_sanity_never_writes_through_links_planted_in_its_default_folder(tmp_path, monkeypatch, tiny_model,
                                                                        xray_folder):
    """The default --out is batchcam-sanity in the working directory: links planted there are replaced."""
    monkeypatch.chdir(tmp_path)
    planted = tmp_path / "batchcam-sanity"
    planted.mkdir()
    victims = {}
    for name in ("sanity.md", "sanity.json", "sanity.png"):
        victim = tmp_path / f"victim-{name}"
        victim.write_bytes(b"someone else's file\n")
        (planted / name).symlink_to(victim)
        victims[victim] = victim.read_bytes()
    assert main(["sanity", str(xray_folder), "--sample", "2", "--device", "cpu", "--model", str(tiny_model)]) == 0
    assert {victim: victim.read_bytes() for victim in victims} == victims
    for name in ("sanity.md", "sanity.json", "sanity.png"):
        assert not (planted / name).is_symlink() and (planted / name).stat().st_size > 100
    assert json.loads((planted / "sanity.json").read_text())["images"]


def test_spearman_is_one_for_a_monotone_transform_and_zero_for_a_flat_map():
    a = np.random.default_rng(0).random((7, 7))
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros((7, 7))) == 0.0


def test_attention_flag_fires_on_a_corner_map_and_stays_quiet_on_lung_maps():
    corner = torch.zeros(7, 7)
    corner[0, 0], corner[0, 1], corner[1, 0] = 1.0, 0.5, 0.5
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + 4):
        xray = generate(seed, "PNEUMONIA", (640, 560))
        fields = estimate_lung_fields(resize_square(xray.image, 224)).fields
        assert fields is not None
        share = attention_outside(corner, fields)
        assert share > ATTENTION_THRESHOLD
        assert Row(path="a", status="ok", attention_outside=share).attention_flag is True
        # a map that is hot where the lungs are: the lung mask pooled to the 7x7 CAM grid
        lungs = torch.from_numpy(xray.lungs.astype(np.float32))[None, None]
        cam = torch.nn.functional.adaptive_avg_pool2d(lungs, 7)[0, 0]
        assert attention_outside(cam, fields) < 0.3


def test_without_lung_fields_attention_outside_is_empty():
    corner = torch.zeros(7, 7)
    corner[0, 0] = 1.0
    assert attention_outside(corner, None) is None
    assert Row(path="a", status="ok", attention_outside=None).attention_flag is None


def test_the_demo_models_heat_on_the_real_chest_film_lies_on_its_lungs_and_the_tibia_gets_no_lung_fields(
        public_dicom, tmp_path):
    """pydicom-data's CR chest PA film (heat on both lungs) and CR tibia, both scored (--select all:
    by default the tibia is a skipped row, see test_selection.py), so the lung estimate must refuse it."""
    import shutil

    root = tmp_path / "films"
    (root / "PNEUMONIA").mkdir(parents=True)     # a class-named folder: metrics.json is written too
    for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(public_dicom(name), root / "PNEUMONIA" / name)
    report = tmp_path / "report"
    assert main(["scan", str(root), "--out", str(report), "--workers", "0", "--quiet", "--select", "all"]) == 0
    rows = rows_by_path(report)
    chest, tibia = rows["PNEUMONIA/RG1_UNCR.dcm"], rows["PNEUMONIA/RG3_UNCR.dcm"]
    assert tibia["status"] == "ok"
    assert chest["status"] == "ok" and 0 <= float(chest["attention_outside"]) < ATTENTION_THRESHOLD
    assert chest["attention_flag"] == "false"
    assert tibia["attention_outside"] == "" and tibia["attention_flag"] == ""
    log = (report / "batchcam.log").read_text().splitlines()
    refused = [line for line in log if "attention_outside left empty: no lung fields" in line]
    assert len(refused) == 1 and "RG3_UNCR.dcm" in refused[0]
    attention = read_metrics(report)["attention"]
    assert attention["n"] == 1 and attention["no_lung_fields"] == 1 and attention["flagged"] == 0
    assert "1 without: not like a frontal chest film" in (report / "index.html").read_text()


def test_attention_stays_quiet_on_the_demo_models_maps_of_plain_images(held_out):
    _, report, _, _ = held_out
    rows = read_rows(report)
    assert all(row["attention_flag"] == "false" for row in rows)
    assert all(0 <= float(row["attention_outside"]) < ATTENTION_THRESHOLD for row in rows)


def test_check_columns_come_after_the_contract_and_read_back():
    row = Row(path="a.png", status="ok", prediction="NORMAL", confidence=0.9, probabilities=[0.9, 0.1],
              attention_outside=0.7, faith_drop_top=0.5, faith_drop_random=0.1)
    values = to_csv_dict(row, ("NORMAL", "PNEUMONIA"))
    assert values["attention_flag"] == "true"
    back = from_csv_dict(values, ("NORMAL", "PNEUMONIA"))
    assert (back.attention_outside, back.faith_drop_top, back.faith_drop_random) == (0.7, 0.5, 0.1)


def test_evaluate_without_saved_maps_reports_the_pointing_game_only(tiny_model, xray_folder, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["scan", str(xray_folder), "--out", str(report), "--model", str(tiny_model), "--workers", "0"]) == 0
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nPNEUMONIA/img01.png,0,0,160,128\nPNEUMONIA/img01.png,5,5,6,6\n")
    assert main(["evaluate", str(report), "--boxes", str(boxes)]) == 0
    assert "cams.npz is missing" in capsys.readouterr().err
    loc = read_metrics(report)["localisation"]
    assert loc["n"] == 1 and loc["pointing_game"]["hit_rate"] == 1.0 and loc["images"][0]["boxes"] == 2
    assert loc["energy_inside"]["mean"] is None and "--save-cams" in loc["energy_inside"]["note"]


@pytest.mark.parametrize("content, reason", [
    ("name,a,b\nx,1,2\n", "header must hold"),
    ("path,x0,y0,x1,y1\na.png,1,2,zero,4\n", "line 2: x1 'zero' is not a number"),
    ("path,x0,y0,x1,y1\na.png,5,2,1,4\n", "x1 < x0"),
    ("patientId,x,y,width,height,Target\nabc,1,2,3,4,2\n", "Target '2'"),
])
def test_evaluate_refuses_a_bad_boxes_file_with_a_one_line_reason(held_out, tmp_path, capsys, content, reason):
    _, report, _, _ = held_out
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(content)
    assert main(["evaluate", str(report), "--boxes", str(boxes)]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1


def test_evaluate_refuses_a_folder_without_a_report(tmp_path, capsys):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\n")
    assert main(["evaluate", str(tmp_path / "nothing"), "--boxes", str(boxes)]) == 2
    assert main(["evaluate", str(tmp_path), "--boxes", str(tmp_path / "missing.csv")]) == 2
    assert not (tmp_path / "nothing").exists()


def test_heat_scale_run_keeps_a_factor_of_four_between_maps_and_image_scale_erases_it():
    from batchcam.cam.overlay import heat_levels, render
    from batchcam.engines.heat_scale import run_heat_scale

    cam = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) + 0.1
    strong = 4 * cam
    scale = run_heat_scale([cam.numpy(), strong.numpy()])
    assert scale == pytest.approx(float(np.percentile(np.concatenate([cam.ravel(), strong.ravel()]), 99)), rel=1e-5)
    weak_levels = np.asarray(heat_levels(cam, 70, 90, scale), dtype=np.float64)
    strong_levels = np.asarray(heat_levels(strong, 70, 90, scale), dtype=np.float64)
    unsaturated = strong_levels < 250
    assert unsaturated.mean() > 0.5
    np.testing.assert_allclose(strong_levels[unsaturated], 4 * weak_levels[unsaturated], atol=8)  # 8-bit rounding
    # per-image scaling: identical levels and identical overlays
    np.testing.assert_array_equal(np.asarray(heat_levels(cam, 70, 90)), np.asarray(heat_levels(strong, 70, 90)))
    display = np.full((70, 90), 128, dtype=np.uint8)
    assert render(display, cam, 90, 70).overlay_jpeg == render(display, strong, 90, 70).overlay_jpeg
    assert render(display, cam, 90, 70, scale).overlay_jpeg != render(display, strong, 90, 70, scale).overlay_jpeg


def test_scan_with_run_heat_scale_rerenders_overlays_and_says_so_in_the_legend(tiny_model, xray_folder, tmp_path):
    from PIL import Image

    image_report, run_report = tmp_path / "image", tmp_path / "run"
    common = ["--model", str(tiny_model), "--workers", "0"]
    assert main(["scan", str(xray_folder), "--out", str(image_report), *common]) == 0
    assert main(["scan", str(xray_folder), "--out", str(run_report), "--heat-scale", "run", *common]) == 0
    cam_info = json.loads((run_report / "manifest.json").read_text())["cam"]
    assert cam_info["heat_scale"] == "run" and cam_info["run_scale"] > 0
    assert (run_report / "cams.npz").is_file()
    assert "one scale for the whole run" in (run_report / "index.html").read_text()
    assert "each map scaled to its own range" in (image_report / "index.html").read_text()
    run_rows, image_rows = rows_by_path(run_report), rows_by_path(image_report)
    differs = 0
    for path, row in run_rows.items():
        assert row["cam_peak_x"] == image_rows[path]["cam_peak_x"]  # scaling never moves the peak
        a = np.asarray(Image.open(run_report / row["overlay"]), dtype=np.int16)
        b = np.asarray(Image.open(image_report / image_rows[path]["overlay"]), dtype=np.int16)
        differs += np.abs(a - b).mean() > 1
    assert differs >= 1
    # an unchanged re-run reuses every row and keeps the one scale
    assert main(["scan", str(xray_folder), "--out", str(run_report), "--heat-scale", "run", *common]) == 0
    manifest = json.loads((run_report / "manifest.json").read_text())
    assert manifest["counts"]["reused"] == len(run_rows) and manifest["cam"]["run_scale"] == cam_info["run_scale"]


MARKER = 8          # px of a 96 px image: a bright square flush in the top-left corner, like a burnt-in marker


def marked_xray(seed: int, marked: bool):
    """A plain NORMAL synthetic X-ray; the marked ones carry the corner marker and nothing else differs."""
    from PIL import Image

    pixels = np.asarray(generate(seed, "NORMAL", (96, 96)).image).copy()
    if marked:
        pixels[:MARKER, :MARKER] = 255
    return Image.fromarray(pixels)


@pytest.mark.slow
def test_attention_flag_fires_on_a_corner_marker_shortcut_and_stays_quiet_on_plain_images(
        held_out, tmp_path, one_cpu_thread):
    from batchcam.model.checkpoint import ModelSpec, build_model, model_input, save_checkpoint

    demo = load_checkpoint(DEMO_MODEL, demo=True)
    spec = ModelSpec(class_names=("NORMAL", "PNEUMONIA"), image_size=demo.spec.image_size)
    views, labels = [], []
    for seed in range(100, 112):
        for marked in (False, True):
            views.append(resize_square(marked_xray(seed, marked), spec.image_size))
            labels.append(int(marked))
    x, y = model_input(torch.from_numpy(np.stack(views)), spec), torch.tensor(labels)
    torch.manual_seed(0)
    model = build_model(2)
    model.load_state_dict(demo.model.state_dict())   # the demo's lung features; the head learns the marker
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(8):
        batch = torch.randperm(len(y), generator=order)[:16]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for module in model.modules():        # batch statistics of the whole set, not of 8 noisy steps
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(x)
    checkpoint = tmp_path / "shortcut.pt"
    save_checkpoint(checkpoint, model.eval(), spec)

    root = tmp_path / "marked" / "PNEUMONIA"
    root.mkdir(parents=True)
    for seed in range(5000, 5010):
        marked_xray(seed, True).save(root / f"m{seed}.png")
    report = tmp_path / "report"
    assert main(["scan", str(root.parent), "--out", str(report), "--model", str(checkpoint), "--workers", "0",
                 "--quiet"]) == 0
    rows = read_rows(report)
    assert sum(row["prediction"] == "PNEUMONIA" for row in rows) >= 8      # the shortcut is learnt
    assert sum(row["attention_flag"] == "true" for row in rows) >= 8       # ...and the flag sees it
    # plain images, scanned with the demo model (held_out): quiet
    assert all(row["attention_flag"] == "false" for row in read_rows(held_out[1]))


# --- pytorch-grad-cam's methods at default settings ----------------------------------------------


def scan_subprocess(args: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m batchcam scan ARGS`` in a process of its own (stderr not a terminal), and that
    process's peak RSS in MB: the helper process's only child is the scan (no DataLoader workers)."""
    measure = ("import resource, subprocess, sys\n"
               "done = subprocess.run([sys.executable, '-m', 'batchcam', 'scan', *sys.argv[1:]], capture_output=True)\n"
               "sys.stdout.buffer.write(done.stdout); sys.stderr.buffer.write(done.stderr)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)\n"
               "sys.exit(done.returncode)\n")
    done = subprocess.run([sys.executable, "-c", measure, *args, "--workers", "0", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=3600)
    *output, peak = done.stdout.splitlines()
    return subprocess.CompletedProcess(done.args, done.returncode, "\n".join(output), done.stderr), int(peak)


# Without --quiet in the fast loop: the library's bars are silenced for every run alike
# (cam.explainer.silence_library_progress), and a quiet run's empty stderr is test_cron's; with it in .ci/run.
@pytest.mark.parametrize("quiet", [pytest.param(["--quiet"], marks=pytest.mark.slow), []])
def test_scorecam_prints_no_library_progress_bars(tiny_model, tmp_path, quiet):
    """pytorch-grad-cam draws a tqdm bar per image for ScoreCAM; batchcam's rules allow none under
    --quiet or when stderr is not a terminal (here it is a pipe). One image is enough to draw a bar
    (ScoreCAM's cost grows with the images: 512 masked forward passes each)."""
    write_xrays(tmp_path / "xrays", count=1)
    done, _ = scan_subprocess([str(tmp_path / "xrays"), "--out", str(tmp_path / "report"), "--model",
                               str(tiny_model), "--cam", "scorecam", *quiet], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "it/s" not in done.stderr and "%|" not in done.stderr and "\r" not in done.stderr
    if quiet:
        assert done.stderr.strip() == ""
    assert "1 ok" in done.stdout


@pytest.mark.slow
def test_scorecam_at_the_default_batch_size_needs_no_more_memory_than_at_batch_size_1(tmp_path):
    """ScoreCAM holds K x 3 x H x W masked copies an image (ResNet18 at 224 px: 300 MB); a batch of 4
    given to the library at once held four times that. Now one image at a time: the demo model over
    4 images at the default --batch-size peaks within 300 MB of a run with --batch-size 1."""
    root = tmp_path / "xrays"
    write_xrays(root, count=4, size=(320, 288))
    single, single_peak = scan_subprocess([str(root / "NORMAL"), "--out", str(tmp_path / "one"), "--cam", "scorecam",
                                           "--batch-size", "1", "--quiet"], tmp_path)
    assert single.returncode == 0, single.stderr
    batch, batch_peak = scan_subprocess([str(root), "--out", str(tmp_path / "all"), "--cam", "scorecam", "--quiet"],
                                        tmp_path)
    assert batch.returncode == 0, batch.stderr
    assert "4 ok" in batch.stdout
    assert batch_peak < single_peak + 300, (single_peak, batch_peak)
