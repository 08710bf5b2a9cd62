"""`lumbar-tf export`: SavedModel contract, metadata, TFLite variants, atomic versions, bad input.

One export of the session's tiny run is shared by test_export, test_edge and test_predict (the
`tiny_export` fixture in conftest.py); tests that need their own export write a SavedModel only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core import labels
from tests.reliability.table import record

REPO = Path(__file__).resolve().parents[2]
NAME = "lumbar_spine"


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def report(export_dir):
    return json.loads((export_dir / "export_report.json").read_text())


@pytest.fixture(scope="module")
def keras_model(tiny_run):
    from lumbar_tf.runtime.keras_model import load_model

    return load_model(tiny_run)


@pytest.fixture(scope="module")
def study_views(phantom_dir, keras_model):
    """Views of three phantom studies, built by the shared numpy preprocessing."""
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views

    cfg = keras_model.preprocess
    dirs = sorted((phantom_dir / "train_images").iterdir())[:3]
    views = [build_views(read_study(d), cfg)[0] for d in dirs]
    return {name: np.stack([v[name] for v in views]).astype(np.float32) for name in cfg.view_names}


@pytest.fixture(scope="module")
def keras_outputs(keras_model, study_views):
    return keras_model.predict_views(study_views)


# === SavedModel ===


def _signature_block(text: str, name: str) -> str:
    start = text.index(f"signature_def['{name}']")
    end = text.find("signature_def[", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_saved_model_cli_lists_serving_default(export_dir, tiny_config):
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.exists():
        pytest.skip("saved_model_cli not installed")
    version = export_dir / "saved_model" / NAME / "1"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [str(cli), "show", "--dir", str(version), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    block = _signature_block(done.stdout, "serving_default")
    s = tiny_config.preprocess.view_size
    for view in ("sag_t2", "sag_t1"):
        assert re.search(
            rf"inputs\['{view}'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: \(-1, {s}, {s}, 3\)", block
        )
    for output, shape in {
        "grade_probs": "(-1, 5, 5, 4)",
        "threshold_probs": "(-1, 5, 5, 3)",
        "presence": "(-1, 5, 5)",
        "level_xy": "(-1, 5, 2)",
    }.items():
        assert re.search(
            rf"outputs\['{output}'\] tensor_info:\s+dtype: DT_FLOAT\s+shape: {re.escape(shape)}", block
        )
    assert "tensorflow/serving/predict" in block


def test_saved_model_reload_matches_keras(export_dir, study_views, keras_outputs):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir / "saved_model" / NAME / "1"))
    fn = loaded.signatures["serving_default"]
    got = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in study_views.items()}).items()}
    assert set(got) == {"grade_probs", "threshold_probs", "presence", "level_xy"}
    for key, value in got.items():
        np.testing.assert_allclose(value, keras_outputs[key], atol=1e-5, err_msg=key)


def test_saved_model_stores_each_weight_once(export_dir, keras_model):
    """keras-team/keras#23553: ExportArchive.track() would store every weight twice."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(
        str(export_dir / "saved_model" / NAME / "1" / "variables" / "variables")
    )
    shapes = reader.get_variable_to_shape_map()
    stored = sum(int(np.prod(shape)) for key, shape in shapes.items() if "VARIABLE_VALUE" in key)
    assert stored == keras_model.model.count_params()


