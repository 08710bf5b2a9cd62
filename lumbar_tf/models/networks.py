"""Keras functional models: the level localiser and the level grader.

Backend-agnostic Keras 3 (``keras.ops`` only; TensorFlow is imported lazily and only to detect
a GPU under the TensorFlow backend). Tensor contracts: ``docs/architecture.md``.

- `build_localizer`: ``view`` ``[B, H, W, 3]`` (0-255) -> ``level_xy`` ``[B, 5, 2]`` (x_norm, y_norm).
- `build_grader`: one crop per view ``[N, S, S, 3]`` (0-255) + ``level_index`` ``[N]`` ->
  ``threshold_logits`` ``[N, 5, 3]`` (condition x threshold, monotone by construction).

The grader's backbone is one nested ``keras.Model`` (layer ``backbone``) applied to every view's
crop (shared weights). Its output is the *spatial* feature map of its last convolution stage;
pooling happens outside it, so each view's feature map is a tensor of the grader's graph and
`build_grader_gradcam_model` can expose it for Grad-CAM.

Importing this module registers every custom layer and loss, so
``keras.models.load_model(path)`` needs no ``custom_objects``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from lumbar_tf.core.config import ModelConfig
from lumbar_tf.core.errors import WeightsError
from lumbar_tf.core.labels import N_CONDITIONS, N_LEVELS, N_THRESHOLDS
from lumbar_tf.models.losses import MaskedLevelLoss, OrdinalFocalLoss  # noqa: F401  (registration)

PACKAGE = "lumbar_tf"

LOCALIZER_INPUT = "view"
LOCALIZER_OUTPUT = "level_xy"
LEVEL_INPUT = "level_index"
GRADER_OUTPUT = "threshold_logits"
BACKBONE_LAYER = "backbone"
GRADCAM_LAYER = "gradcam_features"

BACKBONES = ("efficientnetb3", "efficientnetb0", "resnet50", "mobilenetv3small", "small_cnn")
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")

# Keras applications need at least this input size (five stride-2 stages).
_MIN_APPLICATION_SIZE = 32
# Channel order of keras.applications' caffe preprocessing (RGB -> BGR) and its ImageNet means.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# Keras' EfficientNet adds this rescaling only for weights="imagenet" (keras issue 49930).
_IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)
_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)


# === Custom layers ===


@keras.saving.register_keras_serializable(package=PACKAGE)
class CaffePreprocess(layers.Layer):
    """``keras.applications.resnet50.preprocess_input`` as a layer: RGB -> BGR, minus ImageNet means.

    Input 0-255, channels last.
    """

    def call(self, inputs):
        bgr = ops.flip(inputs, axis=-1)
        return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=bgr.dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class OrdinalLogits(layers.Layer):
    """Monotone ordinal threshold logits from free parameters.

    Input ``[N, n_conditions * n_thresholds]`` read as ``[N, n_conditions, n_thresholds]``
    = (a, b, c, ...); output ``z1 = a``, ``z2 = z1 - softplus(b)``, ``z3 = z2 - softplus(c)``, so
    ``P(>=1) >= P(>=2) >= P(>=3)`` holds by construction.

    Args:
        n_conditions: int, number of conditions. Defaults to 5.
        n_thresholds: int, number of ordinal thresholds. Defaults to 3.
    """

    def __init__(self, n_conditions: int = N_CONDITIONS, n_thresholds: int = N_THRESHOLDS, **kwargs):
        super().__init__(**kwargs)
        self.n_conditions = int(n_conditions)
        self.n_thresholds = int(n_thresholds)

    def call(self, inputs):
        params = ops.reshape(inputs, (-1, self.n_conditions, self.n_thresholds))
        first = params[..., :1]
        gaps = ops.softplus(params[..., 1:])
        return ops.concatenate([first, first - ops.cumsum(gaps, axis=-1)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.n_conditions, self.n_thresholds)

    def get_config(self):
        config = super().get_config()
        config.update(n_conditions=self.n_conditions, n_thresholds=self.n_thresholds)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class SidePooling(layers.Layer):
    """Feature map ``[N, h, w, C]`` -> ``[N, 2C]``: the mean over the patient-right half of the columns,
    then over the patient-left half (an odd middle column belongs to neither).

    For the axial crop, whose columns run towards patient left (`lumbar_tf.axial`): a global mean adds
    the two lateral recesses together, so the head could not tell which side is narrowed.
    """

    def call(self, inputs):
        half = inputs.shape[2] // 2
        right = ops.mean(inputs[:, :, :half, :], axis=(1, 2))
        left = ops.mean(inputs[:, :, inputs.shape[2] - half :, :], axis=(1, 2))
        return ops.concatenate([right, left], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


# === Mixed precision ===


def gpu_available() -> bool:
    """Whether the active Keras backend sees a GPU."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return jax.devices()[0].platform == "gpu"
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def choose_dtype_policy(setting: str = "auto") -> str:
    """Resolve a ``train.mixed_precision`` setting to a Keras dtype policy name.

    ``auto`` gives ``mixed_float16`` when a GPU is visible, else ``float32``; explicit policy
    names are returned unchanged. Model outputs stay float32 under every policy.
    """
    if setting == "auto":
        return "mixed_float16" if gpu_available() else "float32"
    if setting in DTYPE_POLICIES:
        return setting
    raise ValueError(f"mixed precision setting {setting!r} is not one of auto, {', '.join(DTYPE_POLICIES)}")


