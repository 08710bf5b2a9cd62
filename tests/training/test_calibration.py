"""Calibration: stored in the model, monotone, applied by every runtime; on held-out phantoms it
lowers the expected calibration error, and the submission (the metric's decision rule on the
calibrated probabilities) never raises the RSNA loss of the old submission (the uncalibrated
model's plain triple) by more than noise (twice the paired bootstrap standard error over the
held-out studies). Every submission writer applies the decision rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lumbar_tf.models.calibration import (
    CALIBRATION_LAYER,
    ThresholdTemperature,
    apply_numpy,
    calibrated_grader,
    calibration_of,
    uncalibrated_grader,
)
from lumbar_tf.training import calibration as cal

NOISE_Z = 2.0  # a change within two bootstrap standard errors is noise


def test_layer_keeps_thresholds_monotone_and_matches_numpy():
    rng = np.random.default_rng(0)
    logits = np.sort(rng.normal(0, 4, size=(7, 5, 3)), axis=-1)[..., ::-1].copy()
    temperatures = [[0.5, 2.0, 2.0], [1.0, 0.7, 0.7], [3.0, 1.0, 1.0]]
    biases = [[-2.0, 1.0, 1.0], [0.0, -0.5, -0.5], [1.0, 0.0, 0.0]]  # >=1 pushed below >=2 in places
    out = np.asarray(ThresholdTemperature(temperatures, biases)(logits.astype(np.float32)))
    assert np.all(np.diff(out, axis=-1) <= 1e-6)  # logit(>=1) >= logit(>=2) >= logit(>=3)
    np.testing.assert_allclose(out[:, 0, 1:], logits[:, 0, 1:] / 2.0 + 1.0, rtol=1e-5)  # >=2/>=3 untouched
    probs = 1 / (1 + np.exp(-logits[:, :, None]))  # [N, 5, 1 level, 3]
    np.testing.assert_allclose(
        apply_numpy(probs, temperatures, biases)[:, :, 0], 1 / (1 + np.exp(-out)), atol=1e-5
    )
    per_group = ThresholdTemperature((0.5, 2.0, 3.0))  # the older one-temperature-per-group form
    assert per_group.temperatures[2] == [3.0] * 3 and per_group.biases[0] == [0.0] * 3
    with pytest.raises(ValueError):
        ThresholdTemperature((1.0, 0.0, 1.0))


def _ordinal_sample(n, rng):
    true_logits = np.sort(rng.normal(0, 1.5, size=(n, 5, 5, 1)) + np.array([1.0, -0.5, -2.0]), axis=-1)
    true_logits = true_logits[..., ::-1]
    # One draw per cell against the three monotone thresholds: grade = thresholds passed.
    return true_logits, (rng.uniform(size=(n, 5, 5, 1)) < cal._sigmoid(true_logits)).sum(axis=-1)


def test_fit_recovers_an_overconfident_temperature_and_keeps_a_calibrated_model():
    rng = np.random.default_rng(1)
    true_logits, grades = _ordinal_sample(150, rng)
    overconfident = cal._sigmoid(true_logits * 2.5)
    fitted = cal.fit_calibration(overconfident, grades)
    temps = [fitted[g][part]["temperature"] for g in fitted for part in fitted[g]]
    assert all(2.0 < t < 3.2 for t in temps), fitted
    after = cal.rescale(overconfident, *cal.calibration_table(fitted))
    assert cal.expected_calibration_error(after, grades) < 0.5 * cal.expected_calibration_error(
        overconfident, grades
    )
    # Already calibrated: a map is kept only where it beat the identity out of fold.
    true_logits, grades = _ordinal_sample(12, rng)
    fitted = cal.fit_calibration(cal._sigmoid(true_logits), grades)
    for fit in (f for g in fitted.values() for f in g.values()):
        nll_identity, nll = fit["out_of_fold"]["threshold_log_loss"]
        moved = fit["family"] != "identity"
        assert nll < nll_identity if moved else nll == nll_identity
        assert moved or (fit["temperature"], fit["bias"]) == (1.0, 0.0)
    one_study = cal.fit_calibration(cal._sigmoid(true_logits[:1]), grades[:1])
    assert all(f["family"] == "identity" for g in one_study.values() for f in g.values())


def test_paired_bootstrap_se_is_zero_for_no_change_and_grows_with_one():
    rng = np.random.default_rng(2)
    true_logits, grades = _ordinal_sample(20, rng)
    probs = cal._sigmoid(true_logits)
    assert cal.paired_bootstrap_se(probs, probs, grades) == 0.0
    assert cal.paired_bootstrap_se(probs, cal._sigmoid(true_logits * 3), grades) > 0.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Eight phantoms the tiny run never saw (the suite's acquisition), and one cache for them."""
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    data = synthesize_dataset(tmp_path_factory.mktemp("held_out"), 8, seed=2026, acquisition="centred")
    return data, tmp_path_factory.mktemp("held_out_cache")


