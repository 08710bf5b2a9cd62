"""Input quality control: does this study look like a lumbar-spine MRI? (numpy only; the tablet uses it)

A knee, a test pattern or a wrongly typed series still gets five level positions and 25 grades from
the model, with nothing to tell the reader they are meaningless. `assess` checks what is cheap to
check and `predictor.study_result` writes the result as predictions.json's ``quality``
(``{"plausible": bool, "bounds": source, "checks": {name: {"ok", "value", "range"}}}``) plus one
warning line when implausible; the explain report and the heatmaps show a banner.

- Level positions (``level_xy``, normalised view coordinates; the view is ``spine_crop_mm`` square,
  docs/architecture.md "Patient coordinates and views"): all inside the view, head-to-feet order,
  neighbouring levels as far apart as in the training labels, and a curve no sharper than theirs.
- Image statistics of the localiser view's midline channel: the correlation of neighbouring pixels
  (anatomy is smooth; noise is not) and the grey-level entropy (a test pattern or a blank series has
  a handful of grey levels), no lower than the training views'.
- Spine-specific: the view's ``vertical_periodicity`` (`vertical_periodicity`), how strongly some
  10 mm wide column of it repeats head to feet every vertebra plus disc (24-46 mm). A head, a knee
  or an abdominal cross-section is as smooth and as rich in grey levels as a spine, and the
  localiser still gives it five well-spaced levels; a stack of vertebrae is what it lacks. It uses
  the view the model already gets (no extra decode), and being a statistic of the view it is
  measured on the training views like the others. (`preprocess.find_spine`'s own evidence, its
  periodicity share and column length, was measured and does not separate: heads, knees and
  abdomens drawn with smooth texture reach 0.47-0.83 share and 32-188 mm, realistic phantoms
  0.45-0.85 and 86-334 mm.)

The bounds are measured per trained model: training records them from its own training split
(`bounds_from_training`: labelled level spacing and curvature in mm, image statistics of the
training views, widened by a margin) and they travel with the model (the ``.keras`` file's
``level_xy`` layer config and metadata.json, so Keras, SavedModel, TFLite and serving apply the
same ones). The constants below are only the fallback for models without them.

A level pressed against the view's lower edge is the view grid cutting off the lower spine, not a
foreign image: the localiser squeezes the levels it cannot see into the last millimetres, so their
segments come out short. Those segments are left out of the spacing check and reported by the
advisory ``levels_at_view_edge`` check (its own warning; ``plausible`` stays true). An untrained or
unsure localiser that collapses all five levels together is still flagged: the edge rule never
exempts more than the two lowest segments.
"""

from __future__ import annotations

import math

import numpy as np

from lumbar_tf.core.labels import LEVELS

N_LEVELS = 5
# Fallback bounds (models trained before the bounds were recorded).
# Distance between neighbouring level centres, mm. Real lumbar discs are ~25-45 mm apart.
SPACING_MM = (18.0, 60.0)
# Turn of the level polyline at one level, degrees: the lumbar curve bends gently at each disc.
MAX_TURN_DEG = 45.0
# Angle between the first and the last segment (L1/L2->L2/L3 vs L4/L5->L5/S1), degrees: lordosis.
MAX_LORDOSIS_DEG = 90.0
# Image statistics of the localiser view's midline channel (0-255 after CLAHE). Ten phantom studies
# measure correlation 0.75-0.85 at 64 px views (0.92-0.97 at the default 192 px) and 5.5-5.9 bits.
NEIGHBOUR_CORRELATION_MIN = 0.5
ENTROPY_BITS_MIN = 3.0
ENTROPY_BINS = 64
# Vertical periodicity (`vertical_periodicity`): the view at WORK_MM pixels, sheared by SHEARS
# (columns per row), bands BAND_MM wide, high-passed by removing a HIGHPASS_MM moving average
# (twice), autocorrelated at lags of PERIOD_MM. Phantom lumbar views measure 0.56-0.92 (12 centred
# and 40 realistic studies, 64 and 192 px views), drawn heads, knees, abdomens and mistyped axial
# series 0.34-0.71, median 0.53 (docs/architecture.md "Input-quality bounds").
WORK_MM = 2.0
SHEARS = (-0.3, -0.15, 0.0, 0.15, 0.3)
BAND_MM = 10.0
HIGHPASS_MM = 20.0
PERIOD_MM = (24.0, 46.0)
VERTICAL_PERIODICITY_MIN = 0.6

