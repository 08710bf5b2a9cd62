"""Is the model served? TF Serving's ModelService.GetModelStatus plus the served signature.

    lumbar-tf serving-status --server HOST:8500 [--model-name lumbar_spine]

For readiness probes and roll-outs: exit 0 and the version that answers once a version is
AVAILABLE (its warm-up requests have run); exit 1 with one line while none is (LOADING, UNLOADING,
or the server cannot be reached). It also says whether the version serves its own preprocessing
(the ``metadata`` signature that `ServingPredictor` reads) and what that preprocessing is.
"""

from __future__ import annotations

from lumbar_tf.core.contract import METADATA_SIGNATURE, OUTPUT_NAMES, SERVING_SIGNATURE
from lumbar_tf.core.errors import ServingError


def serving_status(client) -> dict:
    """``{"model", "versions": [{"version", "state", "error"}], "serving": newest AVAILABLE version,
    "signature": {inputs, outputs} of what answers}`` for a `GrpcClient`'s model."""
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    client._fill_spec(request.model_spec, signature=False)
    stub = model_service_pb2_grpc.ModelServiceStub(client._channel)
    response = client._call(stub.GetModelStatus, request, "model status")
    state_name = get_model_status_pb2.ModelVersionStatus.State.Name
    versions = [
        {
            "version": int(status.version),
            "state": state_name(status.state),
            "error": status.status.error_message or None,
        }
        for status in sorted(response.model_version_status, key=lambda s: -s.version)
    ]
    available = [v["version"] for v in versions if v["state"] == "AVAILABLE"]
    states = ", ".join(f"{v['version']}: {v['state']}" for v in versions) or "no versions"
    if not available:
        raise ServingError(
            f"TF Serving at {client.target}: {client._model_ref()} has no AVAILABLE version ({states})",
            code="UNAVAILABLE",
            target=client.target,
        )
    metadata = client.metadata()
    signature = metadata["signatures"].get(SERVING_SIGNATURE)
    missing = sorted(set(OUTPUT_NAMES) - set((signature or {}).get("outputs", {})))
    if signature is None or missing:
        lacks = ", ".join(missing) or "everything"
        raise ServingError(
            f"TF Serving at {client.target}: {client._model_ref()} version {metadata['model_version']} is "
            f"not a lumbar-tf export (signature {SERVING_SIGNATURE} lacks {lacks})",
            code="CLIENT",
            target=client.target,
        )
    served = None
    if METADATA_SIGNATURE in metadata["signatures"]:
        meta, version = client.served_metadata()
        cfg = meta["preprocess"]
        served = {
            "version": version,
            "views": [v.get("name") for v in cfg.get("views") or []],
            "view_size": cfg.get("view_size"),
            "quality_bounds": (meta.get("quality_bounds") or {}).get("source"),
        }
    return {
        "model": client.model_name,
        "versions": versions,
        "serving": metadata["model_version"] or max(available),
        "signature": signature,
        "metadata": served,
    }


def status_lines(status: dict) -> list[str]:
    states = ", ".join(f"{v['version']} {v['state']}" for v in status["versions"])
    inputs = ", ".join(status["signature"]["inputs"])
    served = status.get("metadata")
    if served:
        meta_line = (
            f"  {METADATA_SIGNATURE}: preprocessing served by version {served['version']} "
            f"({', '.join(served['views'])} at {served['view_size']} px; quality bounds: "
            f"{served['quality_bounds'] or 'fallback'})"
        )
    else:
        meta_line = f"  {METADATA_SIGNATURE}: not served (older export): clients need its metadata.json"
    return [
        f"{status['model']}: serving version {status['serving']} (versions: {states})",
        f"  {SERVING_SIGNATURE}: {inputs} -> {', '.join(status['signature']['outputs'])}",
        meta_line,
    ]
