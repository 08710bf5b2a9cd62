"""Shared fixtures: phantom data, a prepared cache, a tiny trained run and its export, and a tiny
RSNA-only run, each made once per session.

Test data is generated here, never committed. Sizes are tiny so the default suite stays fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

# Small views and crops: enough anatomy for the pipeline, fast on 2 cores.
TINY_OVERRIDES = [
    "preprocess.view_size=64",
    "preprocess.crop_size=32",
    "model.localizer_size=64",
    "model.localizer_filters=[8,8,16,16,16]",
    "model.head_units=16",
    "train.folds=4",
    "train.localizer.epochs=2",
    "train.localizer.batch_size=4",
    "train.grader.epochs=2",
    "train.grader.batch_size=16",
]


@pytest.fixture
def spy_decodes(monkeypatch):
    """Record the file of every pixel decode, by pydicom (``Dataset.pixel_array``) or straight
    from the file (native pixels located by the fast header scan)."""
    from pydicom.dataset import Dataset

    from lumbar_tf.dicom import reader as dicom

    decoded: list[str] = []
    by_pydicom, native = Dataset.pixel_array, dicom._read_native

    def pixel_array(ds):
        decoded.append(str(ds.filename))
        return by_pydicom.fget(ds)

    def read_native(header):
        decoded.append(str(header.path))
        return native(header)

    monkeypatch.setattr(Dataset, "pixel_array", property(pixel_array))
    monkeypatch.setattr(dicom, "_read_native", read_native)
    return decoded


@contextlib.contextmanager
def _built_once(tmp_path_factory, name: str):
    """A folder built once per test run, also when pytest-xdist runs several workers: they share
    the parent of their base temps, and the first to take the lock builds while the others wait.

    Yields ``(folder, built)``; the caller builds into ``folder`` when ``built`` is False. A build
    that raised leaves no marker, so the next worker starts it afresh.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, marker = root / f"shared_{name}", root / f"shared_{name}.built"
    with open(root / f"shared_{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = marker.exists()
        if not built and folder.exists():
            shutil.rmtree(folder)
        yield folder, built
        marker.touch()


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """Twelve phantom studies in the RSNA layout (read-only for tests: copy before damaging).

    Acquired "centred" (coarse pixels, fields centred on the lumbar spine, one series of each
    description): the pipeline still centres its view grid on the Sagittal T2 field. Switch to the
    default "realistic" acquisition once the pipeline finds the spine in the field (issue 10).
    """
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    with _built_once(tmp_path_factory, "phantom") as (folder, built):
        if not built:
            synthesize_dataset(folder, 12, seed=7, acquisition="centred")
    return folder


@pytest.fixture(scope="session")
def tiny_config():
    from lumbar_tf.core.config import load_config

    return load_config(None, TINY_OVERRIDES)


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, tiny_config, tmp_path_factory):
    from lumbar_tf.data.dataset import prepare_cache

    with _built_once(tmp_path_factory, "cache") as (cache, built):
        if not built:
            prepare_cache(phantom_dir, cache, tiny_config.preprocess, workers=2, progress=False)
    return cache


@pytest.fixture(scope="session")
def tiny_run(phantom_dir, phantom_cache, tmp_path_factory):
    """A finished run of both stages at tiny size (weights are meaningless, shapes are real)."""
    from lumbar_tf.training.train import train

    with _built_once(tmp_path_factory, "run") as (folder, built):
        if not built:
            train(phantom_dir, folder / "run", overrides=TINY_OVERRIDES, cache_dir=phantom_cache)
    return folder / "run"


@pytest.fixture(scope="session")
def tiny_export(tiny_run, phantom_cache, phantom_dir, tmp_path_factory):
    """The tiny run exported once per session: SavedModel, four TFLite variants, held-out AUC.

    Its weights are meaningless, so a quantized variant may well miss the AUC floor: the fixture
    publishes every variant (``allow_degraded``); the gate has its own test in test_export.py.
    """
    from lumbar_tf.export.job import export_model

    with _built_once(tmp_path_factory, "export") as (out, built):
        if not built:
            export_model(
                tiny_run,
                out,
                cache_dir=phantom_cache,
                data_dir=phantom_dir,
                representative_size=6,
                allow_degraded=True,
                progress=False,
            )
    return out


@pytest.fixture(scope="session")
def rsna_resumed_run(phantom_dir, tmp_path_factory):
    """A tiny run on the RSNA labels alone (the phantoms without train_grades.csv), killed in the
    middle of the localiser's second epoch and resumed to the end: one training serves the
    label-semantics tests and the resume test. ``killed`` is what the run folder held after the kill.
    """
    from types import SimpleNamespace

    import keras

    from lumbar_tf.training.train import train

    class Kill(keras.callbacks.Callback):
        """Stands in for a killed process: dies after the first batch of epoch 1."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 0:
                raise KeyboardInterrupt("killed")

    with _built_once(tmp_path_factory, "rsna") as (root, built):
        data, run = root / "data", root / "run"
        if not built:
            shutil.copytree(phantom_dir, data, ignore=shutil.ignore_patterns("train_grades.csv"))
            overrides = [*TINY_OVERRIDES, "train.localizer.epochs=3", "train.grader.epochs=1"]
            with pytest.raises(KeyboardInterrupt):
                train(data, run, overrides=overrides, stage="localizer", extra_callbacks=[Kill()])
            killed = {
                "backup": (run / "backup" / "localizer").exists(),
                "finished": (run / "finished.json").exists(),
                "history": (run / "history" / "localizer.csv").read_text(),
            }
            (root / "killed.json").write_text(json.dumps(killed))
            train(data, run, resume=True)  # the run's own config.yaml; its cache, prepared before the kill
        killed = json.loads((root / "killed.json").read_text())
    return SimpleNamespace(data=data, run=run, killed=killed)


def predict_to(model, study_dir, out_dir, heatmaps: bool = False) -> dict:
    """Predict one study with a model path (any runtime) or a predictor, write OUT/predictions.json,
    and return the predictions dict: what `lumbar-tf predict --study` does."""
    from lumbar_tf.report.heatmaps import write_heatmaps_for
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.predictions import write_predictions
    from lumbar_tf.runtime.predictor import predict_study

    predictor = model if hasattr(model, "predict_views") else load_predictor(model)
    result = predict_study(predictor, study_dir)
    if heatmaps:
        write_heatmaps_for(result, out_dir)
    write_predictions(os.path.join(out_dir, "predictions.json"), result.predictions)
    return result.predictions