def test_metadata_beside_version_and_at_root(export_dir, keras_model, tiny_run):
    from lumbar_tf.core.config import config_to_dict
    from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata

    version_meta = json.loads((export_dir / "saved_model" / NAME / "1" / "metadata.json").read_text())
    root_meta = json.loads((export_dir / "metadata.json").read_text())
    for meta in (version_meta, root_meta):
        assert meta["name"] == NAME and meta["version"] == 1
        assert meta["intended_use"] == "Research decision support only; not for diagnosis."
        # The phantom writes train_grades.csv: every threshold was known in training.
        assert meta["label_semantics"]["known_thresholds"] == [">=1", ">=2", ">=3"]
        assert meta["label_semantics"]["fine_grades"] is meta["fine_grades"] is True
        assert meta["label_semantics"]["n_fine_grade_studies"] == meta["training_data"]["n_train_studies"]
        assert meta["int8_calibration"]["kind"] == "training"
        assert meta["conditions"] == list(labels.CONDITIONS) and meta["levels"] == list(labels.LEVELS)
        assert meta["grades"] == list(labels.GRADES) and meta["thresholds"] == list(labels.THRESHOLDS)
        assert meta["preprocess"] == config_to_dict(keras_model.preprocess)
        assert [v["name"] for v in meta["views"]] == ["sag_t2", "sag_t1"]
        view = meta["views"][0]
        assert view["dtype"] == "float32" and view["value_range"] == [0, 255] and len(view["channels"]) == 3
        assert meta["outputs"]["grade_probs"]["shape"] == [None, 5, 5, 4]
        assert meta["outputs"]["level_xy"]["shape"] == [None, 5, 2]
        assert meta["training_data"]["n_train_studies"] >= 1
        assert "spinal_canal_stenosis" in meta["training_data"]["label_counts"]
        assert meta["metrics"]["training"]["n_train"] >= 1
        assert {"lumbar_tf", "tensorflow", "keras"} <= set(meta["versions"]) and meta["created"]
    assert set(root_meta["tflite"]) == {"float32", "float16", "dynamic", "int8"}
    int8 = json.loads((export_dir / "tflite" / f"{NAME}_int8.json").read_text())
    assert int8["int8_calibration"] == version_meta["int8_calibration"]
    assert int8["label_semantics"] == version_meta["label_semantics"]
    # The serving engineer's client finds and reads it from any export path.
    for where in (export_dir, export_dir / "saved_model" / NAME, export_dir / "saved_model" / NAME / "1"):
        assert preprocess_config_from_metadata(load_export_metadata(where)) == keras_model.preprocess


def test_report_has_sizes_differences_and_auc(report, export_dir):
    assert report["version"] == 1 and report["saved_model"]["size_bytes"] > 0
    assert report["saved_model"]["max_abs_diff"]["threshold_probs"] < 1e-5
    evaluation = report["evaluation"]
    assert evaluation["n_studies"] >= 1 and evaluation["keras_macro_roc_auc"] is not None
    assert evaluation["auc_loss_floor"]["max_loss"] == 0.01
    assert set(evaluation["auc_loss_floor"]["met"]) == {"float32", "float16", "dynamic", "int8"}
    assert report["keras"]["size_bytes"] > 0
    for variant in ("float32", "float16", "dynamic", "int8"):
        info = report["tflite"][variant]
        assert Path(info["path"]) == export_dir / "tflite" / f"{NAME}_{variant}.tflite"
        assert info["size_bytes"] == Path(info["path"]).stat().st_size > 0
        assert set(info["max_abs_diff"]) == {"grade_probs", "threshold_probs", "presence", "level_xy"}
        assert info["keras_macro_roc_auc"] == evaluation["keras_macro_roc_auc"]
        assert info["roc_auc_delta_vs_keras"] == pytest.approx(
            info["macro_roc_auc"] - info["keras_macro_roc_auc"]
        )
        assert not any("Flex" in op for op in info["ops"])
        assert info["published"] is True  # the fixture allows degraded variants; see the gate test
    assert report["tflite"]["float32"]["max_abs_diff"]["threshold_probs"] < 1e-4
    assert report["tflite"]["int8"]["float_tail"] is True  # grader head kept float32 (see export.py)
    sizes = {v: report["tflite"][v]["size_bytes"] for v in report["tflite"]}
    assert sizes["float16"] < sizes["float32"] and sizes["dynamic"] < sizes["float16"]


# === TFLite ===


