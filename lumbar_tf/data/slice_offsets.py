"""Channel offsets learned from the labelled instances of the coordinates file.

A view's side channels are the sagittal slices nearest to fixed lateral offsets from the midline
plane `preprocess.find_spine` finds. Where those offsets come from a guess (+-22 mm for the
foramina), the channel misses the slice a reader labels: real RSNA foramina lie 8-16 mm from the
midline, the realistic phantoms' about 15 mm x body size. The coordinates file says where they are:
each foraminal point (Sagittal T1) and each subarticular point (Axial T2, mapped to patient mm
through its slice's IPP/IOP/PixelSpacing) has a signed lateral distance, along the view's series
normal (patient-left +), from the study's midline plane as `find_spine` puts it, so the learned
offset also absorbs that finder's bias. The median per side over a bounded sample of studies (headers
and the spine finder only) becomes the side channel's offset.

`resolve_offsets` runs once per cache, in `prepare_cache` (pool and Beam) before any view is built;
the resolved `PreprocessConfig` (views with ``offsets: learned``) goes into the manifest and the
trained model, so every runtime uses the same numbers without learning anything.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from lumbar_tf.core.config import PreprocessConfig, ViewSpec, config_to_dict
from lumbar_tf.core.errors import one_line
from lumbar_tf.core.ids import study_sort_key
from lumbar_tf.dicom.reader import read_study
from lumbar_tf.preprocess import view_grid_for_study, view_series

# Studies read to learn the offsets (evenly spread over the sorted ids): headers plus the spine
# finder, about 0.5 s a realistic study on one core. A study's points mostly share one slice, so the
# studies count: with 40 the median is within ~0.5 mm (an eighth of a slice) of its limit, and a
# larger archive would only cost time.
SAMPLE_STUDIES = 40
# Fewer labelled points (or studies) on a side than this: keep the configured offsets.
MIN_POINTS = 10
MIN_STUDIES = 3
# The labels read on each view's series: a view of another series keeps its configured offsets.
SIDE_CONDITIONS = {
    "Sagittal T1": {"left": "left_neural_foraminal_narrowing", "right": "right_neural_foraminal_narrowing"},
    "Sagittal T2/STIR": {"left": "left_subarticular_stenosis", "right": "right_subarticular_stenosis"},
}


def side_channels(offsets_mm) -> dict[str, int]:
    """Channel of each side in a view's offsets: left = most positive, right = most negative
    (patient-left positive), midline = nearest 0."""
    offsets = np.asarray(offsets_mm, dtype=np.float64)
    return {
        "left": int(np.argmax(offsets)),
        "midline": int(np.argmin(np.abs(offsets))),
        "right": int(np.argmin(offsets)),
    }


def _learned_views(cfg: PreprocessConfig) -> list[ViewSpec]:
    return [spec for spec in cfg.views if spec.offsets == "labels"]


def study_offsets(task: tuple) -> tuple[str, dict[str, dict[str, list[float]]] | None, str | None]:
    """One study -> (study_id, {view: {side: [lateral mm of each labelled point]}}, error or None).

    Reads the headers of every series (the labelled one wins, as in `prepare_study`), finds the
    midline plane as the views do (`preprocess.view_grid_for_study`) and measures each labelled
    point of a `labels` view's conditions along that view's series normal (the labelled series'
    normal where the study lacks the view's series).
    """
    images_dir, labels, study_id, descriptions, cfg = task
    try:
        labelled = {row["series_id"] for row in labels.coordinates}
        study = read_study(Path(images_dir) / study_id, descriptions, prefer=labelled)
        midline = view_grid_for_study(study, cfg).midline_xyz
        by_id = {s.series_id: s for s in [*study.extra, *study.series.values()]}
        used = view_series(study, cfg)
        out: dict[str, dict[str, list[float]]] = {}
        for spec in _learned_views(cfg):
            sides = SIDE_CONDITIONS.get(spec.series_description, {})
            points: dict[str, list[float]] = {side: [] for side in sides}
            for row in labels.coordinates:
                side = next((s for s, c in sides.items() if c == row["condition"]), None)
                series = by_id.get(row["series_id"])
                if side is None or series is None:
                    continue
                try:
                    index = series.index_of_instance(row["instance_number"])
                except KeyError:
                    continue
                xy = series.slices[index].file_px_to_px((row["x"], row["y"]))  # label px are the file's
                point = series.pixel_to_patient(index, xy)
                normal = used[spec.name].normal if used[spec.name] is not None else series.normal
                points[side].append(round(float((point - midline) @ normal), 3))
            out[spec.name] = points
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001  (a study that cannot be read is left out of the sample)
        return study_id, None, one_line(exc)
    return study_id, out, None


def sample_studies(study_ids: Iterable[str], labels: dict, n: int = SAMPLE_STUDIES) -> list[str]:
    """Up to ``n`` of the studies with coordinates, evenly spread over their sorted ids."""
    ids = sorted((s for s in study_ids if s in labels and labels[s].coordinates), key=study_sort_key)
    if len(ids) <= n:
        return ids
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, n).round().astype(int)]


def resolve_offsets(
    images_dir,
    labels: dict,
    descriptions: dict,
    study_ids: Iterable[str],
    cfg: PreprocessConfig,
    *,
    mapper: Callable = map,
    sample: int = SAMPLE_STUDIES,
) -> tuple[PreprocessConfig, dict]:
    """``cfg`` with every ``offsets: labels`` view resolved, and a report per such view.

    ``labels``: study_id -> `StudyLabels`; ``mapper``: ``map`` or a pool's ``imap``. A side with
    fewer than MIN_POINTS points (or MIN_STUDIES studies) keeps the configured offsets, and so does
    one whose median lies on the other side of the midline (the coordinates file would then swap
    left and right); both with a warning. A view whose sides all fall back is ``fixed``.
    """
    specs = _learned_views(cfg)
    if not specs:
        return cfg, {}
    chosen = sample_studies(study_ids, labels, sample)
    tasks = [(str(images_dir), labels[sid], sid, descriptions.get(sid, {}), cfg) for sid in chosen]
    results = list(mapper(study_offsets, tasks))
    failed = {sid: error for sid, _, error in results if error is not None}
    report: dict[str, dict] = {}
    views = []
    for spec in cfg.views:
        if spec.offsets != "labels":
            views.append(spec)
            continue
        new, entry = _resolve_view(spec, [(sid, per[spec.name]) for sid, per, _ in results if per])
        entry["studies_sampled"], entry["studies_failed"] = len(chosen), len(failed)
        for message in entry["warnings"]:
            warnings.warn(message, stacklevel=2)
        views.append(new)
        report[spec.name] = entry
    return dataclasses.replace(cfg, views=views), report


def _resolve_view(spec: ViewSpec, per_study: list[tuple[str, dict[str, list[float]]]]):
    channels = side_channels(spec.offsets_mm)
    offsets = list(spec.offsets_mm)
    entry: dict = {"fallback_mm": list(spec.offsets_mm), "warnings": []}
    sides = SIDE_CONDITIONS.get(spec.series_description)
    if sides is None:
        entry["warnings"].append(
            f"view {spec.name}: no labels are read on {spec.series_description!r}; "
            f"offsets_mm {list(spec.offsets_mm)} kept"
        )
    learned_any = False
    for side in sides or {}:
        values = np.array([v for _, points in per_study for v in points.get(side, [])], dtype=np.float64)
        n_studies = sum(1 for _, points in per_study if points.get(side))
        stats = {"points": int(values.size), "studies": n_studies}
        sign = 1.0 if side == "left" else -1.0
        why = None
        if values.size < MIN_POINTS or n_studies < MIN_STUDIES:
            why = (
                f"{values.size} labelled {sides[side]} points in {n_studies} studies "
                f"(need {MIN_POINTS} in {MIN_STUDIES})"
            )
        else:
            median = float(np.median(values))
            stats.update(median_mm=round(median, 2), iqr_mm=_iqr(values))
            if median * sign <= 0:
                why = (
                    f"the {side} points lie {median:+.1f} mm from the midline (patient-left +): "
                    "left and right swapped?"
                )
        if why is None:
            offsets[channels[side]] = round(median, 1)
            learned_any = True
        else:
            entry["warnings"].append(
                f"view {spec.name}: {why}; {side} channel kept at {spec.offsets_mm[channels[side]]:+g} mm"
            )
        entry[side] = stats
    entry["offsets_mm"] = offsets
    entry["offsets"] = "learned" if learned_any else "fixed"
    return dataclasses.replace(spec, offsets_mm=tuple(offsets), offsets=entry["offsets"]), entry


def _iqr(values: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in np.percentile(values, [25, 75])]


def accepts(stored: dict, cfg: PreprocessConfig, report: dict) -> bool:
    """Whether a cache's preprocessing (``stored``, resolved, with its ``slice_offsets`` report) is
    what ``cfg`` asks for: equal, except that a ``labels`` view of ``cfg`` matches the view the
    cache resolved from the same fallback offsets."""
    wanted = config_to_dict(cfg)
    if stored == wanted:
        return True
    stored_views = stored.get("views") if isinstance(stored, dict) else None
    if not isinstance(stored_views, list) or len(stored_views) != len(wanted["views"]):
        return False
    for view, spec in zip(wanted["views"], stored_views):
        entry = report.get(view["name"]) if isinstance(report, dict) else None
        from_labels = isinstance(entry, dict) and entry.get("fallback_mm") == view["offsets_mm"]
        if view["offsets"] == "labels" and from_labels:
            view.update(offsets=spec.get("offsets"), offsets_mm=spec.get("offsets_mm"))
    return stored == wanted
