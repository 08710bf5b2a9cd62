"""`lumbar-tf export`: the trained model as a SavedModel for TF Serving and TFLite files for tablets.

    lumbar-tf export --model RUN --out EXPORT [--name lumbar_spine] [--version N]
                     [--tflite float32,float16,dynamic,int8] [--data HELDOUT] [--representative-size 64]

Writes::

    EXPORT/saved_model/<name>/<version>/        SavedModel (keras.export.ExportArchive), TF Serving layout
        saved_model.pb, variables/, metadata.json
    EXPORT/metadata.json                        copy of the newest version's metadata (+ the TFLite files)
    EXPORT/tflite/<name>_<variant>.tflite       signatures localize + grade, builtin ops only,
    EXPORT/tflite/<name>_<variant>.json         metadata embedded in the file and in this sidecar
    EXPORT/export_report.json                   sizes, largest differences from Keras, ROC-AUC per runtime

The SavedModel's ``serving_default`` holds the whole chain (localiser -> in-graph level crops ->
grader -> probabilities): one float32 input per view ``[None, S, S, 3]`` (0-255) named by the view,
outputs ``grade_probs`` ``[None,5,5,4]``, ``threshold_probs`` ``[None,5,5,3]``, ``presence``
``[None,5,5]`` and ``level_xy`` ``[None,5,2]``. A version is written into a hidden temporary folder
inside ``saved_model/<name>/`` and renamed into place, so a watching TF Serving never sees half a
version; the next free version number is used unless one is given.

TFLite: the in-graph crop is a gather that the converter would have to route through Flex ops, so each
``.tflite`` file holds two signatures instead, ``localize`` (view -> level_xy) and ``grade`` (one crop per
view + level_index -> threshold_probs, sigmoid applied); the tablet runner
(`lumbar_tf.runtime.tflite_model`) crops between them with the shared numpy preprocessing.
Variants: float32, float16 (float16 weights),
dynamic (int8 weights, float activations) and int8 (full integer, calibrated on representative
studies from the training pipeline; float32 input and output so the runner feeds 0-255 floats).
Every file is built with builtin ops only and checked against the Keras model on the same studies.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import config_to_dict
from lumbar_tf.core.contract import (
    EXPORT_REPORT_FILE as REPORT_FILE,
)
from lumbar_tf.core.contract import (
    GRADE,
    INTENDED_USE,
    LEVEL_INDEX,
    LEVEL_XY,
    LOCALIZE,
    METADATA_FILE,
    OUTPUT_SPECS,
    SERVING_SIGNATURE,
    TFLITE_METADATA_NAME,
    TFLITE_SIGNATURES,
    THRESHOLD_PROBS,
)
from lumbar_tf.core.errors import ExportError
from lumbar_tf.core.io import write_bytes_atomic as _write_bytes_atomic
from lumbar_tf.core.io import write_json_atomic as _write_json_atomic
from lumbar_tf.runtime.artifacts import published_versions
from lumbar_tf.runtime.keras_model import run_prior
from lumbar_tf.runtime.saved_model import SavedModelRunner

VARIANTS = ("float32", "float16", "dynamic", "int8")
# The SavedModel must reproduce Keras to float rounding (graph vs eager kernels: ~2e-5 measured on a
# trained demo-sized model, whose grader is steep); more than this means a broken export.
SAVED_MODEL_TOLERANCE = 1e-3
# Held-out macro ROC-AUC a TFLite variant may lose against Keras (reported in the report, not enforced).
AUC_LOSS_FLOOR = 0.01
_TMP_PREFIX = ".tmp-"


# === Small helpers ===


def _versions() -> dict:
    from importlib import metadata

    import keras
    import tensorflow as tf

    try:
        own = metadata.version("lumbar-tf")
    except metadata.PackageNotFoundError:
        own = "unknown"
    return {"lumbar_tf": own, "tensorflow": tf.__version__, "keras": keras.__version__}


def parse_variants(value) -> tuple[str, ...]:
    """``"float32,int8"`` / a sequence -> validated variant names (``""`` or ``"none"``: no TFLite)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ExportError(f"--tflite: unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    return tuple(dict.fromkeys(names))


def next_version(model_dir) -> int:
    """The next free version number (1 for a new model)."""
    versions = published_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# === Loading ===


def _load(run_or_file):
    """The end-to-end Keras model, or ExportError naming the file."""
    from lumbar_tf.core.errors import ModelLoadError
    from lumbar_tf.runtime.keras_model import load_model

    try:
        return load_model(run_or_file)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


# === Metadata ===


def _channel_meaning(spec) -> list[str]:
    out = []
    for offset in spec.offsets_mm:
        if abs(offset) < 1e-6:
            where = "midline"
        else:
            side = "patient left" if offset > 0 else "patient right"
            where = f"{abs(offset):g} mm to the {side}"
        out.append(f"{spec.series_description} slice nearest {where} of the stack centre")
    return out


def _training_summary(loaded) -> dict:
    """What the model was trained on, from the run folder (cheap: JSON and CSV files only)."""
    run = loaded.run_dir
    if run is None:
        return {"source": str(loaded.path), "note": "model file without its run folder"}
    out: dict = {"run": str(run)}
    split = _read_json(run / "split.json") or {}
    finished = _read_json(run / "finished.json") or {}
    train_ids = list(split.get("train", []))
    out["n_train_studies"] = len(train_ids) or finished.get("n_train")
    out["n_val_studies"] = len(split.get("val", [])) or finished.get("n_val")
    out["data_dir"] = split.get("data_dir") or finished.get("data_dir")
    out["val_fold"] = split.get("val_fold")
    data_dir = out["data_dir"]
    if data_dir and train_ids and Path(data_dir).is_dir():
        try:
            from lumbar_tf.data.dataset import label_summary, read_index

            index = read_index(data_dir)
            grades = [index.studies[s].grades for s in train_ids if s in index.studies]
            if grades:
                out["label_counts"] = label_summary(np.stack(grades))
                out["label_codes"] = {
                    "-2": "normal/mild",
                    "-1": "unknown",
                    "0": "none",
                    "1": "mild",
                    "2": "moderate",
                    "3": "severe",
                }
                out["fine_grades_studies"] = int(
                    sum(index.studies[s].fine_grades for s in train_ids if s in index.studies)
                )
        except Exception as exc:  # noqa: BLE001  (a summary is optional; never fail an export on it)
            out["label_counts_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return out


def build_metadata(loaded, *, name: str, version: int, evaluation_metrics: dict | None = None) -> dict:
    """``metadata.json`` of one exported version (contract: DESIGN.md "Export contract")."""
    cfg = loaded.preprocess
    s = cfg.view_size
    finished = _read_json(loaded.run_dir / "finished.json") if loaded.run_dir else None
    metrics: dict = {"training": finished}
    if evaluation_metrics is not None:
        metrics["evaluation"] = evaluation_metrics
    return {
        "name": name,
        "version": int(version),
        "format": "saved_model",
        "signature": SERVING_SIGNATURE,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "intended_use": INTENDED_USE,
        "fine_grades": True,
        "prior": {
            "threshold_probs": run_prior(loaded.run_dir),
            "meaning": "class frequencies of the training split; the rows of a study that cannot be read",
        },
        "conditions": list(L.CONDITIONS),
        "levels": list(L.LEVELS),
        "grades": list(L.GRADES),
        "thresholds": list(L.THRESHOLDS),
        "rsna_columns": list(L.SUBMISSION_COLUMNS),
        "views": [
            {
                "name": spec.name,
                "series_description": spec.series_description,
                "offsets_mm": list(spec.offsets_mm),
                "shape": [None, s, s, 3],
                "dtype": "float32",
                "value_range": [0, 255],
                "channels": _channel_meaning(spec),
                "localizer_input": spec.name == cfg.localizer_view,
            }
            for spec in cfg.views
        ],
        "preprocess": config_to_dict(cfg),
        "outputs": {
            key: {"shape": shape, "dtype": "float32", "meaning": meaning}
            for key, (shape, meaning) in OUTPUT_SPECS.items()
        },
        "axes": "[batch, condition, level, ...] in the order of 'conditions' and 'levels'",
        "training_data": _training_summary(loaded),
        "metrics": metrics,
        "source_model": str(loaded.path),
    }


# === SavedModel ===


def write_saved_model(model, cfg, path) -> None:
    """The end-to-end model as a SavedModel with the ``serving_default`` signature of the contract."""
    import keras
    import tensorflow as tf

    size = cfg.view_size
    # No archive.track(model): add_endpoint tracks every variable the endpoint uses, and track() would
    # store each weight a second time (keras-team/keras#23553: 2x SavedModel size and serving memory).
    archive = keras.export.ExportArchive()
    specs = {name: tf.TensorSpec([None, size, size, 3], tf.float32, name=name) for name in cfg.view_names}

    def serve(views):
        outputs = model(views, training=False)
        return {key: outputs[key] for key in OUTPUT_SPECS}

    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=[specs])
    archive.write_out(str(path), verbose=False)


def write_edge_saved_model(model, cfg, path) -> None:
    """A SavedModel with the two TFLite signatures: ``localize`` and ``grade`` (probabilities)."""
    import keras
    import tensorflow as tf

    localizer = model.get_layer("localizer")
    grader = model.get_layer("grader")
    s, c = cfg.view_size, cfg.crop_size
    archive = keras.export.ExportArchive()  # not track(): see write_saved_model

    def localize(view):
        return {LEVEL_XY: localizer(view, training=False)}

    def grade(crops):
        return {THRESHOLD_PROBS: keras.ops.sigmoid(grader(crops, training=False))}

    archive.add_endpoint(
        LOCALIZE,
        localize,
        input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32, name=cfg.localizer_view)],
    )
    grade_specs = {name: tf.TensorSpec([None, c, c, 3], tf.float32, name=name) for name in cfg.view_names}
    grade_specs[LEVEL_INDEX] = tf.TensorSpec([None], tf.int32, name=LEVEL_INDEX)
    archive.add_endpoint(GRADE, grade, input_signature=[grade_specs])
    archive.write_out(str(path), verbose=False)


