"""Clients for the lumbar-tf model served by TF Serving (gRPC and REST), for back-end teams.

    from lumbar_tf.serving_client import GrpcClient, RestClient, predict_study

    client = GrpcClient("tf-serving:8500")                 # or RestClient("http://tf-serving:8501")
    outputs = client.predict({"sag_t2": view_t2, "sag_t1": view_t1})   # [H,W,3] or [B,H,W,3], 0-255
    outputs["threshold_probs"]                              # [B,5,5,3] float32

    preds = predict_study(client, "train_images/4003253", metadata="export/saved_model/lumbar_spine/3")

Both clients send float32 views, use a deadline per call, retry with exponential back-off only on
transient failures (server unreachable, deadline exceeded, overloaded) and raise `ServingError` with a
one-line message otherwise. Importing this module is cheap: TensorFlow (needed by the gRPC protos) is
imported when a `GrpcClient` is built, never by `RestClient`.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from lumbar_tf import predictions
from lumbar_tf.config import ConfigError, PreprocessConfig, _from_dict

DEFAULT_MODEL_NAME = "lumbar_spine"
DEFAULT_SIGNATURE = "serving_default"
OUTPUT_NAMES = ("grade_probs", "threshold_probs", "presence", "level_xy")
MODEL_FORMAT = "saved_model"
# The in-graph request of one study is ~0.9 MB at 192 px; batches of studies can pass gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_MAX_DETAIL_CHARS = 400


class ServingError(RuntimeError):
    """A failed call to TF Serving, with a one-line message.

    Attributes:
        code: gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...) or ``"HTTP 404"`` style for REST.
        target: the server address that was called.
    """

    def __init__(self, message: str, *, code: str = "UNKNOWN", target: str = ""):
        super().__init__(message)
        self.code = code
        self.target = target


def _one_line(text, limit: int = _MAX_DETAIL_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# === Input checks shared by both clients ===


def prepare_views(views: dict) -> dict[str, np.ndarray]:
    """Views ``{name: [H,W,3] or [B,H,W,3]}`` -> float32 ``[B,H,W,3]`` arrays with one shared batch size.

    Only the array layout is checked here; which names and sizes the model wants is the server's call
    (its error comes back as a `ServingError`).
    """
    if not isinstance(views, dict) or not views:
        raise ServingError("views: expected a non-empty dict {input name: array}", code="CLIENT")
    out = {}
    batch = None
    for name, value in views.items():
        arr = np.asarray(value)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ServingError(
                f"views[{name!r}]: expected shape [H,W,3] or [B,H,W,3], got {list(np.shape(value))}",
                code="CLIENT",
            )
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ServingError(f"views[{name!r}]: expected numbers, got dtype {arr.dtype}", code="CLIENT")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise ServingError(f"views[{name!r}]: contains NaN or infinite values", code="CLIENT")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise ServingError(
                f"views: batch sizes differ ({name!r} has {arr.shape[0]}, expected {batch})", code="CLIENT"
            )
        out[str(name)] = arr
    return out


def _retry(call, *, tries: int, backoff_s: float, transient) -> object:
    """Run ``call()``; on a transient exception sleep ``backoff_s * 2**k`` and try again, ``tries`` in all."""
    tries = max(1, int(tries))
    for attempt in range(tries):
        try:
            return call()
        except Exception as exc:
            if not transient(exc) or attempt == tries - 1:
                raise
            time.sleep(backoff_s * (2**attempt))
    raise AssertionError("unreachable")


# === gRPC ===

_GRPC_DTYPES = None  # numpy dtype per TensorFlow DataType enum, built on first use


def _dtype_tables():
    global _GRPC_DTYPES
    if _GRPC_DTYPES is None:
        from tensorflow.core.framework import types_pb2

        _GRPC_DTYPES = {
            types_pb2.DT_FLOAT: (np.float32, "float_val"),
            types_pb2.DT_DOUBLE: (np.float64, "double_val"),
            types_pb2.DT_HALF: (np.float16, "half_val"),
            types_pb2.DT_INT32: (np.int32, "int_val"),
            types_pb2.DT_INT64: (np.int64, "int64_val"),
            types_pb2.DT_UINT8: (np.uint8, "int_val"),
            types_pb2.DT_BOOL: (np.bool_, "bool_val"),
        }
    return _GRPC_DTYPES


def ndarray_to_tensor_proto(arr: np.ndarray):
    """float32 array -> ``tensorflow.TensorProto`` (raw little-endian content, like tf.make_tensor_proto)."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    arr = np.ascontiguousarray(arr, dtype="<f4")
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(s)) for s in arr.shape]
    )
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=arr.tobytes())


