"""Calibration stored in the model: each threshold logit of the grader mapped to ``logit / T + b``,
with a temperature ``T`` and a bias ``b`` per condition group (spinal, foraminal, subarticular) and
per threshold (>=1, >=2, >=3).

The layer sits at the end of the grader model (named ``grader`` like the uncalibrated one), so the
end-to-end Keras model, the SavedModel and the TFLite ``grade`` signature all apply it with no
change to the export: every runtime calls that grader. The grades stay monotone: the mapped >=2
logit is the anchor, >=1 is raised to at least it and >=3 lowered to at most it (`lumbar-tf
calibrate` fits >=2 first, then >=3 and >=1 under these bounds, each for its plain log loss: the
probabilities are honest, and the submission's decision rule answers the RSNA weights). The layer's
name starts with ``threshold_logits`` so that the int8 export keeps it in its float32 tail like the
logits before it. T = 1, b = 0 is the identity, which `lumbar-tf calibrate` keeps wherever fitting
does not beat it out of fold.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from lumbar_tf.core import labels as L

CALIBRATION_LAYER = "threshold_logits_calibration"
GROUPS = ("spinal", "foraminal", "subarticular")
# Condition index -> its group (the RSNA metric's groups; both sides pooled).
CONDITION_GROUP = tuple(0 if c.startswith("spinal") else 1 if "foraminal" in c else 2 for c in L.CONDITIONS)


def as_table(values, name: str) -> list[list[float]]:
    """Per group, per threshold: ``[3][3]`` floats from a table, or from one value per group."""
    rows = [[float(v)] * L.N_THRESHOLDS if np.ndim(v) == 0 else [float(x) for x in v] for v in values]
    if len(rows) != len(GROUPS) or any(len(r) != L.N_THRESHOLDS for r in rows):
        raise ValueError(f"{name}: expected {len(GROUPS)} groups x {L.N_THRESHOLDS} thresholds, got {values}")
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name}: values must be finite, got {values}")
    return rows


@keras.saving.register_keras_serializable(package="lumbar_tf")
class ThresholdTemperature(keras.layers.Layer):
    """``[N, 5, 3]`` threshold logits -> logits / T + b per (group, threshold), kept monotone."""

    def __init__(self, temperatures=(1.0, 1.0, 1.0), biases=(0.0, 0.0, 0.0), **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.temperatures = as_table(temperatures, "temperatures")
        self.biases = as_table(biases, "biases")
        if np.min(self.temperatures) <= 0:
            raise ValueError(f"temperatures: must be positive, got {temperatures}")

    def call(self, logits):
        inverse = ops.convert_to_tensor(1.0 / per_condition(self.temperatures)[None], dtype="float32")
        bias = ops.convert_to_tensor(per_condition(self.biases)[None], dtype="float32")
        z = ops.cast(logits, "float32") * inverse + bias
        anchor = z[..., 1:2]
        return ops.concatenate(
            [ops.maximum(z[..., :1], anchor), anchor, ops.minimum(z[..., 2:], anchor)], axis=-1
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["temperatures"] = [list(r) for r in self.temperatures]
        config["biases"] = [list(r) for r in self.biases]
        return config


def calibration_of(grader: keras.Model) -> tuple[list, list] | None:
    """The grader's stored (temperatures, biases), each ``[group][threshold]``, or None if it is
    uncalibrated."""
    try:
        layer = grader.get_layer(CALIBRATION_LAYER)
    except ValueError:
        return None
    return [list(r) for r in layer.temperatures], [list(r) for r in layer.biases]


def uncalibrated_grader(grader: keras.Model) -> keras.Model:
    """The grader without its calibration layer (itself when it has none)."""
    if calibration_of(grader) is None:
        return grader
    return keras.Model(grader.input, grader.get_layer(CALIBRATION_LAYER).input, name=grader.name)


def calibrated_grader(grader: keras.Model, temperatures, biases=(0.0, 0.0, 0.0)) -> keras.Model:
    """The grader with ``temperatures`` and ``biases`` (per group, or per group and threshold)
    applied to its logits; any earlier calibration is replaced, the weights are shared."""
    base = uncalibrated_grader(grader)
    layer = ThresholdTemperature(temperatures, biases, name=CALIBRATION_LAYER)
    return keras.Model(base.input, layer(base.output), name=grader.name)


def per_condition(table) -> np.ndarray:
    """``[5, 3]`` value of each condition and threshold from a per-group table (or per-group values)."""
    rows = as_table(table, "values")
    return np.asarray([rows[g] for g in CONDITION_GROUP], dtype=np.float64)


def apply_numpy(threshold_probs, temperatures, biases) -> np.ndarray:
    """``[N, 5, 5, 3]`` probabilities through the layer's map, in numpy (float64)."""
    p = np.clip(np.asarray(threshold_probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = (np.log(p) - np.log1p(-p)) / per_condition(temperatures)[None, :, None] + per_condition(biases)[
        None, :, None
    ]
    anchor = z[..., 1:2]
    z = np.concatenate([np.maximum(z[..., :1], anchor), anchor, np.minimum(z[..., 2:], anchor)], axis=-1)
    return 0.5 * (1.0 + np.tanh(0.5 * z))