@pytest.mark.parametrize("variant", ["float32", "float16", "dynamic", "int8"])
def test_tflite_variant_builtin_ops_and_signatures_run(export_dir, variant, tiny_config):
    from ai_edge_litert.interpreter import Interpreter

    from lumbar_tf.runtime.tflite_model import read_embedded_metadata

    path = export_dir / "tflite" / f"{NAME}_{variant}.tflite"
    content = path.read_bytes()
    assert b"Flex" not in content
    interpreter = Interpreter(model_path=str(path))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert ops and not any("Flex" in op or op == "CUSTOM" for op in ops)
    signatures = interpreter.get_signature_list()
    assert signatures["localize"] == {"inputs": ["sag_t2"], "outputs": ["level_xy"]}
    assert sorted(signatures["grade"]["inputs"]) == ["level_index", "sag_t1", "sag_t2"]
    assert signatures["grade"]["outputs"] == ["threshold_probs"]
    p = tiny_config.preprocess
    rng = np.random.default_rng(0)
    xy = interpreter.get_signature_runner("localize")(
        sag_t2=rng.uniform(0, 255, (2, p.view_size, p.view_size, 3)).astype(np.float32)
    )["level_xy"]
    assert xy.shape == (2, 5, 2) and np.all((xy >= 0) & (xy <= 1))
    crops = {
        v: rng.uniform(0, 255, (5, p.crop_size, p.crop_size, 3)).astype(np.float32)
        for v in ("sag_t2", "sag_t1")
    }
    probs = interpreter.get_signature_runner("grade")(**crops, level_index=np.arange(5, dtype=np.int32))
    probs = probs["threshold_probs"]
    assert probs.shape == (5, 5, 3) and np.all((probs >= 0) & (probs <= 1))
    # The preprocessing travels inside the file and in the sidecar.
    embedded = read_embedded_metadata(content)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert embedded == sidecar
    assert embedded["variant"] == variant and embedded["version"] == 1
    assert embedded["preprocess"]["view_size"] == p.view_size


@pytest.mark.parametrize("variant", ["float32", "float16"])
def test_float_variants_agree_with_keras(export_dir, variant, study_views, keras_outputs):
    from lumbar_tf.runtime.tflite_model import EdgeModel

    edge = EdgeModel(export_dir / "tflite" / f"{NAME}_{variant}.tflite")
    got = edge.predict_views(study_views)
    for key in ("grade_probs", "threshold_probs", "presence", "level_xy"):
        np.testing.assert_allclose(got[key], keras_outputs[key], atol=1e-3, err_msg=f"{variant} {key}")


def test_quantized_variants_stay_close(export_dir, study_views, keras_outputs):
    from lumbar_tf.runtime.tflite_model import EdgeModel

    for variant, tol in (("dynamic", 0.02), ("int8", 0.1)):
        got = EdgeModel(export_dir / "tflite" / f"{NAME}_{variant}.tflite").predict_views(study_views)
        assert np.max(np.abs(got["threshold_probs"] - keras_outputs["threshold_probs"])) < tol, variant


# === Gates ===


def test_degraded_variant_is_refused_unless_allowed(
    tiny_run, phantom_cache, phantom_dir, tmp_path, monkeypatch
):
    """A floor of -1 demands an AUC gain of 1: no variant can meet it, so none is published."""
    from lumbar_tf.data.dataset import load_studies
    from lumbar_tf.export import verify
    from lumbar_tf.export.job import export_model

    # The held-out studies from the session's prepared cache (decoding them again costs time only).
    monkeypatch.setattr(
        verify, "_heldout_studies", lambda data, cfg, tmp: (load_studies(phantom_cache, cfg), None)
    )

    out = tmp_path / "export"
    kwargs = {
        "tflite": ("float32",),
        "cache_dir": phantom_cache,
        "data_dir": phantom_dir,
        "representative_size": 2,
        "auc_loss_floor": -1.0,
        "progress": False,
    }
    report = export_model(tiny_run, out, **kwargs)
    info = report["tflite"]["float32"]
    assert info["published"] is False and info["degraded"] is True
    assert "not published" in info["reason"] and "--allow-degraded" in info["reason"]
    assert not (out / "tflite" / f"{NAME}_float32.tflite").exists()
    assert json.loads((out / "export_report.json").read_text())["tflite"]["float32"]["published"] is False
    assert json.loads((out / "metadata.json").read_text())["tflite"] == {}
    assert report["evaluation"]["auc_loss_floor"]["met"] == {"float32": False}

    allowed = export_model(tiny_run, out, allow_degraded=True, **kwargs)["tflite"]["float32"]
    assert allowed["published"] is True and allowed["degraded"] is True
    assert "published anyway" in allowed["reason"]
    assert (out / "tflite" / f"{NAME}_float32.tflite").is_file()