# === Localiser ===


def build_localizer(view_size: int, cfg: ModelConfig | None = None, name: str = "localizer") -> keras.Model:
    """Five-block CNN (no BatchNorm) regressing the five level centres of the midline view.

    Args:
        view_size: int, side of the square input view in pixels.
        cfg: `ModelConfig`; uses ``localizer_size``, ``localizer_filters``,
            ``localizer_convs_per_block`` and ``localizer_head_units``. Defaults to ``ModelConfig()``.
        name: str, model name. Defaults to ``"localizer"``.

    Returns:
        A model ``view`` ``[B, view_size, view_size, 3]`` float32 0-255 -> ``level_xy``
        ``[B, 5, 2]`` float32 (x_norm, y_norm) in [0, 1].
    """
    cfg = cfg or ModelConfig()
    # BatchNorm is left out on purpose: with it the same network gave errors of hundreds of
    # pixels at inference (DESIGN.md, "Model").
    inputs = keras.Input((view_size, view_size, 3), dtype="float32", name=LOCALIZER_INPUT)
    x = layers.Resizing(cfg.localizer_size, cfg.localizer_size, interpolation="bilinear", name="resize")(
        inputs
    )
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for block, filters in enumerate(cfg.localizer_filters, start=1):
        for conv in range(1, cfg.localizer_convs_per_block + 1):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}")(
                x
            )
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    # Flatten, not global pooling: the coordinates live in the spatial layout.
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(cfg.localizer_head_units, activation="relu", name="head_dense")(x)
    x = layers.Dense(N_LEVELS * 2, activation="sigmoid", dtype="float32", name="head_coords")(x)
    level_xy = layers.Reshape((N_LEVELS, 2), dtype="float32", name=LOCALIZER_OUTPUT)(x)
    return keras.Model(inputs, level_xy, name=name)


# === Backbones ===


def check_weights_file(path) -> Path:
    """A local weights file that exists and has a weights suffix, or `WeightsError` naming it.

    Cheap (no loading), so a bad path is named before Keras tries to read it.
    """
    weights_path = Path(path)
    if not weights_path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if not weights_path.name.endswith((".weights.h5", ".h5", ".hdf5", ".keras")):
        raise WeightsError(f"{path}: expected a .weights.h5, .h5 or .keras weights file")
    return weights_path


def _load_backbone_weights(backbone: keras.Model, path: str, backbone_name: str) -> None:
    """Load a local weights file into the backbone or raise `WeightsError` naming the file."""
    weights_path = check_weights_file(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(str(weights_path))
        except Exception as exc:  # noqa: BLE001  (Keras raises ValueError, OSError, KeyError...)
            summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path}: cannot load weights into the {backbone_name} backbone ({summary})"
            ) from None
    skipped = [w for w in caught if "could not be loaded" in str(w.message) or "Skipping" in str(w.message)]
    if skipped:
        reason = str(skipped[0].message).splitlines()[0]
        raise WeightsError(f"{path}: weights do not match the {backbone_name} backbone ({reason})")
    for w in caught:  # pass on anything else Keras had to say
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _match_efficientnet_imagenet_scaling(backbone: keras.Model) -> None:
    """Give a local ImageNet EfficientNet file the input scaling ``weights="imagenet"`` gets.

    Keras adds ``Rescaling(1 / sqrt(stddev))`` after the Normalization layer only when it
    downloads the ImageNet weights; the same scaling folded into the variance makes a local
    copy of those weights behave identically. Files without ImageNet statistics are untouched.
    """
    norm = next((lyr for lyr in backbone.layers if isinstance(lyr, layers.Normalization)), None)
    if norm is None or not hasattr(norm, "adapt_variance"):
        return
    mean = np.asarray(keras.ops.convert_to_numpy(norm.adapt_mean)).reshape(-1)
    variance = np.asarray(keras.ops.convert_to_numpy(norm.adapt_variance)).reshape(-1)
    stddev = np.asarray(_IMAGENET_STDDEV_RGB)
    if np.allclose(mean, _IMAGENET_MEAN_RGB, atol=1e-4) and np.allclose(variance, stddev**2, atol=1e-4):
        norm.adapt_variance.assign(np.reshape(variance * stddev, norm.adapt_variance.shape).astype("float32"))
        norm.finalize_state()  # the layer normalises with tensors derived from the variables


