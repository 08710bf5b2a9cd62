"""Levels onto the axial series through DICOM geometry, and per-level axial crops (numpy + OpenCV).

Why geometry and not a second localiser: the strong RSNA 2024 solutions find each level's axial
slice by projecting the level's 3-D point (found on the sagittal series) onto the axial planes
(point-to-plane distance from ImagePositionPatient / ImageOrientationPatient). Same layer as
`lumbar_tf.preprocess` (the tablet imports it): never TensorFlow or Keras.

Steps, all in DICOM patient coordinates (LPS mm):
  sagittal view position -> source pixel -> patient point  (`level_points_patient`)
  patient point -> axial stack, nearest slice, in-plane pixel  (`project_levels`)
  projection -> crop of the slice and its neighbours  (`axial_crops`)

An axial series is split into *stacks* (`find_stacks`): slices sharing one orientation at regular
spacing. A contiguous acquisition is one stack; per-disc angled acquisitions give one 3-5-slice stack
per disc inside one series. A point is *covered* by a stack when its nearest plane is within half the
stack's slice spacing (+ a tolerance) and it projects inside that slice's field of view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lumbar_tf import preprocess
from lumbar_tf.core import labels
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom.reader import AXIAL_T2, Series, SliceHeader, Study


@dataclass(frozen=True)
class ProjectionParams:
    """Tolerances of the stack split and of the coverage test.

    orientation_tol_deg: slices whose normals differ by less than this share a stack orientation.
    gap_factor: within one orientation, a gap over ``gap_factor`` x the median gap starts a new stack.
    max_gap_mm: a gap over this always starts a new stack (two lone slices far apart are no stack).
    tolerance_mm: added to half the slice spacing before a point counts as outside a stack.
    single_slice_mm: the slab thickness assumed for a stack of one slice (no spacing to measure).
    tie_mm: nearest-plane distances closer than this are a tie (the series with more slices wins).
    """

    orientation_tol_deg: float = 1.0
    gap_factor: float = 1.5
    max_gap_mm: float = 12.0
    tolerance_mm: float = 1.0
    single_slice_mm: float = 4.0
    tie_mm: float = 0.1


DEFAULT_PARAMS = ProjectionParams()
# A stack of at most this many slices is a per-disc stack: the radiographer centred it on one disc.
DISC_STACK_SLICES = 5
# Levels within this of a per-disc stack's middle plane take that middle slice (`project_levels`
# ``snap_mm``): the localiser errs by ~5 mm median / ~19 mm p90 along the spine, more than a 3-slice
# stack covers, while the stack itself was placed on the disc (benchmarks/axial_ablation_results.md).
DISC_SNAP_MM = 12.0
_SAME_PLANE_MM = 0.01  # planes closer than this are one position (a repeated slice)


@dataclass(frozen=True)
class AxialStack:
    """Slices of one series sharing an orientation at regular spacing."""

    series_id: str
    indices: tuple[int, ...]  # into `Series.slices`, ordered feet -> head along `normal`
    normal: tuple[float, float, float]  # unit, signed like `Series.normal` (head-positive for axial)
    spacing_mm: float  # median distance between neighbouring planes


@dataclass(frozen=True)
class AxialProjection:
    """Where one level's 3-D point falls on the axial series.

    ``slice_index`` indexes `Series.slices` of ``series_id``; ``distance_mm`` is the signed distance
    of the point from that slice's plane (positive: towards the head); ``(x_px, y_px)`` is the
    point's projection in that slice's pixels (column, row). When ``covered`` is False the fields
    still name the nearest slice found (None / NaN where there is none) and ``reason`` says why.
    """

    level: str
    series_id: str | None
    instance_number: int | None
    slice_index: int | None
    distance_mm: float
    x_px: float
    y_px: float
    covered: bool
    reason: str = ""


# === Stacks ===


def _slice_normal(s: SliceHeader, reference: np.ndarray) -> np.ndarray:
    n = s.normal / np.linalg.norm(s.normal)
    return -n if n @ reference < 0 else n


def find_stacks(series: Series, params: ProjectionParams = DEFAULT_PARAMS) -> list[AxialStack]:
    """Split a series into stacks: group slices by orientation, then cut each group at large gaps."""
    cos_tol = math.cos(math.radians(params.orientation_tol_deg))
    groups: list[tuple[np.ndarray, list[int]]] = []
    for i, s in enumerate(series.slices):
        n = _slice_normal(s, series.normal)
        for normal, members in groups:
            if n @ normal >= cos_tol:
                members.append(i)
                break
        else:
            groups.append((n, [i]))
    stacks = []
    for _, members in groups:
        mean = np.mean([_slice_normal(series.slices[i], series.normal) for i in members], axis=0)
        mean /= np.linalg.norm(mean)
        pos = np.array([series.slices[i].position @ mean for i in members])
        order = np.argsort(pos, kind="stable")
        members, pos = [members[k] for k in order], pos[order]
        gaps = np.diff(pos)
        limit = params.max_gap_mm
        if np.count_nonzero(gaps > _SAME_PLANE_MM) >= 2:  # repeated planes (gap 0) say nothing of spacing
            limit = min(limit, params.gap_factor * float(np.median(gaps[gaps > _SAME_PLANE_MM])))
        cuts = [k + 1 for k, g in enumerate(gaps) if g > limit]
        for run, run_pos in zip(np.split(np.arange(len(members)), cuts), np.split(pos, cuts), strict=True):
            steps = np.diff(run_pos)
            steps = steps[steps > _SAME_PLANE_MM]
            spacing = float(np.median(steps)) if steps.size else params.single_slice_mm
            stacks.append(
                AxialStack(
                    series_id=series.series_id,
                    indices=tuple(members[k] for k in run),
                    normal=tuple(float(v) for v in mean),
                    spacing_mm=spacing,
                )
            )
    stacks.sort(key=lambda st: st.indices[0])
    return stacks


def axial_series(study: Study) -> list[Series]:
    """The study's Axial T2 series: the one kept under its name first, then repeats set aside."""
    kept = study.series_by_description(AXIAL_T2)
    found = [kept] if kept is not None and kept.plane == "axial" else []
    found += [s for s in study.extra if s.description == AXIAL_T2 and s.plane == "axial"]
    return found


