"""TF Serving warm-up requests: ``<version>/assets.extra/tf_serving_warmup_requests``.

TF Serving replays these PredictionLog records (TFRecord file) while it loads a version and marks the
version AVAILABLE only afterwards. The first real request therefore does not pay for graph
optimisation and oneDNN kernel selection, which takes several seconds on CPU. The requests are
representative studies from the export (real views, not zeros) at batch 1, the size of a client
request. Merged batches (``--enable_batching``) have other shapes that no warm-up file can all
cover; ``batch_sizes`` adds some, at about 0.8 MB per study and view at 256 px. An axial model's
SavedModel is called twice per study: each study then warms ``localize`` and ``grade`` (with the
study's axial crops) in that order, as a client calls them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumbar_tf.core.contract import GRADE, LOCALIZE, SERVING_SIGNATURE, SERVING_WARMUP_FILE

WARMUP_STUDIES = 2  # batch-1 requests; TF Serving replays each once (num_request_iterations)


def warmup_requests(
    views: dict,
    model_name: str,
    *,
    n: int = WARMUP_STUDIES,
    batch_sizes=(),
    axial: dict | None = None,
    localizer_view: str | None = None,
) -> list:
    """PredictionLog protos for ``n`` studies of ``views`` ({name: [B, S, S, 3]}) at batch 1, plus one
    request per size in ``batch_sizes`` (studies repeated to fill it). ``axial`` ``{name: [B, 5, C,
    C, 2n+1]}``: an axial model's crops; each request is then a ``localize`` request (the
    ``localizer_view`` alone) followed by a ``grade`` request (views + axial crops)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    names = sorted(views)
    total = len(views[names[0]])
    if total == 0:
        raise ValueError("no representative studies for the warm-up requests")
    chosen = [np.arange(i, i + 1) for i in range(min(n, total))]
    chosen += [np.arange(size) % total for size in batch_sizes if size > 1]
    if axial is None:
        calls = [(SERVING_SIGNATURE, views)]
    else:
        if localizer_view is None:
            raise ValueError("an axial model's warm-up needs the localiser view's name")
        calls = [(LOCALIZE, {localizer_view: views[localizer_view]}), (GRADE, {**views, **axial})]
    logs = []
    for index in chosen:
        for signature, inputs in calls:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name in sorted(inputs):
                batch = np.asarray(inputs[name], np.float32)[index]
                request.inputs[name].CopyFrom(tf.make_tensor_proto(batch))
            logs.append(
                prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            )
    return logs


def write_warmup_requests(saved_model_dir, views: dict, model_name: str, **kwargs) -> dict:
    """Write the warm-up file into a SavedModel folder; returns what the export report records."""
    import tensorflow as tf

    path = Path(saved_model_dir) / SERVING_WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    logs = warmup_requests(views, model_name, **kwargs)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    batches = [_batch_size(log.predict_log.request) for log in logs]
    out = {"file": SERVING_WARMUP_FILE, "n_requests": len(logs), "batch_sizes": batches}
    if kwargs.get("axial") is not None:
        out["signatures"] = [log.predict_log.request.model_spec.signature_name for log in logs]
    return out


def _batch_size(request) -> int:
    return int(request.inputs[sorted(request.inputs)[0]].tensor_shape.dim[0].size)


def read_warmup_requests(saved_model_dir) -> list:
    """The PredictionLog records of a SavedModel's warm-up file (what TF Serving replays)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(saved_model_dir) / SERVING_WARMUP_FILE
    return [
        prediction_log_pb2.PredictionLog.FromString(raw)
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    ]
