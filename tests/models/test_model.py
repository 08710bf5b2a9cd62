"""Localiser and grader: build per backbone, save/reload, mixed precision, weights files, Grad-CAM, fit."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from lumbar_tf.core import labels
from lumbar_tf.core.config import ModelConfig
from lumbar_tf.models import networks as M
from lumbar_tf.models.losses import MaskedLevelLoss, OrdinalFocalLoss

CROP = 32
VIEW = 64
VIEWS = ("sag_t2", "sag_t1")
TINY = dict(head_units=16, level_embedding_dim=4, small_cnn_filters=(8, 16, 16, 32))
TINY_LOCALIZER = ModelConfig(localizer_size=64, localizer_filters=(8, 8, 16, 16, 16), localizer_head_units=32)


def _grader_batch(n=10, crop=CROP, seed=0):
    rng = np.random.default_rng(seed)
    batch = {v: rng.uniform(0, 255, (n, crop, crop, 3)).astype("float32") for v in VIEWS}
    batch[M.LEVEL_INPUT] = (np.arange(n) % 5).astype("int32")
    return batch


def _grader_targets(n=10, seed=0):
    from lumbar_tf.core.labels import NORMAL_MILD, UNKNOWN, encode_grades

    rng = np.random.default_rng(seed)
    grades = rng.choice([0, 1, 2, 3, NORMAL_MILD, UNKNOWN], size=(n, 5))
    targets, mask = encode_grades(grades)
    return np.stack([targets, mask], axis=-1)  # [n, 5, 3, 2]


def _localizer_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    views = rng.uniform(0, 255, (n, VIEW, VIEW, 3)).astype("float32")
    xy = rng.uniform(0.2, 0.8, (n, 5, 2)).astype("float32")
    present = (rng.uniform(size=(n, 5, 1)) > 0.2).astype("float32")
    return views, np.concatenate([xy, present], axis=-1)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _assert_monotone(logits):
    assert np.all(np.diff(logits, axis=-1) <= 0), "threshold logits must not increase with the threshold"


# === Layers and helpers ===


def test_ordinal_logits_are_monotone_and_follow_the_formula():
    params = np.random.default_rng(1).normal(0, 5, (7, 15)).astype("float32")
    out = np.asarray(M.OrdinalLogits()(params))
    p = params.reshape(7, 5, 3).astype(np.float64)
    softplus = np.logaddexp(0.0, p)
    expected = np.stack(
        [p[..., 0], p[..., 0] - softplus[..., 1], p[..., 0] - softplus[..., 1] - softplus[..., 2]], -1
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    _assert_monotone(out)
    probs = M.threshold_probs_from_logits(out)
    assert np.all(np.diff(probs, axis=-1) <= 0)


def test_caffe_preprocess_matches_keras_applications():
    x = np.random.default_rng(2).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(M.CaffePreprocess()(x)), expected, rtol=1e-6, atol=1e-4)


def test_level_batch_and_study_layouts_round_trip():
    per_level = np.arange(2 * 5 * 5 * 3).reshape(10, 5, 3)  # [B*5 (level-major), condition, threshold]
    study = labels.level_batch_to_study(per_level)
    assert study.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(study[1, 2, 4], per_level[1 * 5 + 4, 2])  # study 1, condition 2, level 4
    np.testing.assert_array_equal(labels.study_to_level_batch(study), per_level)


def test_threshold_probs_from_logits_is_a_stable_sigmoid():
    logits = np.array([-1000.0, -2.0, 0.0, 3.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = M.threshold_probs_from_logits(logits)
    np.testing.assert_allclose(
        probs, [0.0, 1 / (1 + np.exp(2.0)), 0.5, 1 / (1 + np.exp(-3.0)), 1.0], atol=1e-7
    )


def test_choose_dtype_policy():
    assert M.choose_dtype_policy("float32") == "float32"
    assert M.choose_dtype_policy("mixed_float16") == "mixed_float16"
    assert M.choose_dtype_policy("auto") == ("mixed_float16" if M.gpu_available() else "float32")
    with pytest.raises(ValueError, match="float64"):
        M.choose_dtype_policy("float64")


# === Build ===


def test_localizer_contract():
    localizer = M.build_localizer(VIEW, TINY_LOCALIZER)
    assert [t.name for t in localizer.inputs] == ["view"]
    assert localizer.output_names == ["level_xy"]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in localizer.layers)
    views, _ = _localizer_batch()
    xy = np.asarray(localizer.predict(views, verbose=0))
    assert xy.shape == (4, 5, 2) and xy.dtype == np.float32
    assert np.all((xy >= 0) & (xy <= 1))


# small_cnn, EfficientNetB0 (the production family) and MobileNetV3Small (tablets) build in the fast
# suite; EfficientNetB3 and ResNet50 (7-13 s each on 2 cores) with the slow tests.
_SLOW_BACKBONES = ("efficientnetb3", "resnet50")


@pytest.mark.parametrize(
    "backbone", [pytest.param(b, marks=pytest.mark.slow) if b in _SLOW_BACKBONES else b for b in M.BACKBONES]
)
def test_grader_builds_and_takes_a_fit_step_for_every_backbone(backbone):
    """Built once per backbone (the costly part): outputs, the Grad-CAM layer, one training step."""
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone=backbone, **TINY))
    assert set(grader.input) == {*VIEWS, "level_index"}
    assert M.grader_view_names(grader) == VIEWS  # concatenation order, not Keras' sorted dict order
    assert grader.output_names == ["threshold_logits"]
    logits = np.asarray(grader.predict(_grader_batch(6), verbose=0))
    assert logits.shape == (6, 5, 3) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    _assert_monotone(logits)
    # The named layer exists inside the backbone and its output is spatial.
    conv_name = M.grader_last_conv_layer_name(grader)
    conv_output = grader.get_layer("backbone").get_layer(conv_name).output
    assert len(conv_output.shape) == 4
    # Eager: tracing a train step of the application backbones costs 10-40 s on 2 cores; the traced
    # path is exercised by the small_cnn fit tests.
    grader.compile(optimizer="adam", loss=OrdinalFocalLoss(), run_eagerly=True)
    history = grader.fit(_grader_batch(4), _grader_targets(4), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_grader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backbone 'vgg16'"):
        M.build_grader(CROP, VIEWS, ModelConfig(backbone="vgg16"))
    with pytest.raises(ValueError, match="at least 32 px"):
        M.build_grader(16, VIEWS, ModelConfig(backbone="efficientnetb0"))
    with pytest.raises(ValueError, match="unique"):
        M.build_grader(CROP, ("sag_t2", "sag_t2"), ModelConfig(**TINY))


# === Mixed precision ===


@pytest.mark.parametrize("backbone", ["small_cnn", "efficientnetb0"])
def test_outputs_stay_float32_under_mixed_float16(mixed_float16, backbone):
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone=backbone, **TINY))
    assert grader.get_layer("head_dense").compute_dtype == "float16"  # mixed precision is really on
    logits = grader(_grader_batch(5), training=False)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    _assert_monotone(np.asarray(logits))
    localizer = M.build_localizer(VIEW, TINY_LOCALIZER)
    xy = localizer(_localizer_batch()[0], training=False)
    assert keras.backend.standardize_dtype(xy.dtype) == "float32"


# === Save / reload ===


def _roundtrip(model, tmp_path, name):
    if getattr(model, "optimizer", None) is not None:  # saved optimizer state must match on reload
        model.optimizer.build(model.trainable_variables)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    return keras.models.load_model(path, safe_mode=True)  # no custom_objects: registration suffices


# An application backbone (EfficientNet: the production family, with its Normalization layer) is
# reloaded in the fast suite; ResNet50 (100 MB of weights, about a minute) only with the slow tests.
@pytest.mark.parametrize(
    "backbone", ["small_cnn", "efficientnetb0", pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_grader_save_reload_gives_identical_outputs(tmp_path, backbone):
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone=backbone, **TINY))
    grader.compile(optimizer="adam", loss=OrdinalFocalLoss(focal_weight=0.3))
    batch = _grader_batch(5)
    reloaded = _roundtrip(grader, tmp_path, backbone)
    # Direct calls, not predict(): tracing two predict functions of an EfficientNet costs seconds.
    np.testing.assert_array_equal(
        np.asarray(reloaded(batch, training=False)), np.asarray(grader(batch, training=False))
    )
    assert isinstance(reloaded.loss, OrdinalFocalLoss) and reloaded.loss.focal_weight == 0.3
    assert M.grader_last_conv_layer_name(reloaded) == M.grader_last_conv_layer_name(grader)
    assert M.grader_view_names(reloaded) == VIEWS


def test_localizer_save_reload_gives_identical_outputs(tmp_path):
    localizer = M.build_localizer(VIEW, TINY_LOCALIZER)
    localizer.compile(optimizer="adam", loss=MaskedLevelLoss(delta=0.02))
    views, _ = _localizer_batch()
    reloaded = _roundtrip(localizer, tmp_path, "localizer")
    np.testing.assert_array_equal(
        np.asarray(reloaded.predict(views, verbose=0)), np.asarray(localizer.predict(views, verbose=0))
    )
    assert reloaded.loss.delta == 0.02


# === Weights files ===


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(M.WeightsError, match="nowhere.weights.h5: weights file not found"):
        M.build_grader(CROP, VIEWS, ModelConfig(backbone="small_cnn", weights=str(missing), **TINY))


def test_mismatching_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "small.weights.h5"
    M.build_backbone("small_cnn", CROP, small_cnn_filters=(8, 16, 16, 32)).save_weights(path)
    with pytest.raises(M.WeightsError, match=r"small\.weights\.h5: .*mobilenetv3small"):
        M.build_grader(CROP, VIEWS, ModelConfig(backbone="mobilenetv3small", weights=str(path), **TINY))
    wider = {**TINY, "small_cnn_filters": (8, 16, 32, 32)}
    with pytest.raises(M.WeightsError, match=r"small\.weights\.h5: .*small_cnn"):
        M.build_grader(CROP, VIEWS, ModelConfig(backbone="small_cnn", weights=str(path), **wider))


def test_matching_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = M.build_backbone("small_cnn", CROP, small_cnn_filters=(8, 16, 16, 32))
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone="small_cnn", weights=str(path), **TINY))
    for expected, loaded in zip(source.get_weights(), grader.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(loaded, expected)


def test_local_imagenet_efficientnet_file_gets_the_imagenet_input_scaling(tmp_path):
    # Keras' weights="imagenet" EfficientNet divides the normalised input by sqrt(stddev) once more;
    # a local copy of those weights (Normalization holding ImageNet mean and stddev**2) must too.
    mean, stddev = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    source = M.build_backbone("efficientnetb0", CROP)
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(mean.astype("float32"))
    norm.adapt_variance.assign((stddev**2).astype("float32"))
    path = tmp_path / "efficientnetb0_imagenet.weights.h5"
    source.save_weights(path)
    loaded = M.build_backbone("efficientnetb0", CROP, weights=str(path))
    loaded_norm = next(layer for layer in loaded.layers if isinstance(layer, keras.layers.Normalization))
    x = np.random.default_rng(3).uniform(0, 255, (2, CROP, CROP, 3)).astype("float32")
    normalised = keras.Model(loaded.input, loaded_norm.output)(x)
    expected = (x / 255.0 - mean) / stddev / np.sqrt(stddev)
    np.testing.assert_allclose(np.asarray(normalised), expected, rtol=1e-4, atol=1e-4)


# === Grad-CAM ===


def test_gradcam_model_exposes_one_views_feature_map_with_gradients(tmp_path):
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone="small_cnn", **TINY))
    grader = _roundtrip(grader, tmp_path, "gradcam")  # must work on a reloaded grader
    batch = _grader_batch(3)
    for view in VIEWS:
        gradcam = M.build_grader_gradcam_model(grader, view)
        inputs = {name: tf.constant(value) for name, value in batch.items()}
        with tf.GradientTape() as tape:
            feature_map, logits = gradcam(inputs, training=False)
            score = logits[:, 2, 1]  # left foramen, >=2
        grads = tape.gradient(score, feature_map)
        np.testing.assert_allclose(logits.numpy(), grader.predict(batch, verbose=0), rtol=1e-5, atol=1e-5)
        assert feature_map.shape == (3, 4, 4, 32)  # small_cnn at 32 px: three 2x poolings
        assert grads is not None and grads.shape == feature_map.shape
        assert float(tf.reduce_max(tf.abs(grads))) > 0.0
        # The feature map is that view's: recompute it with the backbone on that view alone.
        own = grader.get_layer("backbone")(batch[view])
        np.testing.assert_allclose(feature_map.numpy(), np.asarray(own), rtol=1e-5, atol=1e-5)
        assert gradcam.get_layer("gradcam_features").output is gradcam.outputs[0]
    with pytest.raises(ValueError, match="axial"):
        M.build_grader_gradcam_model(grader, "axial")


# === Training ===


def test_small_cnn_grader_fits_and_its_loss_goes_down():
    keras.utils.set_random_seed(0)
    grader = M.build_grader(CROP, VIEWS, ModelConfig(backbone="small_cnn", dropout=0.0, **TINY))
    grader.compile(optimizer=keras.optimizers.Adam(3e-3), loss=OrdinalFocalLoss())
    batch, targets = _grader_batch(16), _grader_targets(16)
    history = grader.fit(batch, targets, batch_size=16, epochs=15, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < history[0]
    _assert_monotone(np.asarray(grader.predict(batch, verbose=0)))


def test_localizer_fits_and_its_loss_goes_down():
    keras.utils.set_random_seed(0)
    localizer = M.build_localizer(VIEW, TINY_LOCALIZER)
    localizer.compile(optimizer=keras.optimizers.Adam(1e-3), loss=MaskedLevelLoss())
    views, targets = _localizer_batch(8)
    history = localizer.fit(views, targets, batch_size=8, epochs=15, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert history[-1] < history[0]


# === Axial side pooling ===


def test_side_pooling_keeps_the_two_halves_apart():
    """[N, h, w, C] -> right-half mean then left-half mean; an odd middle column is in neither."""
    rng = np.random.default_rng(0)
    for width in (4, 5):
        x = rng.normal(size=(2, 3, width, 6)).astype("float32")
        out = np.asarray(M.SidePooling()(x))
        half = width // 2
        expected = np.concatenate(
            [x[:, :, :half].mean(axis=(1, 2)), x[:, :, width - half :].mean(axis=(1, 2))], -1
        )
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    # A feature seen on the patient-left half only moves the left part of the pooled vector.
    x = np.zeros((1, 4, 4, 2), "float32")
    x[0, :, 3, 1] = 1.0
    np.testing.assert_allclose(np.asarray(M.SidePooling()(x)), [[0.0, 0.0, 0.0, 0.5]])


def test_side_pooled_axial_grader_reloads_and_explains(tmp_path):
    views = (*VIEWS, "ax_t2")
    grader = M.build_grader(
        CROP,
        views,
        ModelConfig(backbone="small_cnn", **TINY),
        own_backbone=("ax_t2",),
        side_pooled=("ax_t2",),
    )
    assert grader.get_layer("features").output.shape[-1] == 32 + 32 + 2 * 32 + 4  # axial: two halves
    batch = _grader_batch(3)
    batch["ax_t2"] = np.random.default_rng(1).uniform(0, 255, (3, CROP, CROP, 3)).astype("float32")
    reloaded = _roundtrip(grader, tmp_path, "side_pooled")
    np.testing.assert_array_equal(np.asarray(reloaded(batch)), np.asarray(grader(batch)))
    gradcam = M.build_grader_gradcam_model(reloaded, "ax_t2")
    feature_map, logits = gradcam(batch, training=False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(grader(batch)), rtol=1e-5, atol=1e-5)
    assert feature_map.shape == (3, 4, 4, 32)
