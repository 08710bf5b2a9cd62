"""The SavedModel predictor: ``serving_default`` of an exported version, in process (TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumbar_tf.core import labels
from lumbar_tf.core.contract import METADATA_FILE, SERVING_SIGNATURE
from lumbar_tf.core.errors import ConfigError, ModelLoadError
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata


class SavedModelRunner:
    """``serving_default`` of a SavedModel folder, called with numpy views."""

    def __init__(self, path):
        import tensorflow as tf

        self._tf = tf
        self.loaded = tf.saved_model.load(str(path))
        self.fn = self.loaded.signatures[SERVING_SIGNATURE]

    def predict_views(self, views: dict, batch_size: int = 16) -> dict[str, np.ndarray]:
        names = list(self.fn.structured_input_signature[1])
        n = len(views[names[0]])
        parts = []
        for i in range(0, n, batch_size):
            feed = {k: self._tf.constant(np.asarray(views[k][i : i + batch_size], np.float32)) for k in names}
            parts.append({k: v.numpy() for k, v in self.fn(**feed).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class SavedModelPredictor:
    """A predictor (`runtime.predictor`) over a SavedModel version folder and its ``metadata.json``."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / METADATA_FILE).is_file():
            raise ModelLoadError(
                f"{self.path}: no {METADATA_FILE} beside the SavedModel (export it with lumbar-tf export)"
            )
        try:
            self.metadata = load_export_metadata(self.path)
            self.preprocess = preprocess_config_from_metadata(self.metadata)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        self.label_semantics = labels.semantics_or_default(self.metadata.get("label_semantics"))
        self.fine_grades = self.label_semantics["fine_grades"]
        self.prior_threshold_probs = (self.metadata.get("prior") or {}).get("threshold_probs")
        self.quality_bounds = self.metadata.get("quality_bounds")
        try:
            self.runner = SavedModelRunner(self.path)
        except Exception as exc:  # noqa: BLE001  (TF raises OSError, ValueError, KeyError, ... here)
            raise ModelLoadError(f"{self.path}: cannot load SavedModel ({exc.__class__.__name__})") from None
        inputs = set(self.runner.fn.structured_input_signature[1])
        if inputs != set(self.preprocess.view_names):
            raise ModelLoadError(
                f"{self.path}: signature {SERVING_SIGNATURE} takes {sorted(inputs)}, {METADATA_FILE} says "
                f"{sorted(self.preprocess.view_names)}"
            )

    def predict_views(self, views: dict) -> dict:
        return self.runner.predict_views(views)

    def model_info(self) -> dict:
        return {
            "name": self.metadata.get("name", self.path.parent.name),
            "version": self.metadata.get("version"),
            "format": "saved_model",
        }
