"""The end-to-end Keras model: views -> localiser -> in-graph level crops -> grader -> probabilities.

An axial model (``preprocess.axial`` set) takes one more input, the per-level axial crops
``[B, 5, S, S, 3]`` that `lumbar_tf.axial` cut around the projection of the localiser's own
``level_xy`` (the caller runs the localiser first: `runtime.predictor.predict_study`).

One functional model in backend-agnostic Keras 3 (keras.ops only), saved as ``RUN/model.keras`` and
exported as the SavedModel's ``serving_default``. The crop reproduces ``tf.image.crop_and_resize``
(and ``preprocess.crop_and_resize``, its numpy twin used by the tablet runner) exactly.
"""

from __future__ import annotations

import keras
from keras import ops

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import PreprocessConfig, config_to_dict, preprocess_config_from_dict

N_LEVELS = L.N_LEVELS


@keras.saving.register_keras_serializable(package="lumbar_tf")
class LevelCrop(keras.layers.Layer):
    """Bilinear square crops around each level centre, as tf.image.crop_and_resize would take them.

    Args:
        crop_size: int, output side in pixels.
        half_extent: float, half the crop side in normalised view units (crop_mm / spine_crop_mm / 2).

    Call args: ``image`` [B, H, W, C] and ``level_xy`` [B, 5, 2] normalised (x, y);
    returns [B * 5, crop_size, crop_size, C] float32 (level-major within each study).
    """

    def __init__(self, crop_size: int, half_extent: float, **kwargs):
        super().__init__(**kwargs)
        self.crop_size = int(crop_size)
        self.half_extent = float(half_extent)

    def call(self, image, level_xy):
        image = ops.cast(image, "float32")
        level_xy = ops.cast(level_xy, "float32")
        shape = ops.shape(image)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        h = ops.cast(height, "float32")
        w = ops.cast(width, "float32")
        s = self.crop_size
        steps = ops.cast(ops.arange(s), "float32") / float(max(s - 1, 1))  # [S]
        x1 = level_xy[..., 0] - self.half_extent  # [B, 5]
        y1 = level_xy[..., 1] - self.half_extent
        span = 2.0 * self.half_extent
        # Source pixel coordinates, as crop_and_resize: y1*(H-1) + i*(y2-y1)*(H-1)/(S-1).
        ys = (y1[..., None] + steps * span) * (h - 1.0)  # [B, 5, S]
        xs = (x1[..., None] + steps * span) * (w - 1.0)
        y0f, x0f = ops.floor(ys), ops.floor(xs)
        wy, wx = ys - y0f, xs - x0f
        y0, x0 = ops.cast(y0f, "int32"), ops.cast(x0f, "int32")
        flat = ops.reshape(image, (-1, channels))
        base = ops.reshape(ops.arange(batch, dtype="int32") * height * width, (-1, 1, 1, 1))
        h_i, w_i = ops.cast(height, "int32"), ops.cast(width, "int32")

        def corner(yi, xi):
            valid_y = ops.logical_and(yi >= 0, yi < h_i)  # [B, 5, S]
            valid_x = ops.logical_and(xi >= 0, xi < w_i)
            yc = ops.clip(yi, 0, h_i - 1)
            xc = ops.clip(xi, 0, w_i - 1)
            index = base + yc[..., :, None] * w_i + xc[..., None, :]  # [B, 5, S, S]
            values = ops.take(flat, ops.reshape(index, (-1,)), axis=0)
            values = ops.reshape(values, (batch, N_LEVELS, s, s, channels))
            valid = ops.logical_and(valid_y[..., :, None], valid_x[..., None, :])
            return values * ops.cast(valid, "float32")[..., None]

        # crop_and_resize gives 0 where the sample point itself lies outside the image.
        inside_y = ops.logical_and(ys >= 0.0, ys <= h - 1.0)
        inside_x = ops.logical_and(xs >= 0.0, xs <= w - 1.0)
        inside = ops.cast(ops.logical_and(inside_y[..., :, None], inside_x[..., None, :]), "float32")
        wy4 = wy[..., :, None, None]
        wx4 = wx[..., None, :, None]
        top = corner(y0, x0) * (1.0 - wx4) + corner(y0, x0 + 1) * wx4
        bottom = corner(y0 + 1, x0) * (1.0 - wx4) + corner(y0 + 1, x0 + 1) * wx4
        crops = (top * (1.0 - wy4) + bottom * wy4) * inside[..., None]
        return ops.reshape(crops, (-1, s, s, channels))

    def compute_output_shape(self, image_shape, level_xy_shape):
        return (None, self.crop_size, self.crop_size, image_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"crop_size": self.crop_size, "half_extent": self.half_extent})
        return config


