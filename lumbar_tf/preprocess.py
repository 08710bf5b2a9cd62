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
from lumbar_tf.dicom.reader import DicomError, Series, Study

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
    counts = _histogram(codes)
    present = np.flatnonzero(counts)
    stored_values = present.astype(codes.dtype).view(stored.dtype)
    # The modality values of the distinct stored values: what load_pixels gives, bit for bit.
    values = modality.apply(stored_values)
    order = np.argsort(values, kind="stable")
    lo, hi = _histogram_percentiles(values[order], counts[present][order], (low_pct, high_pct))
    lut = np.zeros(counts.size, np.uint8)
    lut[present] = to_uint8(_scale_to_unit(values, lo, hi))
    return np.take(lut, codes)


def _histogram(codes: np.ndarray) -> np.ndarray:
    """``np.bincount(codes.ravel())`` of 8/16-bit unsigned codes; OpenCV's histogram is ~5x faster
    and exact while no bin can pass float32's 2**24 integers."""
    if codes.size >= 2**24 or codes.size == 0:
        return np.bincount(codes.ravel())
    n = int(codes.max()) + 1
    flat = np.ascontiguousarray(codes).reshape(-1, codes.shape[-1])
    return cv2.calcHist([flat], [0], None, [n], [0, n]).ravel().astype(np.int64)


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
    # A point of the spine's midline plane (patient x, y, z mm; `find_spine`): slices are chosen by
    # their distance from it. None: from the stack centre.
    midline_xyz: np.ndarray | None = None

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
    """The series the spine is found on: Sagittal T2/STIR, else Sagittal T1, else another sagittal."""
    candidates = study.sagittal_series()
    if not candidates:
        raise DicomError(study.path, "no sagittal series")
    return candidates[0]


def view_grid_for_study(study: Study, cfg: PreprocessConfig) -> ViewGrid:
    """The study's view grid, placed on the lumbar spine found in the image (`find_spine`) of the
    reference sagittal series (`_reference_sagittal`); on its field centre where no spine is found."""
    return _grid_from_spine(find_spine(_reference_sagittal(study), cfg), cfg)


def _grid_from_spine(spine: SpineLocation, cfg: PreprocessConfig) -> ViewGrid:
    return ViewGrid(
        center_yz=spine.center_yz,
        spine_crop_mm=float(cfg.spine_crop_mm),
        size=int(cfg.view_size),
        midline_xyz=spine.midline_xyz,
    )


# === Finding the spine ===

# Working resolution of the coarse pass over the whole field.
COARSE_MM = 2.0
# Vertebra + disc periods searched for (thoracic ~24 mm up to large lumbar ~42 mm).
_PERIODS_MM = (24.0, 30.0, 36.0, 42.0)
# Calibration of the column trace to the levels (measured on phantoms, see docs/architecture.md):
# the periodic column (vertebral bodies + spinous processes) fades this far below L5/S1 (sacrum) ...
SACRAL_TAIL_MM = 45.0
# ... or, where it runs off the bottom of the field (no sacral end seen), L5/S1 is taken halfway
# between a lumbar-centred field (L5/S1 LEVELS_HALF_SPAN_MM below the field centre) and one with
# L5/S1 this close to its lower edge: lumbar fields are planned from centred to low;
CUT_TAIL_MM = 20.0
# Where lumbar fields put L5/S1 (RSNA and the realistic phantom: spine centred, L5/S1 ~62 mm below
# the field centre, down to the lower half, L5/S1 some 15-60 mm above the lower edge).
L5S1_MIN_BELOW_MM = 40.0
L5S1_EDGE_MM = 15.0
# L1/L2..L5/S1 span about twice this (the grid centre is this far above L5/S1, on the trace).
LEVELS_HALF_SPAN_MM = 62.0
# A column counts as found when its band-pass share (periodic energy / all vertical variation) is
# at least this along the trace, over at least this length; noise gives ~0.3, a spine 0.5-0.8 (60 mm,
# was 100: 3 of 40 realistic spines gave 68-94 mm runs broken by gaps, the grid fell to the field).
MIN_PERIODICITY = 0.45
MIN_COLUMN_MM = 60.0
# The sacrum leaves the lumbar column tilted back from vertical by 30-60 degrees: where the trace
# bends back by more than SACRAL_BEND_DEG over SACRAL_BEND_MM, that bend is the lumbosacral junction.
SACRAL_BEND_DEG = 28.0
SACRAL_BEND_MM = 30.0
# The trace leaves the lumbar column for the sacrum early, by about the periodicity filter's
# half-width (its envelope blurs the sacrum upwards): L5/S1 lies this far below the bend's middle
# (35 mm on the realistic phantoms' sacrum, 20 mm before on the drawn one).
BEND_LAG_MM = 35.0
# L5/S1 from the sacrum on T2/STIR (`_sac_end`): the dural sac (bright CSF) ends at S2, so its end
# lies one S1 body (~27 mm), the fused S1/S2 disc and half the L5/S1 disc below the L5/S1 canal
# point, measured along the canal (realistic phantoms, seed 31: 37-45 mm head-feet, median 40).
SAC_TAIL_MM = 40.0
# Where the sac runs off the field's lower edge, L5/S1 lies between SAC_TAIL_MM and the 15 mm
# planning margin above that edge (measured 14-33 mm, median 21): this far.
SAC_CUT_MM = 21.0
# Where no end is seen, the sac runs off the field only where the canal is CSF-bright at the edge:
# over the last SAC_RUNOFF_MM at least SAC_RUNOFF_BRIGHT of the canal's 90th percentile over
# SAC_REFERENCE_MM, or over the last SAC_EDGE_MM (median) at least SAC_EDGE_BRIGHT of it (a
# narrowing above the edge). Tuned on seeds 77 and 31: sacs cut by the edge 0.80-0.99 / 0.56-1.05,
# ends the drop test missed in centred fields 0.37-0.47 / 0.74-0.79. Otherwise L5/S1 is uncertain:
# halfway between the run-off place and a spine-centred field's (LEVELS_HALF_SPAN_MM below the field
# centre), which holds all five levels for either.
SAC_RUNOFF_MM = 40.0
SAC_RUNOFF_BRIGHT = 0.7
SAC_EDGE_MM = 10.0
SAC_EDGE_BRIGHT = 0.9
# The canal is traced at FINE_MM; its end is the lowest row where the CSF signal (at least
# SAC_BRIGHT of the trace's 90th percentile over SAC_REFERENCE_MM above, median over SAC_WINDOW_MM)
# falls to SAC_STEP of it below and stays there.
FINE_MM = 1.0
# The canal is searched this far either side of the periodic column (which may follow the bodies or
# the spinous processes), widening by CANAL_TILT per mm below its end (the sacrum tilts back).
CANAL_REACH_MM = 40.0
CANAL_TILT = 0.4
SAC_WINDOW_MM = 15.0
SAC_REFERENCE_MM = 100.0
SAC_BOUND_SLACK_MM = 25.0
SAC_STRONG_STEP = 0.6
SAC_BRIGHT = 0.8
SAC_STEP = 0.9
# Half-range of the midline search about the stack centre, and the mirror distances compared.
MIDLINE_SEARCH_MM = 12.0
_MIRROR_MM = (4.0, 8.0, 12.0)


