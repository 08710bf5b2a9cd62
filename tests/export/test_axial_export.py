"""An axial model through every runtime (issue 11): the export writes ``localize`` + ``grade(ax_t2)``
SavedModel signatures and a TFLite ``grade`` that takes the axial crops; the SavedModel, TFLite,
gRPC and REST give the Keras model's predictions.json on a phantom study with an Axial T2 series,
and a study without one still predicts through each, with the per-level warning.

Default suite: one SavedModel-only export shared by the module (SavedModel, gRPC, REST); the TFLite
variants, the warm-up replay and the shared deadline are `slow` (conversion and sleeps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lumbar_tf.core import labels
from lumbar_tf.core.contract import AXIAL_SIGNATURES, GRADE, LOCALIZE, OUTPUT_NAMES, SERVING_SIGNATURE
from tests.axial.test_axial_model import AXIAL_OVERRIDES

NAME = "lumbar_spine"
FORMATS = {"keras": "keras", "saved_model": "saved_model", "grpc": "saved_model", "rest": "saved_model"}


@pytest.fixture(scope="module")
def axial_cfg():
    from lumbar_tf.core.config import load_config

    return load_config(None, AXIAL_OVERRIDES)


@pytest.fixture(scope="module")
def axial_model_file(axial_cfg, tmp_path_factory):
    """An untrained axial end-to-end model (a real graph; agreement needs no trained weights)."""
    import keras

    from lumbar_tf.models.end_to_end import build_end_to_end, grader_input_names
    from lumbar_tf.models.networks import build_grader, build_localizer

    keras.utils.set_random_seed(11)
    p = axial_cfg.preprocess
    model = build_end_to_end(
        build_localizer(p.view_size, axial_cfg.model),
        build_grader(p.crop_size, grader_input_names(p), axial_cfg.model, own_backbone=("ax_t2",)),
        p,
    )
    path = tmp_path_factory.mktemp("axial_export_model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def axial_cache(phantom_dir, axial_cfg, tmp_path_factory):
    """One phantom study prepared with the axial view (the export's representative study)."""
    from lumbar_tf.data.dataset import prepare_cache, read_index

    cache = tmp_path_factory.mktemp("axial_export_cache") / "cache"
    ids = read_index(phantom_dir).study_ids[:1]
    prepare_cache(phantom_dir, cache, axial_cfg.preprocess, progress=False, study_ids=ids)
    return cache


@pytest.fixture(scope="module")
def axial_export(axial_model_file, axial_cache, tmp_path_factory):
    from lumbar_tf.export.job import export_model

    out = tmp_path_factory.mktemp("axial_export") / "export"
    report = export_model(
        axial_model_file, out, tflite=(), cache_dir=axial_cache, representative_size=1, progress=False
    )
    return out, report


@pytest.fixture(scope="module")
def served(axial_export):
    from tests.serving_fixtures import ModelRepository, grpc_server, rest_server

    out, _ = axial_export
    repository = ModelRepository({NAME: out / "saved_model" / NAME})
    with (
        grpc_server({}, repository=repository) as grpc_running,
        rest_server({}, repository=repository) as rest,
    ):
        yield grpc_running.target, rest.base_url


def _predictors(axial_model_file, axial_export, served):
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.saved_model import SavedModelPredictor
    from lumbar_tf.runtime.serving.grpc import GrpcClient
    from lumbar_tf.runtime.serving.predictor import ServingPredictor
    from lumbar_tf.runtime.serving.rest import RestClient

    out, report = axial_export
    grpc_target, rest_url = served
    return {
        "keras": KerasPredictor(axial_model_file),
        "saved_model": SavedModelPredictor(out / "saved_model" / NAME / str(report["version"])),
        "grpc": ServingPredictor(GrpcClient(grpc_target, timeout_s=30.0, retries=1)),
        "rest": ServingPredictor(RestClient(rest_url, timeout_s=30.0, retries=1)),
    }


def _assert_same_projections(got: list, expected: list, runtime: str) -> None:
    """The same slice of the same series per level, the point to float rounding of level_xy."""
    exact = ("level", "covered", "series_id", "instance_number")
    assert [[e[k] for k in exact] for e in got] == [[e[k] for k in exact] for e in expected], runtime
    for g, e in zip(got, expected, strict=True):
        if e["covered"]:
            np.testing.assert_allclose([g["x"], g["y"]], [e["x"], e["y"]], atol=0.05, err_msg=runtime)
            assert abs(g["distance_mm"] - e["distance_mm"]) < 0.05, runtime


def _probs(preds: dict) -> np.ndarray:
    return np.array([[c["presence"], *c["grade_probs"]] for c in preds["cells"]])


def test_the_export_writes_both_calls_and_describes_the_axial_input(axial_export, axial_cfg):
    """SavedModel: ``grade`` (also serving_default) takes the views and ``ax_t2``, ``localize`` the
    localiser view; the report compares with Keras on covered axial crops; metadata.json and the
    warm-up requests name the new input (the TFLite files: the slow test below)."""
    import tensorflow as tf

    from lumbar_tf.export.warmup import read_warmup_requests

    out, report = axial_export
    p = axial_cfg.preprocess
    version = out / "saved_model" / NAME / str(report["version"])
    assert report["representative"]["axial_levels_covered"] > 0
    assert max(report["saved_model"]["max_abs_diff"].values()) < 1e-3
    assert "localize_level_xy" in report["saved_model"]["max_abs_diff"]

    signatures = tf.saved_model.load(str(version)).signatures
    assert {LOCALIZE, GRADE, SERVING_SIGNATURE, "metadata"} <= set(signatures)
    grade_inputs = signatures[GRADE].structured_input_signature[1]
    assert set(grade_inputs) == {"sag_t2", "sag_t1", "ax_t2"}
    assert grade_inputs["ax_t2"].shape.as_list() == [None, 5, p.crop_size, p.crop_size, 3]
    assert set(signatures[SERVING_SIGNATURE].structured_input_signature[1]) == set(grade_inputs)
    assert set(signatures[LOCALIZE].structured_input_signature[1]) == {p.localizer_view}

    meta = json.loads((version / "metadata.json").read_text())
    axial = meta["axial"]
    assert meta["signature"] == GRADE
    assert (axial["name"], axial["series_description"], axial["crop_mm"]) == ("ax_t2", "Axial T2", 60.0)
    assert axial["shape"] == [None, 5, p.crop_size, p.crop_size, 3] and len(axial["channels"]) == 3
    assert axial["call_order"] == list(AXIAL_SIGNATURES) == [LOCALIZE, GRADE]
    assert set(axial["signatures"][GRADE]["inputs"]) == {"sag_t2", "sag_t1", "ax_t2"}

    logs = read_warmup_requests(version)
    called = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert called == [LOCALIZE, GRADE] * (len(logs) // 2) and logs
    assert set(logs[1].predict_log.request.inputs) == {"sag_t2", "sag_t1", "ax_t2"}
    assert report["saved_model"]["warmup"]["signatures"] == called


@pytest.mark.slow
def test_warmup_requests_are_answered_by_the_exported_model(axial_export):
    from lumbar_tf.export.warmup import read_warmup_requests
    from tests.export.test_warmup import _replay

    out, report = axial_export
    logs = read_warmup_requests(out / "saved_model" / NAME / str(report["version"]))
    answers = _replay(out / "saved_model" / NAME, logs)
    assert [sorted(a) for a in answers[:2]] == [["level_xy"], sorted(OUTPUT_NAMES)]


def test_every_runtime_gives_the_keras_predictions_with_and_without_axial_series(
    axial_model_file, axial_export, served, phantom_dir, tmp_path
):
    """A study with Axial T2: the same projections (so the same slices and points) and the same
    probabilities as Keras, the axial input non-zero. The same study without it: every runtime
    still predicts, with the per-level warning, and agrees with Keras."""
    from lumbar_tf.runtime.predictor import predict_study
    from tests.runtime.test_predict import copy_study_without

    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    bare = copy_study_without(study_dir, tmp_path, descriptions=("Axial T2",))
    predictors = _predictors(axial_model_file, axial_export, served)
    keras = predict_study(predictors["keras"], study_dir)
    keras_bare = predict_study(predictors["keras"], bare, series_descriptions={}).predictions
    assert any(e["covered"] for e in keras.predictions["axial"]) and keras.axial[1].max() > 0
    for runtime, predictor in predictors.items():
        result = predict_study(predictor, study_dir)
        got = result.predictions
        assert got["model"]["format"] == FORMATS[runtime]
        _assert_same_projections(got["axial"], keras.predictions["axial"], runtime)
        assert got["series"] == keras.predictions["series"], runtime
        # level_xy agrees to float rounding, so the crops to a grey level of uint8 rounding
        assert np.abs(result.axial[1].astype(int) - keras.axial[1]).max() <= 1, runtime
        np.testing.assert_allclose(_probs(got), _probs(keras.predictions), atol=1e-3, err_msg=runtime)
        np.testing.assert_allclose(result.level_xy, keras.level_xy, atol=1e-3, err_msg=runtime)

        no_axial = predict_study(predictor, bare, series_descriptions={}).predictions
        assert sum("no axial coverage" in w for w in no_axial["warnings"]) == labels.N_LEVELS, runtime
        assert no_axial["series"]["ax_t2"] is None and not any(e["covered"] for e in no_axial["axial"])
        np.testing.assert_allclose(_probs(no_axial), _probs(keras_bare), atol=1e-3, err_msg=runtime)


@pytest.mark.slow
def test_the_two_serving_calls_share_one_deadline(axial_export, phantom_dir):
    """Each call alone fits the client's timeout, both together do not: the study fails with
    DEADLINE_EXCEEDED instead of taking twice the timeout."""
    from lumbar_tf.core.errors import ServingError
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.serving.grpc import GrpcClient
    from lumbar_tf.runtime.serving.predictor import ServingPredictor
    from tests.serving_fixtures import ModelRepository, grpc_server

    out, _ = axial_export
    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    repository = ModelRepository({NAME: out / "saved_model" / NAME})
    with grpc_server({}, repository=repository, delay_s=1.2) as server:
        predictor = ServingPredictor(GrpcClient(server.target, timeout_s=2.0, retries=1))
        with pytest.raises(ServingError) as failed:
            predict_study(predictor, study_dir)
        assert failed.value.code == "DEADLINE_EXCEEDED"
        assert "\n" not in str(failed.value)
        predictor.close()


@pytest.mark.slow
def test_every_tflite_variant_takes_the_axial_crops(
    axial_model_file, axial_cache, axial_cfg, phantom_dir, tmp_path
):
    """Every variant (int8 calibrated on the cache's study, axial crops included) is written, names
    ``ax_t2`` in its embedded and standard metadata, agrees with Keras in the export's check and on
    a study with and without Axial T2 through `predict_study` (the warning per level)."""
    from lumbar_tf.export.job import export_model
    from lumbar_tf.export.tflite import VARIANTS
    from lumbar_tf.export.tflite_metadata import read_litert_metadata
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.tflite_model import EdgeModel, read_embedded_metadata
    from tests.runtime.test_predict import copy_study_without

    out = tmp_path / "export"
    report = export_model(
        axial_model_file, out, tflite=VARIANTS, cache_dir=axial_cache, representative_size=1, progress=False
    )
    assert report["int8_calibration"]["kind"] == "training"
    p = axial_cfg.preprocess
    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    bare = copy_study_without(study_dir, tmp_path, descriptions=("Axial T2",))
    keras_predictor = KerasPredictor(axial_model_file)
    keras = predict_study(keras_predictor, study_dir)
    keras_bare = predict_study(keras_predictor, bare, series_descriptions={}).predictions
    for variant in VARIANTS:
        info = report["tflite"][variant]
        limit = 1e-3 if variant == "float32" else 0.1
        assert info["published"] and info["max_abs_diff"]["threshold_probs"] < limit, variant
        path = out / "tflite" / f"{NAME}_{variant}.tflite"
        content = path.read_bytes()
        embedded = read_embedded_metadata(content)
        assert embedded["signatures"][GRADE]["inputs"]["ax_t2"]["shape"] == [
            None,
            p.crop_size,
            p.crop_size,
            3,
        ]
        assert embedded["axial"]["name"] == "ax_t2" and "ax_t2" in embedded["runner"]
        grade_graph = next(
            g for g in read_litert_metadata(content)["subgraph_metadata"] if g["name"] == GRADE
        )
        described = {t["name"]: t["description"] for t in grade_graph["input_tensor_metadata"]}
        assert "Axial T2" in described["ax_t2"] and "zeros" in described["ax_t2"]

        edge = EdgeModel(path)
        result = predict_study(edge, study_dir)
        assert result.predictions["model"]["format"] == f"tflite_{variant}"
        if variant == "float32":
            _assert_same_projections(result.predictions["axial"], keras.predictions["axial"], variant)
            assert np.abs(result.axial[1].astype(int) - keras.axial[1]).max() <= 1
        np.testing.assert_allclose(
            _probs(result.predictions), _probs(keras.predictions), atol=limit, err_msg=variant
        )
        no_axial = predict_study(edge, bare, series_descriptions={}).predictions
        assert sum("no axial coverage" in w for w in no_axial["warnings"]) == labels.N_LEVELS, variant
        np.testing.assert_allclose(_probs(no_axial), _probs(keras_bare), atol=limit, err_msg=variant)


def test_beam_batch_inference_of_an_axial_model_gives_the_loops_numbers(axial_export, phantom_dir, tmp_path):
    """On Beam's local runner an axial model localises, cuts its axial crops and grades each study
    (two passes, as `predict_study` makes two calls): the loop's submission and predictions.json,
    for studies with Axial T2, one without it (zeros, the per-level warning) and one of broken files."""
    import shutil

    from lumbar_tf.data import beam_prepare
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.batch import predict_folder
    from lumbar_tf.runtime.beam_predict import predict_folder_beam
    from tests.data.test_beam import _submission
    from tests.runtime.test_predict import copy_study_without

    out, report = axial_export
    model = out / "saved_model" / NAME / str(report["version"])
    images = tmp_path / "data" / "test_images"
    images.mkdir(parents=True)
    studies = sorted((phantom_dir / "train_images").iterdir(), key=lambda p: int(p.name))
    for study in studies[:2]:
        shutil.copytree(study, images / study.name)
    bare = copy_study_without(studies[2], images, descriptions=("Axial T2",)).name
    shutil.copytree(studies[3], images / studies[3].name)
    for path in (images / studies[3].name).rglob("*.dcm"):
        path.write_bytes(b"broken")

    loop = predict_folder(load_predictor(model), images.parent, tmp_path / "loop" / "sub.csv", progress=False)
    beamed = predict_folder_beam(
        model,
        images.parent,
        tmp_path / "beam" / "sub.csv",
        options=beam_prepare.pipeline_options("direct"),
        max_batch_size=2,
    )
    assert beamed == loop and beamed["n_predicted"] == 3 and list(beamed["from_prior"]) == [studies[3].name]
    assert sum("no axial coverage" in w for w in beamed["warnings"][bare]) == labels.N_LEVELS
    (a, order_a), (b, order_b) = (
        _submission(tmp_path / "loop" / "sub.csv"),
        _submission(tmp_path / "beam" / "sub.csv"),
    )
    assert order_a == order_b
    for row_id in a:
        np.testing.assert_allclose(b[row_id], a[row_id], atol=2e-6)
    covered = False  # a study with Axial T2 had its axial crops cut on Beam
    for sid in loop["predicted"]:
        one = json.loads((tmp_path / "loop" / "sub_studies" / sid / "predictions.json").read_text())
        two = json.loads((tmp_path / "beam" / "sub_studies" / sid / "predictions.json").read_text())
        assert (
            one["axial"] == two["axial"] and one["series"] == two["series"] and one["levels"] == two["levels"]
        )
        np.testing.assert_allclose(_probs(two), _probs(one), atol=2e-6)
        covered |= sid != bare and any(e["covered"] for e in two["axial"])
    assert covered
