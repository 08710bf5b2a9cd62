"""Stand-ins for TF Serving in the tests: a tiny SavedModel with the export contract's signature, an
in-process gRPC PredictionService and a local REST server speaking TF Serving's JSON API.

They answer like TF Serving does (status codes and error texts copied from tensorflow_serving's
predict_util / http_server), so client error handling is tested against realistic replies. Servers bind
127.0.0.1 on a free port and are stopped by their context managers.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from lumbar_tf.core import labels
from lumbar_tf.core.config import PreprocessConfig, config_to_dict

VIEW_NAMES = ("sag_t2", "sag_t1")
OUTPUT_SHAPES = {
    "grade_probs": (5, 5, 4),
    "threshold_probs": (5, 5, 3),
    "presence": (5, 5),
    "level_xy": (5, 2),
}


# === A tiny SavedModel with the export contract's signature ===


class TinyLumbarModel(tf.Module):
    """Deterministic outputs of the contract's shapes from simple image statistics of both views."""

    def __init__(self, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        n_features = 4 * len(VIEW_NAMES)
        self.w_thresholds = tf.constant(rng.normal(0, 2.0, (n_features, 75)), tf.float32)
        self.b_thresholds = tf.constant(rng.normal(0, 0.5, (75,)), tf.float32)
        self.w_xy = tf.constant(rng.normal(0, 0.5, (n_features, 10)), tf.float32)

    def features(self, views):
        feats = []
        for view in views:
            scaled = view / 255.0
            feats.append(tf.reduce_mean(scaled, axis=[1, 2]))  # [B, 3]
            width = tf.cast(tf.shape(view)[2], tf.float32)
            ramp = tf.reshape(tf.linspace(0.0, 1.0, tf.shape(view)[2]), [1, 1, -1, 1])
            feats.append(tf.reduce_sum(scaled * ramp, axis=[1, 2, 3])[:, None] / (width * 3.0))  # [B, 1]
        return tf.concat(feats, axis=1)

    @tf.function
    def serve(self, sag_t2, sag_t1):
        f = self.features([sag_t2, sag_t1])
        raw = tf.reshape(f @ self.w_thresholds + self.b_thresholds, [-1, 5, 5, 3])
        l1 = raw[..., 0]
        l2 = l1 - tf.nn.softplus(raw[..., 1]) - 0.5
        l3 = l2 - tf.nn.softplus(raw[..., 2]) - 0.5
        threshold_probs = tf.sigmoid(tf.stack([l1, l2, l3], axis=-1))
        p1, p2, p3 = threshold_probs[..., 0], threshold_probs[..., 1], threshold_probs[..., 2]
        grade_probs = tf.stack([1.0 - p1, p1 - p2, p2 - p3, p3], axis=-1)
        offsets = 0.05 * tf.tanh(tf.reshape(f @ self.w_xy, [-1, 5, 2]))
        base = tf.constant([[0.5, (i + 0.5) / 5.0 * 0.8 + 0.1] for i in range(5)], tf.float32)
        level_xy = tf.clip_by_value(base[None] + offsets, 0.0, 1.0)
        return {
            "grade_probs": grade_probs,
            "threshold_probs": threshold_probs,
            "presence": p1,
            "level_xy": level_xy,
        }


def build_tiny_saved_model(
    export_dir, name: str = "lumbar_spine", version: int = 1, view_size: int = 32, seed: int = 0
) -> Path:
    """Write ``export_dir/saved_model/<name>/<version>/`` + metadata.json atomically; return that folder."""
    module = TinyLumbarModel(seed)
    specs = [tf.TensorSpec([None, view_size, view_size, 3], tf.float32, name=n) for n in VIEW_NAMES]
    serving_fn = module.serve.get_concrete_function(*specs)
    model_dir = Path(export_dir) / "saved_model" / name
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / str(version)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=model_dir))
    try:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": serving_fn})
        metadata = {
            "name": name,
            "version": version,
            "format": "saved_model",
            "conditions": list(labels.CONDITIONS),
            "levels": list(labels.LEVELS),
            "grades": list(labels.GRADES),
            "label_semantics": {"known_thresholds": list(labels.THRESHOLDS), "fine_grades": True},
            "preprocess": config_to_dict(PreprocessConfig(view_size=view_size)),
            "intended_use": "Research decision support only; not for diagnosis.",
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2))
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def random_views(batch: int, view_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 views in 0-255 as the signature expects."""
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 256, (batch, view_size, view_size, 3)).astype(np.float32) for n in VIEW_NAMES}


# === A model repository that resolves requests like TF Serving ===


class ServingStatus(Exception):
    """An error status as TF Serving would return it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}