def tensor_proto_to_ndarray(proto) -> np.ndarray:
    """``tensorflow.TensorProto`` -> numpy array (the subset of dtypes TF Serving returns for this model)."""
    tables = _dtype_tables()
    if proto.dtype not in tables:
        raise ServingError(
            f"TF Serving returned an unsupported tensor dtype (enum {proto.dtype})", code="CLIENT"
        )
    dtype, field = tables[proto.dtype]
    shape = [d.size for d in proto.tensor_shape.dim]
    size = int(np.prod(shape)) if shape else 1
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=np.dtype(dtype).newbyteorder("<"))
    else:
        values = getattr(proto, field)
        if field == "half_val":
            flat = np.asarray(values, dtype=np.uint16).view(np.float16)
        else:
            flat = np.asarray(values, dtype=dtype)
        if flat.size == 1 and size > 1:  # TF packs a constant tensor as one repeated value
            flat = np.full(size, flat[0], dtype=dtype)
    if flat.size != size:
        raise ServingError(
            f"TF Serving returned a malformed tensor ({flat.size} values for {shape})", code="CLIENT"
        )
    return flat.astype(dtype, copy=False).reshape(shape)


class GrpcClient:
    """TF Serving PredictionService over gRPC.

    Args:
        target: ``host:port`` of the gRPC endpoint (TF Serving's ``--port``, 8500 by default).
        model_name: the served model's name (``model_config_list { config { name } }``).
        signature_name: signature to call (``serving_default``).
        timeout_s: deadline of each call in seconds.
        retries: tries in all for transient failures (UNAVAILABLE, DEADLINE_EXCEEDED); other errors
            are raised at once.
        backoff_s: sleep before the second try; doubles before each further try.
        version: pin a model version (default: the latest version the server has loaded).
        version_label: or a version label (``stable``/``canary``) set in the server's model config.
    """

    transient_codes = ("UNAVAILABLE", "DEADLINE_EXCEEDED")

    def __init__(
        self,
        target: str = "localhost:8500",
        model_name: str = DEFAULT_MODEL_NAME,
        signature_name: str = DEFAULT_SIGNATURE,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        version: int | None = None,
        *,
        version_label: str | None = None,
    ):
        import grpc
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            predict_pb2,
            prediction_service_pb2_grpc,
        )

        if version is not None and version_label is not None:
            raise ValueError("give either version or version_label, not both")
        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.version = None if version is None else int(version)
        self.version_label = version_label
        self.last_version: int | None = None  # version that answered the last predict()
        self._grpc = grpc
        self._predict_pb2 = predict_pb2
        self._metadata_pb2 = get_model_metadata_pb2
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Reconnect soon after a failed connect so our own back-off decides the pace.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    # --- plumbing ---

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"GrpcClient({self.target!r}, model_name={self.model_name!r}, version={self.version!r})"

    def _model_ref(self) -> str:
        if self.version is not None:
            return f"model '{self.model_name}' version {self.version}"
        if self.version_label is not None:
            return f"model '{self.model_name}' label '{self.version_label}'"
        return f"model '{self.model_name}'"

    def _fill_spec(self, spec, signature: bool) -> None:
        spec.name = self.model_name
        if signature:
            spec.signature_name = self.signature_name
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label is not None:
            spec.version_label = self.version_label

    def _call(self, method, request, what: str):
        grpc = self._grpc

        def transient(exc) -> bool:
            return isinstance(exc, grpc.RpcError) and exc.code().name in self.transient_codes

        try:
            return _retry(
                lambda: method(request, timeout=self.timeout_s),
                tries=self.retries,
                backoff_s=self.backoff_s,
                transient=transient,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, what) from None

    def _error(self, exc, what: str) -> ServingError:
        code = exc.code().name
        detail = _one_line(exc.details() or "")
        tries = max(1, self.retries)
        at = f"TF Serving at {self.target}"
        if code == "UNAVAILABLE" and "queue" in detail.lower():  # batching queue full: server is up
            msg = f"{at} is overloaded after {tries} tries: {detail}"
        elif code == "UNAVAILABLE":
            msg = f"cannot reach {at} after {tries} tries ({detail})"
        elif code == "DEADLINE_EXCEEDED":
            msg = f"{at} did not answer {what} within {self.timeout_s:g} s ({tries} tries)"
        elif code == "RESOURCE_EXHAUSTED":
            msg = f"{at} refused the {what} request (too large or out of resources): {detail}"
        elif code == "NOT_FOUND":
            msg = f"{self._model_ref()} is not served by {at}: {detail}"
        elif code == "FAILED_PRECONDITION" and "signature key" in detail.lower():
            msg = f"{self._model_ref()} at {self.target} has no signature '{self.signature_name}': {detail}"
        elif code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
            msg = (
                f"{at} rejected the {what} request for {self._model_ref()} "
                f"(signature '{self.signature_name}'): {detail}"
            )
        elif code == "UNIMPLEMENTED":
            msg = f"{at} does not implement {what}: {detail}"
        else:
            msg = f"{at} failed on {what} ({code}): {detail}"
        return ServingError(msg, code=code, target=self.target)

    # --- API ---

    def predict(self, views: dict) -> dict[str, np.ndarray]:
        """Run the signature on ``views`` ``{input name: [H,W,3] or [B,H,W,3]}`` (0-255 values).

        Returns every output of the signature as a numpy array with the batch axis, e.g.
        ``threshold_probs [B,5,5,3]``. Raises `ServingError`.
        """
        arrays = prepare_views(views)
        request = self._predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, signature=True)
        for name, arr in arrays.items():
            request.inputs[name].CopyFrom(ndarray_to_tensor_proto(arr))
        response = self._call(self._stub.Predict, request, "predict")
        if response.model_spec.HasField("version"):
            self.last_version = int(response.model_spec.version.value)
        return {name: tensor_proto_to_ndarray(proto) for name, proto in response.outputs.items()}

    def metadata(self) -> dict:
        """The served signatures as ``{signature: {"inputs": {name: {dtype, shape}}, "outputs": {...}}}``.

        Also ``"model_version"``: the version that answered. Uses GetModelMetadata(signature_def).
        """
        request = self._metadata_pb2.GetModelMetadataRequest()
        self._fill_spec(request.model_spec, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self._stub.GetModelMetadata, request, "metadata")
        sig_map = self._metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(sig_map):
            raise ServingError(
                f"TF Serving at {self.target} sent no signature_def metadata", target=self.target
            )
        out: dict = {
            "model_version": int(response.model_spec.version.value)
            if response.model_spec.HasField("version")
            else None
        }
        out["signatures"] = {key: _signature_summary(sig) for key, sig in sig_map.signature_def.items()}
        return out

    def model_info(self) -> dict:
        """``{"name", "version", "format"}`` for predictions.json (version: pinned, else last answer)."""
        return {
            "name": self.model_name,
            "version": self.version if self.version is not None else self.last_version,
            "format": MODEL_FORMAT,
        }


