"""Training: run folder rules, resume after a kill, precision policy, and the end-to-end model."""

import json

import numpy as np
import pytest

from lumbar_tf.data.dataset import DatasetError
from lumbar_tf.training.train import RunFolderError, train
from tests.conftest import TINY_OVERRIDES


def test_finished_run_holds_everything(tiny_run):
    for name in ("config.yaml", "split.json", "prior.json", "localizer.keras", "grader.keras", "model.keras"):
        assert (tiny_run / name).exists(), name
    assert (tiny_run / "history" / "grader.csv").exists()
    summary = json.loads((tiny_run / "finished.json").read_text())
    assert summary["dtype_policy"] == "float32"  # no GPU here
    split = json.loads((tiny_run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


def test_finished_run_is_not_overwritten_by_accident(tiny_run, phantom_dir):
    with pytest.raises(RunFolderError, match="finished run"):
        train(phantom_dir, tiny_run, overrides=TINY_OVERRIDES)


def test_killed_run_resumes_from_backup_and_finishes(rsna_resumed_run):
    """The session's RSNA-only run (conftest.py): killed in localiser epoch 1 of 3, then resumed."""
    run, killed = rsna_resumed_run.run, rsna_resumed_run.killed
    assert killed["backup"] and not killed["finished"]
    logged = killed["history"].strip().splitlines()
    assert len(logged) == 2  # header + the one epoch that finished
    logged = (run / "history" / "localizer.csv").read_text().strip().splitlines()
    epochs = [int(line.split(",")[0]) for line in logged[1:]]
    assert epochs == [0, 1, 2]  # resumed at epoch 1, not from scratch
    assert (run / "finished.json").exists() and (run / "model.keras").exists()
    assert not (run / "backup" / "localizer").exists()


def test_dataset_without_labels_is_a_clear_error(phantom_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "train_label_coordinates.csv").write_text(
        "study_id,series_id,instance_number,condition,level,x,y\n"
    )
    with pytest.raises(DatasetError, match="no usable labels"):
        train(data, tmp_path / "run", overrides=TINY_OVERRIDES)


def test_end_to_end_model_reloads_with_identical_outputs(tiny_run, phantom_cache, tiny_config):
    from lumbar_tf.data.dataset import load_studies
    from lumbar_tf.runtime.keras_model import load_model

    loaded = load_model(tiny_run)
    assert loaded.preprocess == tiny_config.preprocess
    studies = load_studies(phantom_cache, tiny_config.preprocess)
    views = {k: v[:3] for k, v in studies["views"].items()}
    out = loaded.predict_views(views)
    assert out["grade_probs"].shape == (3, 5, 5, 4) and out["level_xy"].shape == (3, 5, 2)
    np.testing.assert_allclose(out["grade_probs"].sum(-1), 1.0, atol=1e-5)
    again = load_model(tiny_run / "model.keras").predict_views(views)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])


def test_level_crop_layer_matches_tf_crop_and_resize():
    import tensorflow as tf

    from lumbar_tf.models.end_to_end import LevelCrop

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (2, 40, 40, 3)).astype(np.float32)
    xy = rng.uniform(-0.1, 1.1, (2, 5, 2)).astype(np.float32)
    half = 0.15
    ours = np.asarray(LevelCrop(16, half)(image, xy))
    boxes = np.concatenate(
        [xy[..., 1:] - half, xy[..., :1] - half, xy[..., 1:] + half, xy[..., :1] + half], -1
    )
    ref = tf.image.crop_and_resize(image, boxes.reshape(-1, 4), np.repeat(np.arange(2), 5), [16, 16]).numpy()
    np.testing.assert_allclose(ours, ref, atol=5e-3)