def _small_cnn(crop_size: int, filters, name: str) -> keras.Model:
    """Compact VGG-style CNN (conv-BatchNorm-ReLU) for CPU training and tablets; input 0-255.

    BatchNorm is right here (unlike in the localiser): trained from scratch on the demo's 1,200
    level crops, the same network without it sat at the class prior for 12 epochs, while with it
    the validation loss halved (0.26 -> 0.125) in the same 12 epochs.
    """
    inputs = keras.Input((crop_size, crop_size, 3), name="crop")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for block, n_filters in enumerate(filters, start=1):
        if block > 1:
            x = layers.MaxPooling2D(2, name=f"block{block - 1}_pool")(x)
        for conv in (1, 2):
            prefix = f"block{block}_conv{conv}"
            x = layers.Conv2D(n_filters, 3, padding="same", use_bias=False, name=prefix)(x)
            # momentum 0.9: the demo sees ~20 steps an epoch, too few for the default 0.99.
            x = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu")(x)
    return keras.Model(inputs, x, name=name)


def build_backbone(
    backbone: str,
    crop_size: int,
    weights: str | None = None,
    small_cnn_filters=(16, 32, 64, 128),
    name: str = BACKBONE_LAYER,
) -> keras.Model:
    """Feature extractor ``[N, S, S, 3]`` 0-255 -> spatial feature map ``[N, h, w, C]``.

    Each backbone does its own input preprocessing inside the model: EfficientNet rescales
    internally, ResNet50 gets a `CaffePreprocess` layer, MobileNetV3 uses
    ``include_preprocessing``, the small CNN rescales to [0, 1].

    Args:
        backbone: str, one of `BACKBONES`.
        crop_size: int, input side in pixels (>= 32 for the keras.applications backbones).
        weights: ``None`` (random init), ``"imagenet"`` (downloads) or a local weights file
            (``.weights.h5`` / ``.h5`` / ``.keras``) for this backbone. Defaults to None.
        small_cnn_filters: filters per block of the small CNN. Defaults to (16, 32, 64, 128).
        name: str, model name. Defaults to ``"backbone"``.

    Raises:
        ValueError: unknown backbone or too small a crop.
        WeightsError: a weights file that is missing or does not fit.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r} is not one of {', '.join(BACKBONES)}")
    if backbone != "small_cnn" and crop_size < _MIN_APPLICATION_SIZE:
        raise ValueError(
            f"backbone {backbone} needs crops of at least {_MIN_APPLICATION_SIZE} px, got {crop_size}"
        )
    if weights == "imagenet" and backbone == "small_cnn":
        raise WeightsError("imagenet: there are no ImageNet weights for the small_cnn backbone")
    app_weights = "imagenet" if weights == "imagenet" else None
    shape = (crop_size, crop_size, 3)
    apps = keras.applications
    if backbone == "small_cnn":
        model = _small_cnn(crop_size, small_cnn_filters, name)
    elif backbone == "efficientnetb3":
        model = apps.EfficientNetB3(include_top=False, weights=app_weights, input_shape=shape, name=name)
    elif backbone == "efficientnetb0":
        model = apps.EfficientNetB0(include_top=False, weights=app_weights, input_shape=shape, name=name)
    elif backbone == "resnet50":
        inputs = keras.Input(shape, name="crop")
        preprocessed = CaffePreprocess(name="caffe_preprocess")(inputs)
        model = apps.ResNet50(include_top=False, weights=app_weights, input_tensor=preprocessed, name=name)
    else:  # mobilenetv3small
        model = apps.MobileNetV3Small(
            include_top=False, weights=app_weights, input_shape=shape, include_preprocessing=True, name=name
        )
    if weights not in (None, "imagenet"):
        _load_backbone_weights(model, weights, backbone)
        if backbone.startswith("efficientnet"):
            _match_efficientnet_imagenet_scaling(model)
    return model


# === Grader ===


_HEAD_LAYERS = (
    "feature_pool",
    "level_embedding",
    "features",
    "head_dropout_in",
    "head_dense",
    "head_dropout",
    "head_logits",
    GRADER_OUTPUT,
)


def _grader_layers(cfg: ModelConfig) -> dict:
    """The grader's layers after the backbone, by name (shared by all views)."""
    return {
        "feature_pool": layers.GlobalAveragePooling2D(name="feature_pool"),
        "level_embedding": layers.Embedding(N_LEVELS, cfg.level_embedding_dim, name="level_embedding"),
        "features": layers.Concatenate(name="features"),
        "head_dropout_in": layers.Dropout(cfg.dropout, name="head_dropout_in"),
        "head_dense": layers.Dense(cfg.head_units, activation="relu", name="head_dense"),
        "head_dropout": layers.Dropout(cfg.dropout, name="head_dropout"),
        "head_logits": layers.Dense(N_CONDITIONS * N_THRESHOLDS, dtype="float32", name="head_logits"),
        GRADER_OUTPUT: OrdinalLogits(N_CONDITIONS, N_THRESHOLDS, dtype="float32", name=GRADER_OUTPUT),
    }


