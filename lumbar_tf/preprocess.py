"""DICOM series -> model views -> per-level crops (numpy + OpenCV only; never TensorFlow).

One implementation used by training (tf.data), the TF Serving client and the TFLite tablet runner,
so it must never import tensorflow or keras, directly or indirectly.

Pipeline (docs/architecture.md): choose three sagittal slices by lateral offset in mm -> decode
(modality LUT) -> percentile normalisation over those slices -> CLAHE -> resample each slice onto
the study's *view grid* (a ``spine_crop_mm`` square in the sagittal (y, z) plane, centred on the
Sagittal T2/STIR field of view) with ``cv2.warpAffine`` -> uint8 ``[S, S, 3]`` view -> square crops
of ``crop_mm`` around each level, exactly like ``tf.image.crop_and_resize``.

Coordinates, all as ``[..., 2]`` arrays in (x, y) = (column, row) order:
  source pixel (x, y) of slice k  <->  patient (y, z) mm  <->  view pixel (u, v)
  <->  normalised view (u + 0.5) / S, (v + 0.5) / S  <->  crop pixel (j, i) of a level box.
Each step has a function both ways (`slice_to_view_affine`, `ViewGrid`, `crop_px_to_view_px`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lumbar_tf.core.config import PreprocessConfig, ViewSpec
from lumbar_tf.dicom.reader import SAGITTAL_T2, DicomError, Series, Study

# === Intensity ===


def normalize_percentile(pixels: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    """Clip to the [low_pct, high_pct] percentiles of all values together, scale to [0, 1].

    ``pixels`` is ``[k, H, W]`` (or any shape): one pair of percentiles for all slices, so the
    channels of a view keep their relative brightness. A constant input gives zeros.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.size == 0:
        return pixels.copy()
    lo, hi = np.percentile(pixels, [low_pct, high_pct])
    return _scale_to_unit(pixels, lo, hi)


