"""Input quality control: does this study look like a lumbar-spine MRI? (numpy only; the tablet uses it)

A knee, a test pattern or a wrongly typed series still gets five level positions and 25 grades from
the model, with nothing to tell the reader they are meaningless. `assess` checks what is cheap to
check and `predictor.study_result` writes the result as predictions.json's ``quality``
(``{"plausible": bool, "checks": {name: {"ok", "value", "range"}}}``) plus one warning line when
implausible; the explain report and the heatmaps show a banner.

- Level positions (``level_xy``, normalised view coordinates; the view is ``spine_crop_mm`` square,
  docs/architecture.md "Patient coordinates and views"): all inside the view, head-to-feet order,
  neighbouring levels 18-60 mm apart (real lumbar discs are ~25-45 mm apart), and a gentle curve
  (lordosis) rather than a zig-zag.
- Image statistics of the localiser view's midline channel against bounds with wide margins around
  the phantom training data (``python -m lumbar_tf.runtime.quality DATA_DIR`` prints them): the
  correlation of neighbouring pixels (anatomy is smooth; noise is not) and the grey-level entropy
  (a test pattern or a blank series has a handful of grey levels).

The localiser outputs only ``level_xy`` (no heatmap or score), so there is no confidence to check.
"""

from __future__ import annotations

import math

import numpy as np

N_LEVELS = 5
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

WARNING = (
    "the input does not look like a lumbar-spine MRI ({failed}); treat the levels and grades as meaningless"
)


def _check(ok: bool, value, lo=None, hi=None) -> dict:
    def plain(v):
        if v is None:
            return None
        if isinstance(v, (list, tuple, np.ndarray)):
            return [plain(x) for x in np.asarray(v, dtype=np.float64).tolist()]
        v = float(v)
        return round(v, 4) if math.isfinite(v) else None

    return {"ok": bool(ok), "value": plain(value), "range": [lo, hi]}


def level_checks(level_xy, spine_crop_mm: float) -> dict:
    """Plausibility of five level centres ``[5, 2]`` (x_norm, y_norm), L1/L2 first, in a view of
    ``spine_crop_mm`` millimetres: ``{name: {"ok", "value", "range"}}``."""
    xy = np.asarray(level_xy, dtype=np.float64).reshape(N_LEVELS, 2)
    finite = bool(np.all(np.isfinite(xy)))
    xy = np.nan_to_num(xy, nan=-1.0, posinf=-1.0, neginf=-1.0)
    mm = xy * float(spine_crop_mm)
    seg = np.diff(mm, axis=0)  # [4, 2] head -> feet
    spacing = np.hypot(seg[:, 0], seg[:, 1])
    dy = np.diff(xy[:, 1])
    checks = {
        "inside_view": _check(finite and bool(np.all((xy >= 0.0) & (xy <= 1.0))), xy.min(), 0.0, 1.0),
        "head_to_feet": _check(bool(np.all(dy > 0)), dy.min() * float(spine_crop_mm), 0.0, None),
        "spacing_mm": _check(
            bool(np.all((spacing >= SPACING_MM[0]) & (spacing <= SPACING_MM[1]))), spacing, *SPACING_MM
        ),
    }
    if np.all(spacing > 1e-6):
        angle = np.arctan2(seg[:, 0], seg[:, 1])  # direction of each segment from straight down
        turns = np.degrees(np.abs(np.angle(np.exp(1j * np.diff(angle)))))
        lordosis = float(np.degrees(abs(np.angle(np.exp(1j * (angle[-1] - angle[0]))))))
        curve_ok = bool(turns.max() <= MAX_TURN_DEG and lordosis <= MAX_LORDOSIS_DEG)
        value = [float(turns.max()), lordosis]
    else:  # coincident points have no direction
        curve_ok, value = False, None
    checks["curvature_deg"] = _check(curve_ok, value, None, [MAX_TURN_DEG, MAX_LORDOSIS_DEG])
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


def image_checks(image) -> dict:
    stats = image_stats(image)
    corr, entropy = stats["neighbour_correlation"], stats["entropy_bits"]
    return {
        "neighbour_correlation": _check(
            corr >= NEIGHBOUR_CORRELATION_MIN, corr, NEIGHBOUR_CORRELATION_MIN, 1.0
        ),
        "entropy_bits": _check(
            entropy >= ENTROPY_BITS_MIN, entropy, ENTROPY_BITS_MIN, math.log2(ENTROPY_BINS)
        ),
    }


def assess(level_xy, spine_crop_mm: float, localiser_image=None) -> dict:
    """``{"plausible", "checks"}``: every check of the level positions and, given the localiser
    view's midline channel ``[H, W]``, of its image statistics."""
    checks = level_checks(level_xy, spine_crop_mm)
    if localiser_image is not None:
        checks.update(image_checks(localiser_image))
    return {"plausible": all(c["ok"] for c in checks.values()), "checks": checks}


def failed(quality: dict | None) -> list[str]:
    """Names of the failed checks (none for a missing record)."""
    return [name for name, c in ((quality or {}).get("checks") or {}).items() if not c.get("ok", True)]


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
