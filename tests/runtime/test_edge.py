"""The tablet runner (`lumbar_tf.runtime.tflite_model`, `lumbar-tf-edge`): no TensorFlow, same
predictions as the SavedModel, one-line errors for bad input, missing views fed as zeros with a warning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core import labels

NAME = "lumbar_spine"
HEAVY = ("tensorflow", "keras", "tf_keras", "jax", "torch")


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def study_dir(phantom_dir):
    return sorted((phantom_dir / "train_images").iterdir())[0]


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}


def _tflite(export_dir, variant="float32") -> Path:
    return export_dir / "tflite" / f"{NAME}_{variant}.tflite"


def copy_study_without(study_dir: Path, dest: Path, *, planes=(), descriptions=()) -> Path:
    """Copy a study, leaving out its series of the given planes or descriptions."""
    from lumbar_tf.dicom.reader import read_study

    target = dest / study_dir.name
    shutil.copytree(study_dir, target)
    study = read_study(target)
    for description, series in study.series.items():
        if series.plane in planes or description in descriptions:
            shutil.rmtree(series.path)
    return target


def test_runner_never_imports_tensorflow_and_matches_saved_model(export_dir, study_dir, tmp_path):
    out = tmp_path / "edge"
    code = (
        "import json, sys\n"
        "from lumbar_tf.cli.edge import main\n"
        f"rc = main(['--model', {str(_tflite(export_dir))!r}, '--study', {str(study_dir)!r}, "
        f"'--out', {str(out)!r}, '--heatmaps'])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print('HEAVY=' + json.dumps(heavy))\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    heavy = json.loads(done.stdout.split("HEAVY=")[-1].strip().splitlines()[0])
    assert heavy == [], f"the tablet runner imported {heavy}"

    from tests.conftest import predict_to

    reference = predict_to(export_dir / "saved_model" / NAME / "1", study_dir, tmp_path / "sm")
    edge = json.loads((out / "predictions.json").read_text())
    assert edge["model"] == {"name": NAME, "version": 1, "format": "tflite_float32"}
    assert reference["model"]["format"] == "saved_model"
    assert edge["study_id"] == reference["study_id"] == study_dir.name
    assert [(c["condition"], c["level"]) for c in edge["cells"]] == [
        (c, lv) for c in labels.CONDITIONS for lv in labels.LEVELS
    ]
    for a, b in zip(edge["cells"], reference["cells"]):
        np.testing.assert_allclose(a["grade_probs"], b["grade_probs"], atol=1e-3)
        assert a["presence"] == pytest.approx(b["presence"], abs=1e-3)
        assert a["grade"] == b["grade"] or max(a["grade_probs"]) - sorted(a["grade_probs"])[-2] < 2e-3
    for a, b in zip(edge["levels"], reference["levels"]):
        assert a["level"] == b["level"] and a["instance_number"] == b["instance_number"]
        assert a["x"] == pytest.approx(b["x"], abs=0.05) and a["y"] == pytest.approx(b["y"], abs=0.05)
    assert edge["intended_use"] == reference["intended_use"]


def _run_edge_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "lumbar_tf.cli.edge", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def test_cli_file_that_is_not_a_model_exits_2(study_dir, tmp_path):
    bogus = tmp_path / "notes.tflite"
    bogus.write_bytes(b"these are my notes, not a model" * 10)
    done = _run_edge_cli("--model", bogus, "--study", study_dir, "--out", tmp_path / "out")
    assert done.returncode == 2
    assert str(bogus) in _one_error_line(done.stderr)
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"\x00\x00\x00\x00TFL3" + b"\x01" * 64)  # right identifier, broken flatbuffer
    done = _run_edge_cli("--model", fake, "--study", study_dir, "--out", tmp_path / "out")
    assert done.returncode == 2 and "not a valid TFLite model" in _one_error_line(done.stderr)
    done = _run_edge_cli(
        "--model", tmp_path / "missing.tflite", "--study", study_dir, "--out", tmp_path / "o"
    )
    assert done.returncode == 2 and "not found" in _one_error_line(done.stderr)


def test_cli_study_without_sagittal_series_exits_2(export_dir, study_dir, tmp_path):
    axial_only = copy_study_without(study_dir, tmp_path, planes=("sagittal",))
    done = _run_edge_cli(
        "--model", _tflite(export_dir, "int8"), "--study", axial_only, "--out", tmp_path / "o"
    )
    assert done.returncode == 2
    assert _one_error_line(done.stderr) == f"error: {axial_only}: no sagittal series"
    assert not (tmp_path / "o" / "predictions.json").exists()


class _Spy:
    """Wraps a predictor and keeps the views it was fed."""

    def __init__(self, inner):
        self.inner = inner
        self.preprocess = inner.preprocess
        self.label_semantics = inner.label_semantics
        self.views = None

    def predict_views(self, views):
        self.views = views
        return self.inner.predict_views(views)

    def model_info(self):
        return self.inner.model_info()


def test_missing_view_is_zeroed_with_a_warning(export_dir, study_dir, tmp_path):
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.tflite_model import EdgeModel

    no_t1 = copy_study_without(study_dir, tmp_path, descriptions=("Sagittal T1",))
    spy = _Spy(EdgeModel(_tflite(export_dir, "dynamic")))
    result = predict_study(spy, no_t1)
    assert not np.any(spy.views["sag_t1"]) and np.any(spy.views["sag_t2"])
    assert any("Sagittal T1" in w and "sag_t1 is zeros" in w for w in result.predictions["warnings"])
    assert len(result.predictions["cells"]) == 25
    assert all(lv["instance_number"] is not None for lv in result.predictions["levels"])


@pytest.mark.parametrize("variant", ["float16", "dynamic", "int8"])
def test_every_variant_predicts_a_study(export_dir, study_dir, variant):
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.tflite_model import EdgeModel

    model = EdgeModel(_tflite(export_dir, variant))
    assert model.metadata_source == "embedded" and model.variant == variant
    preds = predict_study(model, study_dir).predictions
    assert preds["model"]["format"] == f"tflite_{variant}"
    assert len(preds["cells"]) == 25 and len(preds["levels"]) == 5
    for cell in preds["cells"]:
        assert sum(cell["grade_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(cell["rsna"].values()) == pytest.approx(1.0, abs=1e-5)


def test_metadata_falls_back_to_sidecar_and_export_metadata(export_dir, tmp_path):
    from lumbar_tf.core.errors import ModelLoadError
    from lumbar_tf.runtime.tflite_model import EdgeModel, find_metadata

    src = _tflite(export_dir)
    # A file without the embedded entry: the sidecar, then EXPORT/metadata.json are used.
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(src.read_bytes()))
    model.metadata = [
        m for m in model.metadata if m.name not in ("lumbar_tf_metadata", b"lumbar_tf_metadata")
    ]
    bare = flatbuffer_utils.convert_object_to_bytearray(model)
    export = tmp_path / "export"
    (export / "tflite").mkdir(parents=True)
    target = export / "tflite" / src.name
    target.write_bytes(bare)
    with pytest.raises(ModelLoadError, match="no preprocessing metadata"):
        EdgeModel(target)
    shutil.copy(export_dir / "metadata.json", export / "metadata.json")
    assert find_metadata(target, bare)[1] == "export metadata.json"
    shutil.copy(src.with_suffix(".json"), target.with_suffix(".json"))
    edge = EdgeModel(target)
    assert edge.metadata_source == "sidecar" and edge.variant == "float32"


def test_tflite_without_lumbar_signatures_is_rejected(tmp_path):
    import tensorflow as tf

    from lumbar_tf.core.errors import ModelLoadError
    from lumbar_tf.runtime.tflite_model import EdgeModel

    class Double(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
        def serve(self, x):
            return {"y": 2.0 * x}

    module = Double()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    path = tmp_path / "double.tflite"
    path.write_bytes(converter.convert())
    with pytest.raises(ModelLoadError, match="not a lumbar-tf TFLite export"):
        EdgeModel(path)