def _scale_to_unit(values: np.ndarray, lo, hi) -> np.ndarray:
    lo, hi = np.float32(lo), np.float32(hi)
    if not hi > lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 0..255 (rounded)."""
    return np.clip(np.rint(np.asarray(img01, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def apply_clahe(img: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """CLAHE (OpenCV) of a ``[H, W]`` image, uint8 or floats in [0, 1] -> uint8 ``[H, W]``."""
    img8 = img if img.dtype == np.uint8 else to_uint8(img)
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid),) * 2)
    return clahe.apply(img8)


def normalized_slices(series: Series, indices, clip_percentiles) -> np.ndarray:
    """Decode slices ``indices`` and normalise them together -> uint8 ``[k, H, W]`` (before CLAHE).

    Equal to ``to_uint8(normalize_percentile(series.load_pixels(indices), ...))``. Where the
    slices share one stored -> modality map (the usual case) it works on the stored integers
    instead: percentiles from their histogram and one lookup table for the rest, several times
    faster than sorting floats (a tie at a rounding boundary may move a pixel by one grey level).
    """
    decoded = series.load_stored(indices)
    maps = {modality for _, modality in decoded}
    dtypes = {values.dtype for values, _ in decoded}
    if len(maps) == 1 and None not in maps and len(dtypes) == 1:
        dtype = dtypes.pop()
        if dtype.kind in "iu" and dtype.itemsize <= 2:
            return _normalize_stored(np.stack([v for v, _ in decoded]), maps.pop(), *clip_percentiles)
    pixels = np.stack([v if m is None else m.apply(v) for v, m in decoded])
    return to_uint8(normalize_percentile(pixels, *clip_percentiles))


def _normalize_stored(stored: np.ndarray, modality, low_pct: float, high_pct: float) -> np.ndarray:
    """`normalized_slices` for 8/16-bit stored integers sharing one modality map."""
    # Histogram over the stored words read as unsigned (no copy); the order of the bins does not
    # matter because the distinct values are sorted by their modality value below.
    codes = stored.view(stored.dtype.str.replace("i", "u"))
    counts = np.bincount(codes.ravel())
    present = np.flatnonzero(counts)
    stored_values = present.astype(codes.dtype).view(stored.dtype)
    # The modality values of the distinct stored values: what load_pixels gives, bit for bit.
    values = modality.apply(stored_values)
    order = np.argsort(values, kind="stable")
    lo, hi = _histogram_percentiles(values[order], counts[present][order], (low_pct, high_pct))
    lut = np.zeros(counts.size, np.uint8)
    lut[present] = to_uint8(_scale_to_unit(values, lo, hi))
    return np.take(lut, codes)


def _histogram_percentiles(sorted_values: np.ndarray, counts: np.ndarray, percents) -> list[float]:
    """Percentiles (numpy's default "linear" method) of the multiset ``sorted_values`` x ``counts``."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in percents:
        rank = q / 100.0 * (n - 1)
        below = int(np.floor(rank))
        lower, upper = np.searchsorted(cumulative, [below, min(below + 1, n - 1)], side="right")
        a, b = float(sorted_values[lower]), float(sorted_values[upper])
        out.append(a + (rank - below) * (b - a))
    return out


def prepared_slices(series: Series, indices, cfg: PreprocessConfig) -> np.ndarray:
    """Source slices as the views show them: normalised together, then CLAHE each -> uint8 ``[k, H, W]``."""
    pixels = normalized_slices(series, indices, cfg.clip_percentiles)
    return np.stack([apply_clahe(p, cfg.clahe_clip_limit, cfg.clahe_tile_grid) for p in pixels])


# === View grid ===


def _apply_affine(m: np.ndarray, xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    return xy @ m[:, :2].T + m[:, 2]


def _invert_affine(m: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, -(a @ m[:, 2:])], axis=1)


@dataclass(frozen=True)
class ViewGrid:
    """A square of ``spine_crop_mm`` in the sagittal (y, z) plane, sampled by ``size`` pixels.

    View column axis = patient +y (anterior -> posterior), row axis = patient -z (head -> feet);
    pixel centres at integers: ``y = y0 + (u + 0.5) * mm_per_px - spine_crop_mm / 2`` and
    ``z = z0 - (v + 0.5) * mm_per_px + spine_crop_mm / 2``.
    All methods take and return ``[..., 2]`` arrays.
    """

    center_yz: np.ndarray  # (2,) patient (y0, z0) mm
    spine_crop_mm: float
    size: int

    @property
    def mm_per_px(self) -> float:
        return self.spine_crop_mm / self.size

    def view_from_patient_yz(self) -> np.ndarray:
        """2x3 affine: patient (y, z) -> view pixel (u, v)."""
        s, half = self.mm_per_px, self.spine_crop_mm / 2
        y0, z0 = (float(c) for c in self.center_yz)
        return np.array([[1 / s, 0.0, (half - y0) / s - 0.5], [0.0, -1 / s, (z0 + half) / s - 0.5]])

    def patient_yz_from_view(self) -> np.ndarray:
        """2x3 affine: view pixel (u, v) -> patient (y, z)."""
        return _invert_affine(self.view_from_patient_yz())

    def view_px_to_patient_yz(self, uv) -> np.ndarray:
        return _apply_affine(self.patient_yz_from_view(), uv)

    def patient_yz_to_view_px(self, yz) -> np.ndarray:
        return _apply_affine(self.view_from_patient_yz(), yz)

    def to_normalized(self, uv) -> np.ndarray:
        """View pixel (u, v) -> ((u + 0.5) / S, (v + 0.5) / S)."""
        return (np.asarray(uv, dtype=np.float64) + 0.5) / self.size

    def from_normalized(self, xy_norm) -> np.ndarray:
        return np.asarray(xy_norm, dtype=np.float64) * self.size - 0.5


def _reference_sagittal(study: Study) -> Series:
    series = study.series_by_description(SAGITTAL_T2)
    if series is not None and series.plane == "sagittal":
        return series
    candidates = study.sagittal_series()
    if not candidates:
        raise DicomError(study.path, "no sagittal series")
    return candidates[0]


def view_grid_for_study(study: Study, cfg: PreprocessConfig) -> ViewGrid:
    """The study's view grid, centred on the Sagittal T2/STIR field of view (mean (y, z) of its
    slice centres); fallback: the first other sagittal series (Sagittal T1 first)."""
    series = _reference_sagittal(study)
    centers = np.array([s.center for s in series.slices])
    return ViewGrid(
        center_yz=centers[:, 1:3].mean(axis=0),
        spine_crop_mm=float(cfg.spine_crop_mm),
        size=int(cfg.view_size),
    )


# === Source slice <-> view ===


def patient_yz_of_source_px(series: Series, slice_index: int, xy) -> np.ndarray:
    """Source pixel (column, row) ``[..., 2]`` of a slice -> patient (y, z) mm ``[..., 2]``."""
    return series.pixel_to_patient(slice_index, xy)[..., 1:3]


def _patient_yz_from_source(series: Series, slice_index: int) -> np.ndarray:
    """2x3 affine: source pixel (x, y) -> patient (y, z) for one slice (any orientation)."""
    s = series.slices[slice_index]
    row_mm, col_mm = s.pixel_spacing
    return np.stack([s.row_dir[1:3] * col_mm, s.col_dir[1:3] * row_mm, s.position[1:3]], axis=1)


def slice_to_view_affine(series: Series, slice_index: int, grid: ViewGrid) -> np.ndarray:
    """2x3 affine: source pixel (x, y) of slice ``slice_index`` -> view pixel (u, v).

    Goes through the slice's own IPP/IOP/PixelSpacing and keeps the patient (y, z) of each point
    (projection onto the sagittal plane). Defined for any slice orientation, e.g. to place axial
    label points on the view; the inverse (`view_to_slice_affine`) needs a sagittal slice.
    """
    yz = _patient_yz_from_source(series, slice_index)
    view = grid.view_from_patient_yz()
    return view[:, :2] @ yz + np.concatenate([np.zeros((2, 2)), view[:, 2:]], axis=1)


def view_to_slice_affine(series: Series, slice_index: int, grid: ViewGrid) -> np.ndarray:
    """2x3 affine: view pixel (u, v) -> source pixel (x, y) of slice ``slice_index``.

    For an oblique sagittal slice, the slice point whose patient (y, z) is the view point's.
    Raises DicomError for a slice far from sagittal (|normal_x| < 0.5), where (y, z) does not
    determine a point of the slice.
    """
    s = series.slices[slice_index]
    if abs(s.normal[0]) < 0.5:
        raise DicomError(s.path, "not a sagittal slice; cannot map the sagittal view onto it")
    return _invert_affine(slice_to_view_affine(series, slice_index, grid))


def source_px_to_view_norm(series: Series, slice_index: int, xy, grid: ViewGrid) -> np.ndarray:
    """Source pixel (column, row) ``[..., 2]`` -> normalised view (x_norm, y_norm) ``[..., 2]``.

    Any slice orientation: the point's patient (y, z) on the view grid (axial points are projected
    onto the sagittal plane)."""
    return grid.to_normalized(_apply_affine(slice_to_view_affine(series, slice_index, grid), xy))


def view_norm_to_source_px(series: Series, slice_index: int, xy_norm, grid: ViewGrid) -> np.ndarray:
    """Normalised view (x_norm, y_norm) ``[..., 2]`` -> source pixel (column, row) ``[..., 2]``
    of a sagittal slice (DicomError for a non-sagittal one)."""
    uv = grid.from_normalized(xy_norm)
    return _apply_affine(view_to_slice_affine(series, slice_index, grid), uv)


# === Views ===


def choose_slices(series: Series, offsets_mm) -> list[int]:
    """Index (into ``series.slices``) of the slice nearest to each lateral offset.

    Offsets in mm from the stack centre along the slice normal, patient-left positive for a
    sagittal series (`Series.lateral_positions_mm`); ties go to the lower index.
    """
    lateral = series.lateral_positions_mm()
    return [int(np.argmin(np.abs(lateral - float(o)))) for o in offsets_mm]


def build_view(
    series: Series, spec: ViewSpec, grid: ViewGrid, cfg: PreprocessConfig
) -> tuple[np.ndarray, list[int]]:
    """One view: uint8 ``[S, S, 3]`` (channel c = slice nearest ``spec.offsets_mm[c]``) and the
    instance numbers of the three slices.

    Decodes only the chosen slices; percentiles over those (distinct) slices together; CLAHE per
    slice on its own pixel grid; bilinear ``cv2.warpAffine`` onto the view grid, 0 outside.
    """
    chosen = choose_slices(series, spec.offsets_mm)
    distinct = sorted(set(chosen))
    by_index = dict(zip(distinct, prepared_slices(series, distinct, cfg)))
    size = int(grid.size)
    view = np.zeros((size, size, len(chosen)), dtype=np.uint8)
    for c, i in enumerate(chosen):
        view[..., c] = cv2.warpAffine(
            by_index[i],
            view_to_slice_affine(series, i, grid),
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
    return view, [series.slices[i].instance_number for i in chosen]


def build_views(
    study: Study, cfg: PreprocessConfig
) -> tuple[dict[str, np.ndarray], ViewGrid, dict[str, list[int]], list[str]]:
    """All configured views of a study -> (views, grid, instance numbers per view, warnings).

    A missing series gives a zero view, an empty instance list and a warning; no sagittal series
    at all raises DicomError(study path, "no sagittal series"). The warnings start with the
    study's own (`Study.warnings`: ignored or duplicate series).
    """
    grid = view_grid_for_study(study, cfg)
    views: dict[str, np.ndarray] = {}
    info: dict[str, list[int]] = {}
    warnings = list(study.warnings)
    for spec in cfg.views:
        series = study.series_by_description(spec.series_description)
        if series is None:
            views[spec.name] = np.zeros((grid.size, grid.size, 3), dtype=np.uint8)
            info[spec.name] = []
            warnings.append(f"no {spec.series_description!r} series; view {spec.name} is zeros")
            continue
        views[spec.name], info[spec.name] = build_view(series, spec, grid, cfg)
    return views, grid, info, warnings


# === Level crops ===


def level_boxes(level_xy_norm, cfg: PreprocessConfig) -> np.ndarray:
    """Level centres ``[..., 5, 2]`` (x_norm, y_norm) -> boxes ``[..., 5, 4]`` (y1, x1, y2, x2).

    ``half = crop_mm / spine_crop_mm / 2``; ``box = [y - half, x - half, y + half, x + half]``
    (normalised, as `tf.image.crop_and_resize` takes them).
    """
    xy = np.asarray(level_xy_norm, dtype=np.float32)
    half = np.float32(cfg.crop_mm / cfg.spine_crop_mm / 2)
    x, y = xy[..., 0], xy[..., 1]
    return np.stack([y - half, x - half, y + half, x + half], axis=-1).astype(np.float32)


def _sample_coords(lo: np.ndarray, hi: np.ndarray, extent: int, out_size: int) -> np.ndarray:
    """tf.image.crop_and_resize sample positions ``[n, out_size]`` (float32, as TF computes)."""
    lo = lo.astype(np.float32)[:, None]
    hi = hi.astype(np.float32)[:, None]
    ext = np.float32(extent - 1)
    if out_size > 1:
        scale = (hi - lo) * ext / np.float32(out_size - 1)
        return lo * ext + np.arange(out_size, dtype=np.float32)[None, :] * scale
    return np.float32(0.5) * (lo + hi) * ext


def crop_and_resize(image, boxes, out_size: int, extrapolation_value: float = 0.0) -> np.ndarray:
    """numpy ``tf.image.crop_and_resize`` (bilinear) of one image.

    Args:
        image: ``[H, W, C]`` (or ``[H, W]``), any real dtype.
        boxes: ``[n, 4]`` normalised (y1, x1, y2, x2); may reach outside [0, 1] or be flipped.
        out_size: output height = width.
    Returns:
        float32 ``[n, out_size, out_size, C]``; samples outside the image are
        ``extrapolation_value``. Crop pixel (j, i) samples image (x, y) =
        ``(x1 * (W-1) + j * (x2-x1) * (W-1) / (out-1), y1 * (H-1) + i * (y2-y1) * (H-1) / (out-1))``.
    """
    img = np.asarray(image, dtype=np.float32)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    h, w = img.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    in_y = _sample_coords(boxes[:, 0], boxes[:, 2], h, out_size)
    in_x = _sample_coords(boxes[:, 1], boxes[:, 3], w, out_size)
    valid = ((in_y >= 0) & (in_y <= h - 1))[:, :, None] & ((in_x >= 0) & (in_x <= w - 1))[:, None, :]
    fy, fx = np.floor(in_y), np.floor(in_x)
    top = np.clip(fy, 0, h - 1).astype(np.intp)[:, :, None]
    bottom = np.clip(np.ceil(in_y), 0, h - 1).astype(np.intp)[:, :, None]
    left = np.clip(fx, 0, w - 1).astype(np.intp)[:, None, :]
    right = np.clip(np.ceil(in_x), 0, w - 1).astype(np.intp)[:, None, :]
    y_lerp = (in_y - fy)[:, :, None, None]
    x_lerp = (in_x - fx)[:, None, :, None]
    top_left, top_right = img[top, left], img[top, right]
    bottom_left, bottom_right = img[bottom, left], img[bottom, right]
    upper = top_left + (top_right - top_left) * x_lerp
    lower = bottom_left + (bottom_right - bottom_left) * x_lerp
    out = upper + (lower - upper) * y_lerp
    out = np.where(valid[..., None], out, np.float32(extrapolation_value)).astype(np.float32)
    return out[..., 0] if squeeze else out


def crop_levels(views: dict[str, np.ndarray], level_xy_norm, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Per-level crops of every view -> ``{name: float32 [5, crop_size, crop_size, C]}`` (0-255)."""
    boxes = level_boxes(np.asarray(level_xy_norm, dtype=np.float32).reshape(-1, 2), cfg)
    return {name: crop_and_resize(view, boxes, cfg.crop_size) for name, view in views.items()}


def crop_px_to_view_px(box, xy, image_hw: tuple[int, int], out_size: int) -> np.ndarray:
    """Crop pixel (j, i) ``[..., 2]`` of the crop of ``box`` -> image pixel (u, v) ``[..., 2]``.

    ``box`` is (y1, x1, y2, x2), one box for all points (or ``[..., 4]`` broadcasting with xy).
    """
    box = np.asarray(box, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64)
    h, w = image_hw
    y1, x1, y2, x2 = (box[..., k] for k in range(4))
    d = max(out_size - 1, 1)
    u = x1 * (w - 1) + xy[..., 0] * (x2 - x1) * (w - 1) / d
    v = y1 * (h - 1) + xy[..., 1] * (y2 - y1) * (h - 1) / d
    return np.stack([u, v], axis=-1)


def view_px_to_crop_px(box, uv, image_hw: tuple[int, int], out_size: int) -> np.ndarray:
    """Inverse of `crop_px_to_view_px`: image pixel (u, v) -> crop pixel (j, i)."""
    box = np.asarray(box, dtype=np.float64)
    uv = np.asarray(uv, dtype=np.float64)
    h, w = image_hw
    y1, x1, y2, x2 = (box[..., k] for k in range(4))
    d = max(out_size - 1, 1)
    j = (uv[..., 0] - x1 * (w - 1)) * d / ((x2 - x1) * (w - 1))
    i = (uv[..., 1] - y1 * (h - 1)) * d / ((y2 - y1) * (h - 1))
    return np.stack([j, i], axis=-1)


def crop_px_to_view_norm(box, xy, cfg: PreprocessConfig) -> np.ndarray:
    """Crop pixel (j, i) of a level crop -> normalised view (x_norm, y_norm)."""
    s = int(cfg.view_size)
    uv = crop_px_to_view_px(box, xy, (s, s), int(cfg.crop_size))
    return (uv + 0.5) / s


def view_norm_to_crop_px(box, xy_norm, cfg: PreprocessConfig) -> np.ndarray:
    """Normalised view (x_norm, y_norm) -> crop pixel (j, i) of a level crop."""
    s = int(cfg.view_size)
    uv = np.asarray(xy_norm, dtype=np.float64) * s - 0.5
    return view_px_to_crop_px(box, uv, (s, s), int(cfg.crop_size))


__all__ = [
    "ViewGrid",
    "apply_clahe",
    "build_view",
    "build_views",
    "choose_slices",
    "crop_and_resize",
    "crop_levels",
    "crop_px_to_view_norm",
    "crop_px_to_view_px",
    "level_boxes",
    "normalize_percentile",
    "normalized_slices",
    "patient_yz_of_source_px",
    "prepared_slices",
    "slice_to_view_affine",
    "source_px_to_view_norm",
    "to_uint8",
    "view_grid_for_study",
    "view_norm_to_crop_px",
    "view_norm_to_source_px",
    "view_px_to_crop_px",
    "view_to_slice_affine",
]
