"""A predictor (`runtime.predictor`) that calls TF Serving, over gRPC or REST.

    predictor = ServingPredictor(GrpcClient("tf-serving:8500"), metadata="export/metadata.json")
    result = predict_study(predictor, "test_images/44036939")

The preprocessing parameters come from the export's metadata.json, so the client and the served
model never disagree on view size or slice offsets.
"""

from __future__ import annotations

from lumbar_tf.core import labels
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata


class ServingPredictor:
    """TF Serving as a predictor.

    Args:
        client: a `serving.grpc.GrpcClient` or `serving.rest.RestClient` (``predict``, ``model_info``).
        metadata: the export's metadata dict, or a path `artifacts.load_export_metadata` accepts.
    """

    def __init__(self, client, metadata):
        self.client = client
        self.metadata = metadata if isinstance(metadata, dict) else load_export_metadata(metadata)
        self.preprocess = preprocess_config_from_metadata(self.metadata)
        self.label_semantics = labels.semantics_or_default(self.metadata.get("label_semantics"))
        self.fine_grades = self.label_semantics["fine_grades"]
        self.prior_threshold_probs = (self.metadata.get("prior") or {}).get("threshold_probs")
        self.quality_bounds = self.metadata.get("quality_bounds")
        self.target = getattr(client, "target", "")

    def predict_views(self, views: dict) -> dict:
        return self.client.predict(views)

    def model_info(self) -> dict:
        info = dict(self.client.model_info())
        if info.get("version") is None:
            info["version"] = self.metadata.get("version")
        return info

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
