"""Your own model through the command line (issue 23's table): each file saved the way users save it,
scanned with ``--model`` (or first made a checkpoint with ``import-model``), and every probability in
predictions.csv compared with a plain PyTorch forward pass on the declared preprocessing (PIL ->
torchvision.transforms -> model -> softmax, within 1e-4), every map in cams.npz with pytorch-grad-cam's
GradCAM on the same target layer (correlation >= 0.98). Refusals are exit 2 with one line.

Models are compared at 64 px where a declaration allows it (``import-model --input-size 64``); a plain
state dict's 224 px is what ``--model`` assumes, so those rows run at 224.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from batchcam.cli import main
from batchcam.commands.scan.run import check_decoder
from batchcam.config import ARCHITECTURE_NAMES, RESIZE_MODES, ScanConfig
from batchcam.decode import imaging
from batchcam.decode.imaging import view_box
from batchcam.errors import UsageError
from batchcam.model.architectures import ARCHITECTURES
from batchcam.model.checkpoint import load_checkpoint
from tests.e2e.helpers import manifest, rows_by_path, scan_argv
from tests.unit.model.user_models import (
    MIN_CORRELATION,
    PROBABILITY_TOLERANCE,
    SIZE,
    Preprocessing,
    cam_reference,
    correlation,
    library_maps,
    optimizer_state,
    reference_inputs,
    reference_probabilities,
    user_model,
    write_xray_pngs,
)

PLAIN = Preprocessing(size=224)   # what --model assumes of a plain state dict
SMALL = Preprocessing(size=SIZE)  # what these tests declare with import-model --input-size
NAMES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread(one_cpu_thread):
    """Models on a small shared CPU are faster with one intra-op thread."""


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> list[Path]:
    return write_xray_pngs(tmp_path_factory.mktemp("xrays"), count=4)


def said(*argv: str) -> tuple[int, str, str]:
    """A command in this process: its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv])
    return code, out.getvalue(), err.getvalue()


def scanned(root: Path, out: Path, model: Path, *extra: str) -> str:
    """Scan with --save-cams; its stderr (asserting exit 0)."""
    code, _, err = said(*scan_argv(root, out, model, "--save-cams", "--quiet", *extra))
    assert code == 0, err
    return err


def imported(source: Path, out: Path, *flags: str) -> str:
    """import-model; what it printed (asserting exit 0 and the file written)."""
    code, printed, err = said("import-model", str(source), "--out", str(out), *flags)
    assert code == 0, err
    assert out.is_file()
    return printed


