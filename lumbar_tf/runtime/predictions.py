"""Model outputs -> `predictions.json` and Kaggle submission rows (numpy only, never TensorFlow).

One implementation of the output contract of DESIGN.md, used by every predictor (Keras, SavedModel,
TF Serving client, TFLite edge runner), so the JSON a back-end receives never depends on the runtime.
`level_positions_from_views` maps ``level_xy`` back to source pixels through `lumbar_tf.preprocess`
(numpy + OpenCV), imported only when called.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lumbar_tf import preprocess
from lumbar_tf.core import labels
from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.core.io import write_csv_atomic, write_json_atomic
from lumbar_tf.dicom.reader import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_ISSUES
from lumbar_tf.runtime.quality import warnings_for as quality_warnings

SUBMISSION_HEADER = ("row_id", *labels.SUBMISSION_COLUMNS)
LEVEL_POSITION_KEYS = ("level", "instance_number", "x", "y")
# Threshold probabilities that break P(>=1) >= P(>=2) >= P(>=3) by more than this get a warning.
MONOTONE_TOLERANCE = 1e-4
RSNA_ONLY_WARNING = (
    "the model was trained on RSNA labels only: mild is not distinguishable from none; presence is "
    "P(>= moderate) and grades are normal_mild/moderate/severe"
)


# The series each condition is read on (RSNA 2024: its coordinates are on that series). A cell is
# flagged by that series' view and by the localiser's view (the first), which places every level.
CONDITION_SERIES = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}
# A cell's "flags" are "<view>: <code>": what reading the input cost the views the cell was read from.
FLAG_CODES = {
    **SERIES_ISSUES,
    "series_set_aside": "the series of this description was set aside as unusable (see the warnings)",
    "series_missing": "no series of this description; the view is zeros or another series stands in",
    "not_covered": "the axial series does not cover this level; graded from the sagittal views only",
}


def _view_descriptions(cfg) -> dict[str, str]:
    """View name -> the series description it is built from (the axial view's is Axial T2)."""
    described = {spec.name: spec.series_description for spec in cfg.views}
    if cfg.axial is not None:
        described[cfg.axial.name] = AXIAL_T2
    return described


def view_flags(study, cfg, series_ids: dict) -> dict[str, list[str]]:
    """View name -> `FLAG_CODES` of what reading its input cost, for views ``series_ids`` names
    (view -> series id used, None where none was; predictions.json's "series")."""
    by_id = {s.series_id: s for s in [*study.series.values(), *study.extra]}
    described = _view_descriptions(cfg)
    out = {}
    for view, sid in series_ids.items():
        desc = described.get(view)
        series = by_id.get(sid) if sid is not None else None
        codes = sorted(series.issues) if series is not None else []
        if desc is not None and study.series_by_description(desc) is None:
            codes.append("series_set_aside" if desc in study.set_aside else "series_missing")
        out[view] = codes
    return out


def cell_flags(flags_by_view: dict[str, list[str]], cfg, uncovered_levels=()) -> dict[tuple, list[str]]:
    """(condition, level) -> ``["<view>: <code>", ...]`` from `view_flags`; ``uncovered_levels``: the
    levels the axial series does not cover (their subarticular cells get ``not_covered``)."""
    views_of: dict[str, list[str]] = {}
    for view, desc in _view_descriptions(cfg).items():
        views_of.setdefault(desc, []).append(view)
    # Without an axial series at all its view's own flag says so; no per-level flag on top.
    absent = cfg.axial is None or bool(
        {"series_missing", "series_set_aside"} & set(flags_by_view.get(cfg.axial.name, []))
    )
    uncovered = set() if absent else set(uncovered_levels)
    out = {}
    for condition in labels.CONDITIONS:
        views = list(dict.fromkeys([cfg.views[0].name, *views_of.get(CONDITION_SERIES[condition], [])]))
        flags = [f"{v}: {code}" for v in views for code in flags_by_view.get(v, [])]
        axial_read = CONDITION_SERIES[condition] == AXIAL_T2
        for level in labels.LEVELS:
            extra = [f"{cfg.axial.name}: not_covered"] if axial_read and level in uncovered else []
            out[condition, level] = flags + extra
    return out


def _as_threshold_probs(threshold_probs) -> np.ndarray:
    probs = np.asarray(threshold_probs, dtype=np.float64)
    expected = (labels.N_CONDITIONS, labels.N_LEVELS, labels.N_THRESHOLDS)
    if probs.shape != expected:
        raise ValueError(f"threshold_probs: expected shape {list(expected)}, got {list(probs.shape)}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("threshold_probs: contains NaN or infinite values")
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ValueError("threshold_probs: values outside [0, 1] (pass probabilities, not logits)")
    return np.clip(probs, 0.0, 1.0)


def monotone_thresholds(threshold_probs) -> np.ndarray:
    """Project ``[..., 3]`` threshold probabilities onto P(>=1) >= P(>=2) >= P(>=3).

    The model is monotone by construction; this guards against float noise (and odd runtimes) so
    grade probabilities and the RSNA triple always sum to one.
    """
    probs = np.asarray(threshold_probs, dtype=np.float64)
    return np.minimum.accumulate(probs, axis=-1)


def _check_level_positions(level_positions) -> list[dict]:
    if len(level_positions) != labels.N_LEVELS:
        raise ValueError(f"level_positions: expected {labels.N_LEVELS} entries, got {len(level_positions)}")
    by_level = {}
    for entry in level_positions:
        missing = [k for k in LEVEL_POSITION_KEYS if k not in entry]
        if missing:
            raise ValueError(f"level_positions: entry {entry!r} lacks {', '.join(missing)}")
        if entry["level"] not in labels.LEVELS:
            raise ValueError(f"level_positions: unknown level {entry['level']!r}")
        by_level[entry["level"]] = entry
    if len(by_level) != labels.N_LEVELS:
        raise ValueError("level_positions: each level must appear exactly once")
    return [by_level[level] for level in labels.LEVELS]


def _optional_number(value, cast):
    if value is None:
        return None
    value = cast(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_predictions(
    study_id,
    threshold_probs,
    level_xy_norm,
    *,
    model_info: dict,
    level_positions: list[dict],
    warnings: list[str] | tuple[str, ...] = (),
    fine_grades: bool = True,
    label_semantics: dict | None = None,
    series: dict | None = None,
    quality: dict | None = None,
    flags: dict | None = None,
) -> dict:
    """One study's `predictions.json` dict (DESIGN.md output contract).

    Args:
        study_id: study identifier (written as a string).
        threshold_probs: ``[5, 5, 3]`` P(grade>=1), P(>=2), P(>=3) per (condition, level).
        level_xy_norm: ``[5, 2]`` level centres (x, y) in normalised view coordinates; written beside
            the source-pixel positions as ``x_norm`` / ``y_norm``.
        model_info: ``{"name", "version", "format"}`` of the model that produced the outputs.
        level_positions: 5 dicts ``{level, instance_number, x, y}`` on the midline Sagittal T2 slice
            (source pixels), computed by the caller from ``level_xy`` through preprocess.
        warnings: messages for the reader (missing series, clipped coordinates, ...).
        fine_grades: the model was trained with grades 0/1 known; presence is then P(>=1), else P(>=2).
        label_semantics: the model's record (`core.labels.semantics_or_default`); overrides
            ``fine_grades`` and is written as the top-level ``label_semantics``. Without fine grades,
            P(none)/P(mild) mean nothing: ``grade``/``grade_probs`` are then in the 3-class RSNA
            space (normal_mild, moderate, severe) and a warning says mild is not distinguishable.
        series: view name -> series id it was built from (None: a zero view); written as "series".
        quality: `runtime.quality.assess` of the input, written as "quality"; when
            implausible, a warning line says so.
        flags: (condition, level) -> flag strings (`cell_flags`), written as each cell's "flags".
    """
    if label_semantics is None:
        label_semantics = {"fine_grades": bool(fine_grades), "known_thresholds": list(labels.THRESHOLDS)}
        if not fine_grades:
            label_semantics["known_thresholds"] = list(labels.THRESHOLDS[1:])
    semantics = labels.semantics_or_default(label_semantics)
    fine_grades = semantics["fine_grades"]
    probs = _as_threshold_probs(threshold_probs)
    warnings = [str(w) for w in warnings]
    monotone = monotone_thresholds(probs)
    if np.max(probs - monotone) > MONOTONE_TOLERANCE:
        warnings.append("threshold probabilities were not monotone; projected to P(>=1)>=P(>=2)>=P(>=3)")
    xy = np.asarray(level_xy_norm, dtype=np.float64)
    if xy.shape != (labels.N_LEVELS, 2):
        raise ValueError(f"level_xy_norm: expected shape [{labels.N_LEVELS}, 2], got {list(xy.shape)}")
    positions = _check_level_positions(level_positions)
    for key in ("name", "version", "format"):
        if key not in model_info:
            raise ValueError(f"model_info: missing {key!r}")

    rsna = labels.rsna_triple(monotone).astype(np.float64)
    grade_probs = labels.grade_probs_from_thresholds(monotone).astype(np.float64) if fine_grades else rsna
    if not fine_grades:
        warnings.append(RSNA_ONLY_WARNING)
    warnings.extend(quality_warnings(quality))
    presence = labels.presence(monotone, fine_grades_known=fine_grades).astype(np.float64)

    cells = []
    for ci, condition in enumerate(labels.CONDITIONS):
        for li, level in enumerate(labels.LEVELS):
            gp = grade_probs[ci, li]
            cells.append(
                {
                    "condition": condition,
                    "level": level,
                    "grade": int(np.argmax(gp)),
                    "grade_probs": [float(p) for p in gp],
                    "presence": float(presence[ci, li]),
                    "rsna": {
                        name: float(rsna[ci, li, k]) for k, name in enumerate(labels.SUBMISSION_COLUMNS)
                    },
                    "flags": [str(f) for f in (flags or {}).get((condition, level), [])],
                }
            )
    levels = []
    for li, entry in enumerate(positions):
        levels.append(
            {
                "level": entry["level"],
                "instance_number": _optional_number(entry["instance_number"], int),
                "x": _optional_number(entry["x"], float),
                "y": _optional_number(entry["y"], float),
                "x_norm": float(xy[li, 0]),
                "y_norm": float(xy[li, 1]),
            }
        )
    preds = {
        "study_id": str(study_id),
        "model": {
            "name": str(model_info["name"]),
            "version": model_info["version"],
            "format": str(model_info["format"]),
        },
        "cells": cells,
        "levels": levels,
        "series": {str(k): None if v is None else str(v) for k, v in (series or {}).items()},
        "warnings": warnings,
        "label_semantics": {
            "known_thresholds": list(semantics.get("known_thresholds", [])),
            "fine_grades": fine_grades,
            "presence": f"P(grade {semantics['presence']})",
            "grade_scale": semantics["grade_scale"],
        },
        "intended_use": INTENDED_USE,
    }
    if quality is not None:
        preds["quality"] = quality
    return preds


def level_positions_from_views(
    study, grid, info: dict, level_xy_norm, cfg, warnings: list | None = None
) -> list[dict]:
    """Level centres from ``level_xy`` -> 5 ``{level, instance_number, x, y}`` in source pixels.

    The points go on the midline slice (the channel whose offset is nearest 0 mm) of the first
    configured view that was built (the localiser view, Sagittal T2/STIR by default), through
    `preprocess.view_norm_to_source_px`, in the pixels of the slice's file (`SliceHeader.px_to_file_px`).
    If that view's series is missing, the next view's midline is
    used; with no view at all, positions are None. Either case appends a message to ``warnings``.

    Args:
        study, grid, info: `dicom.read_study` / `preprocess.build_views` results for the study
            (``info``: view name -> instance numbers of its three channels).
        level_xy_norm: ``[5, 2]`` (x_norm, y_norm) from the model's ``level_xy``.
        cfg: the `PreprocessConfig` the views were built with.
    """

    warnings = [] if warnings is None else warnings
    xy = np.asarray(level_xy_norm, dtype=np.float64).reshape(labels.N_LEVELS, 2)
    for k, spec in enumerate(cfg.views):
        instances = list(info.get(spec.name) or [])
        series = study.series_by_description(spec.series_description)
        if not instances or series is None:
            continue
        channel = int(np.argmin(np.abs(np.asarray(spec.offsets_mm, dtype=np.float64))))
        instance = int(instances[channel])
        index = series.index_of_instance(instance)
        # The file's own pixels: a slice of another size was resampled onto its series' matrix.
        px = series.slices[index].px_to_file_px(preprocess.view_norm_to_source_px(series, index, xy, grid))
        if k > 0:
            warnings.append(
                f"level positions are on the midline {spec.series_description} slice "
                f"({cfg.views[0].series_description} missing)"
            )
        return [
            {"level": level, "instance_number": instance, "x": float(px[i, 0]), "y": float(px[i, 1])}
            for i, level in enumerate(labels.LEVELS)
        ]
    warnings.append("no sagittal view to place the levels on; level positions left empty")
    return [{"level": level, "instance_number": None, "x": None, "y": None} for level in labels.LEVELS]


def write_predictions(path, preds: dict) -> Path:
    """Write a predictions dict as JSON with floats rounded to 6 digits (atomically)."""
    return write_json_atomic(path, preds, indent=2, digits=6)


def submission_rows(study_id, threshold_probs) -> list[tuple[str, float, float, float]]:
    """25 Kaggle rows ``(row_id, normal_mild, moderate, severe)`` in CONDITIONS x LEVELS order: the
    metric's decision rule (`core.labels.rsna_submission_triple`), not the plain triple of
    predictions.json. Every writer (`runtime.batch`, `runtime.beam_predict`, the prior rows of
    studies that could not be read) goes through here."""
    monotone = monotone_thresholds(_as_threshold_probs(threshold_probs))
    rsna = labels.rsna_submission_triple(monotone).astype(np.float64)
    rows = []
    for ci, condition in enumerate(labels.CONDITIONS):
        for li, level in enumerate(labels.LEVELS):
            triple = rsna[ci, li]
            rows.append((f"{study_id}_{condition}_{level}", *(float(v) for v in triple)))
    return rows


def write_submission(path, rows) -> Path:
    """Write Kaggle submission rows (any number of studies) as ``row_id,normal_mild,moderate,severe``."""
    lines = []
    for row in rows:
        if len(row) != len(SUBMISSION_HEADER):
            raise ValueError(f"submission row {row!r}: expected {len(SUBMISSION_HEADER)} fields")
        lines.append([str(row[0]), *(f"{float(v):.6f}" for v in row[1:])])
    return write_csv_atomic(path, SUBMISSION_HEADER, lines)


def grade_scale(preds: dict) -> list[str]:
    """The names a cell's ``grade`` indexes: none..severe, or normal_mild/moderate/severe for a model
    trained on RSNA labels alone (predictions without the record are the 4-grade kind)."""
    return list((preds.get("label_semantics") or {}).get("grade_scale") or labels.FINE_GRADE_SCALE)


def summary_lines(preds: dict, path) -> list[str]:
    """What a command prints for one study: where its predictions went, the three most severe cells
    and the warnings."""
    model = preds["model"]
    lines = [f"study {preds['study_id']} ({model['format']} {model['name']} v{model['version']}): {path}"]
    scale = grade_scale(preds)
    for cell in sorted(preds["cells"], key=lambda c: -c["rsna"]["severe"])[:3]:
        lines.append(
            f"  {cell['condition']} {cell['level']}: grade {scale[cell['grade']]}, "
            f"P(severe) {cell['rsna']['severe']:.2f}"
        )
    lines.extend(f"  warning: {warning}" for warning in preds["warnings"])
    return lines
