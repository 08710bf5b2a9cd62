"""Pictures of one study's predictions: the 5x5 severity grid and the per-disc overlay.

numpy + OpenCV + matplotlib only, never TensorFlow or Keras: the tablet runner (`lumbar_tf.cli.edge`)
draws the same pictures from a TFLite model's `predictions.json`, so every runtime shows one picture.

- ``grid.png``: conditions x levels, coloured by severity = expected grade ``sum_g g * p_g`` (0-3),
  each cell labelled with its most probable grade and that grade's probability. For a model trained
  on RSNA labels alone the grades are normal_mild/moderate/severe and normal/mild counts as 0.
- ``levels.png``: the midline Sagittal T2/STIR slice with each disc level marked at the localiser's
  position (``predictions["levels"][i]["x"], ["y"]``, source pixels), coloured by the level's worst
  severity over the five conditions and labelled L1/L2 ... L5/S1.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no global backend switch) and saved
by `save_png`, which writes only a fixed Software/Description text chunk: nothing from a DICOM header
ever reaches these files (the study id is the folder name).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.core.io import PNG_METADATA, save_png
from lumbar_tf.preprocess import prepared_slices
from lumbar_tf.runtime.predictions import grade_scale  # what a cell's grade indexes
from lumbar_tf.runtime.quality import banner as quality_banner

GRID_FILE = "grid.png"
LEVELS_FILE = "levels.png"
# Green (none) -> yellow -> red (severe); the grid and the overlay share it and its 0-3 range.
SEVERITY_CMAP = "RdYlGn_r"
SEVERITY_RANGE = (0.0, 3.0)
CONDITION_SHORT = {
    "spinal_canal_stenosis": "canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L subarticular",
    "right_subarticular_stenosis": "R subarticular",
}
CONDITION_LABELS = {
    "spinal_canal_stenosis": "spinal canal stenosis",
    "left_neural_foraminal_narrowing": "left neural foraminal\nnarrowing",
    "right_neural_foraminal_narrowing": "right neural foraminal\nnarrowing",
    "left_subarticular_stenosis": "left subarticular\nstenosis",
    "right_subarticular_stenosis": "right subarticular\nstenosis",
}
# The overlay is drawn at about this many pixels on its longer side, so markers stay round and crisp.
OVERLAY_SIZE = 768


# === Numbers ===


def grade_values(predictions: dict) -> np.ndarray:
    """The grade (0-3) each entry of the scale stands for: normal/mild counts as 0, since an RSNA-only
    model's P(mild) means nothing (its severity is then 2 P(moderate) + 3 P(severe))."""
    scale = grade_scale(predictions)
    if list(scale) == list(L.RSNA_GRADE_SCALE):
        return np.array([0.0, 2.0, 3.0])
    return np.arange(L.N_GRADES, dtype=np.float64)


def grade_prob_array(predictions: dict) -> np.ndarray:
    """``predictions["cells"]`` -> grade probabilities ``[5 conditions, 5 levels, len(grade_scale)]``.

    Cells are looked up by (condition, level), so their order in the list does not matter.
    """
    probs = np.full((L.N_CONDITIONS, L.N_LEVELS, len(grade_scale(predictions))), np.nan)
    for cell in predictions["cells"]:
        ci, li = L.CONDITIONS.index(cell["condition"]), L.LEVELS.index(cell["level"])
        probs[ci, li] = np.asarray(cell["grade_probs"], dtype=np.float64)
    if np.isnan(probs).any():
        raise ValueError("predictions: the 25 (condition, level) cells are not all present")
    return probs


def severity_grid(predictions: dict) -> np.ndarray:
    """Expected grade ``sum_g g * p_g`` per cell -> ``[5 conditions, 5 levels]`` in [0, 3]."""
    return grade_prob_array(predictions) @ grade_values(predictions)


def predicted_grades(predictions: dict) -> tuple[np.ndarray, np.ndarray]:
    """Most probable grade ``[5, 5]`` int (index into `grade_scale`) and its probability ``[5, 5]``."""
    probs = grade_prob_array(predictions)
    grades = probs.argmax(axis=-1)
    return grades, np.take_along_axis(probs, grades[..., None], axis=-1)[..., 0]