def refused(*argv: str) -> str:
    """A command that must refuse: exit 2 and one line on stderr, no traceback; that line."""
    code, printed, err = said(*argv)
    assert code == 2, (printed, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchcam: error: "), err
    assert not any(internal in err for internal in ("Traceback", "add_safe_globals", "weights_only", "Unpickl",
                                                    "state_dict for", "Missing key"))
    return lines[0]


def assert_scan_equals_reference(report: Path, user: nn.Module, paths: list[Path], pre: Preprocessing, *,
                                 cam: tuple[nn.Module, nn.Module] | None = None,
                                 names: tuple[str, ...] = NAMES) -> None:
    """predictions.csv's probabilities equal the plain forward pass's; cams.npz's maps pytorch-grad-cam's."""
    rows = rows_by_path(report)
    expected = reference_probabilities(user, reference_inputs(paths, pre))
    targets = []
    for path, reference in zip(paths, expected):
        row = rows[path.name]
        assert row["status"] == "ok", row
        ours = torch.tensor([float(row[f"p_{name}"]) for name in names])
        assert (ours - reference).abs().max() <= PROBABILITY_TOLERANCE, (path.name, ours, reference)
        targets.append(names.index(row["cam_target"]))
    with np.load(report / "cams.npz") as saved:
        maps = [torch.from_numpy(saved[path.name]) for path in paths]
    model, layer = cam or (user, user.layer4)
    single = expected.shape[1] == 2 and _single_logit(user, pre)
    theirs = library_maps(model, layer, reference_inputs(paths, pre), targets, single)
    for ours_map, their_map in zip(maps, theirs):
        upsampled = torch.nn.functional.interpolate(ours_map[None, None].float(), size=their_map.shape,
                                                    mode="bilinear", align_corners=False)[0, 0].numpy()
        assert correlation(upsampled, their_map) >= MIN_CORRELATION


def _single_logit(user: nn.Module, pre: Preprocessing) -> bool:
    with torch.inference_mode():
        return user.eval()(torch.zeros(1, pre.channels, pre.size, pre.size)).shape[1] == 1


# ---- what --model reads with no flags ------------------------------------------------------------------

def test_a_plain_state_dict_scans_exactly_saying_what_it_assumed_on_stderr_and_in_the_manifest(tmp_path, xrays):
    user = user_model("resnet18", pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")

    err = scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pth")

    notices = [line for line in err.splitlines() if "assumed" in line]
    assert len(notices) == 1 and "import-model" in notices[0] and "224 px squash" in notices[0]
    model = manifest(tmp_path / "report")["model"]
    assert model["arch"] == "resnet18" and model["source"] == "a plain state dict"
    assert model["target_layer"] == "layer4" and manifest(tmp_path / "report")["cam"]["target_layer"] == "layer4"
    assert (model["image_size"], model["resize"], model["channels"]) == (224, "squash", 3)
    assert model["class_names"] == list(NAMES) and len(model["mean"]) == len(model["std"]) == 3
    assert any("224 px squash" in a for a in model["assumptions"])
    assert any("NORMAL, PNEUMONIA" in a for a in model["assumptions"])
    assert_scan_equals_reference(tmp_path / "report", user, xrays, PLAIN)


def _save_row(row: str, user: nn.Module, path: Path) -> None:
    """``user`` saved as the table's row ``row`` is."""
    state = user.state_dict()
    if row in ("dropout-head", "single-logit", "resnet34"):
        torch.save(state, path)
    elif row == "dataparallel":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif row == "timm":
        torch.save({"epoch": 4, "arch": "resnet18", "state_dict": state, "version": 2, "metric": 0.9,
                    "args": argparse.Namespace(model="resnet18", num_classes=2, img_size=224)}, path)
    elif row == "training-dict":
        torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": optimizer_state(user),
                    "class_names": list(NAMES)}, path)
    elif row == "lightning":
        torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "hyper_parameters": {"lr": 1e-4}}, path)
    else:
        raise ValueError(row)


ROWS = {
    "dropout-head": ("resnet18", lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 2))),
    "dataparallel": ("resnet18", None),
    "timm": ("resnet18", None),
    "training-dict": ("resnet18", None),
    "lightning": ("resnet18", None),
    "single-logit": ("resnet18", lambda: nn.Linear(512, 1)),
    "resnet34": ("resnet34", None),
}


# The fast loop runs one of these 224 px scans (the library's own tests run every row fast, in memory).
@pytest.mark.parametrize("row", [row if row == "dropout-head" else pytest.param(row, marks=pytest.mark.slow)
                                 for row in ROWS])
def test_each_file_the_table_says_loads_directly_scans_exactly(tmp_path, xrays, row):
    arch, head = ROWS[row]
    user = user_model(arch, head() if head else None, pre=PLAIN, split_on=xrays)
    _save_row(row, user, tmp_path / "model.pth")

    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pth")

    assert manifest(tmp_path / "report")["model"]["arch"] == arch
    assert_scan_equals_reference(tmp_path / "report", user, xrays, PLAIN)


def test_a_single_logit_scans_as_two_probabilities_summing_to_one(tmp_path, xrays):
    user = user_model("resnet18", nn.Linear(512, 1), pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "bce.pth")

    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "bce.pth")

    for row in rows_by_path(tmp_path / "report").values():
        assert abs(float(row["p_NORMAL"]) + float(row["p_PNEUMONIA"]) - 1) <= 2e-6


def test_an_mlp_head_scans_with_pytorch_grad_cam_maps(tmp_path, xrays):
    head = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 2))
    user = user_model("resnet18", head, pre=PLAIN, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "mlp.pth")

    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "mlp.pth")

    assert manifest(tmp_path / "report")["cam"]["exact_fast_path"] is False
    assert_scan_equals_reference(tmp_path / "report", user, xrays, PLAIN)


# ---- what needs import-model -------------------------------------------------------------------------

def test_a_whole_pickled_model_is_refused_naming_trust_pickle_and_imported_with_it(tmp_path, xrays):
    user = user_model("resnet18", pre=SMALL, split_on=xrays)
    torch.save(user, tmp_path / "whole.pt")

    line = refused(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "whole.pt"))
    assert "import-model" in line and "--trust-pickle" in line
    assert not (tmp_path / "report").exists()
    line = refused("import-model", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "model.pt"))
    assert "--trust-pickle" in line and not (tmp_path / "model.pt").exists()

    printed = imported(tmp_path / "whole.pt", tmp_path / "model.pt", "--trust-pickle", "--input-size", "64")
    assert "a pickled model (torchvision.models.resnet.ResNet)" in printed and "checked: " in printed
    err = scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")
    assert "assumed" not in err   # the checkpoint says everything
    assert_scan_equals_reference(tmp_path / "report", user, xrays, SMALL)


