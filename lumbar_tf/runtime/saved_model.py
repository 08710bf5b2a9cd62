"""The SavedModel predictor: an exported version, in process (TensorFlow).

A sagittal-only version answers ``serving_default`` (one call per study); an axial one ``localize``
then ``grade`` with the axial crops `runtime.predictor.predict_study` cuts between them (contract
`AXIAL_SIGNATURES`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lumbar_tf.core import labels
from lumbar_tf.core.contract import GRADE, LEVEL_XY, LOCALIZE, METADATA_FILE, SERVING_SIGNATURE
from lumbar_tf.core.errors import ConfigError, ModelLoadError
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata


class SavedModelRunner:
    """The prediction signatures of a SavedModel folder, called with numpy arrays.

    ``fn`` is the signature returning the contract's outputs: ``grade`` when the SavedModel has the
    axial model's ``localize`` + ``grade`` pair, else ``serving_default``."""

    def __init__(self, path):
        import tensorflow as tf

        self._tf = tf
        self.loaded = tf.saved_model.load(str(path))
        signatures = self.loaded.signatures
        self.axial = LOCALIZE in signatures and GRADE in signatures
        self.fn = signatures[GRADE] if self.axial else signatures[SERVING_SIGNATURE]
        self.localize_fn = signatures[LOCALIZE] if self.axial else None
        self.signature = GRADE if self.axial else SERVING_SIGNATURE

    def input_names(self) -> list[str]:
        return list(self.fn.structured_input_signature[1])

    def _batched(self, fn, inputs: dict, batch_size: int) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        parts = []
        for i in range(0, n, batch_size):
            feed = {
                k: self._tf.constant(np.asarray(v[i : i + batch_size], np.float32)) for k, v in inputs.items()
            }
            parts.append({k: v.numpy() for k, v in fn(**feed).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def predict_views(self, views: dict, batch_size: int = 16, axial=None) -> dict[str, np.ndarray]:
        """Views ``{name: [B, S, S, 3]}`` (and an axial model's crops ``[B, 5, C, C, 2n+1]``, fed to
        the input the signature names beside the views) -> the contract's outputs."""
        names = self.input_names()
        inputs = {k: views[k] for k in names if k in views}
        extra = [k for k in names if k not in views]
        if extra:
            if axial is None or len(extra) != 1:
                raise ModelLoadError(
                    f"signature {self.signature} needs {sorted(extra)} (an axial model: pass axial=)"
                )
            inputs[extra[0]] = axial
        return self._batched(self.fn, inputs, batch_size)

    def localize_views(self, views: dict, batch_size: int = 16) -> np.ndarray:
        """The ``localize`` signature on the localiser view -> ``level_xy [B, 5, 2]``."""
        (name,) = self.localize_fn.structured_input_signature[1]
        return self._batched(self.localize_fn, {name: views[name]}, batch_size)[LEVEL_XY]


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
        cfg = self.preprocess
        inputs = set(self.runner.input_names())
        expected = set(cfg.view_names) | ({cfg.axial.name} if cfg.axial is not None else set())
        if inputs != expected or self.runner.axial != (cfg.axial is not None):
            raise ModelLoadError(
                f"{self.path}: signature {self.runner.signature} takes {sorted(inputs)}, "
                f"{METADATA_FILE} says {sorted(expected)}"
            )

    def predict_views(self, views: dict, axial=None) -> dict:
        return self.runner.predict_views(views, axial=axial)

    def localize_views(self, views: dict) -> np.ndarray:
        return self.runner.localize_views(views)

    def model_info(self) -> dict:
        return {
            "name": self.metadata.get("name", self.path.parent.name),
            "version": self.metadata.get("version"),
            "format": "saved_model",
        }