def _grader_graph(
    view_inputs: list, level_index, backbones: list, pools: list, head: dict, tap: int | None = None
):
    """Wire views -> their backbones (one model shared by the sagittal views) -> their pooling layers
    -> pooled features + level embedding -> ordinal logits.

    With ``tap`` set, that view's feature map passes through an Identity layer named
    `GRADCAM_LAYER` and is returned too.
    """
    pooled, tapped = [], None
    for index, (view, backbone, pool) in enumerate(zip(view_inputs, backbones, pools, strict=True)):
        feature_map = backbone(view)
        if index == tap:
            feature_map = layers.Identity(name=GRADCAM_LAYER, dtype=backbone.dtype_policy)(feature_map)
            tapped = feature_map
        pooled.append(pool(feature_map))
    embedding = head["level_embedding"](level_index)
    x = head["features"]([*pooled, embedding])
    x = head["head_dropout_in"](x)
    x = head["head_dense"](x)
    x = head["head_dropout"](x)
    x = head["head_logits"](x)
    return head[GRADER_OUTPUT](x), tapped


def build_grader(
    crop_size: int,
    view_names: tuple[str, ...] = ("sag_t2", "sag_t1"),
    cfg: ModelConfig | None = None,
    name: str = "grader",
    own_backbone: tuple[str, ...] = (),
    side_pooled: tuple[str, ...] = (),
) -> keras.Model:
    """Level grader: a shared backbone over each view's crop, a level embedding and an ordinal head.

    Args:
        crop_size: int, side of the square level crops in pixels.
        view_names: names of the views, in order; each becomes an input of that name.
        cfg: `ModelConfig`; uses ``backbone``, ``weights``, ``small_cnn_filters``,
            ``level_embedding_dim``, ``head_units`` and ``dropout``. Defaults to ``ModelConfig()``.
        name: str, model name. Defaults to ``"grader"``.
        own_backbone: views that get a backbone of their own (layer ``backbone_<view>``): the axial
            crop. Shared with the sagittal crops, its BatchNorm moving statistics (updated once per
            view call, the last call weighing most) fitted neither picture, and the axial model came
            out worse than the sagittal-only one on every group (benchmarks/axial_ablation_results.md).
        side_pooled: views whose feature map is pooled per side (`SidePooling`, layer
            ``side_pool_<view>``) instead of globally: the axial crop with ``model.axial_pooling`` "sides".

    Returns:
        A model with dict inputs ``{view: [N, S, S, 3] float32 0-255, ..., "level_index": [N] int32
        0..4}`` and output ``threshold_logits`` ``[N, 5, 3]`` float32, monotone along the last
        axis. Feed it a dict by name (Keras orders dict inputs by key, so ``model.inputs`` is not
        in ``view_names`` order; `grader_view_names` gives that order).
    """
    cfg = cfg or ModelConfig()
    view_names = tuple(view_names)
    if not view_names or len(set(view_names)) != len(view_names) or LEVEL_INPUT in view_names:
        raise ValueError(f"view names must be unique, non-empty and not {LEVEL_INPUT!r}: {view_names}")
    backbone = build_backbone(cfg.backbone, crop_size, cfg.weights, cfg.small_cnn_filters)
    backbones = [
        build_backbone(cfg.backbone, crop_size, cfg.weights, cfg.small_cnn_filters, name=own_backbone_name(v))
        if v in own_backbone
        else backbone
        for v in view_names
    ]
    inputs = _grader_inputs(view_names, crop_size)
    head = _grader_layers(cfg)
    pools = [
        SidePooling(name=side_pool_name(v)) if v in side_pooled else head["feature_pool"] for v in view_names
    ]
    logits, _ = _grader_graph([inputs[v] for v in view_names], inputs[LEVEL_INPUT], backbones, pools, head)
    return keras.Model(inputs, logits, name=name)