# === Projection ===


def _signed_distance(series: Series, index: int, point: np.ndarray) -> float:
    s = series.slices[index]
    return float((point - s.position) @ _slice_normal(s, series.normal))


def _inside_fov(s: SliceHeader, xy: np.ndarray) -> bool:
    return bool(-0.5 <= xy[0] <= s.cols - 0.5 and -0.5 <= xy[1] <= s.rows - 0.5)


def project_point(
    level: str, point, series_list: Sequence[Series], params: ProjectionParams = DEFAULT_PARAMS
) -> AxialProjection:
    """One patient point -> its `AxialProjection` on the nearest covering slice of ``series_list``.

    Per stack the nearest plane is taken; a stack covers the point when that plane is within
    ``spacing_mm / 2 + tolerance_mm`` and the point projects inside the slice. Among covering
    stacks the nearest plane wins; distances within ``tie_mm`` go to the series with more slices.
    Without a covering stack the nearest plane found is reported, not covered.
    """
    stacks = [(order, se, st) for order, se in enumerate(series_list) for st in find_stacks(se, params)]
    return _project(level, point, stacks, params)


def _project(level: str, point, stacks: list, params: ProjectionParams) -> AxialProjection:
    """`project_point` over stacks found already: ``[(series order, series, AxialStack)]``."""
    point = np.asarray(point, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(point)):
        return AxialProjection(
            level, None, None, None, math.nan, math.nan, math.nan, False, "no level position"
        )
    if not stacks:
        return AxialProjection(
            level, None, None, None, math.nan, math.nan, math.nan, False, "no axial series"
        )
    candidates = []  # (covered, |d|, -n slices, order, series, index, d, xy, reason)
    for order, series, stack in stacks:
        distances = [_signed_distance(series, i, point) for i in stack.indices]
        k = int(np.argmin(np.abs(distances)))
        index, d = stack.indices[k], distances[k]
        xy = series.slices[index].patient_to_pixel(point)
        half = stack.spacing_mm / 2 + params.tolerance_mm
        if abs(d) > half:
            reason = f"nearest axial slice is {abs(d):.1f} mm away (covered up to {half:.1f} mm)"
        elif not _inside_fov(series.slices[index], xy):
            reason = "projects outside the nearest axial slice's field of view"
        else:
            reason = ""
        candidates.append((not reason, abs(d), -len(series.slices), order, series, index, d, xy, reason))
    covered = [c for c in candidates if c[0]]
    pool = covered or candidates
    best = min(c[1] for c in pool)
    chosen = min((c for c in pool if c[1] <= best + params.tie_mm), key=lambda c: (c[2], c[3], c[1]))
    _, _, _, _, series, index, d, xy, reason = chosen
    return AxialProjection(
        level=level,
        series_id=series.series_id,
        instance_number=series.slices[index].instance_number,
        slice_index=int(index),
        distance_mm=float(d),
        x_px=float(xy[0]),
        y_px=float(xy[1]),
        covered=not reason,
        reason=reason,
    )


