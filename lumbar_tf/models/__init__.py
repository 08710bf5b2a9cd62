"""Keras models. Importing any of them registers every lumbar-tf layer, the calibration layer included,
so a saved model loads wherever `lumbar_tf.models.*` was imported."""

from lumbar_tf.models import calibration  # noqa: F401  (registers ThresholdTemperature)