FALLBACK_BOUNDS = {
    "source": "fixed fallback (the model carries no bounds of its own)",
    "spacing_mm": list(SPACING_MM),
    "max_turn_deg": MAX_TURN_DEG,
    "max_lordosis_deg": MAX_LORDOSIS_DEG,
    "neighbour_correlation_min": NEIGHBOUR_CORRELATION_MIN,
    "entropy_bits_min": ENTROPY_BITS_MIN,
    "vertical_periodicity_min": VERTICAL_PERIODICITY_MIN,
}
# Margins around the training data's range: spacing x(1 -/+ 0.25), curvature + 15 / + 20 degrees
# (localiser error bends the polyline more than anatomy does), image statistics - 0.1 / - 1 bit.
SPACING_MARGIN = 0.25
TURN_MARGIN_DEG = 15.0
LORDOSIS_MARGIN_DEG = 20.0
CORRELATION_MARGIN = 0.1
ENTROPY_MARGIN_BITS = 1.0
PERIODICITY_MARGIN = 0.1
MIN_TRAINING_STUDIES = 3
# L5/S1 within this share of the view (12 mm of 200) of its lower edge is "at the edge".
EDGE_FRACTION = 0.06
EDGE_SEGMENTS = 2  # at most the two lowest segments are exempted from the spacing check

WARNING = (
    "the input does not look like a lumbar-spine MRI ({failed}); treat the levels and grades as meaningless"
)
EDGE_WARNING = (
    "levels {levels} lie crowded at the view's lower edge: the view probably cuts off the lower lumbar "
    "spine; their positions and grades are unreliable"
)
ADVISORY = ("levels_at_view_edge",)


def _check(ok: bool, value, lo=None, hi=None) -> dict:
    def plain(v):
        if v is None:
            return None
        if isinstance(v, (list, tuple, np.ndarray)):
            return [plain(x) for x in np.asarray(v, dtype=np.float64).tolist()]
        v = float(v)
        return round(v, 4) if math.isfinite(v) else None

    return {"ok": bool(ok), "value": plain(value), "range": [lo, hi]}


def _shape(xy_mm: np.ndarray):
    """Segment lengths and (largest turn, first-to-last segment angle) in degrees of a polyline
    in mm, head to feet (None when two points coincide)."""
    seg = np.diff(xy_mm, axis=0)  # [4, 2] head -> feet
    spacing = np.hypot(seg[:, 0], seg[:, 1])
    if not np.all(spacing > 1e-6):  # coincident points have no direction
        return spacing, None
    angle = np.arctan2(seg[:, 0], seg[:, 1])  # direction of each segment from straight down
    turns = np.degrees(np.abs(np.angle(np.exp(1j * np.diff(angle)))))
    lordosis = float(np.degrees(abs(np.angle(np.exp(1j * (angle[-1] - angle[0]))))))
    return spacing, (float(turns.max()), lordosis)


def at_view_edge(xy, spacing, min_spacing_mm: float) -> np.ndarray:
    """``[5]`` bool: the levels squeezed against the view's lower edge. L5/S1 within
    `EDGE_FRACTION` of the edge, and the run of too-short segments above it (at most
    `EDGE_SEGMENTS`, from the bottom up); each such segment marks its lower level."""
    edge = np.zeros(N_LEVELS, bool)
    if not xy[-1, 1] >= 1.0 - EDGE_FRACTION:
        return edge
    for k in range(EDGE_SEGMENTS):
        if not spacing[-1 - k] < min_spacing_mm:
            break
        edge[-1 - k] = True
    return edge


