"""What an exported version says about itself: ``metadata.json`` and the TFLite files' embedded copy.

DESIGN.md "Export contract": conditions, levels, grades, view specs, preprocessing, a training-data
summary (with the label semantics: which grade thresholds the training labels made known), metrics
and the intended-use line. Cheap to build: JSON and CSV files of the run folder only.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import config_to_dict
from lumbar_tf.core.contract import (
    AXIAL_SIGNATURES,
    GRADE,
    INTENDED_USE,
    LEVEL_INDEX,
    LEVEL_XY,
    LOCALIZE,
    OUTPUT_SPECS,
    SERVING_SIGNATURE,
    THRESHOLD_PROBS,
)
from lumbar_tf.runtime.keras_model import label_semantics_of, quality_bounds_of, run_prior

LABEL_CODES = {
    "-2": "normal/mild",
    "-1": "unknown",
    "0": "none",
    "1": "mild",
    "2": "moderate",
    "3": "severe",
}


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def json_default(obj):
    """``json.dumps(default=...)`` for numpy values and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _versions() -> dict:
    from importlib import metadata

    import keras
    import tensorflow as tf

    try:
        own = metadata.version("lumbar-tf")
    except metadata.PackageNotFoundError:
        own = "unknown"
    return {"lumbar_tf": own, "tensorflow": tf.__version__, "keras": keras.__version__}


def channel_meaning(spec) -> list[str]:
    """One sentence per channel of a view: which slice of which series it holds."""
    # The midline is the plane `preprocess.find_spine` finds in the image, not the stack centre;
    # learned offsets (`offsets: labels`) are already resolved to numbers in a trained model's config.
    how = "learned from the labelled instances" if spec.offsets in ("labels", "learned") else "fixed"
    out = []
    for offset in spec.offsets_mm:
        if abs(offset) < 1e-6:
            out.append(f"{spec.series_description} slice nearest the midline found in the image")
            continue
        side = "patient left" if offset > 0 else "patient right"
        out.append(
            f"{spec.series_description} slice nearest {abs(offset):.1f} mm to the {side} of the "
            f"midline found in the image (offset {how})"
        )
    return out


def training_summary(loaded) -> dict:
    """What the model was trained on, from the run folder (cheap: JSON and CSV files only)."""
    run = loaded.run_dir
    if run is None:
        return {"source": str(loaded.path), "note": "model file without its run folder"}
    out: dict = {"run": str(run)}
    split = read_json(run / "split.json") or {}
    finished = read_json(run / "finished.json") or {}
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
                out["label_codes"] = dict(LABEL_CODES)
                out["fine_grades_studies"] = int(
                    sum(index.studies[s].fine_grades for s in train_ids if s in index.studies)
                )
        except Exception as exc:  # noqa: BLE001  (a summary is optional; never fail an export on it)
            out["label_counts_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return out


def build_metadata(
    loaded, *, name: str, version: int, evaluation_metrics: dict | None = None, extra: dict | None = None
) -> dict:
    """``metadata.json`` of one exported version (contract: DESIGN.md "Export contract").

    ``label_semantics`` is the training run's record (`core.labels.label_semantics`); every runtime
    reads it for presence and the grade scale. ``fine_grades`` repeats its flag for older readers.
    ``extra``: further top-level entries (``int8_calibration``).
    """
    cfg = loaded.preprocess
    s = cfg.view_size
    finished = read_json(loaded.run_dir / "finished.json") if loaded.run_dir else None
    metrics: dict = {"training": finished}
    if evaluation_metrics is not None:
        metrics["evaluation"] = evaluation_metrics
    semantics = label_semantics_of(loaded)
    axial = axial_description(cfg)
    return {
        "name": name,
        "version": int(version),
        "format": "saved_model",
        "signature": SERVING_SIGNATURE if axial is None else GRADE,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "intended_use": INTENDED_USE,
        "label_semantics": semantics,
        "fine_grades": semantics["fine_grades"],
        "prior": {
            "threshold_probs": run_prior(loaded.run_dir),
            "meaning": "class frequencies of the training split; the rows of a study that cannot be read",
        },
        # Input-quality bounds measured on the training split (null: runtimes use the fallback).
        "quality_bounds": quality_bounds_of(loaded),
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
                "channels": channel_meaning(spec),
                "localizer_input": spec.name == cfg.localizer_view,
            }
            for spec in cfg.views
        ],
        **({} if axial is None else {"axial": axial}),
        "preprocess": config_to_dict(cfg),
        "outputs": {
            key: {"shape": shape, "dtype": "float32", "meaning": meaning}
            for key, (shape, meaning) in OUTPUT_SPECS.items()
        },
        "axes": "[batch, condition, level, ...] in the order of 'conditions' and 'levels'",
        "training_data": training_summary(loaded),
        "metrics": metrics,
        "source_model": str(loaded.path),
        **(extra or {}),
    }


