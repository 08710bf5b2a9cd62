"""Label semantics travel with the model: a model trained on the RSNA labels alone (no
train_grades.csv) reports presence as P(>= moderate), grades in the RSNA three, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core import labels as L


def test_label_semantics_of_rsna_and_fine_grades():
    rsna = np.full((3, 5, 5), L.NORMAL_MILD)
    rsna[0, 0, 0], rsna[0, 1, 1] = 2, 3
    rsna[1, 2, 3] = L.UNKNOWN
    got = L.label_semantics(rsna)
    assert got["known_thresholds"] == [">=2", ">=3"] and got["fine_grades"] is False
    assert got["n_fine_grade_studies"] == 0 and got["presence"] == ">=2"
    assert got["grade_scale"] == ["normal_mild", "moderate", "severe"]

    mixed = rsna.copy()
    mixed[2, 4, 4] = 0  # one study with a fine grade (grade < 1) makes >=1 known
    got = L.label_semantics(mixed)
    assert got["known_thresholds"] == [">=1", ">=2", ">=3"] and got["fine_grades"] is True
    assert got["n_fine_grade_studies"] == 1 and got["grade_scale"] == list(L.GRADES)
    # Without a record, P(>=1) is not trusted.
    assert L.semantics_or_default(None)["fine_grades"] is False
    assert L.semantics_or_default({"fine_grades": True})["presence"] == ">=1"


def test_synth_rsna_labels_writes_no_train_grades(tmp_path):
    from lumbar_tf.cli.main import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--studies", "1", "--labels", "rsna"]) == 0
    assert (tmp_path / "d" / "train.csv").is_file()
    assert not (tmp_path / "d" / "train_grades.csv").exists()


@pytest.fixture(scope="module")
def rsna_run(rsna_resumed_run):
    """The session's RSNA-only run (conftest.py): the phantoms without train_grades.csv."""
    data, run = rsna_resumed_run.data, rsna_resumed_run.run
    assert not (data / "train_grades.csv").exists() and (data / "train.csv").is_file()
    return data, run


def test_rsna_only_training_predicts_presence_of_moderate(rsna_run, tmp_path):
    import tensorflow as tf

    from lumbar_tf.export.job import export_model
    from lumbar_tf.report.explain import explain_study
    from lumbar_tf.report.heatmaps import severity_grid, write_heatmaps_for
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.predictor import predict_study

    data, run = rsna_run
    record = json.loads((Path(run) / "label_semantics.json").read_text())
    assert record["known_thresholds"] == [">=2", ">=3"] and record["fine_grades"] is False
    assert json.loads((Path(run) / "finished.json").read_text())["label_semantics"] == record

    out = tmp_path / "export"
    export_model(run, out, tflite=(), representative_size=2, progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["label_semantics"]["fine_grades"] is False and meta["fine_grades"] is False

    study = sorted((data / "train_images").iterdir())[0]
    for model in (run, out):
        result = predict_study(load_predictor(model), study)
        preds = result.predictions
        tp = result.threshold_probs
        for k, cell in enumerate(preds["cells"]):
            ci, li = divmod(k, 5)
            assert cell["presence"] == pytest.approx(float(tp[ci, li, 1]), abs=1e-6)  # P(>=2)
            assert len(cell["grade_probs"]) == 3
            assert cell["grade_probs"] == pytest.approx(list(cell["rsna"].values()), abs=1e-6)
        assert preds["label_semantics"]["presence"] == "P(grade >=2)"
        assert preds["label_semantics"]["grade_scale"] == ["normal_mild", "moderate", "severe"]
        assert any("mild is not distinguishable" in w for w in preds["warnings"])
        # Heatmap severity never uses P(mild): 2 P(moderate) + 3 P(severe).
        rsna = np.array([list(c["rsna"].values()) for c in preds["cells"]]).reshape(5, 5, 3)
        np.testing.assert_allclose(severity_grid(preds), rsna @ [0, 2, 3], atol=1e-9)
        grid, levels = write_heatmaps_for(result, tmp_path / Path(model).name)
        assert grid.is_file() and levels.is_file()

    # The HTML report names the RSNA grades, never "mild".
    page = Path(explain_study(run, study, tmp_path / "explain")["paths"]["report"]).read_text()
    assert "<th>P(normal_mild)</th><th>P(moderate)</th><th>P(severe)</th>" in page
    assert "<th>P(mild)</th>" not in page

    # The SavedModel's in-graph presence is P(>=2) too.
    fn = tf.saved_model.load(str(out / "saved_model" / "lumbar_spine" / "1")).signatures["serving_default"]
    views = {k: tf.constant(np.asarray(v, np.float32)[None]) for k, v in result.views.items()}
    got = {k: v.numpy() for k, v in fn(**views).items()}
    np.testing.assert_allclose(got["presence"], got["threshold_probs"][..., 1], atol=1e-6)