def project_levels(
    points,
    series_list: Sequence[Series] | Study,
    params: ProjectionParams = DEFAULT_PARAMS,
    snap_mm: float | None = None,
) -> list[AxialProjection]:
    """Level points ``[5, 3]`` (LPS mm; NaN rows for unknown levels) -> one projection per level.

    ``series_list``: the candidate axial series, or a Study (its `axial_series`). ``snap_mm``: a
    level whose point lies within this of the middle plane of a per-disc stack (at most
    `DISC_STACK_SLICES` slices) takes that middle slice, nearest middle first, one level per stack
    (`_snap`); the others are projected as usual.
    """
    if isinstance(series_list, Study):
        series_list = axial_series(series_list)
    points = np.asarray(points, dtype=np.float64).reshape(labels.N_LEVELS, 3)
    stacks = [(order, se, st) for order, se in enumerate(series_list) for st in find_stacks(se, params)]
    out = [_project(level, points[k], stacks, params) for k, level in enumerate(labels.LEVELS)]
    return out if snap_mm is None else _snap(out, points, stacks, snap_mm)


def _snap(projections: list, points: np.ndarray, stacks: list, snap_mm: float) -> list:
    """Levels -> the middle slice of the nearest per-disc stack within ``snap_mm``, greedily by
    distance so two levels never share a stack."""
    pairs = []
    for k, point in enumerate(points):
        if not np.all(np.isfinite(point)):
            continue
        for j, (_, series, stack) in enumerate(stacks):
            if len(stack.indices) > DISC_STACK_SLICES:
                continue
            middle = stack.indices[len(stack.indices) // 2]
            d = _signed_distance(series, middle, point)
            xy = series.slices[middle].patient_to_pixel(point)
            if abs(d) <= snap_mm and _inside_fov(series.slices[middle], xy):
                pairs.append((abs(d), k, j, series, middle, d, xy))
    out, used_levels, used_stacks = list(projections), set(), set()
    for _, k, j, series, middle, d, xy in sorted(pairs, key=lambda p: p[0]):
        if k in used_levels or j in used_stacks:
            continue
        used_levels.add(k)
        used_stacks.add(j)
        out[k] = AxialProjection(
            level=labels.LEVELS[k],
            series_id=series.series_id,
            instance_number=series.slices[middle].instance_number,
            slice_index=int(middle),
            distance_mm=float(d),
            x_px=float(xy[0]),
            y_px=float(xy[1]),
            covered=True,
        )
    return out


def slice_point_patient(series: Series, projection: AxialProjection) -> np.ndarray:
    """The projected point back in patient mm (the foot of the perpendicular on the chosen plane)."""
    return series.pixel_to_patient(projection.slice_index, (projection.x_px, projection.y_px))


# === Sagittal positions -> patient points ===


def source_px_to_patient(series: Series, instance_number: int, xy) -> np.ndarray:
    """Pixel (column, row) ``[..., 2]`` of one instance -> LPS mm ``[..., 3]`` (e.g. a label point)."""
    return series.pixel_to_patient(series.index_of_instance(instance_number), xy)


def level_points_patient(
    study: Study, grid: preprocess.ViewGrid, view_instances: dict, level_xy_norm, cfg: PreprocessConfig
) -> np.ndarray:
    """Level centres from ``level_xy`` -> ``[5, 3]`` patient points on the midline sagittal slice.

    The same slice `runtime.predictions.level_positions_from_views` places the levels on: the
    midline channel (offset nearest 0 mm) of the first configured view that was built, mapped
    through `preprocess.view_norm_to_source_px`. NaN rows when no view was built.

    Args:
        view_instances: view name -> instance numbers of its channels (`preprocess.build_views`).
    """
    xy = np.asarray(level_xy_norm, dtype=np.float64).reshape(labels.N_LEVELS, 2)
    for spec in cfg.views:
        instances = list(view_instances.get(spec.name) or [])
        series = study.series_by_description(spec.series_description)
        if not instances or series is None:
            continue
        channel = int(np.argmin(np.abs(np.asarray(spec.offsets_mm, dtype=np.float64))))
        index = series.index_of_instance(int(instances[channel]))
        px = preprocess.view_norm_to_source_px(series, index, xy, grid)
        return series.pixel_to_patient(index, px)
    return np.full((labels.N_LEVELS, 3), np.nan)


# === Crops ===


def _crop_axes(s: SliceHeader) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit axes of a crop: columns towards patient left (+x), rows towards posterior (+y),
    whatever the slice's IOP, so flipped or transposed acquisitions give the same picture."""
    n = s.normal / np.linalg.norm(s.normal)
    u = np.array([1.0, 0.0, 0.0]) - n[0] * n
    if np.linalg.norm(u) < 1e-6:  # a sagittal plane: keep the slice's own row direction
        u = s.row_dir
    u = u / np.linalg.norm(u)
    v = np.cross(n, u)
    return u, (v if v[1] >= 0 else -v)


def crop_to_slice_affine(s: SliceHeader, centre, crop_mm: float, size: int) -> np.ndarray:
    """2x3 affine: crop pixel (j, i) -> source pixel (column, row) of slice ``s``.

    The crop is ``size`` pixels of ``crop_mm / size`` mm, pixel ``((size-1)/2, (size-1)/2)`` on the
    projection of ``centre`` (LPS mm) onto the slice; axes from `_crop_axes`.
    """
    u, v = _crop_axes(s)
    mm = float(crop_mm) / int(size)
    row_mm, col_mm = s.pixel_spacing
    a = mm * np.array(
        [[u @ s.row_dir / col_mm, v @ s.row_dir / col_mm], [u @ s.col_dir / row_mm, v @ s.col_dir / row_mm]]
    )
    c = s.patient_to_pixel(np.asarray(centre, dtype=np.float64))
    half = (int(size) - 1) / 2
    return np.concatenate([a, (c - a @ np.array([half, half]))[:, None]], axis=1)


def _neighbourhood(stack: AxialStack, index: int, neighbours: int) -> list[int | None]:
    """Indices of the slice and ``neighbours`` on each side in its stack, feet -> head (None past the
    stack's ends)."""
    k = stack.indices.index(index)
    out = []
    for j in range(k - neighbours, k + neighbours + 1):
        out.append(stack.indices[j] if 0 <= j < len(stack.indices) else None)
    return out


def axial_crops(
    series: Series | Sequence[Series],
    projections: Sequence[AxialProjection],
    cfg: PreprocessConfig,
    *,
    crop_mm: float = 60.0,
    size: int = 64,
    neighbours: int = 1,
    params: ProjectionParams = DEFAULT_PARAMS,
) -> np.ndarray:
    """Per-level axial crops -> uint8 ``[5, size, size, 2 * neighbours + 1]``.

    ``series``: the axial series the projections name (`axial_series`). Channel ``neighbours`` is
    the chosen slice; the others are its neighbours in its stack, feet first. Each channel is
    centred on the level's projection onto that slice. A level's slices are prepared together like
    a view's (`preprocess.prepared_slices`: one pair of percentiles, CLAHE per slice), so its crop
    does not depend on which other levels were found; then resampled bilinearly, 0 outside the
    slice. A level that is not covered, and a neighbour past the end of its stack, are zeros: a
    copied slice would show anatomy that was not imaged there.
    """
    by_id = {s.series_id: s for s in ([series] if isinstance(series, Series) else series)}
    size, neighbours = int(size), int(neighbours)
    out = np.zeros((len(projections), size, size, 2 * neighbours + 1), dtype=np.uint8)
    stacks: dict[str, list[AxialStack]] = {}
    for k, p in enumerate(projections):
        if not p.covered:
            continue
        if p.series_id not in by_id:
            raise ValueError(f"projection of {p.level} names series {p.series_id}, which was not given")
        se = by_id[p.series_id]
        if se.series_id not in stacks:
            stacks[se.series_id] = find_stacks(se, params)
        stack = next(st for st in stacks[se.series_id] if p.slice_index in st.indices)
        centre = slice_point_patient(se, p)
        chosen = [
            (c, i) for c, i in enumerate(_neighbourhood(stack, p.slice_index, neighbours)) if i is not None
        ]
        prepared = preprocess.prepared_slices(se, [i for _, i in chosen], cfg)
        for (c, index), pixels in zip(chosen, prepared, strict=True):
            out[k, :, :, c] = cv2.warpAffine(
                pixels,
                crop_to_slice_affine(se.slices[index], centre, crop_mm, size),
                (size, size),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
    return out


__all__ = [
    "DEFAULT_PARAMS",
    "DISC_SNAP_MM",
    "DISC_STACK_SLICES",
    "AxialProjection",
    "AxialStack",
    "ProjectionParams",
    "axial_crops",
    "axial_series",
    "crop_to_slice_affine",
    "find_stacks",
    "level_points_patient",
    "project_levels",
    "project_point",
    "slice_point_patient",
    "source_px_to_patient",
]