# === Representative studies (training pipeline) ===


def _studies_from_cache(cache: Path, cfg, ids: list[str] | None, n: int):
    from lumbar_tf.data.dataset import load_manifest, load_studies

    manifest = load_manifest(cache, cfg)
    available = [str(s) for s in manifest["study_ids"]]
    wanted = [s for s in ids if s in set(available)] if ids else available
    if not wanted:
        return None
    return load_studies(cache, cfg, wanted[:n])


def _prepare_studies(data_dir, cfg, ids: list[str] | None, n: int, tmp: Path):
    from lumbar_tf.data.dataset import DatasetError, load_studies, prepare_cache, read_index

    index = read_index(data_dir)
    candidates = [s for s in (ids or index.study_ids) if s in index.studies][: max(n, 1) + 8]
    cache = tmp / f"cache-{uuid.uuid4().hex[:8]}"
    try:
        manifest = prepare_cache(data_dir, cache, cfg, progress=False, study_ids=candidates)
    except DatasetError:
        return None
    return load_studies(cache, cfg, manifest["study_ids"][:n])


def representative_studies(loaded, n: int, tmp: Path, *, cache_dir=None, data_dir=None):
    """Up to ``n`` training studies as model-ready views, and where they came from.

    Order: an explicit prepared cache; the run's own cache (``RUN/cache``); the run's training data
    (``split.json``'s data folder, decoded now); the held-out ``data_dir``; failing all, a few phantom
    studies synthesised on the spot (recorded as such in the report).
    """
    from lumbar_tf.data.dataset import DatasetError

    cfg = loaded.preprocess
    run = loaded.run_dir
    split = (_read_json(run / "split.json") if run else None) or {}
    train_ids = [str(s) for s in split.get("train", [])]
    caches = [Path(cache_dir)] if cache_dir else []
    if run is not None:
        caches.append(run / "cache")
    for cache in caches:
        if (cache / "manifest.json").exists():
            try:
                studies = _studies_from_cache(cache, cfg, train_ids, n)
            except DatasetError:
                studies = None
            if studies and studies["study_id"]:
                return studies, f"training cache {cache}"
    sources = []
    if split.get("data_dir") and Path(split["data_dir"]).is_dir():
        sources.append((split["data_dir"], train_ids, "training data"))
    if data_dir is not None:
        sources.append((data_dir, None, "held-out data (no training data found)"))
    for folder, ids, what in sources:
        try:
            studies = _prepare_studies(folder, cfg, ids, n, tmp)
        except DatasetError:
            studies = None
        if studies and studies["study_id"]:
            return studies, f"{what} {folder}"
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    count = max(1, min(n, 8))
    phantom = synthesize_dataset(tmp / "phantom", count, seed=12345)
    studies = _prepare_studies(phantom, cfg, None, count, tmp)
    if not studies or not studies["study_id"]:
        raise ExportError(f"{loaded.path}: no representative studies for the TFLite checks")
    return studies, "phantom studies synthesised for calibration (no training data found)"