def level_checks(level_xy, spine_crop_mm: float, bounds: dict | None = None) -> dict:
    """Plausibility of five level centres ``[5, 2]`` (x_norm, y_norm), L1/L2 first, in a view of
    ``spine_crop_mm`` millimetres, against ``bounds`` (default `FALLBACK_BOUNDS`):
    ``{name: {"ok", "value", "range"}}``."""
    b = {**FALLBACK_BOUNDS, **(bounds or {})}
    lo, hi = (float(v) for v in b["spacing_mm"])
    max_turn, max_lordosis = float(b["max_turn_deg"]), float(b["max_lordosis_deg"])
    xy = np.asarray(level_xy, dtype=np.float64).reshape(N_LEVELS, 2)
    finite = bool(np.all(np.isfinite(xy)))
    xy = np.nan_to_num(xy, nan=-1.0, posinf=-1.0, neginf=-1.0)
    spacing, curve = _shape(xy * float(spine_crop_mm))
    dy = np.diff(xy[:, 1])
    edge = at_view_edge(xy, spacing, lo) if finite else np.zeros(N_LEVELS, bool)
    judged = ~edge[1:]  # segment i joins levels i and i+1: left out when its lower level is at the edge
    spacing_ok = bool(np.all((spacing[judged] >= lo) & (spacing[judged] <= hi)))
    if edge.any():  # a squeezed segment bends at random: judge the curve of the levels above only
        _, curve = _shape(xy[~edge] * float(spine_crop_mm)) if (~edge).sum() >= 3 else (None, None)
    curve_ok = curve is not None and curve[0] <= max_turn and curve[1] <= max_lordosis
    checks = {
        "inside_view": _check(finite and bool(np.all((xy >= 0.0) & (xy <= 1.0))), xy.min(), 0.0, 1.0),
        "head_to_feet": _check(bool(np.all(dy > 0)), dy.min() * float(spine_crop_mm), 0.0, None),
        "spacing_mm": _check(spacing_ok, spacing, lo, hi),
        "curvature_deg": _check(curve_ok, curve, None, [max_turn, max_lordosis]),
    }
    names = [LEVELS[i] for i in np.nonzero(edge)[0]]
    checks["levels_at_view_edge"] = _check(not edge.any(), float(edge.sum()), 0.0, 0.0)
    checks["levels_at_view_edge"]["levels"] = names
    return checks


