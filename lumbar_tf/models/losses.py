"""Masked losses for the grader (ordinal BCE + focal) and the localiser (masked smooth L1).

Backend-agnostic Keras 3 (``keras.ops`` only): the same code trains under TensorFlow and JAX.

Both losses normalise by the *batch total* of the mask (times the severity weights), not per
sample, so a masked cell contributes nothing to the value or the gradient and a sample with
many labels weighs more than one with few. To stay compatible with Keras' reduction (sum over
the batch divided by the batch size, then scaled for distribution strategies), ``call`` returns
per-sample values ``n_batch * numerator_i / denominator_total`` whose batch mean is the masked
mean.
"""

from __future__ import annotations

import keras
from keras import ops

from lumbar_tf.core.config import LossConfig

PACKAGE = "lumbar_tf"
# Keeps the division finite (and the gradient free of NaNs under JAX) when a batch holds no label.
_MIN_DENOMINATOR = 1e-8


def ordinal_cell_losses(
    targets,
    logits,
    focal_weight: float = 0.5,
    gamma: float = 2.0,
    alpha: float = 0.25,
    apply_class_balancing: bool = False,
):
    """Element-wise ``(1 - focal_weight) * BCE + focal_weight * focal`` from logits.

    The focal term is Keras' ``BinaryFocalCrossentropy`` formula (``(1 - p_t) ** gamma * BCE``,
    times ``alpha``/``1 - alpha`` when ``apply_class_balancing``), computed from logits with a
    numerically stable BCE instead of Keras' clipped probabilities.
    """
    targets = ops.cast(targets, "float32")
    logits = ops.cast(logits, "float32")
    bce = ops.binary_crossentropy(targets, logits, from_logits=True)
    probs = ops.sigmoid(logits)
    p_t = targets * probs + (1.0 - targets) * (1.0 - probs)
    focal = ops.power(1.0 - p_t, gamma) * bce
    if apply_class_balancing:
        focal = focal * (targets * alpha + (1.0 - targets) * (1.0 - alpha))
    return (1.0 - focal_weight) * bce + focal_weight * focal


def _batch_normalised(weighted_losses, weights):
    """Per-sample values whose batch mean is ``sum(weighted_losses) / sum(weights)``."""
    batch = ops.shape(weighted_losses)[0]
    numerator = ops.sum(ops.reshape(weighted_losses, (batch, -1)), axis=1)
    denominator = ops.mean(ops.sum(ops.reshape(weights, (batch, -1)), axis=1))
    return numerator / ops.maximum(denominator, _MIN_DENOMINATOR)


@keras.saving.register_keras_serializable(package=PACKAGE)
class OrdinalFocalLoss(keras.losses.Loss):
    """Masked, severity-weighted mix of BCE and focal loss on the ordinal threshold logits.

    ``y_true`` is ``[N, 5, 3, 2]`` = stack(targets, mask) on the last axis; ``y_pred`` the
    ``threshold_logits`` ``[N, 5, 3]``. Each cell's loss is weighted by
    ``mask * severity_weights[threshold]`` (thresholds >=1, >=2, >=3 weighted 1, 2, 4 by
    default, as the competition metric weighs normal-mild/moderate/severe) and the batch sum is
    divided by the batch sum of those weights.

    Args:
        focal_weight: float, share of the focal term (0 = plain BCE). Defaults to 0.5.
        gamma: float, focusing parameter of the focal term. Defaults to 2.0.
        alpha: float, positive-class weight of the focal term, used only with
            ``apply_class_balancing``. Defaults to 0.25.
        apply_class_balancing: bool, weigh the focal term by ``alpha``. Defaults to False.
        severity_weights: three floats, weights of the >=1, >=2, >=3 thresholds.
            Defaults to (1, 2, 4).
    """

    def __init__(
        self,
        focal_weight: float = 0.5,
        gamma: float = 2.0,
        alpha: float = 0.25,
        apply_class_balancing: bool = False,
        severity_weights=(1.0, 2.0, 4.0),
        name: str = "ordinal_focal_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= float(focal_weight) <= 1.0:
            raise ValueError(f"focal_weight must be in [0, 1], got {focal_weight!r}")
        self.focal_weight = float(focal_weight)
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.apply_class_balancing = bool(apply_class_balancing)
        self.severity_weights = tuple(float(w) for w in severity_weights)

    @classmethod
    def from_loss_config(cls, config: LossConfig) -> OrdinalFocalLoss:
        """The loss described by a `LossConfig`."""
        return cls(
            focal_weight=config.focal_weight,
            gamma=config.focal_gamma,
            alpha=config.focal_alpha,
            apply_class_balancing=config.apply_class_balancing,
            severity_weights=config.severity_weights,
        )

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        targets, mask = y_true[..., 0], y_true[..., 1]
        cell_losses = ordinal_cell_losses(
            targets,
            y_pred,
            focal_weight=self.focal_weight,
            gamma=self.gamma,
            alpha=self.alpha,
            apply_class_balancing=self.apply_class_balancing,
        )
        weights = mask * ops.convert_to_tensor(self.severity_weights, dtype="float32")
        # where() rather than a product alone: a masked cell with an extreme logit must not
        # leak inf * 0 = NaN into the value or the gradient.
        weighted = ops.where(weights > 0, cell_losses * weights, 0.0)
        return _batch_normalised(weighted, weights)

    def get_config(self):
        config = super().get_config()
        config.update(
            focal_weight=self.focal_weight,
            gamma=self.gamma,
            alpha=self.alpha,
            apply_class_balancing=self.apply_class_balancing,
            severity_weights=list(self.severity_weights),
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedLevelLoss(keras.losses.Loss):
    """Masked smooth-L1 loss on the localiser's normalised level centres.

    ``y_true`` is ``[B, 5, 3]`` = (x, y, present); ``y_pred`` the ``level_xy`` output
    ``[B, 5, 2]``. Per level the loss is the smooth L1 (quadratic below ``delta``, ``|e| -
    delta / 2`` above) summed over x and y; the batch sum over present levels is divided by the
    number of present levels, so absent levels contribute nothing.

    Args:
        delta: float, switch point from quadratic to linear, in normalised view units
            (0.01 is about 1 px at 128 px). Defaults to 0.01.
    """

    def __init__(
        self,
        delta: float = 0.01,
        name: str = "masked_level_loss",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if float(delta) <= 0.0:
            raise ValueError(f"delta must be positive, got {delta!r}")
        self.delta = float(delta)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        present = y_true[..., 2]
        error = ops.abs(y_pred - y_true[..., :2])
        smooth_l1 = ops.where(
            error < self.delta, 0.5 * ops.square(error) / self.delta, error - 0.5 * self.delta
        )
        level_losses = ops.sum(smooth_l1, axis=-1)
        weighted = ops.where(present > 0, level_losses * present, 0.0)
        return _batch_normalised(weighted, present)

    def get_config(self):
        config = super().get_config()
        config.update(delta=self.delta)
        return config
