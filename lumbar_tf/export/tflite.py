"""TFLite conversion: four variants of the two-signature SavedModel, builtin ops only.

The in-graph crop is a gather that the converter would have to route through Flex ops, so each
``.tflite`` file holds two signatures instead, ``localize`` (view -> level_xy) and ``grade`` (one crop
per view, an axial model's axial crop ``[N, C, C, 2n+1]``, level_index -> threshold_probs, sigmoid
applied); the tablet runner
(`lumbar_tf.runtime.tflite_model`) crops between them with the shared numpy preprocessing.
Variants: float32, float16 (float16 weights), dynamic (int8 weights, float activations) and int8 (full
integer, calibrated on training studies; float32 input and output so the runner feeds 0-255 floats).
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import GRADE, LEVEL_INDEX, LOCALIZE, TFLITE_METADATA_NAME, TFLITE_SIGNATURES
from lumbar_tf.core.errors import ExportError
from lumbar_tf.export.metadata import json_default
from lumbar_tf.export.tflite_metadata import add_litert_metadata

VARIANTS = ("float32", "float16", "dynamic", "int8")


def calibration_samples(views: dict, keras_level_xy: np.ndarray, cfg, axial: np.ndarray | None = None):
    """(signature, inputs) pairs for int8 calibration: each study's localiser view, and its five level
    crops around the Keras localiser's output (what the grader sees at inference); an axial model's
    grade samples carry the studies' axial crops ``axial [B, 5, C, C, 2n+1]`` too."""
    from lumbar_tf import preprocess

    if cfg.axial is not None and axial is None:
        raise ExportError("int8: an axial model's calibration needs the studies' axial crops")

    samples = []
    for b in range(len(keras_level_xy)):
        samples.append(
            (LOCALIZE, {cfg.localizer_view: np.asarray(views[cfg.localizer_view][b : b + 1], np.float32)})
        )
        crops = preprocess.crop_levels({k: v[b] for k, v in views.items()}, keras_level_xy[b], cfg)
        if cfg.axial is not None:
            crops[cfg.axial.name] = np.asarray(axial[b], np.float32)
        crops[LEVEL_INDEX] = np.arange(L.N_LEVELS, dtype=np.int32)
        samples.append((GRADE, crops))
    return samples


# int8: the grader's last dense layer, the ordinal transform (softplus gaps, cumulative sums) and the
# sigmoids stay float32. Quantized, the softplus (EXP -> ADD -> LOG in int8) and the int8 logits alone
# moved probabilities by ~0.05 on a trained demo-sized model; float, the largest difference was ~0.002.
# Everything before (all convolutions, the pooled features, the localiser) is int8.
QUANTIZATION = {
    "float32": "none (float32)",
    "float16": "float16 weights, float32 compute",
    "dynamic": "int8 weights, activations quantized on the fly (dynamic range)",
    "int8": "int8 weights and activations, calibrated on training studies; float32 input/output and "
    "float32 grader head (last dense layer, ordinal transform, sigmoid)",
}
FLOAT_TAIL_LAYERS = ("head_logits", "threshold_logits")
FLOAT_TAIL_OPS = ("LOG", "EXP", "LOGISTIC", "CUMSUM")


def _new_converter(edge_saved_model):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(edge_saved_model), signature_keys=list(TFLITE_SIGNATURES)
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def _int8_converter(edge_saved_model, samples):
    """A converter set up for full-integer quantization calibrated on ``samples``."""
    import tensorflow as tf

    converter = _new_converter(edge_saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def _convert(converter) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibrator's tf.lite.Interpreter deprecation notice
        return bytes(converter.convert())


def _float_tail_nodes(calibrated: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    names = [t["name"] for t in Interpreter(model_content=calibrated).get_tensor_details()]
    return [n for n in names if any(f"/{layer}" in n for layer in FLOAT_TAIL_LAYERS)]


def _int8_with_float_tail(edge_saved_model, samples) -> tuple[bytes, dict]:
    """Calibrate, then quantize everything but the grader's tail (the route of TFLite's
    QuantizationDebugger: calibrate-only conversion + mlir_quantize with a denylist)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tflite_convert

    converter = _int8_converter(edge_saved_model, samples)
    converter._experimental_calibrate_only = True
    calibrated = _convert(converter)
    nodes = _float_tail_nodes(calibrated)
    if not nodes:
        raise LookupError("no head_logits / threshold_logits tensors in the grader")
    content = tflite_convert.mlir_quantize(
        calibrated,
        disable_per_channel=False,
        fully_quantize=False,
        input_data_type=tf.float32,
        output_data_type=tf.float32,
        denylisted_ops=list(FLOAT_TAIL_OPS),
        denylisted_nodes=nodes,
    )
    return bytes(content), {"float_tail": True, "float_tail_tensors": len(nodes)}


def convert_tflite(edge_saved_model, variant: str, samples=None) -> tuple[bytes, dict]:
    """Convert the two-signature SavedModel to one TFLite variant (builtin ops only).

    Returns the flatbuffer and notes for the report. ``int8``: int8 weights and activations with
    float32 input/output (the runner feeds 0-255 floats), calibrated on ``samples``; the grader's
    tail stays float32 (`FLOAT_TAIL_LAYERS`), falling back to a plain full-int8 conversion if that
    route is unavailable.
    """
    import tensorflow as tf

    notes: dict = {}
    if variant == "int8":
        if not samples:
            raise ExportError("int8: no representative data for calibration")
        try:
            content, notes = _int8_with_float_tail(edge_saved_model, samples)
        except (AttributeError, ImportError, LookupError, TypeError) as exc:
            notes = {"float_tail": False, "float_tail_error": f"{exc.__class__.__name__}: {exc}"[:300]}
            converter = _int8_converter(edge_saved_model, samples)
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32
            content = _convert(converter)
    else:
        converter = _new_converter(edge_saved_model)
        if variant == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif variant == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif variant != "float32":
            raise ExportError(f"--tflite: unknown variant {variant!r}")
        content = _convert(converter)
    check_builtin_only(content, variant)
    return content, notes


def check_builtin_only(content: bytes, variant: str) -> None:
    """ExportError if the flatbuffer needs Flex (SELECT_TF_OPS) ops: a plain LiteRT runtime lacks them."""
    if b"Flex" in content:
        raise ExportError(f"TFLite {variant}: the model needs Flex (SELECT_TF_OPS) ops; not exported")


def embed_metadata(content: bytes, metadata: dict) -> bytes:
    """Add the JSON metadata to a TFLite flatbuffer as metadata entry ``lumbar_tf_metadata``."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    model.metadata = [
        m
        for m in (model.metadata or [])
        if m.name not in (TFLITE_METADATA_NAME, TFLITE_METADATA_NAME.encode())
    ]
    buffer = schema_fb.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata, default=json_default).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema_fb.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    return add_litert_metadata(bytes(flatbuffer_utils.convert_object_to_bytearray(model)), metadata)


def tflite_op_names(path) -> list[str]:
    """Operator names of a ``.tflite`` file, as LiteRT resolves them (for the report and tests)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})