def _signature_summary(signature_def) -> dict:
    from tensorflow.core.framework import types_pb2

    def tensors(mapping) -> dict:
        out = {}
        for name, info in mapping.items():
            dims = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
            out[name] = {"dtype": types_pb2.DataType.Name(info.dtype), "shape": dims}
        return out

    return {"inputs": tensors(signature_def.inputs), "outputs": tensors(signature_def.outputs)}


# === REST ===


class _RestStatus(Exception):
    """HTTP error status from TF Serving, with its ``{"error": ...}`` text."""

    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


class RestClient:
    """TF Serving REST API (``POST /v1/models/<name>[/versions/<v>]:predict``, columnar ``inputs``).

    Args:
        base_url: ``http://host:port`` of TF Serving's ``--rest_api_port`` (8501 by default).
        model_name: the served model's name.
        signature_name: signature to call.
        version: pin a model version (default: latest).
        timeout_s: socket timeout of each call in seconds.
        retries: tries in all for transient failures (connection refused/reset, timeouts, HTTP 502/503/504,
            i.e. TF Serving's UNAVAILABLE and DEADLINE_EXCEEDED); other errors are raised at once.
        backoff_s: sleep before the second try; doubles before each further try.
        proxies: ``{"http": url}`` to go through a proxy; by default the server is called directly
            (environment proxy variables are ignored, so an in-cluster call never leaves the cluster).
    """

    transient_statuses = (502, 503, 504)

    def __init__(
        self,
        base_url: str = "http://localhost:8501",
        model_name: str = DEFAULT_MODEL_NAME,
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        *,
        proxies: dict | None = None,
    ):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = None if version is None else int(version)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies or {}))

    def __repr__(self) -> str:
        return f"RestClient({self.base_url!r}, model_name={self.model_name!r}, version={self.version!r})"

    @property
    def target(self) -> str:
        return self.base_url

    def _model_url(self) -> str:
        url = f"{self.base_url}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def _model_ref(self) -> str:
        if self.version is not None:
            return f"model '{self.model_name}' version {self.version}"
        return f"model '{self.model_name}'"

    def _request_once(self, url: str, body: bytes | None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                text = json.loads(raw).get("error", "")
            except (ValueError, AttributeError):
                text = raw.decode("utf-8", "replace")
            raise _RestStatus(exc.code, _one_line(text or exc.reason)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise ServingError(
                f"TF Serving at {self.base_url} answered with something that is not JSON",
                code="CLIENT",
                target=self.base_url,
            ) from None

    def _transient(self, exc) -> bool:
        if isinstance(exc, _RestStatus):
            return exc.status in self.transient_statuses
        return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout))

    def _call(self, url: str, body: bytes | None, what: str) -> dict:
        try:
            return _retry(
                lambda: self._request_once(url, body),
                tries=self.retries,
                backoff_s=self.backoff_s,
                transient=self._transient,
            )
        except _RestStatus as exc:
            raise self._status_error(exc, what) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            tries = max(1, self.retries)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                msg = (
                    f"TF Serving at {self.base_url} did not answer {what} "
                    f"within {self.timeout_s:g} s ({tries} tries)"
                )
                code = "DEADLINE_EXCEEDED"
            else:
                msg = f"cannot reach TF Serving at {self.base_url} after {tries} tries ({_one_line(reason)})"
                code = "UNAVAILABLE"
            raise ServingError(msg, code=code, target=self.base_url) from None

    def _status_error(self, exc: _RestStatus, what: str) -> ServingError:
        at = f"TF Serving at {self.base_url}"
        code = f"HTTP {exc.status}"
        if exc.status == 404:
            msg = f"{self._model_ref()} is not served by {at}: {exc.text}"
        elif exc.status == 400 and "signature key" in exc.text.lower():
            msg = (
                f"{self._model_ref()} at {self.base_url} has no signature '{self.signature_name}': {exc.text}"
            )
        elif exc.status == 400:
            msg = (
                f"{at} rejected the {what} request for {self._model_ref()} "
                f"(signature '{self.signature_name}'): {exc.text}"
            )
        elif exc.status in self.transient_statuses:
            msg = f"{at} is overloaded or unavailable after {max(1, self.retries)} tries ({code}): {exc.text}"
        else:
            msg = f"{at} failed on {what} ({code}): {exc.text}"
        return ServingError(msg, code=code, target=self.base_url)

    # --- API ---

    def predict(self, views: dict) -> dict[str, np.ndarray]:
        """Same contract as `GrpcClient.predict`: float32 views in, numpy outputs (with batch axis) out."""
        arrays = prepare_views(views)
        payload = {
            "signature_name": self.signature_name,
            "inputs": {k: v.tolist() for k, v in arrays.items()},
        }
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        answer = self._call(f"{self._model_url()}:predict", body, "predict")
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if outputs is None:
            raise ServingError(
                f"TF Serving at {self.base_url} answered predict without 'outputs'",
                code="CLIENT",
                target=self.base_url,
            )
        if not isinstance(outputs, dict):  # a signature with a single output is sent unnamed
            outputs = {"output_0": outputs}
        return {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}

    def status(self) -> dict:
        """``GET /v1/models/<name>[/versions/<v>]``: the versions and their state (AVAILABLE, LOADING...)."""
        return self._call(self._model_url(), None, "status")

    def metadata(self) -> dict:
        """``GET /v1/models/<name>[/versions/<v>]/metadata``: the signature definitions as JSON."""
        return self._call(f"{self._model_url()}/metadata", None, "metadata")

    def model_info(self) -> dict:
        """``{"name", "version", "format"}`` for predictions.json (REST answers do not name the version)."""
        return {"name": self.model_name, "version": self.version, "format": MODEL_FORMAT}