def test_a_torchscript_file_is_refused_naming_import_model_and_imported(tmp_path, xrays):
    user = user_model("resnet18", pre=SMALL, split_on=xrays)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch announces TorchScript's deprecation
        torch.jit.script(user).save(str(tmp_path / "scripted.pt"))

    line = refused(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "scripted.pt"))
    assert "TorchScript" in line and "import-model" in line

    assert "a TorchScript model" in imported(tmp_path / "scripted.pt", tmp_path / "model.pt", "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")
    assert_scan_equals_reference(tmp_path / "report", user, xrays, SMALL)


def test_three_classes_without_names_are_refused_naming_classes_and_imported_with_them(tmp_path, xrays):
    names = ("NORMAL", "BACTERIA", "VIRUS")
    user = user_model("resnet18", outputs=3, pre=SMALL, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "three.pth")

    line = refused(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "three.pth"))
    assert "3 outputs and no class names" in line and "import-model" in line and "--classes A,B,C" in line

    imported(tmp_path / "three.pth", tmp_path / "model.pt", "--classes", ",".join(names), "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")
    assert manifest(tmp_path / "report")["model"]["class_names"] == list(names)
    assert_scan_equals_reference(tmp_path / "report", user, xrays, SMALL, names=names)


def test_a_one_channel_model_is_refused_without_its_normalisation_and_scans_with_it(tmp_path, xrays):
    gray = Preprocessing(size=SIZE, mean=(0.5,), std=(0.5,), channels=1)
    user = user_model("resnet18", channels=1, pre=gray, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "gray.pth")

    line = refused(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "gray.pth"))
    assert "1-channel" in line and "--channels 1 --mean M --std S" in line

    imported(tmp_path / "gray.pth", tmp_path / "model.pt", "--channels", "1", "--mean", "0.5", "--std", "0.5",
             "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")
    model = manifest(tmp_path / "report")["model"]
    assert (model["channels"], model["mean"], model["std"]) == (1, [0.5], [0.5])
    assert_scan_equals_reference(tmp_path / "report", user, xrays, gray)