def _calibration_samples(views: dict, keras_level_xy: np.ndarray, cfg):
    """(signature, inputs) pairs for int8 calibration: each study's localiser view, and its five level
    crops around the Keras localiser's output (what the grader sees at inference)."""
    from lumbar_tf import preprocess

    samples = []
    for b in range(len(keras_level_xy)):
        samples.append(
            (LOCALIZE, {cfg.localizer_view: np.asarray(views[cfg.localizer_view][b : b + 1], np.float32)})
        )
        crops = preprocess.crop_levels({k: v[b] for k, v in views.items()}, keras_level_xy[b], cfg)
        crops[LEVEL_INDEX] = np.arange(L.N_LEVELS, dtype=np.int32)
        samples.append((GRADE, crops))
    return samples


# === TFLite ===


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
    if b"Flex" in content:
        raise ExportError(f"TFLite {variant}: the model needs Flex (SELECT_TF_OPS) ops; not exported")
    return content, notes


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
    buffer.data = np.frombuffer(json.dumps(metadata, default=_json_default).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema_fb.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    return flatbuffer_utils.convert_object_to_bytearray(model)


def tflite_op_names(path) -> list[str]:
    """Operator names of a ``.tflite`` file, as LiteRT resolves them (for the report and tests)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def _tflite_metadata(meta: dict, variant: str, file_name: str) -> dict:

    cfg = meta["preprocess"]
    view_names = [v["name"] for v in cfg["views"]]
    s, c = cfg["view_size"], cfg["crop_size"]
    keep = (
        "name",
        "version",
        "created",
        "versions",
        "intended_use",
        "fine_grades",
        "prior",
        "conditions",
        "levels",
        "grades",
        "thresholds",
        "rsna_columns",
        "views",
        "preprocess",
    )
    out = {k: meta[k] for k in keep if k in meta}
    out.update(
        format="tflite",
        variant=variant,
        quantization=QUANTIZATION[variant],
        file=file_name,
        signatures={
            LOCALIZE: {
                "inputs": {view_names[0]: {"shape": [None, s, s, 3], "dtype": "float32", "range": [0, 255]}},
                "outputs": {LEVEL_XY: {"shape": [None, 5, 2], "dtype": "float32"}},
            },
            GRADE: {
                "inputs": {
                    **{
                        n: {"shape": [None, c, c, 3], "dtype": "float32", "range": [0, 255]}
                        for n in view_names
                    },
                    LEVEL_INDEX: {"shape": [None], "dtype": "int32", "range": [0, 4]},
                },
                "outputs": {
                    THRESHOLD_PROBS: {
                        "shape": [None, 5, 3],
                        "dtype": "float32",
                        "meaning": "per level: condition x P(grade>=1, >=2, >=3)",
                    }
                },
            },
        },
        runner="crop between the signatures with lumbar_tf.preprocess.crop_levels (lumbar-tf-edge)",
    )
    return out


# === Held-out evaluation ===


def _heldout_studies(data_dir, cfg, tmp: Path):
    """Labelled held-out studies (RSNA train layout) as views + grades, or (None, reason)."""
    from lumbar_tf.data.dataset import DatasetError, load_studies, prepare_cache

    data_dir = Path(data_dir)
    if not (data_dir / "train.csv").exists() and not (data_dir / "train_grades.csv").exists():
        return None, f"{data_dir}: no train.csv labels; ROC-AUC not computed"
    cache = tmp / "heldout-cache"
    try:
        manifest = prepare_cache(data_dir, cache, cfg, progress=False)
    except DatasetError as exc:
        return None, str(exc)
    return load_studies(cache, cfg, manifest["study_ids"]), None


def _auc(threshold_probs, grades) -> float | None:
    from lumbar_tf.training.metrics import compute_metrics

    return compute_metrics(threshold_probs, grades)["macro_roc_auc"]


# === The export ===


def export_model(
    run_or_file,
    out,
    *,
    name: str = "lumbar_spine",
    version: int | None = None,
    tflite=VARIANTS,
    data_dir=None,
    representative_size: int = 64,
    metrics=None,
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """Export a trained run (or ``model.keras``) as SavedModel + TFLite files; returns the report.

    Args:
        run_or_file: run folder or end-to-end ``.keras`` file.
        out: export root ``EXPORT``.
        name: model name (TF Serving ``model_name``; TFLite file prefix).
        version: SavedModel version; default: the next free number. An existing version is an error.
        tflite: variants to write (subset of `VARIANTS`; ``()`` for none).
        data_dir: held-out studies (RSNA train layout with labels): the report gets macro ROC-AUC of
            Keras, the SavedModel and each TFLite variant on them.
        representative_size: studies used for int8 calibration and the Keras comparison.
        metrics: an evaluation ``metrics.json`` (path or dict) to store in the metadata.
        cache_dir: a prepared cache of the training data to draw representative studies from
            (default: the run's cache, else its training data).
        progress: print one line per step.

    Raises:
        ExportError: missing/corrupt model, an existing version, bad options. Nothing is published
            then: no version folder, no temporary folder.
    """
    say = print if progress else (lambda *a, **k: None)
    variants = parse_variants(tflite)
    if version is not None and int(version) < 1:
        raise ExportError(f"--version: must be a positive integer, got {version}")
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"--name: {name!r} is not a valid model name")
    if representative_size < 1:
        raise ExportError(f"--representative-size: must be at least 1, got {representative_size}")
    evaluation_metrics = metrics
    if metrics is not None and not isinstance(metrics, dict):
        evaluation_metrics = _read_json(Path(metrics))
        if not isinstance(evaluation_metrics, dict):
            raise ExportError(f"{metrics}: not a readable metrics.json")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ExportError(f"{data_dir}: held-out data folder not found")
    if cache_dir is not None and not (Path(cache_dir) / "manifest.json").is_file():
        raise ExportError(f"{cache_dir}: not a prepared cache (no manifest.json)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")

    loaded = _load(run_or_file)  # before anything is written: a bad model leaves nothing behind
    cfg = loaded.preprocess
    model_dir = out / "saved_model" / name
    if version is not None and (model_dir / str(version)).exists():
        raise ExportError(f"{model_dir / str(version)}: version {version} already exists")

    report: dict = {
        "name": name,
        "source_model": str(loaded.path),
        "intended_use": INTENDED_USE,
        "keras": {"path": str(loaded.path), "size_bytes": Path(loaded.path).stat().st_size},
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
    work = Path(tempfile.mkdtemp(prefix="lumbar_export_"))
    try:
        # 1. SavedModel into a hidden staging folder.
        say(f"SavedModel: {SERVING_SIGNATURE} ({', '.join(cfg.view_names)} -> {', '.join(OUTPUT_SPECS)})")
        write_saved_model(loaded.model, cfg, staging)

        # 2. Representative studies from the training pipeline; Keras reference outputs.
        studies, source = representative_studies(
            loaded, representative_size, work, cache_dir=cache_dir, data_dir=data_dir
        )
        views = studies["views"]
        say(f"representative studies: {len(studies['study_id'])} from {source}")
        reference = loaded.predict_views(views)
        report["representative"] = {"source": source, "n_studies": len(studies["study_id"])}

        saved = SavedModelRunner(staging)
        saved_out = saved.predict_views(views)
        diffs = {k: _max_diff(saved_out[k], reference[k]) for k in OUTPUT_SPECS}
        if max(diffs.values()) > SAVED_MODEL_TOLERANCE:
            raise ExportError(
                f"{loaded.path}: the SavedModel differs from the Keras model by {max(diffs.values()):.2e}"
            )
        report["saved_model"] = {"max_abs_diff": diffs}
        from lumbar_tf.export.warmup import write_warmup_requests

        report["saved_model"]["warmup"] = write_warmup_requests(staging, views, name)

        # 3. TFLite variants (two signatures), checked against Keras on the same studies.
        tflite_files: dict[str, Path] = {}
        if variants:
            edge_sm = work / "edge_saved_model"
            write_edge_saved_model(loaded.model, cfg, edge_sm)
            samples = _calibration_samples(views, reference["level_xy"], cfg) if "int8" in variants else None
            from lumbar_tf.runtime.tflite_model import EdgeModel

            edge_meta = {"preprocess": config_to_dict(cfg), "fine_grades": True}
            report["tflite"] = {}
            for variant in variants:
                say(f"TFLite {variant}: converting")
                path = work / f"{name}_{variant}.tflite"
                content, notes = convert_tflite(edge_sm, variant, samples)
                path.write_bytes(content)
                edge = EdgeModel(path, metadata={**edge_meta, "variant": variant})
                got = edge.predict_views(views)
                report["tflite"][variant] = {
                    "size_bytes": path.stat().st_size,
                    "max_abs_diff": {k: _max_diff(got[k], reference[k]) for k in OUTPUT_SPECS},
                    "ops": tflite_op_names(path),
                    **notes,
                }
                tflite_files[variant] = path

        # 4. Held-out ROC-AUC per runtime.
        if data_dir is not None:
            say(f"held-out evaluation on {data_dir}")
            report["evaluation"] = _evaluate_heldout(data_dir, loaded, saved, tflite_files, cfg, work)
            _copy_auc_into_variants(report)

        # 5. Publish: metadata, rename the version into place, then the TFLite files.
        version = _publish_saved_model(
            loaded, staging, model_dir, version, name, evaluation_metrics, report.get("evaluation")
        )
        meta = _read_json(model_dir / str(version) / METADATA_FILE)
        report["version"] = version
        report["saved_model"].update(
            path=str(model_dir / str(version)), size_bytes=_dir_size(model_dir / str(version))
        )
        root_meta = dict(meta)
        if tflite_files:
            tflite_dir = out / "tflite"
            root_meta["tflite"] = {}
            for variant, path in tflite_files.items():
                file_name = f"{name}_{variant}.tflite"
                tmeta = _tflite_metadata(meta, variant, file_name)
                target = tflite_dir / file_name
                _write_bytes_atomic(target, embed_metadata(path.read_bytes(), tmeta))
                _write_json_atomic(target.with_suffix(".json"), tmeta)
                report["tflite"][variant].update(path=str(target), size_bytes=target.stat().st_size)
                root_meta["tflite"][variant] = {
                    "file": f"tflite/{file_name}",
                    "signatures": tmeta["signatures"],
                }
        _write_json_atomic(out / METADATA_FILE, root_meta)
        report["created"] = meta["created"]
        _write_json_atomic(out / REPORT_FILE, report)
        say(f"exported {name} version {version} to {out}")
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _publish_saved_model(
    loaded, staging: Path, model_dir: Path, version, name, evaluation_metrics, heldout
) -> int:
    """Write metadata.json into the staging folder and rename it to the version number (atomic)."""
    pinned = version is not None
    for _ in range(100):
        number = int(version) if pinned else next_version(model_dir)
        meta = build_metadata(loaded, name=name, version=number, evaluation_metrics=evaluation_metrics)
        if heldout is not None:
            meta["metrics"]["export_check"] = heldout
        _write_json_atomic(staging / METADATA_FILE, meta)
        try:
            os.rename(staging, model_dir / str(number))
            return number
        except OSError:
            if pinned or not (model_dir / str(number)).exists():
                raise ExportError(f"{model_dir / str(number)}: cannot publish this version") from None
            # another exporter took this number meanwhile: try the next one
    raise ExportError(f"{model_dir}: cannot find a free version number")


def _evaluate_heldout(data_dir, loaded, saved, tflite_files: dict, cfg, work: Path) -> dict:
    studies, reason = _heldout_studies(data_dir, cfg, work)
    if studies is None:
        return {"data_dir": str(data_dir), "note": reason}
    from lumbar_tf.runtime.tflite_model import EdgeModel

    grades = studies["grades"]
    views = studies["views"]
    keras_auc = _auc(loaded.predict_views(views)["threshold_probs"], grades)
    result = {
        "data_dir": str(data_dir),
        "n_studies": len(studies["study_id"]),
        "keras_macro_roc_auc": keras_auc,
        "saved_model_macro_roc_auc": _auc(saved.predict_views(views)["threshold_probs"], grades),
        "tflite": {},
    }
    for variant, path in tflite_files.items():
        edge = EdgeModel(path, metadata={"preprocess": config_to_dict(cfg), "variant": variant})
        auc = _auc(edge.predict_views(views)["threshold_probs"], grades)
        delta = None if auc is None or keras_auc is None else auc - keras_auc
        result["tflite"][variant] = {"macro_roc_auc": auc, "delta_vs_keras": delta}
    result["auc_loss_floor"] = {
        "max_loss": AUC_LOSS_FLOOR,
        "met": {
            v: (r["delta_vs_keras"] is not None and r["delta_vs_keras"] >= -AUC_LOSS_FLOOR)
            for v, r in result["tflite"].items()
        },
    }
    return result


def _copy_auc_into_variants(report: dict) -> None:
    """Put each variant's held-out AUC and its delta from Keras beside its size and differences."""
    evaluation = report.get("evaluation") or {}
    for variant, info in (report.get("tflite") or {}).items():
        ev = (evaluation.get("tflite") or {}).get(variant)
        if ev:
            info["macro_roc_auc"] = ev["macro_roc_auc"]
            info["keras_macro_roc_auc"] = evaluation.get("keras_macro_roc_auc")
            info["roc_auc_delta_vs_keras"] = ev["delta_vs_keras"]


# === Command line ===


def run_export(args) -> int:
    """``lumbar-tf export``: see `export_model`."""
    report = export_model(
        args.model,
        args.out,
        name=args.name,
        version=args.version,
        tflite=parse_variants(args.tflite),
        data_dir=args.data,
        representative_size=args.representative_size,
        metrics=getattr(args, "metrics", None),
        cache_dir=getattr(args, "cache", None),
    )
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """A terminal table of the export report."""
    lines = [f"{'runtime':<22}{'size MB':>9}{'max |dp|':>11}{'AUC':>8}{'dAUC':>9}"]
    evaluation = report.get("evaluation") or {}
    sm = report["saved_model"]
    lines.append(f"{'keras':<22}{'':>9}{'':>11}{_fmt(evaluation.get('keras_macro_roc_auc')):>8}{'':>9}")
    lines.append(
        f"{'saved_model':<22}{sm['size_bytes'] / 1e6:>9.2f}{sm['max_abs_diff']['threshold_probs']:>11.2e}"
        f"{_fmt(evaluation.get('saved_model_macro_roc_auc')):>8}{'':>9}"
    )
    for variant, info in (report.get("tflite") or {}).items():
        ev = (evaluation.get("tflite") or {}).get(variant, {})
        lines.append(
            f"{'tflite ' + variant:<22}{info['size_bytes'] / 1e6:>9.2f}"
            f"{info['max_abs_diff']['threshold_probs']:>11.2e}{_fmt(ev.get('macro_roc_auc')):>8}"
            f"{_fmt(ev.get('delta_vs_keras'), signed=True):>9}"
        )
    return "\n".join(lines)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


__all__ = [
    "ExportError",
    "VARIANTS",
    "build_metadata",
    "convert_tflite",
    "embed_metadata",
    "export_model",
    "next_version",
    "parse_variants",
    "run_export",
    "write_edge_saved_model",
    "write_saved_model",
]
