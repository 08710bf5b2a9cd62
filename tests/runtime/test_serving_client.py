"""TF Serving clients (gRPC, REST), predictions.json / submission output, and the serving/ configs.

The servers are in-process stand-ins (tests/serving_fixtures.py) on 127.0.0.1 with free ports; every
call is bounded by small deadlines and back-offs.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from lumbar_tf.core import labels
from lumbar_tf.core.config import ConfigError, PreprocessConfig
from lumbar_tf.core.errors import ServingError
from lumbar_tf.dicom.reader import read_study
from lumbar_tf.preprocess import build_views, source_px_to_view_norm
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata
from lumbar_tf.runtime.predictions import (
    INTENDED_USE,
    build_predictions,
    submission_rows,
    write_predictions,
    write_submission,
)
from lumbar_tf.runtime.predictor import predict_study as predict_study_with
from lumbar_tf.runtime.serving.common import prepare_views
from lumbar_tf.runtime.serving.grpc import GrpcClient, ndarray_to_tensor_proto, tensor_proto_to_ndarray
from lumbar_tf.runtime.serving.predictor import ServingPredictor
from lumbar_tf.runtime.serving.rest import RestClient
from tests.dicom_factory import SeriesSpec, write_study
from tests.serving_fixtures import (
    OUTPUT_SHAPES,
    VIEW_NAMES,
    ModelRepository,
    build_tiny_saved_model,
    free_port,
    grpc_server,
    random_views,
    rest_server,
)


def predict_study(client, study_dir, *, metadata):
    """The one path from a study to predictions.json, with TF Serving as the predictor."""
    return predict_study_with(ServingPredictor(client, metadata), study_dir).predictions


REPO = Path(__file__).resolve().parents[2]
SERVING = REPO / "serving"
VIEW_SIZE = 32
MODEL = "lumbar_spine"


# === Fixtures: one export with two versions, served over gRPC and REST for the whole module ===


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    build_tiny_saved_model(root, MODEL, version=1, view_size=VIEW_SIZE, seed=1)
    build_tiny_saved_model(root, MODEL, version=2, view_size=VIEW_SIZE, seed=2)
    return root


@pytest.fixture(scope="module")
def repository(export_dir):
    return ModelRepository({MODEL: export_dir / "saved_model" / MODEL})


@pytest.fixture(scope="module")
def grpc_target(repository):
    with grpc_server({}, repository=repository) as server:
        yield server.target


@pytest.fixture(scope="module")
def rest_url(repository):
    with rest_server({}, repository=repository) as server:
        yield server.base_url


@pytest.fixture
def grpc_client(grpc_target):
    with GrpcClient(grpc_target, timeout_s=5.0, retries=2, backoff_s=0.01) as client:
        yield client


def direct_outputs(export_dir, version: int, views: dict) -> dict:
    loaded = tf.saved_model.load(str(export_dir / "saved_model" / MODEL / str(version)))
    fn = loaded.signatures["serving_default"]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in views.items()}).items()}


# === gRPC ===


def assert_one_line_error(error, code: str, target: str, fragments) -> None:
    """A client error: the expected code, one line naming the server, and each fragment."""
    message = str(error)
    assert error.code == code
    assert "\n" not in message and target in message
    for fragment in fragments:
        assert fragment in message


def test_grpc_predict_matches_saved_model(export_dir, grpc_client):
    views = random_views(2, VIEW_SIZE, seed=3)
    expected = direct_outputs(export_dir, 2, views)
    got = grpc_client.predict(views)
    assert sorted(got) == sorted(OUTPUT_SHAPES)
    for name, shape in OUTPUT_SHAPES.items():
        assert got[name].shape == (2, *shape)
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, rtol=0)
    assert grpc_client.last_version == 2
    assert grpc_client.model_info() == {"name": MODEL, "version": 2, "format": "saved_model"}


def test_grpc_single_view_uint8_gets_batch_axis(export_dir, grpc_client):
    views = {k: v[0].astype(np.uint8) for k, v in random_views(1, VIEW_SIZE, seed=4).items()}
    expected = direct_outputs(export_dir, 2, {k: v[None].astype(np.float32) for k, v in views.items()})
    got = grpc_client.predict(views)
    np.testing.assert_allclose(got["threshold_probs"], expected["threshold_probs"], atol=1e-6, rtol=0)
    assert got["level_xy"].shape == (1, 5, 2)


def test_grpc_pinned_version(export_dir, grpc_target):
    views = random_views(1, VIEW_SIZE, seed=5)
    with GrpcClient(grpc_target, version=1, retries=1) as client:
        got = client.predict(views)
        assert client.last_version == 1
    np.testing.assert_allclose(
        got["grade_probs"], direct_outputs(export_dir, 1, views)["grade_probs"], atol=1e-6, rtol=0
    )
    assert not np.allclose(got["grade_probs"], direct_outputs(export_dir, 2, views)["grade_probs"])


def test_grpc_metadata_lists_signature(grpc_client):
    meta = grpc_client.metadata()
    assert meta["model_version"] == 2
    sig = meta["signatures"]["serving_default"]
    assert sig["inputs"] == {
        n: {"dtype": "DT_FLOAT", "shape": [-1, VIEW_SIZE, VIEW_SIZE, 3]} for n in VIEW_NAMES
    }
    assert {k: v["shape"] for k, v in sig["outputs"].items()} == {
        k: [-1, *s] for k, s in OUTPUT_SHAPES.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "views_edit", "code", "fragments"),
    [
        (
            {"model_name": "spine_v0"},
            None,
            "NOT_FOUND",
            ["model 'spine_v0' is not served", "Latest(spine_v0)"],
        ),
        ({"version": 9}, None, "NOT_FOUND", ["version 9 is not served", "Specific(lumbar_spine, 9)"]),
        ({"signature_name": "grade"}, None, "FAILED_PRECONDITION", ["has no signature 'grade'"]),
        (
            {},
            "rename",
            "INVALID_ARGUMENT",
            ["rejected the predict request", "alias not found", "sag_t1,sag_t2"],
        ),
        ({}, "drop", "INVALID_ARGUMENT", ["Missing but required: {sag_t1}"]),
        ({}, "shape", "INVALID_ARGUMENT", ["rejected the predict request", "[1, 16, 16, 3]"]),
    ],
)
def test_grpc_errors_are_one_clear_line(grpc_target, kwargs, views_edit, code, fragments):
    views = random_views(1, VIEW_SIZE)
    if views_edit == "rename":
        views = {"sag_t2": views["sag_t2"], "sag_t1_typo": views["sag_t1"]}
    elif views_edit == "drop":
        views = {"sag_t2": views["sag_t2"]}
    elif views_edit == "shape":
        views = random_views(1, 16)
    with (
        GrpcClient(grpc_target, retries=3, backoff_s=0.01, **kwargs) as client,
        pytest.raises(ServingError) as info,
    ):
        client.predict(views)
    assert_one_line_error(info.value, code, grpc_target, fragments)


def test_grpc_unreachable_fails_after_retries():
    port = free_port()
    start = time.monotonic()
    client = GrpcClient(f"127.0.0.1:{port}", timeout_s=2.0, retries=3, backoff_s=0.01)
    with client, pytest.raises(ServingError) as info:
        client.predict(random_views(1, VIEW_SIZE))
    assert str(info.value).startswith(f"cannot reach TF Serving at 127.0.0.1:{port} after 3 tries")
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - start < 10


def test_grpc_retries_unavailable_then_succeeds(repository):
    with grpc_server({}, repository=repository, unavailable_first=2) as server:
        with GrpcClient(server.target, retries=3, backoff_s=0.01) as client:
            out = client.predict(random_views(1, VIEW_SIZE))
        assert server.service.predict_calls == 3
    assert out["presence"].shape == (1, 5, 5)


def test_grpc_gives_up_after_configured_tries(repository):
    with grpc_server({}, repository=repository, unavailable_first=10) as server:
        with (
            GrpcClient(server.target, retries=2, backoff_s=0.01) as client,
            pytest.raises(ServingError) as info,
        ):
            client.predict(random_views(1, VIEW_SIZE))
        assert server.service.predict_calls == 2
    assert str(info.value).startswith(f"TF Serving at {server.target} is overloaded after 2 tries: The batch")


def test_grpc_deadline_exceeded(repository):
    with grpc_server({}, repository=repository, delay_s=0.6) as server:
        client = GrpcClient(server.target, timeout_s=0.1, retries=1)
        with client, pytest.raises(ServingError) as info:
            client.predict(random_views(1, VIEW_SIZE))
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "did not answer predict within 0.1 s" in str(info.value)


def test_tensor_proto_round_trip_matches_tensorflow():
    arr = np.random.default_rng(0).normal(size=(2, 3, 4, 3)).astype(np.float32)
    mine = ndarray_to_tensor_proto(arr)
    assert mine == tf.make_tensor_proto(arr)
    np.testing.assert_array_equal(tensor_proto_to_ndarray(mine), arr)
    # TF Serving may also answer with repeated float_val (and a single value for a constant tensor).
    np.testing.assert_array_equal(
        tensor_proto_to_ndarray(tf.make_tensor_proto([[1.5, 2.5]], tf.float32)), [[1.5, 2.5]]
    )
    packed = tf.make_tensor_proto(np.full((2, 2), 7.0, np.float32))
    packed.ClearField("tensor_content")
    packed.float_val.append(7.0)
    np.testing.assert_array_equal(tensor_proto_to_ndarray(packed), np.full((2, 2), 7.0))


def test_prepare_views_rejects_bad_arrays_before_calling():
    with pytest.raises(ServingError, match=r"expected shape \[H,W,3\] or \[B,H,W,3\]"):
        prepare_views({"sag_t2": np.zeros((4, 4))})
    with pytest.raises(ServingError, match="batch sizes differ"):
        prepare_views({"sag_t2": np.zeros((2, 4, 4, 3)), "sag_t1": np.zeros((1, 4, 4, 3))})
    with pytest.raises(ServingError, match="NaN"):
        prepare_views({"sag_t2": np.full((4, 4, 3), np.nan)})
    out = prepare_views({"sag_t2": np.zeros((4, 4, 3), np.uint8)})
    assert out["sag_t2"].shape == (1, 4, 4, 3) and out["sag_t2"].dtype == np.float32


def test_client_module_does_not_import_tensorflow():
    code = (
        "import sys, lumbar_tf.runtime.serving.rest, lumbar_tf.runtime.serving.grpc, "
        "lumbar_tf.runtime.serving.predictor, lumbar_tf.runtime.predictor; print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# === REST ===


def test_rest_predict_matches_saved_model(export_dir, rest_url):
    views = random_views(2, VIEW_SIZE, seed=6)
    expected = direct_outputs(export_dir, 2, views)
    got = RestClient(rest_url, timeout_s=5.0, retries=2, backoff_s=0.01).predict(views)
    assert sorted(got) == sorted(OUTPUT_SHAPES)
    for name, shape in OUTPUT_SHAPES.items():
        assert got[name].shape == (2, *shape)
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, rtol=0)


def test_rest_pinned_version_and_status(export_dir, rest_url):
    views = random_views(1, VIEW_SIZE, seed=7)
    client = RestClient(rest_url, version=1, retries=1)
    np.testing.assert_allclose(
        client.predict(views)["threshold_probs"],
        direct_outputs(export_dir, 1, views)["threshold_probs"],
        atol=1e-6,
        rtol=0,
    )
    status = RestClient(rest_url).status()
    assert [(s["version"], s["state"]) for s in status["model_version_status"]] == [
        ("1", "AVAILABLE"),
        ("2", "AVAILABLE"),
    ]
    meta = RestClient(rest_url).metadata()
    assert set(meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]) == set(
        VIEW_NAMES
    )


@pytest.mark.parametrize(
    ("kwargs", "rename", "code", "fragments"),
    [
        (
            {"model_name": "spine_v0"},
            False,
            "HTTP 404",
            ["model 'spine_v0' is not served", "Latest(spine_v0)"],
        ),
        ({"version": 9}, False, "HTTP 404", ["version 9 is not served"]),
        ({"signature_name": "grade"}, False, "HTTP 400", ["has no signature 'grade'"]),
        ({}, True, "HTTP 400", ["rejected the predict request", "alias not found in signature: sag_t1_typo"]),
    ],
)
def test_rest_errors_are_one_clear_line(rest_url, kwargs, rename, code, fragments):
    views = random_views(1, VIEW_SIZE)
    if rename:
        views = {"sag_t2": views["sag_t2"], "sag_t1_typo": views["sag_t1"]}
    with pytest.raises(ServingError) as info:
        RestClient(rest_url, retries=3, backoff_s=0.01, **kwargs).predict(views)
    assert_one_line_error(info.value, code, rest_url, fragments)


def test_rest_unreachable_fails_after_retries():
    port = free_port()
    start = time.monotonic()
    client = RestClient(f"http://127.0.0.1:{port}", timeout_s=2.0, retries=3, backoff_s=0.01)
    with pytest.raises(ServingError) as info:
        client.predict(random_views(1, VIEW_SIZE))
    assert str(info.value).startswith(f"cannot reach TF Serving at http://127.0.0.1:{port} after 3 tries")
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - start < 10


# === predictions.json and the Kaggle submission ===


def _threshold_probs(seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).uniform(size=(5, 5, 3))
    return -np.sort(-p, axis=-1)  # monotone: P(>=1) >= P(>=2) >= P(>=3)


def _level_positions() -> list[dict]:
    return [
        {"level": lv, "instance_number": 8, "x": 100.0 + i, "y": 50.0 + 20 * i}
        for i, lv in enumerate(labels.LEVELS)
    ]


def _xy() -> np.ndarray:
    return np.stack([np.full(5, 0.5), np.linspace(0.2, 0.8, 5)], axis=1)


def test_build_predictions_structure():
    tp = _threshold_probs()
    preds = build_predictions(
        44036939,
        tp,
        _xy(),
        model_info={"name": MODEL, "version": 3, "format": "saved_model"},
        level_positions=list(reversed(_level_positions())),
        warnings=["Sagittal T1 missing"],
    )
    keys = ["study_id", "model", "cells", "levels", "series", "warnings", "label_semantics", "intended_use"]
    assert list(preds) == keys
    semantics = preds["label_semantics"]
    assert semantics["fine_grades"] is True and semantics["presence"] == "P(grade >=1)"
    assert preds["study_id"] == "44036939"
    assert preds["model"] == {"name": MODEL, "version": 3, "format": "saved_model"}
    assert preds["intended_use"] == INTENDED_USE == "Research decision support only; not for diagnosis."
    assert preds["warnings"] == ["Sagittal T1 missing"]
    cells = preds["cells"]
    assert len(cells) == 25
    assert [(c["condition"], c["level"]) for c in cells] == [
        (c, lv) for c in labels.CONDITIONS for lv in labels.LEVELS
    ]
    for k, cell in enumerate(cells):
        ci, li = divmod(k, 5)
        p1, p2, p3 = tp[ci, li]
        np.testing.assert_allclose(cell["grade_probs"], [1 - p1, p1 - p2, p2 - p3, p3], atol=1e-6)
        assert sum(cell["grade_probs"]) == pytest.approx(1.0, abs=1e-6)
        assert cell["grade"] == int(np.argmax(cell["grade_probs"]))
        assert cell["presence"] == pytest.approx(p1, abs=1e-6)
        assert list(cell["rsna"]) == ["normal_mild", "moderate", "severe"]
        np.testing.assert_allclose(list(cell["rsna"].values()), [1 - p2, p2 - p3, p3], atol=1e-6)
        assert sum(cell["rsna"].values()) == pytest.approx(1.0, abs=1e-6)
    assert [lv["level"] for lv in preds["levels"]] == list(labels.LEVELS)  # reordered
    assert preds["levels"][4] == {
        "level": "l5_s1",
        "instance_number": 8,
        "x": 104.0,
        "y": 130.0,
        "x_norm": 0.5,
        "y_norm": 0.8,
    }


def test_build_predictions_rsna_only_presence_and_monotone_guard():
    tp = _threshold_probs(1)
    tp[0, 0] = [0.2, 0.6, 0.1]  # not monotone
    preds = build_predictions(
        "s1",
        tp,
        _xy(),
        model_info={"name": MODEL, "version": None, "format": "saved_model"},
        level_positions=_level_positions(),
        fine_grades=False,
    )
    first = preds["cells"][0]
    assert sum(first["grade_probs"]) == pytest.approx(1.0, abs=1e-6)
    assert min(first["grade_probs"]) >= 0
    assert any("not monotone" in w for w in preds["warnings"])
    assert preds["cells"][1]["presence"] == pytest.approx(tp[0, 1, 1], abs=1e-6)  # P(>=2) without fine grades
    assert len(first["grade_probs"]) == 3  # normal_mild, moderate, severe: P(mild) is not offered
    assert preds["label_semantics"]["grade_scale"] == ["normal_mild", "moderate", "severe"]
    assert any("mild is not distinguishable" in w for w in preds["warnings"])


@pytest.mark.parametrize(
    ("tp", "positions", "match"),
    [
        (np.zeros((5, 5, 2)), None, "threshold_probs: expected shape"),
        (np.full((5, 5, 3), 3.0), None, "outside"),
        (None, [{"level": "l1_l2", "instance_number": 1, "x": 0, "y": 0}], "expected 5 entries"),
    ],
)
def test_build_predictions_rejects_bad_input(tp, positions, match):
    with pytest.raises(ValueError, match=match):
        build_predictions(
            "s",
            _threshold_probs() if tp is None else tp,
            _xy(),
            model_info={"name": MODEL, "version": 1, "format": "saved_model"},
            level_positions=positions or _level_positions(),
        )


def test_write_predictions_rounds_and_round_trips(tmp_path):
    preds = build_predictions(
        "s1",
        _threshold_probs(),
        _xy(),
        model_info={"name": MODEL, "version": 1, "format": "saved_model"},
        level_positions=_level_positions(),
    )
    path = write_predictions(tmp_path / "out" / "predictions.json", preds)
    loaded = json.loads(path.read_text())
    assert loaded["cells"][3]["grade_probs"] == [round(p, 6) for p in preds["cells"][3]["grade_probs"]]
    assert loaded["levels"][1]["y_norm"] == 0.35 and loaded["levels"][1]["x"] == 101.0
    assert not list(path.parent.glob(".*"))  # no temp file left behind


def test_submission_rows_and_csv(tmp_path):
    tp = _threshold_probs(2)
    rows = submission_rows(44036939, tp)
    assert len(rows) == 25
    assert rows[0][0] == "44036939_spinal_canal_stenosis_l1_l2"
    assert [r[0] for r in rows] == [f"44036939_{c}_{lv}" for c in labels.CONDITIONS for lv in labels.LEVELS]
    for (_, nm, mo, se), triple in zip(rows, labels.rsna_submission_triple(tp).reshape(25, 3)):
        np.testing.assert_allclose([nm, mo, se], triple, atol=1e-6)
        assert nm + mo + se == pytest.approx(1.0, abs=1e-6)
    path = write_submission(tmp_path / "submission.csv", rows + submission_rows("123", tp))
    with path.open(newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["row_id", "normal_mild", "moderate", "severe"]
    assert len(table) == 51
    assert table[26][0] == "123_spinal_canal_stenosis_l1_l2"
    assert float(table[1][1]) == pytest.approx(rows[0][1], abs=1e-6)


# === Export metadata and a whole study through the server ===


def test_load_export_metadata_from_any_export_path(export_dir):
    version_dir = export_dir / "saved_model" / MODEL / "2"
    for path in (version_dir / "metadata.json", version_dir, version_dir.parent, export_dir):
        meta = load_export_metadata(path)
        assert meta["version"] == 2
    cfg = preprocess_config_from_metadata(meta)
    assert isinstance(cfg, PreprocessConfig)
    assert cfg.view_size == VIEW_SIZE and cfg.view_names == VIEW_NAMES
    assert cfg.views[1].offsets_mm == (22.0, 0.0, -22.0)


def test_preprocess_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no 'preprocess'"):
        preprocess_config_from_metadata({"name": MODEL})
    with pytest.raises(ConfigError, match="preprocess.view_sise: unknown config key"):
        preprocess_config_from_metadata({"preprocess": {"view_sise": 64}})
    with pytest.raises(ConfigError, match="no metadata.json"):
        load_export_metadata(tmp_path)


@pytest.mark.parametrize(("transport", "with_t1"), [("grpc", True), ("rest", True), ("grpc", False)])
def test_predict_study_end_to_end(export_dir, grpc_target, rest_url, tmp_path, transport, with_t1):
    """Real DICOM -> the training preprocessing -> the server -> predictions.json, compared with the
    SavedModel run directly on `preprocess.build_views` of the same study."""
    specs = {"11": SeriesSpec("Sagittal T2/STIR", series_number=11, seed=1)}
    if with_t1:
        specs["12"] = SeriesSpec("Sagittal T1", series_number=12, seed=2, n_slices=9)
    study_dir = write_study(tmp_path, "44036939", specs)
    metadata = load_export_metadata(export_dir)
    if transport == "grpc":
        client = GrpcClient(grpc_target, timeout_s=5.0, retries=1)
    else:
        client = RestClient(rest_url, timeout_s=5.0, retries=1)
    preds = predict_study(client, study_dir, metadata=metadata)

    cfg = preprocess_config_from_metadata(metadata)
    study = read_study(study_dir)
    views, grid, info, _ = build_views(study, cfg)
    expected = direct_outputs(export_dir, 2, {k: v[None].astype(np.float32) for k, v in views.items()})
    assert preds["study_id"] == "44036939"
    assert preds["model"] == {"name": MODEL, "version": 2, "format": "saved_model"}
    np.testing.assert_allclose(
        [[c["rsna"]["severe"], c["presence"]] for c in preds["cells"]],
        np.stack(
            [expected["threshold_probs"][0, ..., 2], expected["threshold_probs"][0, ..., 0]], -1
        ).reshape(25, 2),
        atol=1e-6,
    )
    # Levels sit on the midline Sagittal T2 slice and map back onto the model's level_xy.
    t2 = study.series_by_description("Sagittal T2/STIR")
    midline = info["sag_t2"][1]
    source_xy = np.array([[lv["x"], lv["y"]] for lv in preds["levels"]])
    assert {lv["instance_number"] for lv in preds["levels"]} == {midline}
    back = source_px_to_view_norm(t2, t2.index_of_instance(midline), source_xy, grid)
    np.testing.assert_allclose(back, expected["level_xy"][0], atol=1e-6)
    np.testing.assert_allclose(
        [[lv["x_norm"], lv["y_norm"]] for lv in preds["levels"]], expected["level_xy"][0], atol=1e-6
    )
    if not with_t1:
        assert any("Sagittal T1" in w and "zeros" in w for w in preds["warnings"])
        np.testing.assert_array_equal(views["sag_t1"], 0)


def test_level_positions_fall_back_to_the_next_view(export_dir, tmp_path):
    from lumbar_tf.runtime.predictions import level_positions_from_views

    study_dir = write_study(tmp_path, "7", {"12": SeriesSpec("Sagittal T1", series_number=12, n_slices=9)})
    cfg = preprocess_config_from_metadata(load_export_metadata(export_dir))
    study = read_study(study_dir)
    views, grid, info, _ = build_views(study, cfg)
    warnings: list[str] = []
    xy = np.stack([np.full(5, 0.5), np.linspace(0.3, 0.7, 5)], axis=1)
    positions = level_positions_from_views(study, grid, info, xy, cfg, warnings)
    assert [p["instance_number"] for p in positions] == [info["sag_t1"][1]] * 5
    assert warnings == ["level positions are on the midline Sagittal T1 slice (Sagittal T2/STIR missing)"]
    empty = level_positions_from_views(study, grid, {"sag_t1": [], "sag_t2": []}, xy, cfg, warnings)
    assert empty[0] == {"level": "l1_l2", "instance_number": None, "x": None, "y": None}


# === serving/ configuration files ===


def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters, rebuilt from session_bundle_config.proto (fields 1-7):
    tensorflow-serving-api does not ship session_bundle_config_pb2."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="lumbar_tf_tests/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    wrapped = [
        ("max_batch_size", ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", ".google.protobuf.Int64Value"),
        ("num_batch_threads", ".google.protobuf.Int64Value"),
        ("thread_pool_name", ".google.protobuf.StringValue"),
    ]
    for number, (name, type_name) in enumerate(wrapped, start=1):
        msg.field.add(
            name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL, type_name=type_name
        )
    msg.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    msg.field.add(
        name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    )


def test_models_config_parses_as_model_server_config():
    config = text_format.Parse(
        (SERVING / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert model.name == MODEL
    assert model.base_path == "/models/lumbar_spine"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions >= 1


def test_batching_parameters_parse():
    params = text_format.Parse(
        (SERVING / "batching_parameters.txt").read_text(), _batching_parameters_class()()
    )
    for name in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        assert params.HasField(name), name
    assert params.max_batch_size.value >= 1 and params.num_batch_threads.value >= 1
    assert 0 <= params.batch_timeout_micros.value <= 10_000  # the guide's CPU range: 0-10 ms
    assert params.max_enqueued_batches.value >= params.num_batch_threads.value


def test_docker_compose_wires_ports_models_and_configs():
    compose = yaml.safe_load((SERVING / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    assert service["image"].startswith("${TF_SERVING_IMAGE:-tensorflow/serving")
    assert {p.split(":")[-1] for p in service["ports"]} == {"8500", "8501"}
    mounts = {m["target"]: m["source"] for m in service["volumes"]}
    assert mounts["/models"] == "${LUMBAR_EXPORT:-../export/saved_model}"
    flags = dict(arg.lstrip("-").split("=", 1) for arg in service["command"])
    assert flags["enable_batching"] == "true"
    for flag in ("model_config_file", "batching_parameters_file"):
        source = mounts[flags[flag]]  # every config the server reads is mounted from serving/
        assert (SERVING / source).is_file(), source
    config = text_format.Parse(
        (SERVING / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    assert config.model_config_list.config[0].base_path.startswith("/models/")


def test_client_example_compiles():
    compile((SERVING / "client_example.py").read_text(), "client_example.py", "exec")


# === The served model gives its own preprocessing (issue 12, item 4) ===


@pytest.fixture(scope="module")
def served_export(tiny_export):
    """The session's real export (its SavedModel has the `metadata` signature), served over gRPC and
    REST by the in-process stand-ins."""
    repository = ModelRepository({MODEL: tiny_export / "saved_model" / MODEL})
    with (
        grpc_server({}, repository=repository) as grpc_running,
        rest_server({}, repository=repository) as rest,
    ):
        yield tiny_export, grpc_running.target, rest.base_url


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_serving_predictor_takes_preprocessing_from_the_served_model(served_export, phantom_dir, transport):
    """No local file: preprocessing, label semantics, prior and quality bounds come from the
    `metadata` signature, the client is pinned to the version that answered, and the study's
    predictions equal the SavedModel run directly."""
    from lumbar_tf.runtime.saved_model import SavedModelPredictor

    export, grpc_target, rest_url = served_export
    local = load_export_metadata(export)
    version = local["version"]
    if transport == "grpc":
        client = GrpcClient(grpc_target, timeout_s=10.0, retries=1)
    else:
        client = RestClient(rest_url, timeout_s=10.0, retries=1)
    predictor = ServingPredictor(client)
    assert predictor.metadata_source == "served model"
    assert client.version == version == predictor.served_version
    assert predictor.metadata["version"] is None  # the number is TF Serving's (chosen at publishing)
    for key in ("preprocess", "label_semantics", "prior", "quality_bounds", "conditions", "levels"):
        assert predictor.metadata[key] == local[key], key
    assert predictor.preprocess == preprocess_config_from_metadata(local)
    assert predictor.quality_bounds["source"].startswith("training labels")

    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    served = predict_study_with(predictor, study_dir).predictions
    direct = predict_study_with(SavedModelPredictor(export / "saved_model" / MODEL / str(version)), study_dir)
    assert served["model"] == {"name": MODEL, "version": version, "format": "saved_model"}
    np.testing.assert_allclose(
        [c["presence"] for c in served["cells"]],
        [c["presence"] for c in direct.predictions["cells"]],
        atol=1e-5,
    )
    assert served["quality"] == direct.predictions["quality"]


def test_local_metadata_that_disagrees_with_the_served_model_is_refused(served_export):
    export, grpc_target, _ = served_export
    local = load_export_metadata(export)
    other = json.loads(json.dumps(local))
    other["preprocess"]["view_size"] = other["preprocess"]["view_size"] * 2  # another version's
    with GrpcClient(grpc_target, timeout_s=10.0, retries=1) as client:
        with pytest.raises(ServingError, match="preprocessing differs from the local metadata.json"):
            ServingPredictor(client, other)
        agreeing = ServingPredictor(client, local)
        assert agreeing.metadata_source == "served model"


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_an_older_export_without_the_signature_needs_its_metadata_json(
    export_dir, grpc_target, rest_url, transport
):
    """The module's stand-in model has no `metadata` signature: without a local file the error says
    so in one line; with one, that file is used and nothing is pinned."""
    if transport == "grpc":
        client = GrpcClient(grpc_target, timeout_s=5.0, retries=1)
    else:
        client = RestClient(rest_url, timeout_s=5.0, retries=1)
    with pytest.raises(ServingError) as missing:
        ServingPredictor(client)
    message = str(missing.value)
    assert "has no 'metadata' signature" in message and "metadata.json" in message and "\n" not in message
    predictor = ServingPredictor(client, load_export_metadata(export_dir))
    assert predictor.metadata_source == "local metadata.json" and client.version is None


def test_status_lines_report_the_served_preprocessing():
    from lumbar_tf.runtime.serving.status import status_lines

    status = {
        "model": MODEL,
        "versions": [{"version": 3, "state": "AVAILABLE", "error": None}],
        "serving": 3,
        "signature": {"inputs": {"sag_t2": {}, "sag_t1": {}}, "outputs": {"level_xy": {}}},
        "metadata": {
            "version": 3,
            "views": ["sag_t2", "sag_t1"],
            "view_size": 192,
            "quality_bounds": "training labels and views (218 studies)",
        },
    }
    lines = status_lines(status)
    assert lines[2] == (
        "  metadata: preprocessing served by version 3 (sag_t2, sag_t1 at 192 px; quality bounds: "
        "training labels and views (218 studies))"
    )
    assert "not served" in status_lines({**status, "metadata": None})[2]