def test_a_center_crop_model_scans_exactly_with_its_map_peak_and_overlay_in_the_view_box(tmp_path, xrays):
    crop = Preprocessing(size=SIZE, resize="center-crop")
    user = user_model("resnet18", pre=crop, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")

    imported(tmp_path / "model.pth", tmp_path / "model.pt", "--resize", "center-crop", "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")

    assert manifest(tmp_path / "report")["model"]["resize"] == "center-crop"
    assert_scan_equals_reference(tmp_path / "report", user, xrays, crop)
    for path in xrays:
        row = rows_by_path(tmp_path / "report")[path.name]
        width, height = int(row["width"]), int(row["height"])
        left, top, right, bottom = view_box(width, height, SIZE, "center-crop")
        assert (left, top) != (0, 0) or (right, bottom) != (width, height)  # these images are cropped
        assert left <= int(row["cam_peak_x"]) < right and top <= int(row["cam_peak_y"]) < bottom
        with Image.open(tmp_path / "report" / row["overlay"]) as image:
            overlay = np.asarray(image.convert("RGB"), dtype=np.int16)
        scale_x, scale_y = overlay.shape[1] / width, overlay.shape[0] / height
        inside = overlay[int(top * scale_y) + 2:int(bottom * scale_y) - 2, int(left * scale_x) + 2:
                         int(right * scale_x) - 2]
        outside = np.concatenate([overlay[:, :max(0, int(left * scale_x) - 2)].reshape(-1, 3),
                                  overlay[:, int(right * scale_x) + 2:].reshape(-1, 3),
                                  overlay[:max(0, int(top * scale_y) - 2)].reshape(-1, 3),
                                  overlay[int(bottom * scale_y) + 2:].reshape(-1, 3)])
        assert len(outside) and np.abs(outside - outside.mean(1, keepdims=True)).max() <= 12  # gray: no heat
        assert np.abs(inside - inside.mean(2, keepdims=True)).max() > 40                     # coloured: heat


def test_evaluate_places_a_center_crop_models_heat_in_its_view_box(tmp_path, xrays):
    """The map covers the view box: a box around it holds all the heat, a strip beside it none."""
    user = user_model("resnet18", pre=Preprocessing(size=SIZE, resize="center-crop"), split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")
    imported(tmp_path / "model.pth", tmp_path / "model.pt", "--resize", "center-crop", "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")
    rows = rows_by_path(tmp_path / "report")
    views = {path.name: view_box(int(rows[path.name]["width"]), int(rows[path.name]["height"]), SIZE, "center-crop")
             for path in xrays}

    def heat_inside(boxes: dict[str, tuple[float, float, float, float]]) -> list[float | None]:
        lines = ["path,x0,y0,x1,y1", *(f"{name},{x0},{y0},{x1},{y1}" for name, (x0, y0, x1, y1) in boxes.items())]
        (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
        assert said("evaluate", str(tmp_path / "report"), "--boxes", str(tmp_path / "boxes.csv"))[0] == 0
        images = json.loads((tmp_path / "report" / "metrics.json").read_text())["localisation"]["images"]
        return [image["energy_inside"] for image in images]

    around = [share for share in heat_inside(views) if share is not None]   # None: a map without heat
    assert len(around) >= 2 and around == [pytest.approx(1.0)] * len(around)
    beside = {name: (0.0, 0.0, left - 1, float(rows[name]["height"])) for name, (left, *_) in views.items()
              if left >= 2}
    assert beside                                                             # some films are wider than tall
    beside_shares = heat_inside(beside)
    assert 0.0 in beside_shares and set(beside_shares) <= {0.0, None}


@pytest.fixture(scope="module")
def architectures(xrays, tmp_path_factory):
    """Each heavy architecture built once: (user model, plain state dict file)."""
    folder = tmp_path_factory.mktemp("architectures")
    built = {}

    def build(arch: str) -> tuple[nn.Module, Path]:
        if arch not in built:
            user = user_model(arch, pre=SMALL, split_on=xrays)
            torch.save(user.state_dict(), folder / f"{arch}.pth")
            built[arch] = user, folder / f"{arch}.pth"
        return built[arch]
    return build


@pytest.mark.parametrize("arch,target_layer", [
    ("resnet50", "layer4"), ("densenet121", "features.relu5"), ("efficientnet_b0", "features.8"),
    pytest.param("resnet101", "layer4", marks=pytest.mark.slow),
])
def test_each_architecture_imported_scans_exactly_with_its_target_layer(tmp_path, xrays, architectures, arch,
                                                                        target_layer):
    user, weights = architectures(arch)

    printed = imported(weights, tmp_path / "model.pt", "--input-size", "64")
    assert f"Grad-CAM target layer: {target_layer}" in printed
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")

    report = manifest(tmp_path / "report")
    assert report["model"]["arch"] == arch
    assert report["model"]["target_layer"] == report["cam"]["target_layer"] == target_layer
    assert report["cam"]["exact_fast_path"] is True
    assert_scan_equals_reference(tmp_path / "report", user, xrays, SMALL, cam=cam_reference(user, arch))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["densenet121", "efficientnet_b0"])
def test_the_onnx_backend_explains_every_architecture_as_eager_does_or_is_refused_in_one_line(
        tmp_path, xrays, architectures, arch, private_model_cache):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    user, weights = architectures(arch)
    imported(weights, tmp_path / "model.pt", "--input-size", "64")

    code, _, err = said(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt", "--backend", "onnx",
                                   "--save-cams", "--quiet"))

    if code == 2:  # the export checked against eager PyTorch on a probe and found unequal: refused, never run
        assert "--backend onnx: the exported model's outputs differ from PyTorch's" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "report").exists()
        return
    assert code == 0, err
    assert manifest(tmp_path / "report")["cam"]["backend"] == "onnx"
    assert_scan_equals_reference(tmp_path / "report", user, xrays, SMALL, cam=cam_reference(user, arch))


def test_predict_explains_an_imported_architecture_as_scan_does(tmp_path, xrays, architectures):
    _, weights = architectures("densenet121")
    imported(weights, tmp_path / "model.pt", "--input-size", "64")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt")

    code, printed, _ = said("predict", *map(str, xrays), "--model", str(tmp_path / "model.pt"), "--json")

    assert code == 0
    rows = rows_by_path(tmp_path / "report")
    for line in printed.splitlines():
        result = json.loads(line)
        row = rows[Path(result["file"]).name]
        assert abs(result["probabilities"]["PNEUMONIA"] - float(row["p_PNEUMONIA"])) <= 1e-6
        assert (result["cam_peak_x"], result["cam_peak_y"]) == (int(row["cam_peak_x"]), int(row["cam_peak_y"]))