def test_int8_calibration_needs_training_studies_or_the_flag(tiny_run, tmp_path):
    import shutil

    from lumbar_tf.export.job import ExportError, export_model

    bare = tmp_path / "bare" / "model.keras"  # no run folder: no cache, no training data
    bare.parent.mkdir()
    shutil.copy(Path(tiny_run) / "model.keras", bare)
    out = tmp_path / "export"
    kwargs = {"tflite": ("int8",), "representative_size": 2, "progress": False}
    with pytest.raises(ExportError, match="--calibrate-on-phantoms"):
        export_model(bare, out, **kwargs)
    assert not [p for p in _children(out / "saved_model" / NAME) if p.isdigit() or p.startswith(".tmp")]

    report = export_model(bare, out, calibrate_on_phantoms=True, **kwargs)
    assert report["int8_calibration"]["kind"] == "phantoms"
    meta = json.loads((out / "saved_model" / NAME / "1" / "metadata.json").read_text())
    assert meta["int8_calibration"]["kind"] == "phantoms"
    sidecar = json.loads((out / "tflite" / f"{NAME}_int8.json").read_text())
    assert sidecar["int8_calibration"] == meta["int8_calibration"]
    # Without int8 nothing is calibrated, so no training study is needed and nothing is recorded.
    plain = export_model(bare, out, tflite=(), representative_size=2, progress=False)
    assert "int8_calibration" not in plain
    assert "int8_calibration" not in json.loads((out / "metadata.json").read_text())


# === Versions, atomicity, bad input ===


def _children(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir()) if model_dir.exists() else []


