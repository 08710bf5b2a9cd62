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

FALLBACK_BOUNDS = {
    "source": "fixed fallback (the model carries no bounds of its own)",
    "spacing_mm": list(SPACING_MM),
    "max_turn_deg": MAX_TURN_DEG,
    "max_lordosis_deg": MAX_LORDOSIS_DEG,
    "neighbour_correlation_min": NEIGHBOUR_CORRELATION_MIN,
    "entropy_bits_min": ENTROPY_BITS_MIN,
}
# Margins around the training data's range: spacing x(1 -/+ 0.25), curvature + 15 / + 20 degrees
# (localiser error bends the polyline more than anatomy does), image statistics - 0.1 / - 1 bit.
SPACING_MARGIN = 0.25
TURN_MARGIN_DEG = 15.0
LORDOSIS_MARGIN_DEG = 20.0
CORRELATION_MARGIN = 0.1
ENTROPY_MARGIN_BITS = 1.0
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


def image_stats(image) -> dict:
    """Neighbour-pixel correlation and grey-level entropy (bits) of a ``[H, W]`` image."""
    img = np.asarray(image, dtype=np.float64)
    a = np.concatenate([img[:, :-1].ravel(), img[:-1, :].ravel()])
    b = np.concatenate([img[:, 1:].ravel(), img[1:, :].ravel()])
    flat = a.std() < 1e-9 or b.std() < 1e-9  # a blank view has no texture at all
    corr = 0.0 if flat else float(np.corrcoef(a, b)[0, 1])
    hist = np.bincount(np.clip(img.ravel() * ENTROPY_BINS / 256.0, 0, ENTROPY_BINS - 1).astype(int))
    p = hist[hist > 0] / hist.sum()
    return {"neighbour_correlation": corr, "entropy_bits": float(-(p * np.log2(p)).sum())}


def image_checks(image, bounds: dict | None = None) -> dict:
    b = {**FALLBACK_BOUNDS, **(bounds or {})}
    corr_min, entropy_min = float(b["neighbour_correlation_min"]), float(b["entropy_bits_min"])
    stats = image_stats(image)
    corr, entropy = stats["neighbour_correlation"], stats["entropy_bits"]
    return {
        "neighbour_correlation": _check(corr >= corr_min, corr, corr_min, 1.0),
        "entropy_bits": _check(entropy >= entropy_min, entropy, entropy_min, math.log2(ENTROPY_BINS)),
    }


def assess(level_xy, spine_crop_mm: float, localiser_image=None, bounds: dict | None = None) -> dict:
    """``{"plausible", "bounds", "checks"}``: every check of the level positions and, given the
    localiser view's midline channel ``[H, W]``, of its image statistics, against the model's
    ``bounds`` (`bounds_from_training`; None: `FALLBACK_BOUNDS`). Advisory checks (`ADVISORY`)
    warn without making the input implausible."""
    checks = level_checks(level_xy, spine_crop_mm, bounds)
    if localiser_image is not None:
        checks.update(image_checks(localiser_image, bounds))
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
    stats = [image_stats(image) for image in images]
    spacings = np.concatenate(spacings)
    corr = min(s["neighbour_correlation"] for s in stats)
    entropy = min(s["entropy_bits"] for s in stats)
    r = lambda v: round(float(v), 3)  # noqa: E731
    return {
        "source": f"training labels and views ({len(turns)} studies)",
        "n_studies": len(turns),
        "spacing_mm": [r(spacings.min() * (1 - SPACING_MARGIN)), r(spacings.max() * (1 + SPACING_MARGIN))],
        "max_turn_deg": r(min(180.0, max(turns) + TURN_MARGIN_DEG)),
        "max_lordosis_deg": r(min(180.0, max(lordoses) + LORDOSIS_MARGIN_DEG)),
        "neighbour_correlation_min": r(corr - CORRELATION_MARGIN),
        "entropy_bits_min": r(max(0.0, entropy - ENTROPY_MARGIN_BITS)),
        "measured": {
            "spacing_mm": [r(spacings.min()), r(spacings.max())],
            "max_turn_deg": r(max(turns)),
            "max_lordosis_deg": r(max(lordoses)),
            "neighbour_correlation_min": r(corr),
            "entropy_bits_min": r(entropy),
        },
        "margins": {
            "spacing": SPACING_MARGIN,
            "turn_deg": TURN_MARGIN_DEG,
            "lordosis_deg": LORDOSIS_MARGIN_DEG,
            "correlation": CORRELATION_MARGIN,
            "entropy_bits": ENTROPY_MARGIN_BITS,
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
        stats = image_stats(midline_channel(views, cfg))
        print(study_dir.name, " ".join(f"{k}={v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    _main()