# === Export metadata and whole-study prediction ===

METADATA_FILE = "metadata.json"


def find_export_metadata(path) -> Path:
    """Locate ``metadata.json`` from a file, a version folder, a model folder (newest version) or the
    export root (``EXPORT/metadata.json`` or ``EXPORT/saved_model/<name>/<newest version>/``)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / METADATA_FILE, path / "assets.extra" / METADATA_FILE]
    versions = sorted(
        (p for p in path.glob("*") if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if versions:
        candidates += [versions[-1] / METADATA_FILE, versions[-1] / "assets.extra" / METADATA_FILE]
    models = sorted(p for p in (path / "saved_model").glob("*") if p.is_dir())
    if len(models) == 1:
        newest = sorted((p for p in models[0].glob("*") if p.name.isdigit()), key=lambda p: int(p.name))
        if newest:
            candidates.append(newest[-1] / METADATA_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: no {METADATA_FILE} found (pass the export's metadata.json)")


def load_export_metadata(path) -> dict:
    """Read the export's ``metadata.json`` (see `find_export_metadata` for what ``path`` may be)."""
    file = find_export_metadata(path)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return meta


def preprocess_config_from_metadata(meta: dict) -> PreprocessConfig:
    """The `PreprocessConfig` the model was trained with, from metadata ``{"preprocess": {...}}``."""
    if "preprocess" not in meta or not isinstance(meta["preprocess"], dict):
        raise ConfigError("metadata.json: no 'preprocess' mapping (export with lumbar-tf export)")
    cfg = _from_dict(PreprocessConfig, meta["preprocess"], "preprocess")
    if not cfg.views or len({v.name for v in cfg.views}) != len(cfg.views):
        raise ConfigError("preprocess.views: bad value")
    return cfg


