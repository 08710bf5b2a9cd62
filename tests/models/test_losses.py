"""Grader and localiser losses: hand-computed values, masking, severity weights, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from lumbar_tf.core.config import LossConfig
from lumbar_tf.models.losses import MaskedLevelLoss, OrdinalFocalLoss


def _y_true(targets, mask):
    return np.stack([np.asarray(targets, "float32"), np.asarray(mask, "float32")], axis=-1)


def _numpy_loss(targets, mask, logits, focal_weight, gamma, alpha, balancing, severity=(1.0, 2.0, 4.0)):
    """Reference: (1-fw) BCE + fw focal per cell, weighted by mask x severity, over the batch."""
    z, t = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    bce = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    p = 1.0 / (1.0 + np.exp(-z))
    p_t = t * p + (1 - t) * (1 - p)
    focal = (1 - p_t) ** gamma * bce
    if balancing:
        focal = focal * (t * alpha + (1 - t) * (1 - alpha))
    weights = np.asarray(mask, np.float64) * np.asarray(severity)
    return float(np.sum(weights * ((1 - focal_weight) * bce + focal_weight * focal)) / np.sum(weights))


def test_two_cell_example_worked_by_hand():
    # Cell A: logit 0, target 1, threshold >=1 (weight 1). Cell B: logit 2, target 0, >=3 (weight 4).
    logits = np.zeros((1, 5, 3), "float32")
    targets = np.zeros((1, 5, 3), "float32")
    mask = np.zeros((1, 5, 3), "float32")
    logits[0, 0, 0], targets[0, 0, 0], mask[0, 0, 0] = 0.0, 1.0, 1.0
    logits[0, 3, 2], targets[0, 3, 2], mask[0, 3, 2] = 2.0, 0.0, 1.0
    logits[0, 1, 1] = 7.0  # unlabelled cells carry arbitrary logits
    bce_a = np.log(2.0)  # -log(sigmoid(0))
    focal_a = (1 - 0.5) ** 2 * bce_a  # p_t = 0.5
    bce_b = np.log(1 + np.exp(2.0))  # -log(1 - sigmoid(2))
    p_t_b = 1 - 1 / (1 + np.exp(-2.0))
    focal_b = (1 - p_t_b) ** 2 * bce_b
    expected = (1 * (0.5 * bce_a + 0.5 * focal_a) + 4 * (0.5 * bce_b + 0.5 * focal_b)) / (1 + 4)
    loss = OrdinalFocalLoss(focal_weight=0.5, gamma=2.0)
    np.testing.assert_allclose(float(loss(_y_true(targets, mask), logits)), expected, rtol=1e-6)
    # Pure BCE and pure focal too.
    bce_only = (1 * bce_a + 4 * bce_b) / 5
    focal_only = (1 * focal_a + 4 * focal_b) / 5
    np.testing.assert_allclose(
        float(OrdinalFocalLoss(focal_weight=0.0)(_y_true(targets, mask), logits)), bce_only, rtol=1e-6
    )
    np.testing.assert_allclose(
        float(OrdinalFocalLoss(focal_weight=1.0)(_y_true(targets, mask), logits)), focal_only, rtol=1e-6
    )


@pytest.mark.parametrize(
    ("focal_weight", "gamma", "alpha", "balancing"),
    [(0.0, 2.0, 0.25, False), (0.5, 2.0, 0.25, False), (1.0, 1.5, 0.25, True), (0.3, 3.0, 0.6, True)],
)
def test_random_batch_matches_numpy(focal_weight, gamma, alpha, balancing):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (6, 5, 3)).astype("float32")
    targets = (rng.uniform(size=(6, 5, 3)) > 0.6).astype("float32")
    mask = (rng.uniform(size=(6, 5, 3)) > 0.3).astype("float32")
    loss = OrdinalFocalLoss(
        focal_weight=focal_weight, gamma=gamma, alpha=alpha, apply_class_balancing=balancing
    )
    expected = _numpy_loss(targets * mask, mask, logits, focal_weight, gamma, alpha, balancing)
    np.testing.assert_allclose(float(loss(_y_true(targets * mask, mask), logits)), expected, rtol=1e-5)


@pytest.mark.parametrize("balancing", [False, True])
def test_focal_term_matches_keras_binary_focal_crossentropy(balancing):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (4, 5, 3)).astype("float32")
    targets = (rng.uniform(size=(4, 5, 3)) > 0.5).astype("float32")
    ours = OrdinalFocalLoss(
        focal_weight=1.0, gamma=2.0, alpha=0.3, apply_class_balancing=balancing, severity_weights=(1, 1, 1)
    )
    reference = keras.losses.BinaryFocalCrossentropy(
        from_logits=True, gamma=2.0, alpha=0.3, apply_class_balancing=balancing
    )
    value = float(ours(_y_true(targets, np.ones_like(targets)), logits))
    np.testing.assert_allclose(value, float(reference(targets, logits)), rtol=1e-4)


def test_normalised_over_the_batch_not_per_sample():
    # Sample 0 has one labelled cell, sample 1 has three: the batch mean weighs cells equally.
    logits = np.random.default_rng(5).normal(0, 1, (2, 5, 3)).astype("float32")
    targets = np.ones((2, 5, 3), "float32")
    mask = np.zeros((2, 5, 3), "float32")
    mask[0, 0, 0] = 1
    mask[1, 1, 0] = mask[1, 2, 0] = mask[1, 3, 0] = 1
    bce = np.log1p(np.exp(-logits.astype(np.float64)))
    expected = (bce[0, 0, 0] + bce[1, 1, 0] + bce[1, 2, 0] + bce[1, 3, 0]) / 4
    value = OrdinalFocalLoss(focal_weight=0.0)(_y_true(targets * mask, mask), logits)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)


def _value_and_grads(loss, y_true, logits):
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(tf.constant(y_true), variable)
    return float(value), tape.gradient(value, variable).numpy()


def test_masked_cell_label_changes_neither_value_nor_gradient():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 2, (3, 5, 3)).astype("float32")
    logits[1, 2, 0] = 80.0  # an extreme logit on the masked cell must not leak either
    targets = (rng.uniform(size=(3, 5, 3)) > 0.5).astype("float32")
    mask = np.ones((3, 5, 3), "float32")
    mask[1, 2, 0] = 0.0  # e.g. >=1 of a Normal/Mild cell
    loss = OrdinalFocalLoss(focal_weight=0.5, apply_class_balancing=True)
    targets_a, targets_b = targets.copy(), targets.copy()
    targets_a[1, 2, 0], targets_b[1, 2, 0] = 0.0, 1.0
    value_a, grads_a = _value_and_grads(loss, _y_true(targets_a, mask), logits)
    value_b, grads_b = _value_and_grads(loss, _y_true(targets_b, mask), logits)
    assert value_a == value_b
    np.testing.assert_array_equal(grads_a, grads_b)
    assert grads_a[1, 2, 0] == 0.0
    assert np.all(np.isfinite(grads_a)) and np.count_nonzero(grads_a) == grads_a.size - 1


def test_fully_masked_batch_gives_zero_and_finite_gradients():
    logits = np.random.default_rng(7).normal(0, 1, (2, 5, 3)).astype("float32")
    y_true = _y_true(np.ones((2, 5, 3)), np.zeros((2, 5, 3)))
    value, grads = _value_and_grads(OrdinalFocalLoss(), y_true, logits)
    assert value == 0.0
    np.testing.assert_array_equal(grads, np.zeros_like(grads))


def test_ordinal_loss_config_round_trip_and_from_loss_config():
    loss = OrdinalFocalLoss.from_loss_config(
        LossConfig(
            focal_weight=0.2,
            focal_gamma=1.0,
            focal_alpha=0.4,
            apply_class_balancing=True,
            severity_weights=(1.0, 3.0, 9.0),
        )
    )
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, OrdinalFocalLoss)
    assert clone.get_config() == loss.get_config()
    assert (clone.focal_weight, clone.gamma, clone.alpha, clone.apply_class_balancing) == (
        0.2,
        1.0,
        0.4,
        True,
    )
    assert clone.severity_weights == (1.0, 3.0, 9.0)
    with pytest.raises(ValueError, match="focal_weight"):
        OrdinalFocalLoss(focal_weight=1.5)


# === Localiser loss ===


def test_masked_level_loss_worked_by_hand():
    y_pred = np.full((2, 5, 2), 0.5, "float32")
    y_true = np.zeros((2, 5, 3), "float32")
    y_true[..., :2] = 0.5
    y_true[..., 2] = 1.0
    y_true[0, 0, 0] = 0.505  # |e| = 0.005 < delta: 0.5 * e^2 / delta
    y_true[1, 4, 1] = 0.6  # |e| = 0.1 >= delta: |e| - delta / 2
    y_true[1, 2, :2] = (0.0, 1.0)  # absent level with a wild target
    y_true[1, 2, 2] = 0.0
    expected = (0.5 * 0.005**2 / 0.01 + (0.1 - 0.005)) / 9  # nine present levels
    value = MaskedLevelLoss(delta=0.01)(y_true, y_pred)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)


def test_absent_levels_do_not_move_the_level_loss_or_its_gradient():
    rng = np.random.default_rng(8)
    y_pred = rng.uniform(size=(3, 5, 2)).astype("float32")
    y_true = np.concatenate([rng.uniform(size=(3, 5, 2)), np.ones((3, 5, 1))], -1).astype("float32")
    y_true[2, 1, 2] = 0.0
    other = y_true.copy()
    other[2, 1, :2] = (0.99, 0.01)
    value_a, grads_a = _value_and_grads(MaskedLevelLoss(), y_true, y_pred)
    value_b, grads_b = _value_and_grads(MaskedLevelLoss(), other, y_pred)
    assert value_a == value_b
    np.testing.assert_array_equal(grads_a, grads_b)
    np.testing.assert_array_equal(grads_a[2, 1], [0.0, 0.0])
    empty = y_true.copy()
    empty[..., 2] = 0.0
    assert _value_and_grads(MaskedLevelLoss(), empty, y_pred)[0] == 0.0


def test_level_loss_config_round_trip():
    clone = keras.losses.deserialize(keras.losses.serialize(MaskedLevelLoss(delta=0.03)))
    assert isinstance(clone, MaskedLevelLoss) and clone.delta == 0.03
    with pytest.raises(ValueError, match="delta"):
        MaskedLevelLoss(delta=0.0)
