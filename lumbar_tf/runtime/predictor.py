"""The one path from a DICOM study to predictions.json, shared by every runtime (no TensorFlow).

    predictor = load_predictor("export/saved_model/lumbar_spine")   # or TFLite, Keras, gRPC, REST
    result = predict_study(predictor, "test_images/44036939")
    result.predictions                                               # the predictions.json dict

A *predictor* is anything with:

- ``preprocess``: the `PreprocessConfig` the model was trained with (views, sizes, offsets);
- ``label_semantics``: which grade thresholds its training labels made known
  (`core.labels.semantics_or_default`: presence is P(>=1) with fine grades, else P(>=2));
- ``predict_views(views) -> {"threshold_probs" [B,5,5,3], "level_xy" [B,5,2], ...}`` on model-ready
  views ``{name: [B, S, S, 3]}`` (0-255);
- ``model_info() -> {"name", "version", "format"}``;
- for an axial model (``preprocess.axial`` set) also ``localize_views(views) -> level_xy [B,5,2]``,
  and ``predict_views(views, axial=[B,5,S,S,3])``: the axial crops depend on where the levels are,
  so the study takes two calls, localise then grade, with `lumbar_tf.axial` (numpy) between them.

The adapters are thin: `keras_model.KerasPredictor`, `saved_model.SavedModelPredictor`,
`tflite_model.EdgeModel` and `serving.predictor.ServingPredictor` (gRPC or REST). `predict_study`
reads the study once, builds the views exactly as training does (`preprocess.build_views`), runs
the predictor, maps the levels back onto the source slices and builds predictions.json
(`predictions.build_predictions`), so the JSON never depends on the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lumbar_tf import axial, preprocess
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom.reader import DicomError, Series, Study, read_series_descriptions, read_study
from lumbar_tf.runtime import predictions, quality


class Predictor(Protocol):
    preprocess: PreprocessConfig
    label_semantics: dict

    def predict_views(self, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def model_info(self) -> dict: ...


@dataclass
class StudyResult:
    """What predicting one study produced: predictions.json, the study read, and the tensors behind it."""

    predictions: dict
    study: Study
    outputs: dict  # the model's outputs for this study, numpy, batch of one
    views: dict  # the model-ready views the predictor saw, {name: [S, S, 3] uint8}
    grid: preprocess.ViewGrid
    view_instances: dict  # view name -> instance numbers of its three channels
    preprocess: PreprocessConfig
    axial: tuple | None = None  # an axial model's (projections, crops [5, S, S, 3] uint8)

    @property
    def threshold_probs(self) -> np.ndarray:
        """``[5, 5, 3]`` P(grade >= 1, 2, 3) per (condition, level), straight from the model."""
        return np.asarray(self.outputs["threshold_probs"])[0]

    @property
    def level_xy(self) -> np.ndarray:
        return np.asarray(self.outputs["level_xy"])[0]

    def midline(self) -> tuple[Series, int] | None:
        """``(series, slice index)`` that predictions.json places the levels on, or None when the
        levels have no position (the heatmaps, the PACS overlay and its SR point at this slice)."""
        instance = next(
            (lv["instance_number"] for lv in self.predictions.get("levels", []) if lv.get("instance_number")),
            None,
        )
        if instance is None:
            return None
        for spec in self.preprocess.views:
            series = self.study.series_by_description(spec.series_description)
            if series is not None and int(instance) in series.instance_numbers:
                return series, series.index_of_instance(int(instance))
        return None


def descriptions_for_study(study_dir) -> dict[str, str] | None:
    """Series descriptions of a study in the RSNA layout (``DATA/{split}_images/{study_id}``), if the
    ``{split}_series_descriptions.csv`` is there; else None (series are typed from their headers)."""
    study_dir = Path(study_dir)
    images = study_dir.parent
    split = images.name[: -len("_images")] if images.name.endswith("_images") else None
    if not split:
        return None
    csv_path = images.parent / f"{split}_series_descriptions.csv"
    if not csv_path.is_file():
        return None
    try:
        return read_series_descriptions(csv_path).get(study_dir.name)
    except DicomError:
        return None


def _check_outputs(outputs: dict, predictor) -> None:
    from lumbar_tf.core.errors import ServingError

    missing = [k for k in ("threshold_probs", "level_xy") if k not in outputs]
    if missing:
        raise ServingError(
            f"the model has no output {', '.join(missing)} (is it a lumbar-tf export?)",
            code="CLIENT",
            target=str(getattr(predictor, "target", "")),
        )


def predict_study(
    predictor: Predictor,
    study_dir,
    *,
    study_id: str | None = None,
    series_descriptions: dict | None = None,
    study: Study | None = None,
) -> StudyResult:
    """Read a DICOM study, preprocess it as in training, run ``predictor``, build predictions.json.

    Args:
        predictor: see the module docstring.
        study_dir: ``{study_id}/{series_id}/{instance}.dcm``.
        study_id: written into predictions.json; default: the study folder's name.
        series_descriptions: ``series_id -> description`` (RSNA CSV); default: the CSV of the
            study's data folder when it is in the RSNA layout, else typed from the headers.
        study: the study's headers when the caller has read them already (read once).

    Raises:
        DicomError: unreadable study or no sagittal series.
    """
    cfg = predictor.preprocess
    if study is None:
        if series_descriptions is None:
            series_descriptions = descriptions_for_study(study_dir)
        study = read_study(study_dir, series_descriptions)
    views, grid, info, warnings = preprocess.build_views(study, cfg)
    batch = {name: np.asarray(views[name])[None] for name in cfg.view_names}
    if cfg.axial is None:
        axial_in, raw = None, predictor.predict_views(batch)
    else:
        axial_in = axial_inputs(predictor, study, batch, grid, info)  # (projections, crops)
        raw = predictor.predict_views(batch, axial=axial_in[1][None])
    outputs = {k: np.asarray(v) for k, v in raw.items()}
    _check_outputs(outputs, predictor)
    built = (views, grid, info, warnings)
    return study_result(predictor, study, built, outputs, study_id=study_id, axial=axial_in)


def axial_inputs(predictor, study: Study, batch: dict, grid, info: dict, level_xy=None):
    """Localise, project the predicted levels onto the study's Axial T2 series, crop: the axial
    model's ``(projections, crops [5, S, S, 2n+1] uint8)``; uncovered levels are zeros.
    ``level_xy`` ``[1, 5, 2]``: the localiser's answer when the caller has it (benchmarks time the
    calls apart)."""
    cfg = predictor.preprocess
    a = cfg.axial
    if level_xy is None:
        level_xy = predictor.localize_views(batch)
    level_xy = np.asarray(level_xy)[0]
    points = axial.level_points_patient(study, grid, info, level_xy, cfg)
    series = axial.axial_series(study)
    projections = axial.project_levels(points, series, snap_mm=axial.DISC_SNAP_MM)
    crops = axial.axial_crops(
        series, projections, cfg, crop_mm=a.crop_mm, size=cfg.crop_size, neighbours=a.neighbours
    )
    return projections, crops


def _axial_entries(study: Study, projections, warnings: list) -> tuple[list[dict], str | None]:
    """predictions.json's ``axial`` (one entry per level, x/y in the pixels of the slice's file) and
    the series used; a warning per level the axial series does not cover (it is graded from the
    sagittal views alone)."""
    by_id = {s.series_id: s for s in axial.axial_series(study)}
    entries = []
    for p in projections:
        if not p.covered:
            warnings.append(f"{p.level}: no axial coverage ({p.reason}); graded from the sagittal views only")
        x, y = p.x_px, p.y_px
        if p.covered:  # a slice of another size was resampled onto its series' matrix
            x, y = by_id[p.series_id].slices[p.slice_index].px_to_file_px((p.x_px, p.y_px))
        entries.append(
            {
                "level": p.level,
                "covered": bool(p.covered),
                "series_id": p.series_id if p.covered else None,
                "instance_number": p.instance_number if p.covered else None,
                "x": float(x) if p.covered else None,
                "y": float(y) if p.covered else None,
                "distance_mm": float(p.distance_mm) if p.covered else None,
            }
        )
    used = [e["series_id"] for e in entries if e["covered"]]
    return entries, (max(set(used), key=used.count) if used else None)


def study_result(
    predictor, study: Study, built: tuple, outputs: dict, *, study_id=None, axial=None
) -> StudyResult:
    """predictions.json from the model's ``outputs`` (batch of one) for views ``built`` by
    `preprocess.build_views`; `predict_study`'s second half, for callers that batch studies
    (`runtime.beam_predict`). ``predictor`` needs only ``preprocess``, ``fine_grades``, ``model_info``;
    ``axial``: an axial model's ``(projections, crops)`` (`axial_inputs`)."""
    cfg = predictor.preprocess
    views, grid, info, warnings = built
    warnings = list(warnings)
    level_xy = outputs["level_xy"][0]
    positions = predictions.level_positions_from_views(study, grid, info, level_xy, cfg, warnings)
    series = {k: None if v is None else v.series_id for k, v in preprocess.view_series(study, cfg).items()}
    axial_entries = None
    if cfg.axial is not None:
        axial_entries, series[cfg.axial.name] = _axial_entries(study, axial[0], warnings)
    uncovered = [e["level"] for e in axial_entries or () if not e["covered"]]
    flags = predictions.cell_flags(predictions.view_flags(study, cfg, series), cfg, uncovered)
    qc = quality.assess(
        level_xy,
        grid.spine_crop_mm,
        quality.midline_channel(views, cfg),
        bounds=getattr(predictor, "quality_bounds", None),  # measured on the model's training data
    )
    preds = predictions.build_predictions(
        study_id if study_id is not None else study.study_id,
        outputs["threshold_probs"][0],
        level_xy,
        model_info=predictor.model_info(),
        level_positions=positions,
        warnings=warnings,
        label_semantics=getattr(predictor, "label_semantics", None),
        series=series,
        quality=qc,
        flags=flags,
    )
    if axial_entries is not None:
        preds["axial"] = axial_entries
    return StudyResult(preds, study, outputs, views, grid, info, cfg, axial)