def own_backbone_name(view: str) -> str:
    return f"{BACKBONE_LAYER}_{view}"


def side_pool_name(view: str) -> str:
    return f"side_pool_{view}"


def _view_pool(grader: keras.Model, view: str) -> layers.Layer:
    """The pooling layer of a view's feature map: its `SidePooling`, else the shared global pool."""
    names = {layer.name for layer in grader.layers}
    return grader.get_layer(side_pool_name(view) if side_pool_name(view) in names else "feature_pool")


def _view_backbone(grader: keras.Model, view: str) -> keras.Model:
    """The backbone of a view's crop: its own (`build_grader` ``own_backbone``), else the shared one."""
    names = {layer.name for layer in grader.layers}
    return grader.get_layer(own_backbone_name(view) if own_backbone_name(view) in names else BACKBONE_LAYER)


def _grader_inputs(view_names, crop_size: int) -> dict:
    inputs = {v: keras.Input((crop_size, crop_size, 3), dtype="float32", name=v) for v in view_names}
    inputs[LEVEL_INPUT] = keras.Input((), dtype="int32", name=LEVEL_INPUT)
    return inputs


def _source_input_name(tensor) -> str:
    """Follow first inputs back from a symbolic tensor to the model input it comes from."""
    while True:
        operation, node_index, _ = tensor._keras_history
        node = operation._inbound_nodes[node_index]
        if not node.input_tensors:
            return operation.name
        tensor = node.input_tensors[0]


def grader_view_names(grader: keras.Model) -> tuple[str, ...]:
    """The grader's view input names, in the order its features are concatenated.

    The inputs are a dict (Keras keeps dicts sorted), so the order is read from the graph.
    """
    concatenated = grader.get_layer("features")._inbound_nodes[0].input_tensors
    return tuple(_source_input_name(t) for t in concatenated[:-1])  # the last is the level embedding


def grader_last_conv_layer_name(grader: keras.Model) -> str:
    """Name of the layer, *inside* ``grader.get_layer("backbone")``, that outputs the last spatial
    feature map (e.g. ``top_activation`` for EfficientNet, ``conv5_block3_out`` for ResNet50).

    The backbone is shared by the views, so this layer has one output per view in the grader;
    for Grad-CAM use `build_grader_gradcam_model`, which exposes one view's map.
    """
    backbone = grader.get_layer(BACKBONE_LAYER)
    return backbone.outputs[0]._keras_history.operation.name


def build_grader_gradcam_model(grader: keras.Model, view_name: str) -> keras.Model:
    """Model with the grader's inputs and outputs ``[feature_map, threshold_logits]`` for one view.

    ``feature_map`` ``[N, h, w, C]`` is the backbone's last spatial feature map of ``view_name``'s
    crop, produced by an Identity layer named ``"gradcam_features"`` on the path to the logits,
    so ``tape.gradient(threshold_logits[:, condition, threshold], feature_map)`` is defined.
    The layers (and weights) are the grader's own; ``threshold_logits`` equals the grader's output.
    Works on a reloaded grader too.
    """
    view_names = grader_view_names(grader)
    if view_name not in view_names:
        raise ValueError(f"view {view_name!r} is not a grader input (views: {', '.join(view_names)})")
    backbones = [_view_backbone(grader, v) for v in view_names]
    head = {key: grader.get_layer(key) for key in _HEAD_LAYERS}
    inputs = _grader_inputs(view_names, int(grader.get_layer(view_names[0]).output.shape[1]))
    pools = [_view_pool(grader, v) for v in view_names]
    logits, feature_map = _grader_graph(
        [inputs[v] for v in view_names],
        inputs[LEVEL_INPUT],
        backbones,
        pools,
        head,
        tap=view_names.index(view_name),
    )
    return keras.Model(inputs, [feature_map, logits], name=f"{grader.name}_gradcam_{view_name}")


# === Numpy helpers ===


def threshold_probs_from_logits(logits) -> np.ndarray:
    """Sigmoid of threshold logits (numpy, any shape), without overflow warnings."""
    logits = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)


def load_model(path, compile: bool = True) -> keras.Model:
    """``keras.models.load_model`` in safe mode, with lumbar-tf's layers and losses registered."""
    return keras.models.load_model(path, compile=compile, safe_mode=True)