def worst_level_severity(predictions: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per level, the worst severity over the five conditions ``[5]`` and that condition's index ``[5]``."""
    grid = severity_grid(predictions)
    worst = grid.argmax(axis=0)
    return grid[worst, np.arange(L.N_LEVELS)], worst


def level_points(predictions: dict) -> np.ndarray:
    """``predictions["levels"]`` -> ``[5, 2]`` source-pixel (x, y) in LEVELS order (NaN where unknown)."""
    points = np.full((L.N_LEVELS, 2), np.nan)
    for entry in predictions["levels"]:
        li = L.LEVELS.index(entry["level"])
        if entry.get("x") is not None and entry.get("y") is not None:
            points[li] = float(entry["x"]), float(entry["y"])
    return points


def severity_rgb(severity) -> np.ndarray:
    """Severity (0-3) -> RGB uint8 ``[..., 3]`` of `SEVERITY_CMAP`."""
    from matplotlib import colormaps

    lo, hi = SEVERITY_RANGE
    rgba = colormaps[SEVERITY_CMAP]((np.asarray(severity, dtype=np.float64) - lo) / (hi - lo))
    return np.rint(np.asarray(rgba)[..., :3] * 255).astype(np.uint8)


# === Per-disc overlay image ===


@dataclass
class LevelsOverlay:
    """The midline slice as RGB with the level markers drawn in.

    ``rgb`` is the slice resized by ``scale``; ``markers`` ``[5, 2]`` are the marker centres in ``rgb``
    pixels (NaN where a level has no position), ``radius`` their radius in ``rgb`` pixels.
    """

    rgb: np.ndarray
    scale: float
    markers: np.ndarray
    radius: float
    severity: np.ndarray
    worst_condition: np.ndarray


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """A 2-D slice (uint8, or float in [0, 1]) -> uint8 ``[H, W]``."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"midline image: expected a 2-D [H, W] array, got shape {list(image.shape)}")
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def render_levels_overlay(
    predictions: dict, midline_image: np.ndarray, size: int = OVERLAY_SIZE
) -> LevelsOverlay:
    """Draw one filled circle per level at its source-pixel position, in its worst severity's colour.

    The slice is resized so that its longer side is ``size`` pixels (never shrunk); source pixel
    (x, y) lands at ``((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5)``. Drawn with OpenCV in the
    array itself, so a test can find the markers by their colour.
    """
    gray = to_uint8_image(midline_image)
    h, w = gray.shape
    scale = max(1.0, float(size) / max(h, w))
    out_w, out_h = round(w * scale), round(h * scale)
    rgb = cv2.cvtColor(cv2.resize(gray, (out_w, out_h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
    severity, worst = worst_level_severity(predictions)
    points = level_points(predictions)
    markers = (points + 0.5) * scale - 0.5
    radius = max(4.0, 0.013 * max(out_h, out_w))
    shift = 4  # sub-pixel centres for cv2.circle: coordinates in 1/16 pixel
    colours = severity_rgb(severity)
    for li in range(L.N_LEVELS):
        if np.isnan(markers[li]).any():
            continue
        centre = tuple(int(round(c * (1 << shift))) for c in markers[li])
        outer = int(round((radius + 2.0) * (1 << shift)))
        inner = int(round(radius * (1 << shift)))
        cv2.circle(rgb, centre, outer, (0, 0, 0), -1, cv2.LINE_AA, shift)
        cv2.circle(rgb, centre, inner, tuple(int(c) for c in colours[li]), -1, cv2.LINE_AA, shift)
    return LevelsOverlay(rgb, scale, markers, radius, severity, worst)


# === Figures ===


def _text_colour(rgb) -> str:
    r, g, b = (float(c) for c in rgb[:3])
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def severity_grid_figure(predictions: dict):
    """The 5x5 severity grid as a matplotlib Figure."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    severity = severity_grid(predictions)
    grades, grade_p = predicted_grades(predictions)
    scale, values = grade_scale(predictions), grade_values(predictions)
    fig_w, fig_h = 10.0, 6.6
    fig = Figure(figsize=(fig_w, fig_h))
    # Layout in inches: condition labels | 5x5 cells | colour bar with its labels.
    left, bottom, cell_w, cell_h = 2.3, 0.85, 1.15, 0.9
    ax = fig.add_axes((left / fig_w, bottom / fig_h, 5 * cell_w / fig_w, 5 * cell_h / fig_h))
    cax = fig.add_axes(((left + 5 * cell_w + 0.3) / fig_w, bottom / fig_h, 0.22 / fig_w, 5 * cell_h / fig_h))
    cmap = colormaps[SEVERITY_CMAP]
    image = ax.imshow(severity, cmap=cmap, vmin=SEVERITY_RANGE[0], vmax=SEVERITY_RANGE[1], aspect="auto")
    for ci in range(L.N_CONDITIONS):
        for li in range(L.N_LEVELS):
            colour = _text_colour(cmap((severity[ci, li] - SEVERITY_RANGE[0]) / np.ptp(SEVERITY_RANGE)))
            ax.text(
                li,
                ci,
                f"{scale[grades[ci, li]]}\n{grade_p[ci, li]:.0%}",
                ha="center",
                va="center",
                fontsize=10.5,
                color=colour,
                fontweight="bold" if values[grades[ci, li]] >= 2 else "normal",
            )
    ax.set_xticks(range(L.N_LEVELS), [L.LEVEL_TITLES[lv] for lv in L.LEVELS], fontsize=11)
    ax.set_yticks(range(L.N_CONDITIONS), [CONDITION_LABELS[c] for c in L.CONDITIONS], fontsize=10)
    ax.tick_params(top=True, labeltop=True, bottom=False, labelbottom=False, length=0)
    ax.set_xticks(np.arange(-0.5, L.N_LEVELS), minor=True)
    ax.set_yticks(np.arange(-0.5, L.N_CONDITIONS), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    bar = fig.colorbar(image, cax=cax, ticks=range(L.N_GRADES))
    bar.ax.set_yticklabels([f"{g} {name}" for g, name in enumerate(L.GRADES)], fontsize=9)
    bar.set_label("severity = expected grade  \u03a3 g\u00b7p(g)", fontsize=9)
    x0 = 0.25 / fig_w
    fig.text(
        x0,
        1 - 0.4 / fig_h,
        f"Study {predictions.get('study_id', '')}: predicted severity per condition and disc level",
        fontsize=13,
        fontweight="bold",
    )
    banner = quality_banner(predictions)
    if banner:
        fig.text(x0, 1 - 0.68 / fig_h, banner, fontsize=9, color="#b00020", fontweight="bold")
    fig.text(
        x0,
        0.4 / fig_h,
        "Each cell: the most probable grade and its probability. "
        + (
            "Colour: expected grade (0 none ... 3 severe)."
            if len(scale) == L.N_GRADES
            else "Colour: 2 P(moderate) + 3 P(severe) (trained on RSNA labels: mild not distinguishable)."
        ),
        fontsize=9,
    )
    fig.text(x0, 0.15 / fig_h, f"{_model_line(predictions)}    {INTENDED_USE}", fontsize=8.5, style="italic")
    return fig


def spread_labels(y, min_gap: float, lo: float, hi: float) -> np.ndarray:
    """Label positions near ``y`` (any order) at least ``min_gap`` apart, inside [lo, hi] where possible.

    Keeps the order of ``y``; NaN stays NaN.
    """
    y = np.asarray(y, dtype=np.float64)
    out = y.copy()
    valid = np.flatnonzero(~np.isnan(y))
    order = valid[np.argsort(y[valid], kind="stable")]
    targets = y[order]
    # Clusters of labels stacked min_gap apart, each centred on the mean of its points; merge
    # neighbours until none overlap (the classic label-stacking sweep).
    clusters: list[list[int]] = []
    for k in range(len(order)):
        clusters.append([k])
        while len(clusters) > 1:
            prev, last = clusters[-2], clusters[-1]
            prev_end = _cluster_start(targets, prev, min_gap) + (len(prev) - 1) * min_gap
            if _cluster_start(targets, last, min_gap) >= prev_end + min_gap:
                break
            clusters[-2:] = [prev + last]
    placed = np.empty(len(order))
    for n, cluster in enumerate(clusters):
        start = _cluster_start(targets, cluster, min_gap)
        if n == 0:  # keep the end clusters inside the image
            start = max(start, lo)
        if n == len(clusters) - 1:
            start = min(start, hi - (len(cluster) - 1) * min_gap)
        placed[cluster] = start + min_gap * np.arange(len(cluster))
    out[order] = placed
    return out


def _cluster_start(targets: np.ndarray, cluster: list[int], gap: float) -> float:
    return float(targets[cluster].mean() - (len(cluster) - 1) * gap / 2)


def _model_line(predictions: dict) -> str:
    model = predictions.get("model") or {}
    parts = [str(model[k]) for k in ("name", "format", "version") if model.get(k) not in (None, "")]
    return f"model: {' / '.join(parts)}" if parts else ""


def levels_figure(predictions: dict, midline_image: np.ndarray):
    """The per-disc overlay as a matplotlib Figure (the markers are drawn by `render_levels_overlay`)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    overlay = render_levels_overlay(predictions, midline_image)
    gray = to_uint8_image(midline_image)
    h, w = gray.shape
    grades, grade_p = predicted_grades(predictions)
    points = level_points(predictions)

    img_w = 6.4
    img_h = img_w * h / w
    fig = Figure(figsize=(img_w + 2.4, img_h + 1.3))
    fig_w, fig_h = fig.get_size_inches()
    ax = fig.add_axes((0.2 / fig_w, 0.55 / fig_h, img_w / fig_w, img_h / fig_h))
    cax = fig.add_axes(((img_w + 0.5) / fig_w, 0.55 / fig_h, 0.22 / fig_w, img_h / fig_h))
    # extent in source pixels: the labels below are placed in source-pixel coordinates.
    ax.imshow(overlay.rgb, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="antialiased")
    ax.set_axis_off()
    # Labels sit to the right of the markers, pushed apart where the levels lie close together.
    points_per_px = img_h * 72.0 / h
    label_y = spread_labels(points[:, 1], 15.0 / points_per_px, 0.0, h - 1.0)
    label_dx = 16.0 / points_per_px
    for li, level in enumerate(L.LEVELS):
        if np.isnan(points[li]).any():
            continue
        ci = int(overlay.worst_condition[li])
        label = (
            f"{L.LEVEL_TITLES[level]}  {CONDITION_SHORT[L.CONDITIONS[ci]]}: "
            f"{grade_scale(predictions)[grades[ci, li]]} {grade_p[ci, li]:.0%}"
        )
        moved = abs(label_y[li] - points[li, 1]) * points_per_px > 2.0
        ax.annotate(
            label,
            xy=(points[li, 0], points[li, 1]),
            xytext=(points[li, 0] + label_dx, label_y[li]),
            textcoords="data",
            va="center",
            fontsize=9.5,
            color="white",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "black", "alpha": 0.65, "linewidth": 0},
            arrowprops={"arrowstyle": "-", "color": "white", "linewidth": 0.8} if moved else None,
            annotation_clip=False,
        )
    mappable = ScalarMappable(Normalize(*SEVERITY_RANGE), colormaps[SEVERITY_CMAP])
    bar = fig.colorbar(mappable, cax=cax, ticks=range(L.N_GRADES))
    bar.ax.set_yticklabels([f"{g} {name}" for g, name in enumerate(L.GRADES)], fontsize=9)
    bar.set_label("worst severity of the 5 conditions (expected grade)", fontsize=9)
    instance = next(
        (e.get("instance_number") for e in predictions["levels"] if e.get("instance_number")), None
    )
    where = (
        f"midline sagittal slice, instance {instance}" if instance is not None else "midline sagittal slice"
    )
    fig.text(
        0.2 / fig_w,
        1 - 0.3 / fig_h,
        f"Study {predictions.get('study_id', '')}: disc levels found by the localiser ({where})",
        fontsize=11,
        fontweight="bold",
    )
    banner = quality_banner(predictions)
    notes = [banner] if banner else []
    if np.isnan(points).any():
        notes.append("some levels have no position on this slice")
    if notes:
        fig.text(
            0.2 / fig_w,
            1 - 0.5 / fig_h,
            "; ".join(notes),
            fontsize=8.5,
            color="#b00020" if banner else "black",
        )
    fig.text(
        0.2 / fig_w, 0.2 / fig_h, f"{_model_line(predictions)}   {INTENDED_USE}", fontsize=8.5, style="italic"
    )
    return fig


def write_heatmaps(predictions: dict, midline_image: np.ndarray, out_dir) -> list[Path]:
    """Write ``grid.png`` and ``levels.png`` for one study into ``out_dir``; returns their paths.

    Args:
        predictions: one study's `predictions.json` dict (the output contract of DESIGN.md).
        midline_image: ``[H, W]`` uint8 (or float in [0, 1]) midline Sagittal T2/STIR slice, the one
            ``predictions["levels"]`` positions are given on.
        out_dir: folder to write into (created if missing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in (
        (GRID_FILE, severity_grid_figure(predictions)),
        (LEVELS_FILE, levels_figure(predictions, midline_image)),
    ):
        paths.append(save_png(fig, out / name))
    return paths


__all__ = [
    "GRID_FILE",
    "LEVELS_FILE",
    "PNG_METADATA",
    "SEVERITY_CMAP",
    "LevelsOverlay",
    "grade_prob_array",
    "grade_scale",
    "grade_values",
    "level_points",
    "levels_figure",
    "predicted_grades",
    "render_levels_overlay",
    "save_png",
    "severity_grid",
    "severity_grid_figure",
    "severity_rgb",
    "spread_labels",
    "to_uint8_image",
    "worst_level_severity",
    "write_heatmaps",
]


# === A runtime's result ===


def midline_image(result) -> np.ndarray | None:
    """The source midline slice the level positions lie on, normalised as the views are
    (percentile clip + CLAHE): uint8 ``[H, W]`` on the file's own matrix, the pixels the positions
    name (a slice of another size is decoded resampled onto its series'); None when the study has
    no such slice."""
    midline = result.midline()
    if midline is None:
        return None
    series, index = midline
    image = prepared_slices(series, [index], result.preprocess)[0]
    shape = series.slices[index].file_shape
    if shape is not None:
        image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return image


def write_heatmaps_for(result, out_dir) -> list[Path]:
    """The severity grid and per-disc overlay of a `runtime.predictor.StudyResult` (``--heatmaps``).

    A study without a midline slice adds a warning instead (the prediction itself still stands).
    """
    image = midline_image(result)
    if image is None:
        result.predictions["warnings"].append("heatmaps not written: no midline sagittal slice")
        return []
    return [Path(p) for p in write_heatmaps(result.predictions, image, Path(out_dir))]