@pytest.fixture(scope="module")
def calibrated_run(tiny_run, phantom_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(tiny_run, run)
    record = cal.calibrate_run(run, None, cache_dir=phantom_cache)
    return run, record


@pytest.fixture(scope="module")
def overconfident_run(tiny_run, phantom_cache, tmp_path_factory):
    """The tiny run with its logits multiplied by 4 inside the grader (a layer calibration does not
    own, so it counts as the model): a badly overconfident model, then calibrated."""
    from lumbar_tf.core.contract import MODEL_FILE
    from lumbar_tf.models.end_to_end import build_end_to_end, fine_grades_of
    from lumbar_tf.runtime.keras_model import load_model

    run = tmp_path_factory.mktemp("overconfident") / "run"
    shutil.copytree(tiny_run, run)
    loaded = load_model(run)
    grader = loaded.model.get_layer("grader")
    sharpen = ThresholdTemperature((0.25, 0.25, 0.25), name="threshold_logits_overconfident")
    import keras

    distorted = keras.Model(grader.input, sharpen(grader.output), name="grader")
    model = build_end_to_end(
        loaded.model.get_layer("localizer"),
        distorted,
        loaded.preprocess,
        fine_grades=fine_grades_of(loaded.model),
    )
    model.save(run / MODEL_FILE)
    record = cal.calibrate_run(run, None, cache_dir=phantom_cache)
    return run, record


def test_calibrate_stores_the_maps_in_the_grader(calibrated_run):
    from lumbar_tf.runtime.keras_model import load_model

    run, record = calibrated_run
    assert json.loads((run / cal.CALIBRATION_FILE).read_text())["temperatures"] == record["temperatures"]
    assert (run / cal.RELIABILITY_FILE).stat().st_size > 0
    assert (run / cal.UNCALIBRATED_MODEL_FILE).exists()
    grader = load_model(run).model.get_layer("grader")
    temperatures, biases = calibration_of(grader)
    assert temperatures == [pytest.approx(record["temperatures"][g]) for g in record["temperatures"]]
    assert biases == [pytest.approx(record["biases"][g]) for g in record["biases"]]
    assert calibration_of(uncalibrated_grader(grader)) is None
    assert calibrated_grader(grader, (1, 1, 1)).get_layer(CALIBRATION_LAYER).temperatures == [[1.0] * 3] * 3
    # Each map is the least (ridge-penalised) log loss of its threshold on the fold it was fitted on.
    assert record["threshold_log_loss"] <= record["uncalibrated"]["threshold_log_loss"] + 1e-6
    assert set(record["groups"]["spinal"]) == {">=1", ">=2", ">=3"}


def test_every_runtime_path_applies_the_calibration(calibrated_run, overconfident_run, tiny_run, phantom_dir):
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.predictor import predict_study

    run, record = overconfident_run
    study = sorted((phantom_dir / "train_images").iterdir())[0]
    base = predict_study(load_predictor(tiny_run), study).threshold_probs
    before = cal._sigmoid(cal._logit(base) * 4)  # the overconfident model, uncalibrated
    after = predict_study(load_predictor(run), study).threshold_probs
    table = list(record["temperatures"].values()), list(record["biases"].values())
    np.testing.assert_allclose(after, cal.rescale(before[None], *table)[0], atol=2e-4)
    assert np.all(np.diff(after, axis=-1) <= 1e-6)
    assert not np.allclose(after, before, atol=1e-3)  # calibration did something here


def test_calibration_lowers_ece_and_not_the_rsna_loss_on_held_out_phantoms(
    overconfident_run, held_out, tmp_path_factory
):
    run, record = overconfident_run
    from lumbar_tf.training.evaluate import evaluate

    data, cache = held_out
    metrics = evaluate(run, data, tmp_path_factory.mktemp("eval"), cache_dir=cache)
    report = metrics["calibration"]
    before = report["uncalibrated"]
    assert report["expected_calibration_error"] < before["expected_calibration_error"]
    assert report["threshold_log_loss"] < before["threshold_log_loss"]
    # The new submission against the old one (uncalibrated, plain triple), and under one rule.
    assert report["rsna_log_loss_change_vs_plain"] <= NOISE_Z * report["rsna_log_loss_change_vs_plain_se"]
    assert report["rsna_log_loss_change"] <= NOISE_Z * report["rsna_log_loss_change_se"]
    assert metrics["rsna_log_loss"]["total"] == pytest.approx(report["rsna_log_loss"])
    from lumbar_tf.training.evaluate import format_metrics_table

    ece = (
        f"{before['expected_calibration_error']:.3f} -> {report['expected_calibration_error']:.3f} calibrated"
    )
    assert ece in format_metrics_table(metrics)


def test_calibrating_the_plain_tiny_run_lowers_the_held_out_ece_not_the_rsna_score(
    calibrated_run, tiny_run, held_out
):
    from lumbar_tf.data.dataset import DatasetError, load_manifest, load_studies, prepare_cache
    from lumbar_tf.runtime.keras_model import load_model

    run, _ = calibrated_run
    after_model, before_model = load_model(run), load_model(tiny_run)
    data, cache = held_out
    try:
        manifest = load_manifest(cache, after_model.preprocess)
    except DatasetError:
        manifest = prepare_cache(data, cache, after_model.preprocess, progress=False)
    studies = load_studies(cache, after_model.preprocess, list(manifest["study_ids"]))
    after = after_model.predict_views(studies["views"])["threshold_probs"]
    before = before_model.predict_views(studies["views"])["threshold_probs"]
    report = cal.calibration_report(after, studies["grades"], before)
    assert report["expected_calibration_error"] < report["uncalibrated"]["expected_calibration_error"]
    assert np.isfinite(report["rsna_log_loss_change_vs_plain_se"])
    assert report["rsna_log_loss_change_vs_plain"] <= NOISE_Z * report["rsna_log_loss_change_vs_plain_se"]


def test_a_calibrated_run_loads_in_a_fresh_process(calibrated_run):
    import subprocess
    import sys

    run, record = calibrated_run
    code = (
        "import sys; from lumbar_tf.runtime.keras_model import load_model; "
        "from lumbar_tf.models.calibration import calibration_of; "
        "print(calibration_of(load_model(sys.argv[1]).model.get_layer('grader'))[0])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert eval(out.stdout.strip()) == [pytest.approx(t) for t in record["temperatures"].values()]


def _submitted(path) -> dict:
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {r[0]: np.array([float(v) for v in r[1:]]) for r in rows}


def _expected_rows(study_id, threshold_probs) -> dict:
    from lumbar_tf.core import labels as L

    triples = L.rsna_submission_triple(threshold_probs)
    return {
        f"{study_id}_{c}_{lv}": triples[ci, li]
        for ci, c in enumerate(L.CONDITIONS)
        for li, lv in enumerate(L.LEVELS)
    }


def test_the_batch_writer_submits_the_decision_rule_for_model_and_prior_rows(tmp_path):
    """A predicted study and one that fails (prior rows) both get `rsna_submission_triple`, not the
    plain triple of predictions.json."""
    from types import SimpleNamespace

    from lumbar_tf.runtime.batch import predict_folder

    rng = np.random.default_rng(3)
    model_probs = np.sort(rng.uniform(size=(5, 5, 3)), axis=-1)[..., ::-1].copy()
    prior = np.sort(rng.uniform(size=(5, 5, 3)), axis=-1)[..., ::-1].copy()
    for study in ("101", "202"):
        (tmp_path / "test_images" / study).mkdir(parents=True)

    def predict(study_dir, descriptions):
        if study_dir.name == "202":
            raise ValueError("unreadable")
        return SimpleNamespace(threshold_probs=model_probs, predictions={"warnings": []})

    report = predict_folder(
        SimpleNamespace(prior_threshold_probs=prior),
        tmp_path,
        tmp_path / "sub.csv",
        predict=predict,
        progress=False,
    )
    assert report["predicted"] == ["101"] and list(report["from_prior"]) == ["202"]
    submitted = _submitted(tmp_path / "sub.csv")
    expected = {**_expected_rows("101", model_probs), **_expected_rows("202", prior)}
    assert submitted.keys() == expected.keys()
    for row_id, triple in expected.items():
        np.testing.assert_allclose(submitted[row_id], triple, atol=2e-6)
    # ... which differs from the plain triple wherever the weights move mass.
    from lumbar_tf.core import labels as L

    assert not np.allclose(
        submitted["101_spinal_canal_stenosis_l1_l2"], L.rsna_triple(model_probs)[0, 0], atol=1e-3
    )


@pytest.mark.slow  # a Beam pipeline on the direct runner and a model load: ~30 s on the shared cores
def test_the_beam_writer_submits_the_decision_rule_for_model_and_prior_rows(tiny_run, phantom_dir, tmp_path):
    pytest.importorskip("apache_beam")
    from lumbar_tf.data.beam_prepare import pipeline_options
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.beam_predict import predict_folder_beam

    images = tmp_path / "data" / "test_images"
    good, bad = sorted((phantom_dir / "train_images").iterdir(), key=lambda p: int(p.name))[:2]
    shutil.copytree(good, images / good.name)
    shutil.copytree(bad, images / bad.name)
    for path in (images / bad.name).rglob("*.dcm"):
        path.write_bytes(b"broken")
    report = predict_folder_beam(
        tiny_run, tmp_path / "data", tmp_path / "sub.csv", options=pipeline_options("direct")
    )
    assert report["predicted"] == [good.name] and list(report["from_prior"]) == [bad.name]
    cells = json.loads((tmp_path / "sub_studies" / good.name / "predictions.json").read_text())["cells"]
    grade_probs = np.array([c["grade_probs"] for c in cells]).reshape(5, 5, 4)  # fine grades: 0-3
    thresholds = np.flip(np.cumsum(np.flip(grade_probs, -1), -1), -1)[..., 1:]  # P(>=1), P(>=2), P(>=3)
    prior = load_predictor(tiny_run).prior_threshold_probs
    expected = {**_expected_rows(good.name, thresholds), **_expected_rows(bad.name, prior)}
    submitted = _submitted(tmp_path / "sub.csv")
    assert submitted.keys() == expected.keys()
    for row_id, triple in expected.items():
        np.testing.assert_allclose(submitted[row_id], triple, atol=2e-5)
