"""TF Serving PredictionService over gRPC (tensorflow-serving-api), for back-end teams.

    client = GrpcClient("tf-serving:8500")
    outputs = client.predict({"sag_t2": view_t2, "sag_t1": view_t1})   # [H,W,3] or [B,H,W,3], 0-255

TensorFlow (needed by the gRPC protos) is imported when a client is built, not at import.
"""

from __future__ import annotations

import numpy as np

from lumbar_tf.core.contract import (
    DEFAULT_MODEL_NAME,
    METADATA_INPUT,
    METADATA_OUTPUT,
    METADATA_SIGNATURE,
    SERVING_SIGNATURE,
)
from lumbar_tf.core.errors import ServingError
from lumbar_tf.runtime.serving.common import (
    MAX_MESSAGE_BYTES,
    MAX_RESPONSE_BYTES,
    no_metadata_signature,
    one_line,
    parse_served_metadata,
    prepare_views,
    retry,
    try_timeout,
)

MODEL_FORMAT = "saved_model"


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
    from tensorflow.core.framework import types_pb2

    if proto.dtype == types_pb2.DT_STRING:  # the metadata signature's JSON
        shape = [d.size for d in proto.tensor_shape.dim]
        return np.asarray(list(proto.string_val), dtype=object).reshape(shape)
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
        retries: tries in all for transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED by
            a server going away); other errors are raised at once.
        backoff_s: sleep before the second try; doubles before each further try.
        version: pin a model version (default: the latest version the server has loaded).
        version_label: or a version label (``stable``/``canary``) set in the server's model config.
        max_response_bytes: an answer larger than this is refused by gRPC before it is held whole.
    """

    # CANCELLED: this client never cancels, so it is the server going away mid-call (a restart).
    transient_codes = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")

    def __init__(
        self,
        target: str = "localhost:8500",
        model_name: str = DEFAULT_MODEL_NAME,
        signature_name: str = SERVING_SIGNATURE,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        version: int | None = None,
        *,
        version_label: str | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
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
        self.max_response_bytes = int(max_response_bytes)
        self._grpc = grpc
        self._predict_pb2 = predict_pb2
        self._metadata_pb2 = get_model_metadata_pb2
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", int(max_response_bytes)),
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

    def _call(self, method, request, what: str, deadline: float | None = None, signature=None):
        grpc = self._grpc

        def transient(exc) -> bool:
            return isinstance(exc, grpc.RpcError) and exc.code().name in self.transient_codes

        try:
            return retry(
                lambda: method(request, timeout=try_timeout(self.timeout_s, deadline)),
                tries=self.retries,
                backoff_s=self.backoff_s,
                transient=transient,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, what, signature or self.signature_name) from None
        except TimeoutError:  # the study's deadline passed between tries or calls
            raise ServingError(
                f"TF Serving at {self.target} did not answer {what} within the study's deadline "
                f"({self.timeout_s:g} s for all its calls)",
                code="DEADLINE_EXCEEDED",
                target=self.target,
            ) from None

    def _error(self, exc, what: str, signature: str) -> ServingError:
        code = exc.code().name
        detail = one_line(exc.details() or "")
        tries = max(1, self.retries)
        at = f"TF Serving at {self.target}"
        if code == "CANCELLED":
            msg = f"{at} dropped the {what} call after {tries} tries (restarting?): {detail}"
            code = "UNAVAILABLE"
        elif code == "UNAVAILABLE" and "queue" in detail.lower():  # batching queue full: server is up
            msg = f"{at} is overloaded after {tries} tries: {detail}"
        elif code == "UNAVAILABLE":
            msg = f"cannot reach {at} after {tries} tries ({detail})"
        elif code == "DEADLINE_EXCEEDED":
            msg = f"{at} did not answer {what} within {self.timeout_s:g} s ({tries} tries)"
        elif code == "RESOURCE_EXHAUSTED" and "larger than max" in detail.lower():  # our receive cap
            msg = (
                f"{at} sent an answer to {what} over the {self.max_response_bytes}-byte limit "
                f"(max_response_bytes): {detail}"
            )
            code = "CLIENT"
        elif code == "RESOURCE_EXHAUSTED":
            msg = f"{at} refused the {what} request (too large or out of resources): {detail}"
        elif code == "NOT_FOUND":
            msg = f"{self._model_ref()} is not served by {at}: {detail}"
        elif code == "FAILED_PRECONDITION" and "signature key" in detail.lower():
            msg = f"{self._model_ref()} at {self.target} has no signature '{signature}': {detail}"
        elif code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION"):
            msg = (
                f"{at} rejected the {what} request for {self._model_ref()} "
                f"(signature '{signature}'): {detail}"
            )
        elif code == "UNIMPLEMENTED":
            msg = f"{at} does not implement {what}: {detail}"
        else:
            msg = f"{at} failed on {what} ({code}): {detail}"
        return ServingError(msg, code=code, target=self.target)

    # --- API ---

    def predict(
        self, views: dict, *, signature: str | None = None, deadline: float | None = None, level_inputs=()
    ) -> dict[str, np.ndarray]:
        """Run the signature on ``views`` ``{input name: [H,W,3] or [B,H,W,3]}`` (0-255 values).

        Returns every output of the signature as a numpy array with the batch axis, e.g.
        ``threshold_probs [B,5,5,3]``. ``signature``: another signature than the client's (an axial
        model's ``localize`` / ``grade``); ``deadline``: a ``time.monotonic()`` instant that also
        bounds this call (the calls of one study share it); ``level_inputs``: names of
        ``[B,5,S,S,C]`` inputs (`common.prepare_views`). Raises `ServingError`.
        """
        arrays = prepare_views(views, level_inputs)
        request = self._predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, signature=True)
        if signature is not None:
            request.model_spec.signature_name = signature
        for name, arr in arrays.items():
            request.inputs[name].CopyFrom(ndarray_to_tensor_proto(arr))
        response = self._call(self._stub.Predict, request, "predict", deadline, signature)
        if response.model_spec.HasField("version"):
            self.last_version = int(response.model_spec.version.value)
        return {name: tensor_proto_to_ndarray(proto) for name, proto in response.outputs.items()}

    def served_metadata(self) -> tuple[dict, int | None]:
        """The served version's metadata.json (its ``metadata`` signature) and the version that
        answered, so a caller can pin that version: its preprocessing is then the one it runs."""
        request = self._predict_pb2.PredictRequest()
        self._fill_spec(request.model_spec, signature=False)
        request.model_spec.signature_name = METADATA_SIGNATURE
        request.inputs[METADATA_INPUT].CopyFrom(ndarray_to_tensor_proto(np.zeros([1], np.float32)))
        try:
            response = self._call(self._stub.Predict, request, "metadata", signature=METADATA_SIGNATURE)
        except ServingError as exc:
            if exc.code == "FAILED_PRECONDITION" and "signature" in str(exc).lower():
                raise no_metadata_signature(self.target, self._model_ref(), str(exc)) from None
            raise
        if METADATA_OUTPUT not in response.outputs:
            raise parse_served_metadata([], self.target, self._model_ref())  # raises: no metadata
        meta = parse_served_metadata(
            tensor_proto_to_ndarray(response.outputs[METADATA_OUTPUT]), self.target, self._model_ref()
        )
        version = int(response.model_spec.version.value) if response.model_spec.HasField("version") else None
        return meta, version

    def pin(self, version: int) -> None:
        """Call ``version`` from now on (not the label or the latest)."""
        self.version, self.version_label = int(version), None

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