@dataclass
class _Servable:
    loaded: object
    signature_defs: dict


@dataclass
class ModelRepository:
    """``{model name: base path}`` with numeric version folders, all versions loaded (TF Serving's
    default policy serves the latest; a request may pin any loaded version)."""

    base_paths: dict
    servables: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, base in self.base_paths.items():
            versions = {}
            for vdir in sorted(Path(base).iterdir()):
                if vdir.is_dir() and vdir.name.isdigit():
                    proto = saved_model_pb2.SavedModel()
                    proto.ParseFromString((vdir / "saved_model.pb").read_bytes())
                    sig_defs = {
                        k: v for k, v in proto.meta_graphs[0].signature_def.items() if not k.startswith("__")
                    }
                    versions[int(vdir.name)] = _Servable(tf.saved_model.load(str(vdir)), sig_defs)
            self.servables[name] = versions

    def resolve(self, name: str, version: int | None) -> tuple[int, _Servable]:
        versions = self.servables.get(name)
        if version is None:
            if not versions:
                raise ServingStatus(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
                )
            version = max(versions)
        elif not versions or version not in versions:
            raise ServingStatus(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({name}, {version})"
            )
        return version, versions[version]

    def predict(self, name: str, version: int | None, signature_name: str, inputs: dict) -> tuple[int, dict]:
        version, servable = self.resolve(name, version)
        signature_name = signature_name or "serving_default"
        if signature_name not in servable.signature_defs:
            raise ServingStatus(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.'
            )
        sig_def = servable.signature_defs[signature_name]
        expected = sorted(sig_def.inputs)
        if len(inputs) != len(expected):
            extra = sorted(set(inputs) - set(expected))
            missing = sorted(set(expected) - set(inputs))
            raise ServingStatus(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(inputs)}!={len(expected)} "
                f"len({{{','.join(sorted(inputs))}}}) != len({{{','.join(expected)}}}). "
                f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}.",
            )
        for alias in inputs:
            if alias not in sig_def.inputs:
                raise ServingStatus(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input tensor alias not found in signature: {alias}. "
                    f"Inputs expected to be in the set {{{','.join(expected)}}}.",
                )
        fn = servable.loaded.signatures[signature_name]
        _, specs = fn.structured_input_signature
        tensors = {}
        for alias, value in inputs.items():
            spec = specs[alias]
            if value.dtype != spec.dtype.as_numpy_dtype:
                raise ServingStatus(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{alias}] to be {spec.dtype.name} "
                    f"but {tf.as_dtype(value.dtype).name} is provided",
                )
            if not spec.shape.is_compatible_with(value.shape):
                raise ServingStatus(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {alias} has shape {list(value.shape)}, incompatible with {spec.shape}",
                )
            tensors[alias] = tf.constant(value)
        try:
            outputs = fn(**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
            raise ServingStatus(grpc.StatusCode.INVALID_ARGUMENT, str(exc).splitlines()[0]) from None
        return version, {k: v.numpy() for k, v in outputs.items()}


# === gRPC PredictionService ===


class FakePredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a `ModelRepository`.

    Args:
        unavailable_first: answer the first N Predict calls with UNAVAILABLE (to test retries).
        unavailable_message: the text of those answers (TF Serving's batching says its queue is full).
        delay_s: sleep before answering Predict (to test deadlines).
    """

    def __init__(
        self,
        repository: ModelRepository,
        unavailable_first: int = 0,
        unavailable_message: str = "The batch scheduling queue to which this task was submitted is full",
        delay_s: float = 0.0,
    ):
        self.repository = repository
        self.unavailable_first = unavailable_first
        self.unavailable_message = unavailable_message
        self.delay_s = delay_s
        self.predict_calls = 0
        self._lock = threading.Lock()

    def Predict(self, request, context):  # noqa: N802 (gRPC method name)
        with self._lock:
            self.predict_calls += 1
            calls = self.predict_calls
        if calls <= self.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, self.unavailable_message)
        if self.delay_s:
            time.sleep(self.delay_s)
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            version, outputs = self.repository.predict(spec.name, version, spec.signature_name, inputs)
        except ServingStatus as status:
            context.abort(status.code, status.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = spec.signature_name or "serving_default"
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        spec = request.model_spec
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported"
            )
        try:
            version, servable = self.repository.resolve(
                spec.name, spec.version.value if spec.HasField("version") else None
            )
        except ServingStatus as status:
            context.abort(status.code, status.message)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in servable.signature_defs.items():
            sig_map.signature_def[key].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(sig_map)
        return response


@dataclass
class RunningGrpcServer:
    target: str
    service: FakePredictionService


@contextlib.contextmanager
def grpc_server(
    base_paths: dict, *, repository: ModelRepository | None = None, port: int = 0, **service_options
):
    """Serve ``{model name: base path}`` over gRPC on 127.0.0.1 (``port``, default a free one);
    yields `RunningGrpcServer`."""
    repository = repository or ModelRepository(base_paths)
    service = FakePredictionService(repository, **service_options)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield RunningGrpcServer(f"127.0.0.1:{port}", service)
    finally:
        server.stop(grace=None).wait(5)


# === REST (TF Serving's JSON API) ===

_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$"
)


def _json_value(value):
    """A numpy output as TF Serving's JSON writes it (DT_STRING as UTF-8 strings)."""
    value = np.asarray(value)
    if value.dtype.kind in "OS":
        return np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else b, otypes=[object])(
            value
        ).tolist()
    return value.tolist()


def _rest_handler(repository: ModelRepository):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: ServingStatus) -> None:
            self._reply(HTTP_STATUS.get(status.code, 500), {"error": status.message})

        def _route(self):
            match = _PATH.match(self.path)
            if not match:
                return None
            version = match["version"]
            return match["name"], (int(version) if version else None), match["verb"] or ""

        def do_GET(self):  # noqa: N802
            route = self._route()
            if route is None or route[2] == ":predict":
                self._reply(404, {"error": f"Malformed request: GET {self.path}"})
                return
            name, version, verb = route
            try:
                if verb == "/metadata":
                    version, servable = repository.resolve(name, version)
                    sig_map = get_model_metadata_pb2.SignatureDefMap()
                    for key, sig in servable.signature_defs.items():
                        sig_map.signature_def[key].CopyFrom(sig)
                    self._reply(
                        200,
                        {
                            "model_spec": {"name": name, "signature_name": "", "version": str(version)},
                            "metadata": {
                                "signature_def": json_format.MessageToDict(
                                    sig_map, preserving_proto_field_name=True
                                )
                            },
                        },
                    )
                    return
                versions = [version] if version is not None else sorted(repository.servables.get(name, {}))
                for v in versions or [None]:
                    repository.resolve(name, v)
                status = [
                    {
                        "version": str(v),
                        "state": "AVAILABLE",
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                    for v in versions
                ]
                self._reply(200, {"model_version_status": status})
            except ServingStatus as status:
                self._error(status)

        def do_POST(self):  # noqa: N802
            route = self._route()
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            if route is None or route[2] != ":predict":
                self._reply(404, {"error": f"Malformed request: POST {self.path}"})
                return
            name, version, _ = route
            try:
                body = json.loads(raw)
            except ValueError as exc:
                self._reply(400, {"error": f"JSON Parse error: {exc}"})
                return
            try:
                if "inputs" in body and "instances" in body:
                    raise ServingStatus(
                        grpc.StatusCode.INVALID_ARGUMENT, "Only one of inputs or instances may be set"
                    )
                if "inputs" in body:
                    inputs = {k: np.asarray(v, dtype=np.float32) for k, v in body["inputs"].items()}
                    row_format = False
                elif "instances" in body:
                    rows = body["instances"]
                    inputs = {k: np.asarray([r[k] for r in rows], dtype=np.float32) for k in rows[0]}
                    row_format = True
                else:
                    raise ServingStatus(
                        grpc.StatusCode.INVALID_ARGUMENT, "Missing 'inputs' or 'instances' key"
                    )
                _, outputs = repository.predict(name, version, body.get("signature_name", ""), inputs)
            except ServingStatus as status:
                self._error(status)
                return
            if row_format:
                n = len(next(iter(outputs.values())))
                self._reply(
                    200,
                    {"predictions": [{k: _json_value(v[i]) for k, v in outputs.items()} for i in range(n)]},
                )
            elif len(outputs) == 1:  # TF Serving drops the name of a signature's only output
                self._reply(200, {"outputs": _json_value(next(iter(outputs.values())))})
            else:
                self._reply(200, {"outputs": {k: _json_value(v) for k, v in outputs.items()}})

    return Handler


@dataclass
class RunningRestServer:
    base_url: str


@contextlib.contextmanager
def rest_server(base_paths: dict, *, repository: ModelRepository | None = None):
    """Serve ``{model name: base path}`` over TF Serving's REST API on 127.0.0.1 (free port)."""
    repository = repository or ModelRepository(base_paths)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(repository))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield RunningRestServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