def axial_description(cfg) -> dict | None:
    """metadata.json ``axial``: the axial model's third input and the two calls it takes (None for
    a sagittal-only model, whose ``serving_default`` answers in one call)."""
    a = cfg.axial
    if a is None:
        return None
    c, s = cfg.crop_size, cfg.view_size
    n = a.neighbours
    channels = [
        f"{a.series_description} slice {abs(k)} {'towards the head' if k > 0 else 'towards the feet'} "
        "of the chosen slice (zeros past the stack's end)"
        if k
        else f"{a.series_description} slice nearest the level's point (lumbar_tf.axial.project_levels)"
        for k in range(-n, n + 1)
    ]
    return {
        "name": a.name,
        "series_description": a.series_description,
        "shape": [None, L.N_LEVELS, c, c, a.channels],
        "dtype": "float32",
        "value_range": [0, 255],
        "crop_mm": a.crop_mm,
        "channels": channels,
        "missing": "a level no axial stack covers is all zeros (predictions.json warns)",
        "call_order": list(AXIAL_SIGNATURES),
        "signatures": {
            LOCALIZE: {
                "inputs": {cfg.localizer_view: {"shape": [None, s, s, 3], "dtype": "float32"}},
                "outputs": {LEVEL_XY: {"shape": [None, L.N_LEVELS, 2], "dtype": "float32"}},
            },
            GRADE: {
                "inputs": {
                    **{v: {"shape": [None, s, s, 3], "dtype": "float32"} for v in cfg.view_names},
                    a.name: {"shape": [None, L.N_LEVELS, c, c, a.channels], "dtype": "float32"},
                },
                "outputs": sorted(OUTPUT_SPECS),
            },
        },
        "how": (
            f"call {LOCALIZE}, project its level_xy onto the {a.series_description} series and crop "
            f"{a.crop_mm:g} mm around each level (lumbar_tf.axial.project_levels + axial_crops, "
            f"as lumbar_tf.runtime.predictor.predict_study does), then call {GRADE}"
        ),
    }


# Entries of the version's metadata that a TFLite file carries too (the tablet has nothing else).
TFLITE_KEEP = (
    "name",
    "version",
    "created",
    "versions",
    "intended_use",
    "label_semantics",
    "fine_grades",
    "prior",
    "quality_bounds",
    "conditions",
    "levels",
    "grades",
    "thresholds",
    "rsna_columns",
    "views",
    "axial",
    "preprocess",
)


def tflite_metadata(meta: dict, variant: str, file_name: str, quantization: str) -> dict:
    """The metadata embedded in (and beside) one ``.tflite`` file: the version's, plus its signatures."""
    cfg = meta["preprocess"]
    view_names = [v["name"] for v in cfg["views"]]
    s, c = cfg["view_size"], cfg["crop_size"]
    out = {k: meta[k] for k in TFLITE_KEEP if k in meta}
    if variant == "int8" and "int8_calibration" in meta:
        out["int8_calibration"] = meta["int8_calibration"]
    grade_inputs = {n: {"shape": [None, c, c, 3], "dtype": "float32", "range": [0, 255]} for n in view_names}
    runner = "crop between the signatures with lumbar_tf.preprocess.crop_levels (lumbar-tf-edge)"
    axial = cfg.get("axial")
    if axial:
        channels = 2 * int(axial.get("neighbours", 1)) + 1
        grade_inputs[axial["name"]] = {"shape": [None, c, c, channels], "dtype": "float32", "range": [0, 255]}
        runner += (
            f"; {axial['name']}: the level's axial crop (lumbar_tf.axial.project_levels + axial_crops of "
            "localize's level_xy), zeros where no axial stack covers the level"
        )
        # the SavedModel's two-call description does not apply to the file's own signatures
        out["axial"] = {k: v for k, v in out.get("axial", {}).items() if k not in ("signatures", "how")}
    out.update(
        format="tflite",
        variant=variant,
        quantization=quantization,
        file=file_name,
        signatures={
            LOCALIZE: {
                "inputs": {view_names[0]: {"shape": [None, s, s, 3], "dtype": "float32", "range": [0, 255]}},
                "outputs": {LEVEL_XY: {"shape": [None, 5, 2], "dtype": "float32"}},
            },
            GRADE: {
                "inputs": {**grade_inputs, LEVEL_INDEX: {"shape": [None], "dtype": "int32", "range": [0, 4]}},
                "outputs": {
                    THRESHOLD_PROBS: {
                        "shape": [None, 5, 3],
                        "dtype": "float32",
                        "meaning": "per level: condition x P(grade>=1, >=2, >=3)",
                    }
                },
            },
        },
        runner=runner,
    )
    return out
