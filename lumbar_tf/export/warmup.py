"""TF Serving warm-up requests: ``<version>/assets.extra/tf_serving_warmup_requests``.

TF Serving replays these PredictionLog records (TFRecord file) while it loads a version and marks the
version AVAILABLE only afterwards. The first real request therefore does not pay for graph
optimisation and oneDNN kernel selection, which takes several seconds on CPU. The requests are
representative studies from the export (real views, not zeros) at batch 1, the size of a client
request. Merged batches (``--enable_batching``) have other shapes that no warm-up file can all
cover; ``batch_sizes`` adds some, at about 0.8 MB per study and view at 256 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumbar_tf.core.contract import SERVING_SIGNATURE, SERVING_WARMUP_FILE

WARMUP_STUDIES = 2  # batch-1 requests; TF Serving replays each once (num_request_iterations)


def warmup_requests(views: dict, model_name: str, *, n: int = WARMUP_STUDIES, batch_sizes=()) -> list:
    """PredictionLog protos for ``n`` studies of ``views`` ({name: [B, S, S, 3]}) at batch 1, plus one
    request per size in ``batch_sizes`` (studies repeated to fill it)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    names = sorted(views)
    total = len(views[names[0]])
    if total == 0:
        raise ValueError("no representative studies for the warm-up requests")
    chosen = [np.arange(i, i + 1) for i in range(min(n, total))]
    chosen += [np.arange(size) % total for size in batch_sizes if size > 1]
    logs = []
    for index in chosen:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = SERVING_SIGNATURE
        for name in names:
            batch = np.asarray(views[name], np.float32)[index]
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
    batches = [int(log.predict_log.request.inputs[sorted(views)[0]].tensor_shape.dim[0].size) for log in logs]
    return {"file": SERVING_WARMUP_FILE, "n_requests": len(logs), "batch_sizes": batches}


def read_warmup_requests(saved_model_dir) -> list:
    """The PredictionLog records of a SavedModel's warm-up file (what TF Serving replays)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(saved_model_dir) / SERVING_WARMUP_FILE
    return [
        prediction_log_pb2.PredictionLog.FromString(raw)
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    ]
