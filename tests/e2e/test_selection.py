"""Scan only what the model is for: DICOM films that are not frontal chest radiographs become
``skipped`` rows with their reason, in scan, predict and serve; --select, --modalities and --views
change the rule, and a changed rule decides those rows again."""
from __future__ import annotations

import io
import json
from pathlib import Path

import helpers
import pytest
from helpers import manifest, page_cards, rows_by_path

from batchcam.cli import main
from batchcam.config import Selection
from batchcam.decode.selection import Acquisition, skip_reason
from batchcam.errors import UsageError
from tests.conftest import write_xrays
from tests.dicom_films import dicom_film

pydicom = pytest.importorskip("pydicom", reason="DICOM support (the dicom extra) is not installed")


FILMS = {  # name -> (tags, the status and reason of the default rule)
    "chest_pa.dcm": ({"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, "ok", ""),
    "chest_untagged.dcm": ({"Modality": "CR"}, "ok", ""),
    "thorax_ap.dcm": ({"Modality": "cr", "BodyPartExamined": "thorax", "ViewPosition": "AP"}, "ok", ""),
    "chest_lateral.dcm": ({"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "LL"}, "skipped",
                          "lateral view (ViewPosition LL)"),
    "ct_slice.dcm": ({"Modality": "CT"}, "skipped", "not a chest radiograph: Modality CT"),
    "knee.dcm": ({"Modality": "CR", "BodyPartExamined": "KNEE", "ViewPosition": "AP"}, "skipped",
                 "not a chest radiograph: BodyPartExamined KNEE"),
    "no_modality.dcm": ({}, "skipped", "not a chest radiograph: no Modality"),
}


def write_films(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (tags, _, _) in FILMS.items():
        (root / name).write_bytes(dicom_film(**tags))
    write_xrays(root / "png", count=2)


def scan(root: Path, out: Path, model: Path, *extra: str) -> tuple[int, dict[str, dict], dict]:
    code = helpers.scan(root, out, model, *extra)
    return code, rows_by_path(out), manifest(out)


@pytest.fixture
def films(tmp_path) -> Path:
    root = tmp_path / "films"
    write_films(root)
    return root


def test_default_scan_skips_what_is_not_a_frontal_chest_radiograph_with_its_reason(films, tmp_path, tiny_model):
    code, rows, manifest = scan(films, tmp_path / "report", tiny_model)
    assert code == 0  # skipped rows are not errors
    for name, (_, status, reason) in FILMS.items():
        row = rows[name]
        assert (row["status"], row["error"]) == (status, reason), name
        if status == "skipped":
            assert row["prediction"] == row["confidence"] == row["overlay"] == row["p_NORMAL"] == ""
        else:
            assert row["prediction"] and row["overlay"]
    assert rows["png/NORMAL/img00.png"]["status"] == "ok"  # no tags: always scored
    assert manifest["counts"]["skipped"] == 4 and manifest["counts"]["ok"] == 5
    assert manifest["counts"]["error"] == 0
    assert manifest["selection"] == {"select": "chest", "modalities": ["CR", "DX"], "views": ["PA", "AP"]}


def test_the_gallery_shows_skipped_cards_counts_them_and_filters_them(films, tmp_path, tiny_model):
    scan(films, tmp_path / "report", tiny_model)
    html = (tmp_path / "report" / "index.html").read_text()
    assert [card["status"] for card in page_cards(html)].count("skipped") == 4
    assert "lateral view (ViewPosition LL)" in html
    assert 'id="f-skipped"' in html
    assert "skipped<b>4</b>" in html


def test_a_rerun_reuses_skipped_rows_and_a_changed_rule_decides_only_dicom_rows_again(films, tmp_path, tiny_model):
    out = tmp_path / "report"
    scan(films, out, tiny_model)
    code, rows, manifest = scan(films, out, tiny_model)
    assert manifest["counts"]["processed"] == 0 and rows["ct_slice.dcm"]["status"] == "skipped"

    code, rows, manifest = scan(films, out, tiny_model, "--views", "any")
    assert manifest["counts"]["processed"] == len(FILMS)  # every DICOM decided again, the PNGs reused
    assert manifest["counts"]["reused"] == 2
    assert rows["chest_lateral.dcm"]["status"] == "ok" and rows["ct_slice.dcm"]["status"] == "skipped"

    code, rows, manifest = scan(films, out, tiny_model, "--select", "all")
    assert code == 0 and all(row["status"] == "ok" for row in rows.values())
    assert rows["ct_slice.dcm"]["prediction"]

    code, rows, manifest = scan(films, out, tiny_model, "--modalities", "CT", "--views", "any")
    statuses = {name: rows[name]["status"] for name in FILMS}
    assert statuses["ct_slice.dcm"] == "ok" and statuses["chest_pa.dcm"] == "skipped"
    assert rows["chest_pa.dcm"]["error"] == "not a chest radiograph: Modality DX"


def test_a_skipped_film_is_never_decoded(tmp_path, tiny_model):
    """The rule is applied to the tags before the pixels: a CT with broken pixel data is skipped, not an error."""
    root = tmp_path / "root"
    root.mkdir()
    data = dicom_film(Modality="CT")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = 4000  # pixel data far too short for this geometry: decoding it is an error
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    (root / "broken_ct.dcm").write_bytes(buffer.getvalue())
    write_xrays(root, count=1)
    code, rows, _ = scan(root, tmp_path / "report", tiny_model)
    assert rows["broken_ct.dcm"]["status"] == "skipped"
    code, rows, _ = scan(root, tmp_path / "report", tiny_model, "--select", "all")
    assert rows["broken_ct.dcm"]["status"] == "error" and code == 3


def test_a_hostile_tag_value_is_never_quoted(tmp_path, tiny_model):
    root = tmp_path / "root"
    root.mkdir()
    (root / "odd.dcm").write_bytes(dicom_film(Modality="<img src=x onerror=alert(1)>"))
    (root / "odd_view.dcm").write_bytes(dicom_film(Modality="DX", ViewPosition="John^Doe 1970"))
    code, rows, _ = scan(root, tmp_path / "report", tiny_model)
    assert rows["odd.dcm"]["error"] == "not a chest radiograph: Modality (not a DICOM code)"
    assert rows["odd_view.dcm"]["error"] == "unselected view (ViewPosition (not a DICOM code))"
    assert "onerror" not in (tmp_path / "report" / "index.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--select", "all", "--views", "PA"], "--select all scores every file"),
    (["--modalities", "C;T"], "is not a DICOM code"),
    (["--modalities", " , "], "needs at least one value"),
    (["--select", "bone"], "invalid choice"),
])
def test_bad_selection_options_exit_2_and_change_nothing(films, tmp_path, tiny_model, capsys, argv, message):
    out = tmp_path / "report"
    code = main(["scan", str(films), "--out", str(out), "--model", str(tiny_model), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_selection_rule_units():
    chest = Selection()
    assert skip_reason(Acquisition("DX", "CHESTABDOMEN", ""), chest) is None
    assert skip_reason(Acquisition("DX", "LUNG", "PA"), chest) is None
    assert skip_reason(Acquisition("DX", "", "RAO"), chest) == "oblique view (ViewPosition RAO)"
    assert skip_reason(Acquisition("MR", "CHEST", "PA"), chest) == "not a chest radiograph: Modality MR"
    assert skip_reason(Acquisition("CT", "", ""), Selection(mode="all")) is None
    laterals = Selection.from_options("chest", "dx", "LL,RL")
    assert laterals.modalities == ("DX",) and laterals.views == ("LL", "RL")
    assert skip_reason(Acquisition("DX", "", "PA"), laterals) == "frontal view (ViewPosition PA)"
    assert Selection.from_options("chest", None, "any").views is None
    assert len({Selection().key, Selection(mode="all").key, laterals.key}) == 3
    with pytest.raises(UsageError):
        Selection.from_options("all", "CR", None)


def test_predict_reports_a_skipped_film_and_exits_0(films, tiny_model, capsys):
    code = main(["predict", str(films / "ct_slice.dcm"), str(films / "chest_pa.dcm"), "--model", str(tiny_model),
                 "--json"])
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0
    assert results[0]["status"] == "skipped" and results[0]["error"] == "not a chest radiograph: Modality CT"
    assert results[0]["prediction"] is None and results[1]["status"] == "ok"
    assert "1 ok, 0 error, 1 skipped" in captured.err
    code = main(["predict", str(films / "ct_slice.dcm"), "--model", str(tiny_model), "--json", "--select", "all"])
    assert code == 0 and json.loads(capsys.readouterr().out)["status"] == "ok"


def test_serve_answers_a_skipped_upload_with_its_reason_not_a_400(films, tiny_model):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import torch
    from fastapi.testclient import TestClient

    from batchcam.commands.serve import create_app
    from batchcam.model.checkpoint import load_model
    from batchcam.serving.explain import Explainer

    explainer = Explainer(load_model(tiny_model, lambda message: None), torch.device("cpu"))
    client = TestClient(create_app(explainer, 50 * 2**20), base_url="http://127.0.0.1:8000")
    files = [("files", (name, (films / name).read_bytes(), "application/dicom"))
             for name in ("chest_lateral.dcm", "chest_pa.dcm")]
    response = client.post("/api/predict", files=files)
    assert response.status_code == 200
    lateral, frontal = response.json()["results"]
    assert lateral["status"] == "skipped" and lateral["error"] == "lateral view (ViewPosition LL)"
    assert lateral["overlay"] is None and frontal["status"] == "ok" and frontal["overlay"]


def public_films() -> Path:
    data_store = pytest.importorskip("data_store", reason="pydicom-data (the test extra's public DICOM films) "
                                     "is not installed")
    return Path(data_store.__file__).parent / "data"


def test_real_films_only_the_chest_radiograph_is_scored(tmp_path, tiny_model):
    """pydicom's public test films: a CR chest PA (MONOCHROME1, uncompressed and JPEG 2000), a CR
    tibia, a CT slice, an MR and an ultrasound frame."""
    source = public_films()
    root = tmp_path / "real"
    root.mkdir()
    names = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm"]
    for name in names:
        (root / name).symlink_to(source / name)
    code, rows, manifest = scan(root, tmp_path / "report", tiny_model)
    assert code == 0
    assert {name: (rows[name]["status"], rows[name]["error"]) for name in names} == {
        "RG1_UNCR.dcm": ("ok", ""), "RG1_J2KR.dcm": ("ok", ""),
        "RG3_UNCR.dcm": ("skipped", "not a chest radiograph: BodyPartExamined EXTREMITY"),
        "693_UNCR.dcm": ("skipped", "not a chest radiograph: Modality CT"),
        "MR2_UNCR.dcm": ("skipped", "not a chest radiograph: Modality MR"),
        "US1_UNCR.dcm": ("skipped", "not a chest radiograph: Modality US")}
    lossless, uncompressed = rows["RG1_J2KR.dcm"], rows["RG1_UNCR.dcm"]
    assert lossless["prediction"] == uncompressed["prediction"]
    assert float(lossless["confidence"]) == pytest.approx(float(uncompressed["confidence"]), abs=1e-6)
    assert (lossless["width"], lossless["height"]) == ("1841", "1955")
