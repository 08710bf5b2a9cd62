"""DICOM results: the SR holds predictions.json's numbers, both files reference the source study and
instances, dciodvfy/dcmtk accept them, and a de-identified copy carries no identifier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from lumbar_tf.cli.main import main
from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.pacs import sr as sr_module
from lumbar_tf.pacs.results import OVERLAY_FILE, SR_FILE
from lumbar_tf.synthetic.phantom import phi_values


@pytest.fixture(scope="module")
def study_dir(phantom_dir):
    return sorted((phantom_dir / "train_images").iterdir())[0]


@pytest.fixture(scope="module")
def predicted(tiny_run, study_dir, tmp_path_factory):
    """`lumbar-tf predict --dicom-out` once, identified and de-identified."""
    out = tmp_path_factory.mktemp("dicom_results")
    for name, extra in (("ident", []), ("deid", ["--deidentify"])):
        argv = ["predict", "--model", str(tiny_run), "--study", str(study_dir), "--out", str(out / name)]
        assert main([*argv, "--dicom-out", str(out / name / "dicom"), *extra]) == 0
    return out


def _source_headers(study_dir):
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in study_dir.rglob("*.dcm"))
    }


def test_sr_reads_back_to_predictions_json(predicted, study_dir):
    preds = json.loads((predicted / "ident" / "predictions.json").read_text())
    back = sr_module.read_sr(pydicom.dcmread(predicted / "ident" / "dicom" / SR_FILE))
    assert back["model"] == {
        "name": str(preds["model"]["name"]),
        "version": sr_module.model_version(preds["model"]),
    }
    assert back["intended_use"] == INTENDED_USE
    assert len(back["cells"]) == 25
    for cell in preds["cells"]:
        got = back["cells"][(cell["condition"], cell["level"])]
        assert got["grade"] == cell["grade"]
        np.testing.assert_allclose(got["grade_probs"], cell["grade_probs"], atol=1e-6)
    sources = _source_headers(study_dir)
    for entry in preds["levels"]:
        got = back["levels"][entry["level"]]
        assert got["x"] == pytest.approx(entry["x"], abs=1e-3)
        assert got["y"] == pytest.approx(entry["y"], abs=1e-3)
        ref = sources[got["sop_instance_uid"]]  # the SCOORD lies on a real source instance
        assert int(ref.InstanceNumber) == entry["instance_number"]
        assert ref.SeriesDescription.startswith("Sagittal T2")


def test_results_reference_the_source_study_and_copy_its_patient(predicted, study_dir):
    sources = _source_headers(study_dir)
    first = next(iter(sources.values()))
    sr = pydicom.dcmread(predicted / "ident" / "dicom" / SR_FILE)
    sc = pydicom.dcmread(predicted / "ident" / "dicom" / OVERLAY_FILE)
    source_series = {str(ds.SeriesInstanceUID) for ds in sources.values()}
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.SeriesInstanceUID not in source_series and ds.SeriesInstanceUID != ""
        assert ds.PatientID == first.PatientID and ds.PatientName == first.PatientName
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    refs = [
        item.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert refs and all(uid in sources for uid in refs)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
    assert sc.Modality == "OT" and sc.pixel_array.shape[-1] == 3
    assert INTENDED_USE in sc.ImageComments


def test_deidentified_copies_carry_no_identifier(predicted, study_dir):
    study_id = int(study_dir.name)
    sources = _source_headers(study_dir)
    first = next(iter(sources.values()))
    for name in (SR_FILE, OVERLAY_FILE):
        path = predicted / "deid" / "dicom" / name
        raw = path.read_bytes()
        for value in phi_values(study_id):
            assert value.encode() not in raw, (name, value)
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID != first.StudyInstanceUID
        assert first.StudyInstanceUID.encode() not in raw
    back = sr_module.read_sr(pydicom.dcmread(predicted / "deid" / "dicom" / SR_FILE))
    preds = json.loads((predicted / "deid" / "predictions.json").read_text())
    assert back["cells"][(L.CONDITIONS[0], L.LEVELS[0])]["grade"] == preds["cells"][0]["grade"]


@pytest.mark.parametrize("name", [SR_FILE, OVERLAY_FILE])
def test_dciodvfy_and_dcmtk_accept_the_files(predicted, name):
    tools = [t for t in ("dciodvfy", "dcmdump") if shutil.which(t)]
    if not tools:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (dicom3tools) and dcmdump (dcmtk) missing: .ci/run installs them")
        pytest.skip("dicom3tools/dcmtk not installed (.ci/run installs them)")
    path = predicted / "ident" / "dicom" / name
    if "dciodvfy" in tools:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
    if "dcmdump" in tools:
        run = subprocess.run(["dcmdump", "-E", str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr


def test_dicom_out_needs_one_study(tmp_path):
    assert main(["predict", "--model", str(tmp_path), "--data", str(tmp_path), "--dicom-out", "x"]) == 2
    assert main(["predict", "--model", str(tmp_path), "--study", str(tmp_path), "--deidentify"]) == 2


def test_a_keras_run_is_named_dev_in_sr_overlay_and_node_key(
    predicted, tiny_run, study_dir, monkeypatch, tmp_path
):
    from lumbar_tf.pacs import results
    from lumbar_tf.pacs.node import NodeConfig, PacsNode
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.predictor import predict_study

    preds = json.loads((predicted / "ident" / "predictions.json").read_text())
    assert preds["model"]["version"] is None  # a Keras run has no exported version
    sr = pydicom.dcmread(predicted / "ident" / "dicom" / SR_FILE)
    assert sr.SeriesDescription == f"lumbar-tf {preds['model']['name']} v{sr_module.DEV_VERSION} SR"
    assert sr_module.read_sr(sr)["model"]["version"] == sr_module.DEV_VERSION
    assert "None" not in str(sr.SeriesDescription) + str(sr_module.read_sr(sr)["model"])

    predictor = load_predictor(tiny_run)
    drawn = []
    overlay_rgb = results.sc_overlay.overlay_rgb
    monkeypatch.setattr(
        results.sc_overlay, "overlay_rgb", lambda p, image: drawn.append(p["model"]) or overlay_rgb(p, image)
    )
    results.build_dicom_results(predict_study(predictor, study_dir))
    assert drawn and drawn[0]["version"] == sr_module.DEV_VERSION  # the overlay's burned-in model line

    node = PacsNode(predictor, NodeConfig(work_dir=tmp_path))
    assert node.model_key == f"{preds['model']['name']}@{sr_module.DEV_VERSION}"