@dataclass(frozen=True)
class SpineLocation:
    """Where `find_spine` put the lumbar spine (patient mm) and how it got there."""

    found: bool  # a vertebral column was traced; False: the grid falls back to the field centre
    center_yz: np.ndarray  # (2,) centre for the view grid
    midline_xyz: np.ndarray  # (3,) a point of the midline plane, at the spine
    l5s1_yz: np.ndarray | None  # (2,) estimated L5/S1 canal point (None where not found)
    column_yz: np.ndarray  # [n, 2] the traced column (posterior elements), for pictures and tests
    midline_offset_mm: float  # midline relative to the stack centre, along the slice normal
    # How L5/S1 was placed (`L5S1_FROM`); "" where no column was found.
    l5s1_from: str = ""


# SpineLocation.l5s1_from: the dural sac's end, the sac running off the field's lower edge, neither
# seen (halfway between that and a spine-centred field), the column's shape (T1: dark CSF).
L5S1_FROM = ("sac end", "sac off the field", "uncertain", "column shape")


def _row_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(img, -1, kernel[:, None].astype(np.float32), borderType=cv2.BORDER_REFLECT)


def periodicity_map(img: np.ndarray, mm_per_px: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Head-feet periodicity of a sagittal image ``[H, W]`` (rows = head -> feet), floats in [0, 1].

    A stack of vertebrae and discs repeats every 24-42 mm along the spine; a skin edge, noise or
    bowel does not. Per pixel: the largest quadrature (complex Gabor) response over the periods,
    and its *share*: that response over all vertical variation in the same window (about 1 for a
    pure period, low for edges and noise). Returns (share x response, share).
    """
    best = np.zeros_like(img)
    share = np.zeros_like(img)
    for period in _PERIODS_MM:
        p = period / mm_per_px
        sigma = 0.75 * p
        t = np.arange(-int(np.ceil(2.5 * sigma)), int(np.ceil(2.5 * sigma)) + 1, dtype=np.float64)
        env = np.exp(-t * t / (2 * sigma * sigma))
        env /= env.sum()
        re = env * np.cos(2 * np.pi * t / p)
        re -= env * re.sum()
        im = env * np.sin(2 * np.pi * t / p)
        amplitude = np.sqrt(2.0) * np.hypot(_row_filter(img, re), _row_filter(img, im))
        high = img - _row_filter(img, env)
        total = np.sqrt(np.maximum(_row_filter(high * high, env), 0.0)) + 1e-3
        better = amplitude > best
        best = np.where(better, amplitude, best)
        share = np.where(better, amplitude / total, share)
    width = max(1, int(round(10.0 / mm_per_px)))  # 10 mm across
    strength = cv2.boxFilter(np.clip(share, 0.0, 1.5) * best, -1, (width, 1), borderType=cv2.BORDER_REFLECT)
    return strength, share


def trace_column(strength: np.ndarray, valid_rows: np.ndarray, penalty: float = 0.5) -> np.ndarray:
    """Column index per row (``[H]``) of the path of most periodic strength, moving at most one
    column per row (45 degrees), by dynamic programming over the rows marked valid."""
    rows = np.flatnonzero(valid_rows)
    h, w = strength.shape
    path = np.zeros(h, np.int64)
    if rows.size == 0:
        return path
    norm = strength / (np.percentile(strength[rows], 99) + 1e-6)
    score = norm[rows[0]].copy()
    # Per row, each column continues the best of its three neighbours above; ties go to the left
    # one, then straight down, then the right one. The choice is kept as two flags per column and
    # read back along the path only; preallocated rows: this loop runs ~10 times a study.
    from_left = np.zeros((rows.size, w), bool)
    down = np.zeros((rows.size, w), bool)
    left, right = np.full(w, -np.inf, norm.dtype), np.full(w, -np.inf, norm.dtype)
    best = np.empty(w, norm.dtype)
    for n, r in enumerate(rows[1:], start=1):
        np.subtract(score[:-1], penalty, out=left[1:])
        np.subtract(score[1:], penalty, out=right[:-1])
        np.greater_equal(score, right, out=down[n])
        np.maximum(score, right, out=best)
        np.greater_equal(left, best, out=from_left[n])
        score = np.where(from_left[n], left, best) + norm[r]
    col = int(np.argmax(score))
    for n in range(rows.size - 1, -1, -1):
        path[rows[n]] = col
        col = col - 1 if from_left[n, col] else col if down[n, col] else col + 1
    path[: rows[0]] = path[rows[0]]
    path[rows[-1] + 1 :] = path[rows[-1]]
    return path


def _longest_run(on: np.ndarray, gap: int) -> tuple[int, int] | None:
    """(first, last) index of the longest run of True, bridging gaps of up to ``gap``."""
    idx = np.flatnonzero(on)
    if idx.size == 0:
        return None
    runs, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i - prev > gap:
            runs.append((start, prev))
            start = i
        prev = i
    runs.append((start, prev))
    return max(runs, key=lambda r: r[1] - r[0])


def _coarse_grid(series: Series, index: int) -> tuple[ViewGrid, np.ndarray, np.ndarray]:
    """A square grid at COARSE_MM over the whole field of slice ``index`` -> (grid, field lo, hi)
    where lo/hi are the (y, z) bounds of the field."""
    s = series.slices[index]
    corners = np.array([[0, 0], [s.cols - 1, 0], [0, s.rows - 1], [s.cols - 1, s.rows - 1]], dtype=np.float64)
    yz = series.pixel_to_patient(index, corners)[:, 1:3]
    lo, hi = yz.min(axis=0), yz.max(axis=0)
    size = int(np.ceil((hi - lo).max() / COARSE_MM)) + 1
    return ViewGrid(center_yz=(lo + hi) / 2, spine_crop_mm=size * COARSE_MM, size=size), lo, hi


def _coarse_images(series: Series, indices, grid: ViewGrid, cfg: PreprocessConfig) -> np.ndarray:
    """Slices ``indices`` normalised together, low-passed and resampled onto ``grid`` -> float32
    ``[k, S, S]`` in [0, 1]; outside the field the image is mirrored (no false edge at its border)."""
    pixels = normalized_slices(series, indices, cfg.clip_percentiles)
    out = []
    for i, img in zip(indices, pixels):
        px_mm = min(series.slices[i].pixel_spacing)
        sigma = 0.5 * COARSE_MM / px_mm
        smooth = (
            cv2.GaussianBlur(img.astype(np.float32) / 255.0, (0, 0), sigma) if sigma > 0.6 else img / 255.0
        )
        out.append(
            cv2.warpAffine(
                smooth.astype(np.float32),
                view_to_slice_affine(series, i, grid),
                (grid.size, grid.size),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REFLECT,
            )
        )
    return np.stack(out)


def _column(img: np.ndarray, valid_rows: np.ndarray):
    """(path [S], run (first, last) or None, periodicity share along the run) of one coarse image."""
    strength, share = periodicity_map(img)
    path = trace_column(strength, valid_rows)
    rows = np.arange(img.shape[0])
    along = cv2.GaussianBlur(strength[rows, path].astype(np.float32)[:, None], (1, 0), 5.0)[:, 0]
    along = np.where(valid_rows, along, 0.0)
    ref = np.percentile(along[valid_rows], 90) if valid_rows.any() else 0.0
    run = _longest_run(along > 0.4 * ref, gap=int(round(20.0 / COARSE_MM))) if ref > 0 else None
    if run is None:
        return path, None, 0.0
    return path, run, float(np.median(share[rows[run[0] : run[1] + 1], path[run[0] : run[1] + 1]]))


def _sacral_bend(path: np.ndarray, run: tuple[int, int]) -> float | None:
    """Row of the bend where the traced column turns back into the sacrum: the middle of the
    lowest-but-one-third stretch whose SACRAL_BEND_MM windows bend back by more than
    SACRAL_BEND_DEG; None where the column does not bend so."""
    first, last = run
    window = int(round(SACRAL_BEND_MM / COARSE_MM))
    if last - first < 2 * window:
        return None
    ys = cv2.GaussianBlur(path[first : last + 1].astype(np.float32)[:, None], (1, 0), 3.0)[:, 0]
    ahead = (ys[window:] - ys[:-window]) / window  # columns posterior per row feet-ward
    bent = ahead > np.tan(np.radians(SACRAL_BEND_DEG))
    # Only below the upper third of the trace (thoracic kyphosis and lordosis bend the other way).
    bent[: len(bent) // 3] = False
    stretch = _longest_run(bent, gap=0)
    if stretch is None:
        return None
    return first + 0.5 * (stretch[0] + stretch[1]) + window / 2 + BEND_LAG_MM / COARSE_MM


def _mirror_midline(images: np.ndarray, lateral: np.ndarray, band: tuple[slice, slice]) -> float | None:
    """Lateral position (mm, stack frame) of the plane about which the stack is most symmetric.

    Compares the images at c + d and c - d (linear between neighbouring slices) inside ``band``
    for candidate planes c within MIDLINE_SEARCH_MM of the stack centre; None if the stack is too
    narrow to compare any pair.
    """
    order = np.argsort(lateral)
    lateral, crops = lateral[order], images[order][:, band[0], band[1]]

    seen: dict[float, np.ndarray | None] = {}  # the planes c +- d repeat: interpolate each once

    def at(x: float):
        if x in seen:
            return seen[x]
        if x < lateral[0] - 1e-6 or x > lateral[-1] + 1e-6:
            seen[x] = None
            return None
        k = int(np.clip(np.searchsorted(lateral, x) - 1, 0, len(lateral) - 2))
        w = (x - lateral[k]) / max(lateral[k + 1] - lateral[k], 1e-6)
        seen[x] = (1 - w) * crops[k] + w * crops[k + 1]
        return seen[x]

    best, best_c = np.inf, None
    for c in np.arange(-MIDLINE_SEARCH_MM, MIDLINE_SEARCH_MM + 0.25, 0.5):
        diffs = []
        for d in _MIRROR_MM:
            a, b = at(c + d), at(c - d)
            if a is not None and b is not None:
                diffs.append(float(np.mean(np.abs(a - b))))
        if len(diffs) == len(_MIRROR_MM) and np.mean(diffs) < best:
            best, best_c = float(np.mean(diffs)), float(c)
    return best_c


def _canal_trace(img: np.ndarray, column_px: np.ndarray, valid_rows: np.ndarray) -> np.ndarray:
    """Column per row (``[S]``) of the CSF canal on a FINE_MM T2 image: the bright ridge ~10 mm wide
    (brighter than both flanks, weighted towards the brightest), searched CANAL_REACH_MM either side
    of the periodic column (``column_px`` [n, (u, v)]), wider below its end, where the sacrum tilts
    back."""
    k = int(round(9.0 / FINE_MM)) | 1
    centre = cv2.blur(img, (k, k))
    flank = cv2.blur(img, (max(1, k - 1), k))
    shift = k
    left = np.roll(flank, shift, axis=1)
    right = np.roll(flank, -shift, axis=1)
    strength = np.clip(np.minimum(centre - left, centre - right), 0.0, None) * centre**4
    rows = np.arange(img.shape[0])
    order = np.argsort(column_px[:, 1])
    along = np.interp(rows, column_px[order, 1], column_px[order, 0])
    below = np.maximum(rows - column_px[:, 1].max(), 0.0)
    cols = np.arange(img.shape[1])[None, :]
    reach = (CANAL_REACH_MM + CANAL_TILT * below) / FINE_MM
    window = np.abs(cols - along[:, None]) <= reach[:, None]
    return trace_column(strength * window, valid_rows, penalty=0.2)


@dataclass(frozen=True)
class _Canal:
    """The CSF canal traced on a FINE_MM T2/STIR image, for `_sac_end_row`."""

    grid: ViewGrid  # the FINE_MM grid over the field
    path: np.ndarray  # [S] canal column per row
    signal: np.ndarray  # [S] CSF signal along the path (smoothed)
    arc: np.ndarray  # [S] arc length (mm) along the smoothed path
    top: int  # first row of the periodic column
    bottom: int  # last row inside the field
    highest: float  # the planning bound: L5/S1 not above this row
    centre: float  # the field centre's row


def _canal(series: Series, index: int, column_yz: np.ndarray, field_centre: np.ndarray, cfg) -> _Canal | None:
    """Trace the bright canal on slice ``index`` and its signal, or None where too little of it is
    in the field."""
    coarse, lo, hi = _coarse_grid(series, index)
    grid = ViewGrid(coarse.center_yz, coarse.spine_crop_mm, int(round(coarse.spine_crop_mm / FINE_MM)))
    img = _coarse_images(series, [index], grid, cfg)[0]
    rows_yz = grid.view_px_to_patient_yz(np.stack([np.zeros(grid.size), np.arange(grid.size)], axis=1))
    valid = (rows_yz[:, 1] >= lo[1] - 1e-6) & (rows_yz[:, 1] <= hi[1] + 1e-6)
    column_px = grid.patient_yz_to_view_px(column_yz)
    top = int(max(column_px[:, 1].min(), 0))
    valid[:top] = False
    if valid.sum() < 4 * SAC_WINDOW_MM / FINE_MM:
        return None
    path = _canal_trace(img, column_px, valid)
    # Rows where the canal is inside the acquired field (a rotated field's corners are not).
    field = cv2.warpAffine(
        np.ones((series.slices[index].rows, series.slices[index].cols), np.float32),
        view_to_slice_affine(series, index, grid),
        (grid.size, grid.size),
        flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    valid &= field[np.arange(grid.size), path] > 0.5
    if valid.sum() < 4 * SAC_WINDOW_MM / FINE_MM:
        return None
    bottom = int(np.flatnonzero(valid).max())
    signal = cv2.blur(img, (5, 1))[np.arange(grid.size), path]
    signal = cv2.GaussianBlur(signal.astype(np.float32)[:, None], (1, 0), 2.0 / FINE_MM)[:, 0]
    # L5/S1 is at least L5S1_MIN_BELOW_MM below the field centre: a sac end much above that is none;
    # one a little above it with a clear drop (a small spine-centred field) puts L5/S1 on the bound.
    centre = float(grid.patient_yz_to_view_px(field_centre)[1])
    highest = centre + L5S1_MIN_BELOW_MM / FINE_MM
    # Arc length along the (smoothed) canal per row: a tilted sacrum drops less than its length.
    smooth = cv2.GaussianBlur(path.astype(np.float32)[:, None], (1, 0), 3.0 / FINE_MM)[:, 0]
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(1.0, np.diff(smooth)))]) * FINE_MM
    return _Canal(grid, path, signal, arc, top, bottom, highest, centre)


def _sac_end_row(canal: _Canal) -> tuple[float, str]:
    """(Row of L5/S1 on the canal's grid, how: `L5S1_FROM`): SAC_TAIL_MM up the canal from the lowest
    row where the CSF signal ends for good, else SAC_CUT_MM above the field's edge where the canal
    stays bright to it (the sac runs off it), else halfway between that and a spine-centred field."""
    signal, arc, top, bottom, highest = canal.signal, canal.arc, canal.top, canal.bottom, canal.highest
    w = int(round(SAC_WINDOW_MM / FINE_MM))
    reference = int(round(SAC_REFERENCE_MM / FINE_MM))
    skip = int(round(5.0 / FINE_MM))  # the sac tapers over a few mm: compare past the taper
    rows = np.arange(bottom - 3, top + w, -1)
    # Per candidate row, at once: the row SAC_TAIL_MM up the canal and the median CSF signal of the
    # w rows above (the same values as per-row calls, at a fraction of their cost).
    aboves = np.interp(arc[rows] - SAC_TAIL_MM, arc, np.arange(arc.size)) if rows.size else rows
    ups = np.median(np.lib.stride_tricks.sliding_window_view(signal, w), axis=1) if rows.size else rows
    for r, above in zip(rows.tolist(), aboves.tolist(), strict=True):
        if above < highest - SAC_BOUND_SLACK_MM / FINE_MM:
            break
        up = float(ups[r - w])
        after = signal[r + 1 : min(r + 1 + 3 * w, bottom + 1)]
        low = float(after[:w].min())
        if (
            # CSF falling to SAC_STEP of the level above it ...
            float(np.median(after[min(skip, after.size // 2) :][:w]))
            <= (SAC_STEP if above >= highest else SAC_STRONG_STEP) * up
            # ... for good: after a narrowing at a disc the CSF comes back ...
            and float(after[w // 2 :].max(initial=low)) - low < 0.5 * (up - low)
            # ... from CSF as bright as the canal above (relative: the bias field varies along the
            # spine). Last because the costliest; the three tests are independent.
            and up >= SAC_BRIGHT * np.percentile(signal[max(top, r - reference) : r], 90)
        ):
            return max(above, highest), "sac end"
    off_field = bottom - SAC_CUT_MM / FINE_MM
    csf = float(np.percentile(signal[max(top, bottom - reference) : bottom + 1], 90))
    last = signal[max(top, bottom - int(round(SAC_RUNOFF_MM / FINE_MM))) : bottom + 1]
    edge = signal[max(top, bottom - int(round(SAC_EDGE_MM / FINE_MM))) : bottom + 1]
    if last.min() >= SAC_RUNOFF_BRIGHT * csf or np.median(edge) >= SAC_EDGE_BRIGHT * csf:
        return off_field, "sac off the field"
    return 0.5 * (off_field + canal.centre + LEVELS_HALF_SPAN_MM / FINE_MM), "uncertain"


def _sac_end(
    series: Series, index: int, column_yz: np.ndarray, field_centre: np.ndarray, cfg
) -> tuple[np.ndarray, str] | None:
    """(L5/S1 canal point (patient y, z), how: `L5S1_FROM`) from the end of the dural sac on a
    T2/STIR slice, or None where no bright canal is traced (`SAC_TAIL_MM`, `SAC_CUT_MM`)."""
    canal = _canal(series, index, column_yz, field_centre, cfg)
    if canal is None:
        return None
    row, how = _sac_end_row(canal)
    r = int(np.clip(round(row), 0, canal.grid.size - 1))
    return canal.grid.view_px_to_patient_yz([float(canal.path[r]), float(row)]), how


def find_spine(series: Series, cfg: PreprocessConfig) -> SpineLocation:
    """Find the lumbar spine in a sagittal series, from its pixels alone (the same in training and
    inference; never from labels).

    1. Coarse pass: the slices within ~28 mm of the stack centre, normalised, at COARSE_MM over the
       whole field. On the centre slice the vertebral column is traced as the head-feet path of
       strongest periodicity (`periodicity_map`, `trace_column`).
    2. Midline: the plane about which those slices are most symmetric near the column
       (`_mirror_midline`), searched +-12 mm about the stack centre; the column is re-traced on
       the slice nearest to it.
    3. L5/S1 from the sacrum: on T2/STIR, SAC_TAIL_MM above the end of the bright dural sac (S2) on
       the canal traced at FINE_MM (`_sac_end`; SAC_CUT_MM above the field's edge where the sac runs
       off it). On T1 (dark CSF): where the trace bends back into the sacrum (`_sacral_bend`); else
       SACRAL_TAIL_MM above the end of the periodic column; else (the column runs off the field)
       halfway between the places of a centred and a low field. The grid centre is
       LEVELS_HALF_SPAN_MM above L5/S1 on the trace, kept inside the field where the field is
       larger than the view (docs/architecture.md has the measured error).
    Without a column (periodicity share below MIN_PERIODICITY or shorter than MIN_COLUMN_MM) the
    centre is the field centre and the midline the stack centre; ``found`` says which.
    """
    lateral = series.lateral_positions_mm()
    positions = series.positions_mm()
    centre_index = int(np.argmin(np.abs(lateral)))
    field_centre = np.array([s.center for s in series.slices])[:, 1:3].mean(axis=0)
    grid, lo, hi = _coarse_grid(series, centre_index)
    reach = MIDLINE_SEARCH_MM + max(_MIRROR_MM) + 4.0
    near = [i for i in range(len(series.slices)) if abs(lateral[i]) <= reach]
    images = _coarse_images(series, near, grid, cfg)
    rows_yz = grid.view_px_to_patient_yz(np.stack([np.zeros(grid.size), np.arange(grid.size)], axis=1))
    valid_rows = (rows_yz[:, 1] >= lo[1] - 1e-6) & (rows_yz[:, 1] <= hi[1] + 1e-6)
    k = near.index(centre_index)
    path, run, share = _column(images[k], valid_rows)
    midline, traced_on = 0.0, centre_index
    found = run is not None and share >= MIN_PERIODICITY and (run[1] - run[0]) * COARSE_MM >= MIN_COLUMN_MM
    if found:
        cols = slice(
            max(0, int(path[run[0] : run[1] + 1].min() - 60 / COARSE_MM)), int(path.max() + 20 / COARSE_MM)
        )
        mirrored = _mirror_midline(images, lateral[near], (slice(run[0], run[1] + 1), cols))
        if mirrored is not None:
            midline = mirrored
            k_mid = int(np.argmin(np.abs(lateral[near] - midline)))
            if k_mid != k:
                path2, run2, share2 = _column(images[k_mid], valid_rows)
                if run2 is not None and share2 >= MIN_PERIODICITY:
                    path, run, traced_on = path2, run2, near[k_mid]
    normal = series.normal
    l5s1_from = ""
    if not found:
        centre_yz = field_centre
        l5s1, column = None, np.zeros((0, 2))
    else:
        bottom_valid = int(np.flatnonzero(valid_rows).max())
        trace = np.arange(run[0], run[1] + 1)
        column = grid.view_px_to_patient_yz(np.stack([path[trace], trace], axis=1).astype(np.float64))
        # T2/STIR: the end of the bright dural sac (S2); T1 (CSF dark): the column's shape and end.
        sac = None if "T1" in series.description else _sac_end(series, traced_on, column, field_centre, cfg)
        bend = _sacral_bend(path, run)
        if sac is not None:
            sac, l5s1_from = sac
            l5s1_row = float(grid.patient_yz_to_view_px(sac)[1])
        elif bend is not None:
            l5s1_row, l5s1_from = bend, "column shape"
        elif run[1] >= bottom_valid - 5:  # within 10 mm of the edge: the sacrum's end is not in the field
            centred = grid.patient_yz_to_view_px(field_centre)[1] + LEVELS_HALF_SPAN_MM / COARSE_MM
            l5s1_row, l5s1_from = 0.5 * (centred + bottom_valid - CUT_TAIL_MM / COARSE_MM), "uncertain"
        else:
            l5s1_row, l5s1_from = run[1] - SACRAL_TAIL_MM / COARSE_MM, "column shape"
        # Lumbar fields are planned from spine-centred to spine-low: L5/S1 lies between
        # L5S1_MIN_BELOW_MM below the field centre and L5S1_EDGE_MM above its lower edge. A trace
        # that says otherwise has followed the thoracic column or lost the sacrum; keep it inside.
        centre_px = grid.patient_yz_to_view_px(field_centre)[1]
        highest = centre_px + L5S1_MIN_BELOW_MM / COARSE_MM
        lowest = max(highest, bottom_valid - L5S1_EDGE_MM / COARSE_MM)
        l5s1_row = float(np.clip(l5s1_row, highest, lowest))
        centre_row = l5s1_row - LEVELS_HALF_SPAN_MM / COARSE_MM
        lumbar = np.arange(
            int(max(run[0], centre_row - LEVELS_HALF_SPAN_MM / COARSE_MM)), int(max(l5s1_row, run[0])) + 1
        )
        lumbar = lumbar[(lumbar >= 0) & (lumbar < grid.size)]
        col = float(np.median(path[lumbar])) if lumbar.size else float(np.median(path[run[0] : run[1] + 1]))
        l5s1_col = float(path[int(np.clip(round(l5s1_row), 0, grid.size - 1))])
        if sac is not None:  # on the traced canal
            l5s1_col = float(grid.patient_yz_to_view_px(sac)[0])
        centre_yz = grid.view_px_to_patient_yz([col, centre_row])
        l5s1 = grid.view_px_to_patient_yz([l5s1_col, l5s1_row])
        half = float(cfg.spine_crop_mm) / 2
        a, b = lo + half, hi - half  # a <= b: the view fits in the field; else keep the field in the view
        centre_yz = np.clip(centre_yz, np.minimum(a, b), np.maximum(a, b))
    # The midline plane {X . n = mean position + midline}, at the spine's (y, z).
    plane = float(positions.mean()) + midline
    y, z = (float(v) for v in centre_yz)
    x = (plane - normal[1] * y - normal[2] * z) / normal[0] if abs(normal[0]) > 1e-6 else 0.0
    return SpineLocation(
        found=bool(found),
        center_yz=np.asarray(centre_yz, dtype=np.float64),
        midline_xyz=np.array([x, y, z]),
        l5s1_yz=l5s1,
        column_yz=column,
        midline_offset_mm=float(midline),
        l5s1_from=l5s1_from,
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


def choose_slices(series: Series, offsets_mm, midline_xyz=None) -> list[int]:
    """Index (into ``series.slices``) of the slice nearest to each lateral offset.

    Offsets in mm along the slice normal (patient-left positive for a sagittal series) from the
    midline plane through ``midline_xyz`` (`find_spine`; any series of the study: the patient's
    midline, not the stack's); without it, from the stack centre (`Series.lateral_positions_mm`).
    Ties go to the lower index.
    """
    if midline_xyz is None:
        lateral = series.lateral_positions_mm()
    else:
        lateral = series.positions_mm() - float(np.asarray(midline_xyz, dtype=np.float64) @ series.normal)
    return [int(np.argmin(np.abs(lateral - float(o)))) for o in offsets_mm]


def build_view(
    series: Series, spec: ViewSpec, grid: ViewGrid, cfg: PreprocessConfig
) -> tuple[np.ndarray, list[int]]:
    """One view: uint8 ``[S, S, 3]`` (channel c = slice nearest ``spec.offsets_mm[c]`` from the
    grid's midline) and the instance numbers of the three slices.

    Decodes only the chosen slices; percentiles over those (distinct) slices together; CLAHE per
    slice on its own pixel grid; bilinear ``cv2.warpAffine`` onto the view grid, 0 outside.
    """
    chosen = choose_slices(series, spec.offsets_mm, grid.midline_xyz)
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


def view_series(study: Study, cfg: PreprocessConfig) -> dict[str, Series | None]:
    """The series each view is built from (None: a zero view).

    A view's own description wins. Where the localiser's view (the first) has no series, another
    sagittal series stands in (Sagittal T1 first), so the levels are still found: training
    substitutes the same way (`data.dataset`), so the model knows both contrasts there.
    """
    out: dict[str, Series | None] = {}
    for k, spec in enumerate(cfg.views):
        series = study.series_by_description(spec.series_description)
        if series is None and k == 0:
            series = next(iter(study.sagittal_series()), None)
        out[spec.name] = series
    return out


def build_views(
    study: Study, cfg: PreprocessConfig
) -> tuple[dict[str, np.ndarray], ViewGrid, dict[str, list[int]], list[str]]:
    """All configured views of a study -> (views, grid, instance numbers per view, warnings).

    The grid is placed on the spine found in the reference sagittal series (`find_spine`). A
    missing series gives a zero view (the localiser's view: another sagittal series, see
    `view_series`), an empty instance list and a warning; no usable sagittal series at all
    raises DicomError(study path, "no sagittal series"). The warnings start with the
    study's own (`Study.warnings`: series skipped or set aside, slices dropped).
    """
    reference = _reference_sagittal(study)
    with reference.keeping_decoded():  # its slices serve the spine finder and a view
        return _build_views(study, reference, cfg)


def _build_views(study: Study, reference: Series, cfg: PreprocessConfig):
    spine = find_spine(reference, cfg)
    grid = _grid_from_spine(spine, cfg)
    warnings = list(study.warnings)
    if not spine.found:
        warnings.append(
            f"series {reference.series_id}: no vertebral column found in the image; "
            "view grid centred on the field"
        )
    views: dict[str, np.ndarray] = {}
    info: dict[str, list[int]] = {}
    for spec in cfg.views:
        series = view_series(study, cfg)[spec.name]
        if series is None:
            views[spec.name] = np.zeros((grid.size, grid.size, 3), dtype=np.uint8)
            info[spec.name] = []
            warnings.append(f"no {spec.series_description!r} series; view {spec.name} is zeros")
            continue
        if _norm(series.description) != _norm(spec.series_description):
            warnings.append(
                f"no {spec.series_description!r} series; view {spec.name} built from "
                f"{series.description!r} series {series.series_id}"
            )
        views[spec.name], info[spec.name] = build_view(series, spec, grid, cfg)
    return views, grid, info, warnings


def _norm(text: str) -> str:
    return " ".join(str(text).casefold().split())


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
    h, w, c = img.shape
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    in_y = _sample_coords(boxes[:, 0], boxes[:, 2], h, out_size)
    in_x = _sample_coords(boxes[:, 1], boxes[:, 3], w, out_size)
    fy, fx = np.floor(in_y), np.floor(in_x)
    top = np.clip(fy, 0, h - 1).astype(np.intp) * w
    bottom = np.clip(np.ceil(in_y), 0, h - 1).astype(np.intp) * w
    left = np.clip(fx, 0, w - 1).astype(np.intp)
    right = np.clip(np.ceil(in_x), 0, w - 1).astype(np.intp)
    # Rows of a [H*W, C] view taken by flat pixel index: 4x faster than 2-D fancy indexing (the
    # tablet runner crops with this between its two signatures, benchmarks/inference_results.md);
    # mode="clip" skips numpy's bounds check (the indices are clipped above), 1.5x faster again.
    # The in-place arithmetic keeps TF's operations and their order (top_left + (top_right -
    # top_left) * x_lerp, then upper + (lower - upper) * y_lerp): the same floats, bit for bit.
    # The lerp weights are laid out so that numpy's inner loop runs over whole rows: a weight
    # broadcast over the last axis alone (C = 3) makes each multiply 4x slower.
    flat = np.ascontiguousarray(img).reshape(h * w, c)
    n = len(boxes)

    def pixels(rows, cols):
        return flat.take(rows[:, :, None] + cols[:, None, :], axis=0, mode="clip")

    x_lerp = np.repeat((in_x - fx)[:, None, :, None], c, axis=-1)  # [n, 1, out, C]
    upper = pixels(top, left)
    out = pixels(top, right)
    out -= upper
    out *= x_lerp
    out += upper
    lower = pixels(bottom, left)
    below = pixels(bottom, right)
    below -= lower
    below *= x_lerp
    below += lower
    below -= out
    rows = below.reshape(n, out_size, out_size * c)  # a view: the y weight is one per row
    rows *= (in_y - fy)[:, :, None]
    out += below
    valid = ((in_y >= 0) & (in_y <= h - 1))[:, :, None] & ((in_x >= 0) & (in_x <= w - 1))[:, None, :]
    if not valid.all():
        out[~valid] = np.float32(extrapolation_value)
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
    "L5S1_FROM",
    "SpineLocation",
    "ViewGrid",
    "apply_clahe",
    "build_view",
    "build_views",
    "choose_slices",
    "find_spine",
    "periodicity_map",
    "trace_column",
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
    "view_series",
    "view_norm_to_crop_px",
    "view_norm_to_source_px",
    "view_px_to_crop_px",
    "view_to_slice_affine",
]
