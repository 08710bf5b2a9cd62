"""TF Serving warm-up requests: the export writes PredictionLog records that a PredictionService answers."""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from lumbar_tf.core.contract import OUTPUT_NAMES, SERVING_SIGNATURE, SERVING_WARMUP_FILE
from lumbar_tf.export.warmup import read_warmup_requests, write_warmup_requests
from tests.serving_fixtures import (
    FakePredictionService,
    ModelRepository,
    build_tiny_saved_model,
    grpc_server,
    random_views,
)

NAME = "lumbar_spine"


def _replay(base_path, logs) -> list[dict]:
    """Send each warm-up request to the in-process PredictionService, as TF Serving replays them."""
    answers = []
    repository = ModelRepository({NAME: base_path})
    with grpc_server({}, repository=repository) as server, grpc.insecure_channel(server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for log in logs:
            response = stub.Predict(log.predict_log.request, timeout=30)
            answers.append({k: tf.make_ndarray(v) for k, v in response.outputs.items()})
    return answers


def test_warmup_records_parse_and_are_answered(tmp_path):
    version = build_tiny_saved_model(tmp_path, NAME, version=1, view_size=16)
    views = random_views(3, 16, seed=4)
    written = write_warmup_requests(version, views, NAME, n=2, batch_sizes=(3,))
    assert written == {"file": SERVING_WARMUP_FILE, "n_requests": 3, "batch_sizes": [1, 1, 3]}
    logs = read_warmup_requests(version)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 3
    request = logs[0].predict_log.request
    assert request.model_spec.name == NAME and request.model_spec.signature_name == SERVING_SIGNATURE
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["sag_t2"]), views["sag_t2"][:1])
    answers = _replay(tmp_path / "saved_model" / NAME, logs)
    assert [a["threshold_probs"].shape for a in answers] == [(1, 5, 5, 3), (1, 5, 5, 3), (3, 5, 5, 3)]


def test_export_ships_warmup_requests_its_model_answers(tiny_export):
    base = tiny_export / "saved_model" / NAME
    version = sorted(p for p in base.iterdir() if p.name.isdigit())[-1]
    logs = read_warmup_requests(version)
    assert len(logs) >= 1
    request = logs[0].predict_log.request
    assert tf.make_ndarray(request.inputs[next(iter(request.inputs))]).std() > 0  # real views, not zeros
    answers = _replay(base, logs)
    for answer in answers:
        assert set(OUTPUT_NAMES) <= set(answer)
        assert np.all((answer["threshold_probs"] >= 0) & (answer["threshold_probs"] <= 1))


def test_no_studies_no_warmup(tmp_path):
    with pytest.raises(ValueError, match="no representative studies"):
        write_warmup_requests(tmp_path, {"sag_t2": np.zeros((0, 4, 4, 3))}, NAME)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus over the fixtures' repository: every loaded version AVAILABLE, plus
    ``extra`` ({name: {version: state}}: TF Serving's answer while a version loads)."""

    def __init__(self, repository, extra=None):
        self.repository, self.extra = repository, extra or {}

    def GetModelStatus(self, request, context):  # noqa: N802 (gRPC method name)
        states = {v: "AVAILABLE" for v in self.repository.servables.get(request.model_spec.name, {})}
        states.update(self.extra.get(request.model_spec.name, {}))
        if not states:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {request.model_spec.name}"
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state in states.items():
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        return response


@contextlib.contextmanager
def _server_with_status(repository, extra=None):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        FakePredictionService(repository), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(repository, extra), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


def test_serving_status_reports_the_version_served(tmp_path, capsys):
    from lumbar_tf.cli.main import main

    build_tiny_saved_model(tmp_path, NAME, version=1, view_size=16, seed=1)
    build_tiny_saved_model(tmp_path, NAME, version=2, view_size=16, seed=2)
    repository = ModelRepository({NAME: tmp_path / "saved_model" / NAME})
    with _server_with_status(repository, extra={NAME: {3: "LOADING"}}) as target:
        assert main(["serving-status", "--server", target]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"{NAME}: serving version 2 (versions: 3 LOADING, 2 AVAILABLE, 1 AVAILABLE)"
        assert "threshold_probs" in out[1] and "sag_t2" in out[1]
        assert main(["serving-status", "--server", target, "--model-name", "other"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model 'other' is not served" in err[0]
    with _server_with_status(ModelRepository({}), extra={NAME: {1: "LOADING"}}) as target:
        assert main(["serving-status", "--server", target]) == 1
        err = capsys.readouterr().err.strip()
        assert err.endswith("has no AVAILABLE version (1: LOADING)")