def _moving_mean(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Mean over a window of ``k`` along ``axis`` (same size; the window is cut at the edges)."""
    a = np.moveaxis(a, axis, 0)
    n, r = a.shape[0], k // 2
    c = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])
    lo, hi = np.clip(np.arange(n) - r, 0, n), np.clip(np.arange(n) + r + 1, 0, n)
    out = (c[hi] - c[lo]) / (hi - lo).reshape((-1,) + (1,) * (a.ndim - 1))
    return np.moveaxis(out, 0, axis)


def _resample(img: np.ndarray, n: int) -> np.ndarray:
    """``[S, S]`` -> ``[n, n]`` by linear interpolation over the same square."""
    size = img.shape[0]
    src = (np.arange(n) + 0.5) * size / n - 0.5
    grid = np.arange(size)
    rows = np.stack([np.interp(src, grid, img[:, j]) for j in range(img.shape[1])], axis=1)
    return np.stack([np.interp(src, grid, rows[i]) for i in range(n)])


def _column_periodicity(x: np.ndarray, mm: float) -> float:
    """Largest autocorrelation over columns of ``x`` (high-passed) at lags in `PERIOD_MM`."""
    best = 0.0
    for lag in range(max(1, int(PERIOD_MM[0] / mm)), int(math.ceil(PERIOD_MM[1] / mm)) + 1):
        if lag >= x.shape[0] - 2:
            break
        a, b = x[:-lag], x[lag:]
        den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
        r = np.where(den > 1e-9, (a * b).sum(axis=0) / np.maximum(den, 1e-9), 0.0)
        best = max(best, float(r.max()))
    return best


def vertical_periodicity(image, spine_crop_mm: float) -> float:
    """How strongly a ``[S, S]`` sagittal view (rows head -> feet, ``spine_crop_mm`` square) repeats
    head to feet at the pitch of a vertebra plus disc: resampled to `WORK_MM` pixels (the same
    figure at any view size), sheared by each of `SHEARS` (a tilted column stays in one band), the
    largest autocorrelation over bands `BAND_MM` wide and lags in `PERIOD_MM`, high-passed at
    `HIGHPASS_MM`."""
    n = max(8, round(float(spine_crop_mm) / WORK_MM))
    img = _resample(np.asarray(image, dtype=np.float64), n)
    mm = float(spine_crop_mm) / n
    k = max(3, round(HIGHPASS_MM / mm))
    offsets = np.arange(n) - n / 2
    best = 0.0
    for slope in SHEARS:
        cols = (np.arange(n)[None, :] + np.round(slope * offsets).astype(int)[:, None]) % n
        band = _moving_mean(img[np.arange(n)[:, None], cols], max(1, round(BAND_MM / mm)), axis=1)
        x = band - _moving_mean(_moving_mean(band, k, axis=0), k, axis=0)
        best = max(best, _column_periodicity(x, mm))
    return best


def image_stats(image, spine_crop_mm: float | None = None) -> dict:
    """Neighbour-pixel correlation and grey-level entropy (bits) of a ``[H, W]`` image; with the
    view's ``spine_crop_mm``, also its `vertical_periodicity`."""
    img = np.asarray(image, dtype=np.float64)
    a = np.concatenate([img[:, :-1].ravel(), img[:-1, :].ravel()])
    b = np.concatenate([img[:, 1:].ravel(), img[1:, :].ravel()])
    flat = a.std() < 1e-9 or b.std() < 1e-9  # a blank view has no texture at all
    corr = 0.0 if flat else float(np.corrcoef(a, b)[0, 1])
    hist = np.bincount(np.clip(img.ravel() * ENTROPY_BINS / 256.0, 0, ENTROPY_BINS - 1).astype(int))
    p = hist[hist > 0] / hist.sum()
    stats = {"neighbour_correlation": corr, "entropy_bits": float(-(p * np.log2(p)).sum())}
    if spine_crop_mm is not None:
        stats["vertical_periodicity"] = 0.0 if flat else vertical_periodicity(img, spine_crop_mm)
    return stats


def image_checks(image, bounds: dict | None = None, spine_crop_mm: float | None = None) -> dict:
    """Checks of the localiser view's midline channel; ``spine_crop_mm`` (the view's size) adds
    the spine-specific ``vertical_periodicity``."""
    b = {**FALLBACK_BOUNDS, **(bounds or {})}
    corr_min, entropy_min = float(b["neighbour_correlation_min"]), float(b["entropy_bits_min"])
    stats = image_stats(image, spine_crop_mm)
    corr, entropy = stats["neighbour_correlation"], stats["entropy_bits"]
    checks = {
        "neighbour_correlation": _check(corr >= corr_min, corr, corr_min, 1.0),
        "entropy_bits": _check(entropy >= entropy_min, entropy, entropy_min, math.log2(ENTROPY_BINS)),
    }
    if spine_crop_mm is not None:
        period_min, period = float(b["vertical_periodicity_min"]), stats["vertical_periodicity"]
        checks["vertical_periodicity"] = _check(period >= period_min, period, period_min, 1.0)
    return checks


def assess(level_xy, spine_crop_mm: float, localiser_image=None, bounds: dict | None = None) -> dict:
    """``{"plausible", "bounds", "checks"}``: every check of the level positions and, given the
    localiser view's midline channel ``[H, W]``, of its image statistics, against the model's
    ``bounds`` (`bounds_from_training`; None: `FALLBACK_BOUNDS`). Advisory checks (`ADVISORY`)
    warn without making the input implausible."""
    checks = level_checks(level_xy, spine_crop_mm, bounds)
    if localiser_image is not None:
        checks.update(image_checks(localiser_image, bounds, spine_crop_mm))
    plausible = all(c["ok"] for name, c in checks.items() if name not in ADVISORY)
    source = (bounds or FALLBACK_BOUNDS).get("source", "model")
    return {"plausible": plausible, "bounds": source, "checks": checks}


def bounds_from_training(level_xy, level_present, spine_crop_mm: float, images) -> dict | None:
    """The bounds of one trained model, from its training split: labelled level centres
    ``[N, 5, 2]`` (normalised view coordinates) with ``level_present [N, 5]``, and the localiser
    views' midline channels ``[N, H, W]``. The range of the studies with all five levels labelled,
    widened by the margins above; None with fewer than `MIN_TRAINING_STUDIES` such studies."""
    xy = np.asarray(level_xy, dtype=np.float64)
    complete = np.asarray(level_present).reshape(len(xy), N_LEVELS).astype(bool).all(axis=1)
    spacings, turns, lordoses = [], [], []
    for points in xy[complete]:
        spacing, curve = _shape(points * float(spine_crop_mm))
        if curve is None:
            continue
        spacings.append(spacing)
        turns.append(curve[0])
        lordoses.append(curve[1])
    if len(spacings) < MIN_TRAINING_STUDIES:
        return None
    stats = [image_stats(image, spine_crop_mm) for image in images]
    spacings = np.concatenate(spacings)
    corr = min(s["neighbour_correlation"] for s in stats)
    entropy = min(s["entropy_bits"] for s in stats)
    period = min(s["vertical_periodicity"] for s in stats)
    r = lambda v: round(float(v), 3)  # noqa: E731
    return {
        "source": f"training labels and views ({len(turns)} studies)",
        "n_studies": len(turns),
        "spacing_mm": [r(spacings.min() * (1 - SPACING_MARGIN)), r(spacings.max() * (1 + SPACING_MARGIN))],
        "max_turn_deg": r(min(180.0, max(turns) + TURN_MARGIN_DEG)),
        "max_lordosis_deg": r(min(180.0, max(lordoses) + LORDOSIS_MARGIN_DEG)),
        "neighbour_correlation_min": r(corr - CORRELATION_MARGIN),
        "entropy_bits_min": r(max(0.0, entropy - ENTROPY_MARGIN_BITS)),
        "vertical_periodicity_min": r(max(0.0, period - PERIODICITY_MARGIN)),
        "measured": {
            "spacing_mm": [r(spacings.min()), r(spacings.max())],
            "max_turn_deg": r(max(turns)),
            "max_lordosis_deg": r(max(lordoses)),
            "neighbour_correlation_min": r(corr),
            "entropy_bits_min": r(entropy),
            "vertical_periodicity_min": r(period),
        },
        "margins": {
            "spacing": SPACING_MARGIN,
            "turn_deg": TURN_MARGIN_DEG,
            "lordosis_deg": LORDOSIS_MARGIN_DEG,
            "correlation": CORRELATION_MARGIN,
            "entropy_bits": ENTROPY_MARGIN_BITS,
            "vertical_periodicity": PERIODICITY_MARGIN,
        },
    }


def failed(quality: dict | None) -> list[str]:
    """Names of the failed checks that make the input implausible (none for a missing record)."""
    return [
        name
        for name, c in ((quality or {}).get("checks") or {}).items()
        if not c.get("ok", True) and name not in ADVISORY
    ]


def is_implausible(predictions: dict) -> bool:
    """predictions.json says the input does not look like a lumbar-spine MRI."""
    quality = predictions.get("quality")
    return bool(quality) and not quality.get("plausible", True)


def banner(predictions: dict) -> str | None:
    """One line for the report and the heatmap title, or None when the input looks plausible."""
    if not is_implausible(predictions):
        return None
    return "Implausible input: " + WARNING.format(failed=", ".join(failed(predictions["quality"])))


def warning_for(quality: dict) -> str | None:
    return None if quality.get("plausible", True) else WARNING.format(failed=", ".join(failed(quality)))


def warnings_for(quality: dict | None) -> list[str]:
    """predictions.json warnings of a quality record: implausible input, levels at the view's edge."""
    if not quality:
        return []
    out = [w for w in [warning_for(quality)] if w]
    edge = (quality.get("checks") or {}).get("levels_at_view_edge")
    if edge is not None and not edge.get("ok", True) and quality.get("plausible", True):
        out.append(EDGE_WARNING.format(levels=", ".join(edge.get("levels") or [])))
    return out


def midline_channel(views: dict, cfg) -> np.ndarray | None:
    """The localiser view's midline channel (offset nearest 0 mm), ``[S, S]``; None if absent."""
    spec = cfg.views[0]
    view = views.get(spec.name)
    if view is None:
        return None
    channel = int(np.argmin(np.abs(np.asarray(spec.offsets_mm, dtype=np.float64))))
    return np.asarray(view)[..., channel]


def _main(argv=None) -> None:
    """Print the image statistics of the localiser view of each study in DATA_DIR (RSNA layout)."""
    import argparse
    from pathlib import Path

    from lumbar_tf import preprocess
    from lumbar_tf.core.config import load_config
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.runtime.predictor import descriptions_for_study

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="train")
    parser.add_argument("--override", action="append", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(None, args.override).preprocess
    for study_dir in sorted((args.data_dir / f"{args.split}_images").iterdir()):
        study = read_study(study_dir, descriptions_for_study(study_dir))
        views, _grid, _info, _warnings = preprocess.build_views(study, cfg)
        stats = image_stats(midline_channel(views, cfg), _grid.spine_crop_mm)
        print(study_dir.name, " ".join(f"{k}={v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    _main()
