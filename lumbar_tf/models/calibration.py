"""Temperature scaling stored in the model: the grader's threshold logits divided by one temperature
per condition group (spinal, foraminal, subarticular).

The layer sits at the end of the grader model (named ``grader`` like the uncalibrated one), so the
end-to-end Keras model, the SavedModel and the TFLite ``grade`` signature all apply it with no
change to the export: every runtime calls that grader. Dividing by a positive temperature keeps the
order of the three logits, so P(>=1) >= P(>=2) >= P(>=3) still holds. The layer's name starts with
``threshold_logits`` so that the int8 export keeps it in its float32 tail like the logits before it.
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


@keras.saving.register_keras_serializable(package="lumbar_tf")
class ThresholdTemperature(keras.layers.Layer):
    """``[N, 5, 3]`` threshold logits -> logits / T[group of the condition]; T > 0 per group."""

    def __init__(self, temperatures=(1.0, 1.0, 1.0), **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        temperatures = [float(t) for t in temperatures]
        if len(temperatures) != len(GROUPS) or min(temperatures) <= 0:
            raise ValueError(f"temperatures: expected {len(GROUPS)} positive values, got {temperatures}")
        self.temperatures = temperatures

    def call(self, logits):
        per_condition = np.asarray([self.temperatures[g] for g in CONDITION_GROUP], dtype=np.float32)
        inverse = ops.convert_to_tensor((1.0 / per_condition)[None, :, None], dtype="float32")
        return ops.cast(logits, "float32") * inverse

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["temperatures"] = list(self.temperatures)
        return config


def temperatures_of(grader: keras.Model) -> tuple[float, ...] | None:
    """The grader's stored temperatures (spinal, foraminal, subarticular), or None if uncalibrated."""
    try:
        layer = grader.get_layer(CALIBRATION_LAYER)
    except ValueError:
        return None
    return tuple(layer.temperatures)


def uncalibrated_grader(grader: keras.Model) -> keras.Model:
    """The grader without its calibration layer (itself when it has none)."""
    if temperatures_of(grader) is None:
        return grader
    return keras.Model(grader.input, grader.get_layer(CALIBRATION_LAYER).input, name=grader.name)


def calibrated_grader(grader: keras.Model, temperatures) -> keras.Model:
    """The grader with ``temperatures`` (spinal, foraminal, subarticular) applied to its logits; any
    earlier calibration is replaced, the weights are shared."""
    base = uncalibrated_grader(grader)
    layer = ThresholdTemperature(temperatures, name=CALIBRATION_LAYER)
    return keras.Model(base.input, layer(base.output), name=grader.name)


def per_condition(temperatures) -> np.ndarray:
    """``[5]`` temperature of each condition from the three group temperatures."""
    return np.asarray([float(temperatures[g]) for g in CONDITION_GROUP], dtype=np.float64)