def test_the_row_key_holds_the_preprocessing_so_a_reimported_model_redoes_every_row(tmp_path, xrays):
    """The same weights declared with another resize: not one row of the previous run is reused."""
    user = user_model("resnet18", pre=SMALL, split_on=xrays)
    torch.save(user.state_dict(), tmp_path / "model.pth")
    imported(tmp_path / "model.pth", tmp_path / "squash.pt", "--input-size", "64")
    imported(tmp_path / "model.pth", tmp_path / "crop.pt", "--input-size", "64", "--resize", "center-crop")

    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "squash.pt")
    scanned(xrays[0].parent, tmp_path / "report", tmp_path / "crop.pt")

    assert manifest(tmp_path / "report")["counts"]["reused"] == 0
    assert_scan_equals_reference(tmp_path / "report", user, xrays, Preprocessing(size=SIZE, resize="center-crop"))


# ---- refusals ------------------------------------------------------------------------------------------

def test_a_wrong_arch_is_refused_naming_the_architecture_the_weights_are(tmp_path, architectures):
    _, weights = architectures("resnet50")

    line = refused("import-model", str(weights), "--out", str(tmp_path / "model.pt"), "--arch", "densenet121")

    assert "resnet50" in line and "--arch" in line
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("content", [b"", b"hello, not a model", b"PK\x03\x04broken zip"],
                         ids=["empty", "text", "broken-zip"])
def test_a_file_that_is_not_a_model_is_refused_by_scan_and_import_model(tmp_path, xrays, content):
    (tmp_path / "model.pt").write_bytes(content)

    line = refused(*scan_argv(xrays[0].parent, tmp_path / "report", tmp_path / "model.pt"))
    assert "model.pt" in line
    assert not (tmp_path / "report").exists()
    refused("import-model", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_import_model_never_writes_through_a_link_nor_over_a_file_without_force(tmp_path, architectures):
    _, weights = architectures("resnet50")
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_path / "link.pt")

    assert "symbolic link" in refused("import-model", str(weights), "--out", str(tmp_path / "link.pt"), "--force")
    assert target.read_bytes() == b"precious"
    assert "--force" in refused("import-model", str(weights), "--out", str(target))
    assert target.read_bytes() == b"precious"
    assert "SRC" in refused("import-model", str(weights), "--out", str(weights), "--force")

    imported(weights, target, "--force", "--input-size", "64")
    assert target.read_bytes() != b"precious"


@pytest.mark.parametrize("flags,message", [
    (["--mean", "0.5"], "--mean and --std are declared together"),
    (["--channels", "2"], "--channels must be 1 or 3"),
    (["--input-size", "8"], "--input-size must be at least 16"),
    (["--classes", "A"], "--classes"),
])
def test_declarations_that_can_never_be_right_are_refused_in_one_line(tmp_path, architectures, flags, message):
    _, weights = architectures("resnet50")
    assert message in refused("import-model", str(weights), "--out", str(tmp_path / "model.pt"), *flags)
    assert not (tmp_path / "model.pt").exists()


def test_the_command_line_names_every_architecture_batchcam_builds():
    assert ARCHITECTURE_NAMES == tuple(ARCHITECTURES)
    assert imaging.RESIZE_MODES == RESIZE_MODES


@pytest.mark.parametrize("arch,head,stem", [("densenet121", "classifier", "features.conv0"),
                                            ("efficientnet_b0", "classifier", "features.0")])
def test_sanity_randomises_every_architecture_from_its_head_down_to_its_stem(tmp_path, xrays, architectures, arch,
                                                                            head, stem):
    _, weights = architectures(arch)
    imported(weights, tmp_path / "model.pt", "--input-size", "64")

    code, printed, err = said("sanity", str(xrays[0].parent), "--model", str(tmp_path / "model.pt"), "--out",
                              str(tmp_path / "sanity"))

    assert code == 0, err
    steps = json.loads((tmp_path / "sanity" / "sanity.json").read_text())["steps"]
    assert steps[0] == head and stem in steps[-1].split("+")
    assert len(steps) >= 5 and f"{head} " in printed