def predict_study(
    client,
    study_dir,
    cfg: PreprocessConfig | None = None,
    *,
    metadata: dict | str | Path | None = None,
    study_id: str | None = None,
    fine_grades: bool | None = None,
    series_descriptions: dict[str, str] | None = None,
) -> dict:
    """Read one DICOM study, preprocess it exactly as in training, call TF Serving, return predictions.json.

    Args:
        client: a `GrpcClient` or `RestClient` (anything with ``predict(views)`` and ``model_info()``).
        study_dir: folder ``{study_id}/{series_id}/{instance}.dcm`` (RSNA layout).
        cfg: preprocessing config; default: from ``metadata`` (the export's metadata.json, the
            source of truth, so client and model never disagree on view size or slice offsets).
        metadata: the export's metadata dict, or a path accepted by `load_export_metadata`.
        study_id: defaults to the study's id (its folder name).
        fine_grades: presence as P(>=1) (fine grades known in training) or P(>=2); default from
            metadata ``fine_grades`` if present, else True.
        series_descriptions: ``series_id -> description`` of this study (RSNA
            ``*_series_descriptions.csv``); series not in it are typed from their DICOM headers.
    """
    from lumbar_tf import dicom, preprocess

    if metadata is not None and not isinstance(metadata, dict):
        metadata = load_export_metadata(metadata)
    if cfg is None:
        if metadata is None:
            raise ConfigError(
                "predict_study: pass cfg or the export's metadata.json (preprocessing parameters)"
            )
        cfg = preprocess_config_from_metadata(metadata)
    if fine_grades is None:
        fine_grades = bool((metadata or {}).get("fine_grades", True))

    study = dicom.read_study(study_dir, series_descriptions)
    views, grid, info, warnings = preprocess.build_views(study, cfg)
    warnings = list(warnings)
    size = cfg.view_size
    batch = {}
    for name in cfg.view_names:
        view = views.get(name)
        if view is None:  # the model is trained with missing views as zeros
            warnings.append(f"view {name} missing; fed as zeros")
            view = np.zeros((size, size, 3), dtype=np.uint8)
        batch[name] = np.asarray(view)[None]
    outputs = client.predict(batch)
    missing = [k for k in ("threshold_probs", "level_xy") if k not in outputs]
    if missing:
        raise ServingError(
            f"the served model has no output {', '.join(missing)} (is it a lumbar-tf export?)",
            code="CLIENT",
            target=getattr(client, "target", ""),
        )
    threshold_probs = np.asarray(outputs["threshold_probs"])[0]
    level_xy = np.asarray(outputs["level_xy"])[0]
    positions = predictions.level_positions_from_views(study, grid, info, level_xy, cfg, warnings)
    info_model = dict(client.model_info())
    if info_model.get("version") is None and metadata is not None:
        info_model["version"] = metadata.get("version")
    return predictions.build_predictions(
        study_id if study_id is not None else study.study_id,
        threshold_probs,
        level_xy,
        model_info=info_model,
        level_positions=positions,
        warnings=warnings,
        fine_grades=fine_grades,
    )


__all__ = [
    "DEFAULT_MODEL_NAME",
    "GrpcClient",
    "OUTPUT_NAMES",
    "RestClient",
    "ServingError",
    "load_export_metadata",
    "predict_study",
    "preprocess_config_from_metadata",
    "prepare_views",
]
