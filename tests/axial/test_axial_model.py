"""The axial view in the model: config, cache crops (same geometry as inference), tf.data shifts,
the end-to-end model with its `ax_t2` input and the one predict path (localise -> project -> grade)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core import labels

AXIAL_OVERRIDES = [
    "preprocess.view_size=64",
    "preprocess.crop_size=32",
    "preprocess.axial={}",
    "model.localizer_size=64",
    "model.localizer_filters=[8,8,16,16,16]",
    "model.small_cnn_filters=[8,8,8,8]",
    "model.head_units=16",
]


@pytest.fixture(scope="module")
def axial_cfg():
    from lumbar_tf.core.config import load_config

    return load_config(None, AXIAL_OVERRIDES)


@pytest.fixture(scope="module")
def record(phantom_dir, axial_cfg):
    from lumbar_tf.data.dataset import prepare_study, read_index

    index = read_index(phantom_dir)
    sid = index.study_ids[0]
    return index, prepare_study(
        index.images_dir, index.studies[sid], sid, index.descriptions, axial_cfg.preprocess
    )


def test_axial_config_is_optional_checked_and_round_trips():
    from lumbar_tf.core.config import (
        ConfigError,
        config_to_dict,
        load_config,
        preprocess_config_from_dict,
    )

    assert load_config(None).preprocess.axial is None  # today's sagittal-only model
    cfg = load_config(None, ["preprocess.axial={crop_mm: 50, slice_shift: 2}"]).preprocess
    assert (cfg.axial.name, cfg.axial.channels, cfg.axial.crop_mm) == ("ax_t2", 3, 50.0)
    assert preprocess_config_from_dict(config_to_dict(cfg)) == cfg
    for bad in ("{neighbours: 2}", "{name: sag_t2}", "{dropout: 1.0}", "{shift_mm: 40}"):
        with pytest.raises(ConfigError, match="preprocess.axial"):
            load_config(None, [f"preprocess.axial={bad}"])


def test_cache_crops_are_the_inference_crops_at_the_labelled_points(record, axial_cfg):
    """The cache stores margins for the shifts; without shifts tf.data cuts exactly the crop
    `axial.axial_crops` takes at inference around the same level points."""
    from lumbar_tf import axial
    from lumbar_tf.data.dataset import axial_cache_geometry, axial_training_crops
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views

    index, r = record
    cfg = axial_cfg.preprocess
    channels, size, _ = axial_cache_geometry(cfg)
    assert r["axial"].shape == (labels.N_LEVELS, size, size, channels) and r["axial"].dtype == np.uint8
    assert r["axial_valid"].tolist() == [1.0] * labels.N_LEVELS  # per-disc stacks cover every level
    study = read_study(index.images_dir / r["study_id"], index.descriptions.get(r["study_id"]))
    _, grid, instances, _ = build_views(study, cfg)
    points = axial.level_points_patient(study, grid, instances, r["level_xy"], cfg)
    series = axial.axial_series(study)
    expected = axial.axial_crops(series, axial.project_levels(points, series), cfg, crop_mm=60.0, size=32)
    got = axial_training_crops(r["axial"], cfg, training=False).numpy()
    assert got.shape == (labels.N_LEVELS, 32, 32, 3)
    assert np.abs(got - expected.astype(np.float32)).max() <= 1.0  # uint8 rounding of the stored crop
    assert expected[:, :, :, 1].mean() > 20  # the chosen slice has anatomy


def test_training_shifts_slices_and_moves_and_drops_crops(record, axial_cfg):
    import dataclasses

    import tensorflow as tf

    from lumbar_tf.data.dataset import axial_training_crops

    _, r = record
    cfg = axial_cfg.preprocess
    stored = r["axial"]
    centre = axial_training_crops(stored, cfg, training=False).numpy()
    no_move = dataclasses.replace(cfg, axial=dataclasses.replace(cfg.axial, shift_mm=0.0, dropout=0.0))
    tf.random.set_seed(3)
    seen = set()
    for _ in range(12):
        shifted = axial_training_crops(stored, no_move, training=True).numpy()
        for k in range(labels.N_LEVELS):
            # each level's channels are three consecutive stored slices, moved by -1, 0 or +1
            match = [
                s for s in (-1, 0, 1) if np.allclose(shifted[k, :, :, 1], centre[k, :, :, 1 + s], atol=1e-2)
            ]
            assert match, "the centre channel must be a stored neighbour slice"
            seen.add(match[0])
    assert seen == {-1, 0, 1}
    moved = axial_training_crops(stored, cfg, training=True).numpy()
    assert not np.allclose(moved, centre)
    drop_all = dataclasses.replace(cfg, axial=dataclasses.replace(cfg.axial, dropout=0.999))
    assert axial_training_crops(stored, drop_all, training=True).numpy().max() == 0


@pytest.fixture(scope="module")
def axial_model_file(axial_cfg, tmp_path_factory):
    """An untrained end-to-end axial model (weights meaningless, graph real), saved and reloadable."""
    from lumbar_tf.models.end_to_end import build_end_to_end, grader_input_names
    from lumbar_tf.models.networks import build_grader, build_localizer

    p = axial_cfg.preprocess
    assert grader_input_names(p) == ("sag_t2", "sag_t1", "ax_t2")
    model = build_end_to_end(
        build_localizer(p.view_size, axial_cfg.model),
        build_grader(p.crop_size, grader_input_names(p), axial_cfg.model, own_backbone=("ax_t2",)),
        p,
    )
    path = tmp_path_factory.mktemp("axial_model") / "model.keras"
    model.save(path)
    return path


def test_predict_study_localises_projects_and_grades(axial_model_file, phantom_dir, tmp_path):
    """The one path: the crops fed to the grader are those around the model's own level_xy; a
    study without Axial T2 still predicts, with a warning per level (the exported runtimes:
    tests/export/test_axial_export.py)."""
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.predictor import predict_study
    from tests.runtime.test_predict import copy_study_without

    predictor = KerasPredictor(axial_model_file)
    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    result = predict_study(predictor, study_dir)
    projections, crops = result.axial
    assert crops.shape == (labels.N_LEVELS, 32, 32, 3)
    preds = result.predictions
    assert [e["level"] for e in preds["axial"]] == list(labels.LEVELS)
    covered = [e for e in preds["axial"] if e["covered"]]
    assert covered and preds["series"]["ax_t2"] == covered[0]["series_id"]
    direct = predictor.loaded.model(
        {
            **{n: result.views[n][None].astype(np.float32) for n in predictor.preprocess.view_names},
            "ax_t2": crops[None].astype(np.float32),
        },
        training=False,
    )
    assert np.allclose(np.asarray(direct["threshold_probs"])[0], result.threshold_probs, atol=1e-6)
    zeros = predictor.predict_views(
        {n: result.views[n][None] for n in predictor.preprocess.view_names}, axial=np.zeros((1, 5, 32, 32, 3))
    )
    assert not np.allclose(zeros["threshold_probs"], result.outputs["threshold_probs"])  # the input counts

    bare = copy_study_without(study_dir, tmp_path, descriptions=("Axial T2",))
    no_axial = predict_study(predictor, bare, series_descriptions={})
    assert no_axial.axial[1].max() == 0
    assert all(not e["covered"] for e in no_axial.predictions["axial"])
    assert no_axial.predictions["series"]["ax_t2"] is None
    assert sum("no axial coverage" in w for w in no_axial.predictions["warnings"]) == labels.N_LEVELS
    assert np.allclose(no_axial.threshold_probs, zeros["threshold_probs"][0], atol=1e-5)
    for cell in no_axial.predictions["cells"]:  # flagged where the axial view was to be read
        assert ("ax_t2: series_missing" in cell["flags"]) == ("subarticular" in cell["condition"]), cell
        assert "ax_t2: not_covered" not in cell["flags"]  # the series' own flag says it


def test_evaluate_scores_an_axial_model_on_its_own_levels(axial_model_file, phantom_dir, tmp_path):
    """`lumbar-tf evaluate` feeds an axial model the crops `predict_study` cuts (around the model's
    own levels, not the cache's labelled ones), so its metrics are the end-to-end ones."""
    from lumbar_tf.data.dataset import load_studies
    from lumbar_tf.runtime.keras_model import KerasPredictor, load_model
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.training.evaluate import axial_crops_end_to_end, evaluate

    metrics = evaluate(axial_model_file, phantom_dir, tmp_path / "eval")
    assert metrics["n_studies"] == 12 and 0 <= metrics["macro_roc_auc"] <= 1
    loaded = load_model(axial_model_file)
    studies = load_studies(tmp_path / "eval" / "cache", loaded.preprocess)
    two = {"study_id": studies["study_id"][:2], "views": {k: v[:2] for k, v in studies["views"].items()}}
    crops, zeroed = axial_crops_end_to_end(loaded, phantom_dir, two)
    assert zeroed == {}
    for n in range(2):
        sid = str(studies["study_id"][n])
        result = predict_study(KerasPredictor(axial_model_file), phantom_dir / "train_images" / sid)
        assert np.array_equal(crops[n], result.axial[1])

    # A study that cannot be read again costs its axial crops (zeros, reported), not the evaluation.
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    gone = str(studies["study_id"][3])
    shutil.rmtree(data / "train_images" / gone)
    with pytest.warns(UserWarning, match=f"study {gone}: axial crops zeroed"):
        again = evaluate(axial_model_file, data, tmp_path / "eval2", cache_dir=tmp_path / "eval" / "cache")
    assert again["n_studies"] == 12 and list(again["axial_crops_zeroed"]) == [gone]
    assert "axial_crops_zeroed" not in metrics


def test_calibrate_fits_an_axial_model_on_its_own_levels(axial_model_file, phantom_dir, tmp_path):
    """`lumbar-tf calibrate` on an axial run: fitted on the validation fold's end-to-end crops, and
    the calibrated model predicts the uncalibrated one's probabilities through the fitted maps."""
    import json

    from lumbar_tf.data.dataset import read_index
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.training import calibration as cal

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(axial_model_file, run / "model.keras")
    ids = read_index(phantom_dir).study_ids
    split = {"data_dir": str(phantom_dir), "val_fold": 0, "folds": {s: int(n < 8) for n, s in enumerate(ids)}}
    (run / "split.json").write_text(json.dumps(split))
    record = cal.calibrate_run(run, None)
    assert record["fitted_on"] == f"validation fold 0 ({len(ids) - 8} studies)"
    study = phantom_dir / "train_images" / ids[0]
    before = predict_study(KerasPredictor(axial_model_file), study)
    after = predict_study(KerasPredictor(run), study)
    assert np.array_equal(after.axial[1], before.axial[1])  # the localiser is untouched
    table = list(record["temperatures"].values()), list(record["biases"].values())
    expected = cal.rescale(before.threshold_probs[None], *table)[0]
    np.testing.assert_allclose(after.threshold_probs, expected, atol=2e-4)


def test_tablet_modules_still_import_no_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, lumbar_tf.runtime.predictor, lumbar_tf.axial, lumbar_tf.core.config;"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
def test_explain_feeds_the_axial_crops(axial_model_file, phantom_dir, tmp_path):
    from lumbar_tf.report.explain import explain_study

    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    out = explain_study(axial_model_file, study_dir, tmp_path / "explain")
    assert [e["level"] for e in out["predictions"]["axial"]] == list(labels.LEVELS)
    assert not any("other probabilities" in w for w in out["predictions"]["warnings"])
    # subarticular Grad-CAM on each level's own axial slice; the other conditions stay sagittal
    axial_slice = out["cam_slices"]["left_subarticular_stenosis"]
    covered = [e for e in out["predictions"]["axial"] if e["covered"]]
    assert axial_slice["view"] == "ax_t2" and len(axial_slice["instances"]) == len(covered)
    assert out["cam_slices"]["spinal_canal_stenosis"]["view"] == "sag_t2"
    assert out["paths"]["gradcam"]["right_subarticular_stenosis"].is_file()
    peaks = out["cam_peaks"]["left_subarticular_stenosis"]
    levels = [labels.LEVELS.index(e["level"]) for e in covered]
    for k, e in zip(levels, covered, strict=True):
        if np.isfinite(peaks[k]).all():  # the peak lies inside the 60 mm crop on that axial slice
            assert np.hypot(peaks[k][0] - e["x"], peaks[k][1] - e["y"]) < 60


def test_snap_takes_the_middle_of_the_nearest_disc_stack(record, phantom_dir):
    """A level point a few mm off its disc (the localiser's error) still gets its disc stack's
    middle slice; one level per stack; a point far from every stack stays uncovered."""
    from lumbar_tf import axial
    from lumbar_tf.dicom.reader import read_study

    index, r = record
    study = read_study(index.images_dir / r["study_id"], index.descriptions.get(r["study_id"]))
    series = axial.axial_series(study)
    stacks = axial.find_stacks(series[0])
    exact = axial.project_levels(_label_points(index, r, study), series)
    assert all(p.covered for p in exact)
    normal = np.asarray(stacks[0].normal)
    off = _label_points(index, r, study) + 9.0 * normal  # 9 mm towards the head: past a 3-slice stack
    plain = axial.project_levels(off, series)
    snapped = axial.project_levels(off, series, snap_mm=axial.DISC_SNAP_MM)
    assert [p.instance_number for p in snapped] == [p.instance_number for p in exact]
    assert all(p.covered for p in snapped)
    assert [p.instance_number for p in plain] != [p.instance_number for p in exact]
    far = _label_points(index, r, study) + 60.0 * normal
    far[1:] = np.nan
    assert not axial.project_levels(far, series, snap_mm=axial.DISC_SNAP_MM)[0].covered


def _label_points(index, r, study) -> np.ndarray:
    from lumbar_tf import axial
    from lumbar_tf.preprocess import build_views

    cfg = axial.PreprocessConfig(view_size=64, crop_size=32)
    _, grid, instances, _ = build_views(study, cfg)
    return axial.level_points_patient(study, grid, instances, r["level_xy"], cfg)