def test_decode_gpu_is_refused_for_a_center_crop_model_before_report_is_touched(tmp_path, xrays, architectures):
    """Checked in scan's prepare, after the device (a CPU-only machine refuses --decode gpu earlier)."""
    _, weights = architectures("resnet50")
    imported(weights, tmp_path / "crop.pt", "--input-size", "64", "--resize", "center-crop")
    loaded = load_checkpoint(tmp_path / "crop.pt")
    root, out = xrays[0].parent, tmp_path / "report"

    with pytest.raises(UsageError, match="--decode gpu makes squashed views only; crop.pt takes a center-crop view"):
        check_decoder(ScanConfig(root=root, out=out, decode="gpu"), loaded)
    check_decoder(ScanConfig(root=root, out=out, decode="cpu"), loaded)
    assert not out.exists()


# ---- calibrate with another backbone ---------------------------------------------------------------------

CALIBRATION_IMAGES_PER_CLASS = 340      # calibrate holds out 30%: 204 held out in all, 238 per class to fit


def overlapping_tree(root: Path) -> list[tuple[Path, int]]:
    """Noise films whose brightness leans by class but overlaps: a model can learn it and still err."""
    rng = np.random.default_rng(0)
    files = []
    for label, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for i in range(CALIBRATION_IMAGES_PER_CLASS):
            level = rng.uniform(90, 150) + 20 * label
            path = root / name / f"{i:03d}.png"
            Image.fromarray(np.clip(rng.normal(level, 30, (40, 48)), 0, 255).astype(np.uint8)).save(path)
            files.append((path, label))
    return files


def fitted_head(user: nn.Module, head: nn.Linear, files: list[tuple[Path, int]]) -> nn.Module:
    """``user`` with ``head`` scoring the direction between the two classes' mean features (standardised) on
    some of ``files``, scaled by a one-dimensional logistic fit: better than chance, not perfect, so the
    held-out images hold an estimate of the temperature (a full logistic fit on a thousand features
    would learn these few images by heart)."""
    some = files[::5]
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].detach()))
    with torch.no_grad():
        user(reference_inputs([path for path, _ in some], SMALL))
    hook.remove()
    x, y = features[0], torch.tensor([label for _, label in some])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    standard = (x - mean) / scale
    direction = standard[y == 1].mean(0) - standard[y == 0].mean(0)
    score = standard @ direction
    slope, offset = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.Adam([slope, offset], lr=0.05)
    for _ in range(300):
        optimiser.zero_grad()
        logit = slope * score / score.std() + offset
        nn.functional.binary_cross_entropy_with_logits(logit, y.float()).backward()
        optimiser.step()
    with torch.no_grad():
        weight = float(slope) / 2 * direction / score.std() / scale           # the two logits: -z/2 and z/2
        head.weight.copy_(torch.stack([-weight, weight]))
        bias = float(offset) / 2 - float((weight * mean).sum())
        head.bias.copy_(torch.tensor([-bias, bias]))
    return user


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "features"), [("efficientnet_b0", 1280), ("densenet121", 1024)])
def test_calibrate_fits_the_statistics_of_another_backbone_and_scan_flags_with_them(arch, features, tmp_path):
    files = overlapping_tree(tmp_path / "labelled")
    user = user_model(arch, pre=SMALL)
    head = user.classifier if arch == "densenet121" else user.classifier[-1]
    fitted_head(user, head, files)
    torch.save({"model_state_dict": user.state_dict(), "class_names": list(NAMES)}, tmp_path / "model.pth")
    imported(tmp_path / "model.pth", tmp_path / "model.pt", "--input-size", "64")

    code, _, err = said("calibrate", str(tmp_path / "labelled"), "--model", str(tmp_path / "model.pt"),
                        "--out", str(tmp_path / "calibrated.pt"), "--batch-size", "64")
    assert code == 0, err
    calibrated = load_checkpoint(tmp_path / "calibrated.pt")
    assert calibrated.ood is not None and tuple(calibrated.ood.means.shape) == (len(NAMES), features)
    assert 0.5 <= calibrated.temperature <= 5
    before = load_checkpoint(tmp_path / "model.pt").model.state_dict()
    assert all(torch.equal(value, before[name]) for name, value in calibrated.model.state_dict().items())

    scanned(tmp_path / "labelled" / "NORMAL", tmp_path / "report", tmp_path / "calibrated.pt")
    rows = rows_by_path(tmp_path / "report")
    assert all(row["ood_flag"] in ("true", "false") and float(row["ood_score"]) > 0 for row in rows.values())
    assert manifest(tmp_path / "report")["ood"]["statistics"] is True