def test_versions_are_numbered_and_written_atomically(
    tiny_run, tiny_export, phantom_cache, tmp_path, monkeypatch
):
    import shutil

    from lumbar_tf.export import job as export
    from lumbar_tf.export.job import ExportError, export_model
    from lumbar_tf.export.publish import next_version

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)  # the session's export holds version 1
    kwargs = {"tflite": (), "cache_dir": phantom_cache, "representative_size": 2, "progress": False}
    assert _children(out / "saved_model" / NAME) == ["1"]
    assert export_model(tiny_run, out, **kwargs)["version"] == 2
    assert export_model(tiny_run, out, version=7, **kwargs)["version"] == 7
    model_dir = out / "saved_model" / NAME
    assert _children(model_dir) == ["1", "2", "7"]
    assert json.loads((out / "metadata.json").read_text())["version"] == 7
    assert json.loads((model_dir / "2" / "metadata.json").read_text())["version"] == 2
    with pytest.raises(ExportError, match="version 2 already exists"):
        export_model(tiny_run, out, version=2, **kwargs)

    # A failure half-way through writing leaves neither a version nor the staging folder.
    def half_written(model, cfg, path, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_saved_model", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(tiny_run, out, **kwargs)
    assert _children(model_dir) == ["1", "2", "7"]
    assert next_version(model_dir) == 8


def test_missing_or_corrupt_model_is_one_clear_error(tmp_path):
    from lumbar_tf.export.job import ExportError, export_model

    out = tmp_path / "export"
    with pytest.raises(ExportError) as missing:
        export_model(tmp_path / "nowhere", out, progress=False)
    assert "nowhere" in str(missing.value) and "\n" not in str(missing.value)

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras archive")
    with pytest.raises(ExportError) as corrupt:
        export_model(run, out, progress=False)
    message = str(corrupt.value)
    assert str(run / "model.keras") in message and "\n" not in message
    model_dir = out / "saved_model" / NAME
    assert not [p for p in _children(model_dir) if p.isdigit() or p.startswith(".tmp")]


def test_cli_export_bad_model_exits_2_with_one_line(tmp_path, capsys):
    from lumbar_tf.cli.main import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_text("garbage")
    code = main(["export", "--model", str(run), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "model.keras" in err[0]
    assert not (tmp_path / "out" / "saved_model" / NAME).exists() or not _children(
        tmp_path / "out" / "saved_model" / NAME
    )


def test_cli_rejects_unknown_variant(tiny_run, tmp_path, capsys):
    from lumbar_tf.cli.main import main

    code = main(["export", "--model", str(tiny_run), "--out", str(tmp_path), "--tflite", "float32,int4"])
    assert code == 2 and "int4" in capsys.readouterr().err


def test_parse_variants():
    from lumbar_tf.export.job import ExportError, parse_variants

    assert parse_variants("float32,int8") == ("float32", "int8")
    assert parse_variants(" INT8 , int8 ") == ("int8",)
    assert parse_variants("none") == () and parse_variants("") == ()
    with pytest.raises(ExportError):
        parse_variants("bf16")


def test_export_script_is_a_thin_cli_wrapper():
    done = subprocess.run(
        [sys.executable, str(REPO / "export" / "export.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "--tflite" in done.stdout and "--representative-size" in done.stdout


# === Per-variant files follow their version (issue 14, item 5) ===


def _sidecar_version(folder: Path, variant: str) -> int:
    return json.loads((folder / f"{NAME}_{variant}.json").read_text())["version"]


def test_publish_tflite_replaces_this_models_variants_and_leaves_nothing_stale(tmp_path):
    from lumbar_tf.export.publish import publish_tflite
    from lumbar_tf.export.tflite import VARIANTS

    folder = tmp_path / "tflite"
    v1 = {v: (b"v1-" + v.encode(), {"version": 1}) for v in ("float32", "int8")}
    publish_tflite(folder, NAME, v1, VARIANTS)
    other = folder / "other_model_int8.tflite"  # another model sharing the folder
    other.write_bytes(b"other")
    orphan = folder / f".{NAME}_float32.tflite.abc123"  # a killed export's temporary file
    orphan.write_bytes(b"half")

    written = publish_tflite(folder, NAME, {"float32": (b"v2", {"version": 2})}, VARIANTS)
    assert written == {"float32": folder / f"{NAME}_float32.tflite"}
    assert (folder / f"{NAME}_float32.tflite").read_bytes() == b"v2"
    version = _sidecar_version(folder, "float32")
    assert version == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{NAME}_float32.tflite", f"{NAME}_float32.json", other.name]
    )
    assert publish_tflite(folder, NAME, {}, VARIANTS) == {}
    assert sorted(p.name for p in folder.iterdir()) == [other.name]
    record(
        "stale-variants",
        f"the new float32 file and its JSON say version {version}; version 1's int8 and a killed "
        "export's temporary file removed; another model's file kept",
    )


@pytest.mark.slow  # three exports, two TFLite conversions: ~40 s
def test_second_export_replaces_per_variant_files_with_its_version(tiny_run, phantom_cache, tmp_path):
    """Two real exports: the second one's sidecar, embedded metadata and metadata.json all say 2, and
    a third without TFLite leaves no older version's file behind."""
    from lumbar_tf.export.job import export_model
    from lumbar_tf.runtime.tflite_model import read_embedded_metadata

    out = tmp_path / "export"
    folder = out / "tflite"
    kwargs = {"cache_dir": phantom_cache, "representative_size": 2, "progress": False}
    assert export_model(tiny_run, out, tflite=("float32",), **kwargs)["version"] == 1
    assert _sidecar_version(folder, "float32") == 1
    assert export_model(tiny_run, out, tflite=("float32",), **kwargs)["version"] == 2
    root = json.loads((out / "metadata.json").read_text())
    embedded = read_embedded_metadata((folder / f"{NAME}_float32.tflite").read_bytes())
    assert root["version"] == _sidecar_version(folder, "float32") == embedded["version"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [f"{NAME}_float32.json", f"{NAME}_float32.tflite"]

    assert export_model(tiny_run, out, tflite=(), **kwargs)["version"] == 3
    assert list(folder.iterdir()) == []
    assert "tflite" not in json.loads((out / "metadata.json").read_text())