@keras.saving.register_keras_serializable(package="lumbar_tf")
class StudyGrades(keras.layers.Layer):
    """Per-level threshold logits [B*5, 5, 3] -> the output contract's probability tensors.

    Args:
        fine_grades: the training labels made grade >= 1 known (``core.labels.label_semantics``);
            ``presence`` is then P(>=1), else P(>=2), since an RSNA-only model never learns P(>=1).
    """

    def __init__(self, fine_grades: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.fine_grades = bool(fine_grades)

    def get_config(self):
        config = super().get_config()
        config["fine_grades"] = self.fine_grades
        return config

    def call(self, threshold_logits):
        logits = ops.cast(threshold_logits, "float32")
        per_study = ops.reshape(logits, (-1, N_LEVELS, L.N_CONDITIONS, L.N_THRESHOLDS))
        threshold_probs = ops.sigmoid(ops.transpose(per_study, (0, 2, 1, 3)))  # [B, cond, level, 3]
        p1, p2, p3 = threshold_probs[..., 0], threshold_probs[..., 1], threshold_probs[..., 2]
        grade_probs = ops.stack([1.0 - p1, p1 - p2, p2 - p3, p3], axis=-1)
        return {
            "grade_probs": ops.clip(grade_probs, 0.0, 1.0),
            "threshold_probs": threshold_probs,
            "presence": p1 if self.fine_grades else p2,
        }


@keras.saving.register_keras_serializable(package="lumbar_tf")
class PreprocessingCard(keras.layers.Layer):
    """Pass-through layer that carries the preprocessing settings inside the saved model.

    The views a model expects (series, slice offsets, spine crop, sizes, CLAHE) travel with the
    ``.keras`` file, so predict, explain and export can never pair a model with other preprocessing.
    """

    def __init__(self, preprocess: dict, quality: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.preprocess = preprocess
        self.quality = quality  # `runtime.quality.bounds_from_training` of the training split

    def call(self, inputs):
        return ops.cast(inputs, "float32")

    def get_config(self):
        config = super().get_config()
        config["preprocess"] = self.preprocess
        if self.quality is not None:
            config["quality"] = self.quality
        return config


def fine_grades_of(model: keras.Model) -> bool:
    """Whether the model's ``presence`` output is P(>=1) (see `StudyGrades`)."""
    return bool(model.get_layer("study_grades").fine_grades)


def preprocess_config_of(model: keras.Model) -> PreprocessConfig:
    """The PreprocessConfig stored in an end-to-end model by `build_end_to_end`."""
    return preprocess_config_from_dict(model.get_layer("level_xy").preprocess)


def quality_bounds_of(model: keras.Model) -> dict | None:
    """The input-quality bounds stored by `build_end_to_end` (None for models without them)."""
    return getattr(model.get_layer("level_xy"), "quality", None)


def grader_input_names(preprocess_cfg: PreprocessConfig) -> tuple[str, ...]:
    """The grader's crop inputs: one per view, then the axial crop when the config has one."""
    axial = (preprocess_cfg.axial.name,) if preprocess_cfg.axial is not None else ()
    return tuple(preprocess_cfg.view_names) + axial


@keras.saving.register_keras_serializable(package="lumbar_tf")
class LevelStack(keras.layers.Layer):
    """Per-study level crops ``[B, 5, S, S, C]`` -> ``[B * 5, S, S, C]`` float32 (level-major, as
    `LevelCrop` orders them)."""

    def call(self, crops):
        shape = ops.shape(crops)
        return ops.reshape(ops.cast(crops, "float32"), (-1, shape[2], shape[3], shape[4]))

    def compute_output_shape(self, input_shape):
        return (None, *input_shape[2:])


def build_end_to_end(
    localizer: keras.Model,
    grader: keras.Model,
    preprocess_cfg,
    *,
    fine_grades: bool = True,
    quality_bounds: dict | None = None,
) -> keras.Model:
    """Chain the trained localiser and grader into one model with the export contract's tensors
    (``fine_grades``: see `StudyGrades`; ``quality_bounds``: `runtime.quality.bounds_from_training`)."""
    size = preprocess_cfg.view_size
    inputs = {
        name: keras.Input((size, size, 3), name=name, dtype="float32") for name in preprocess_cfg.view_names
    }
    level_xy = localizer(inputs[preprocess_cfg.localizer_view])
    level_xy = PreprocessingCard(
        config_to_dict(preprocess_cfg), quality_bounds, name="level_xy", dtype="float32"
    )(level_xy)
    half = preprocess_cfg.crop_mm / preprocess_cfg.spine_crop_mm / 2.0
    crops = {
        name: LevelCrop(preprocess_cfg.crop_size, half, name=f"crop_{name}")(inputs[name], level_xy)
        for name in preprocess_cfg.view_names
    }
    if preprocess_cfg.axial is not None:
        a = preprocess_cfg.axial
        inputs[a.name] = keras.Input(
            (N_LEVELS, preprocess_cfg.crop_size, preprocess_cfg.crop_size, a.channels), name=a.name
        )
        crops[a.name] = LevelStack(name=f"stack_{a.name}")(inputs[a.name])
    crops["level_index"] = LevelIndex(name="level_index")(level_xy)
    logits = grader(crops)
    probs = StudyGrades(fine_grades=fine_grades, name="study_grades")(logits)
    outputs = {
        "grade_probs": keras.layers.Identity(name="grade_probs")(probs["grade_probs"]),
        "threshold_probs": keras.layers.Identity(name="threshold_probs")(probs["threshold_probs"]),
        "presence": keras.layers.Identity(name="presence")(probs["presence"]),
        "level_xy": level_xy,
    }
    return keras.Model(inputs, outputs, name="lumbar_spine")


@keras.saving.register_keras_serializable(package="lumbar_tf")
class LevelIndex(keras.layers.Layer):
    """Level indices 0..4 repeated for each study of the batch: [B*5] int32."""

    def call(self, level_xy):
        batch = ops.shape(level_xy)[0]
        return ops.reshape(ops.tile(ops.arange(N_LEVELS, dtype="int32")[None], (batch, 1)), (-1,))

    def compute_output_spec(self, level_xy):
        return keras.KerasTensor((None,), dtype="int32")
