"""`lumbar-tf explain`: predictions, heatmaps, Grad-CAM++ of the grader and an HTML report for one study.

For each (condition, level) the grader's Grad-CAM++ is taken on that level's crop of the view that shows
the condition, and drawn on the source slice the crop came from:

  ==========================  ==========  ==============================================
  condition                   view        channel (slice) the map is shown on
  ==========================  ==========  ==============================================
  spinal canal stenosis       sag_t2      midline (offset nearest 0 mm)
  left / right foraminal      sag_t1      left (+22 mm) / right (-22 mm) foramen
  left / right subarticular   sag_t2      left (+12 mm) / right (-12 mm) paramedian
  ==========================  ==========  ==============================================

The grader sees all three channels of a view through one shared backbone, so the map is spatial (over
the crop) and the channel only chooses the slice it is displayed on. The target is the logit of
``P(grade >= 2)`` (moderate or worse; `TARGET_THRESHOLD`): the RSNA decision boundary, defined under both
gradings, and the threshold whose evidence a reader asks about ("why moderate/severe here?").

Grad-CAM++ is computed with a `tf.GradientTape` over `model.build_grader_gradcam_model` (the grader's own
layers with the chosen view's feature map exposed) rather than tf-keras-vis, which cannot see into the
nested grader and needs one call per condition (README, Dependencies): one forward pass per view with a
persistent tape gives the gradients of all five levels (a batch of independent samples) for every
condition read on that view. The weighting is tf-keras-vis' `GradcamPlusPlus` formula (see
`gradcam_plus_plus`).

Coordinates go crop pixel -> normalised view -> source pixel of the chosen slice through
`lumbar_tf.preprocess` (the maps training and inference use), so the overlay sits where the grader
looked. No DICOM header field other than geometry and instance numbers is read into any output; the
study id is the folder name.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import PreprocessConfig, config_to_dict
from lumbar_tf.core.contract import INTENDED_USE, PREDICTIONS_FILE
from lumbar_tf.core.errors import ModelLoadError
from lumbar_tf.core.io import save_png
from lumbar_tf.dicom.reader import SAGITTAL_T1, SAGITTAL_T2
from lumbar_tf.report.heatmaps import grade_prob_array, grade_scale, midline_image, write_heatmaps
from lumbar_tf.runtime.quality import banner as quality_banner

TARGET_THRESHOLD = 1  # index into labels.THRESHOLDS: ">=2"
REPORT_FILE = "report.html"
TFLITE_HINT = (
    "Grad-CAM needs the Keras model (a .keras file or a run folder); "
    "for a TFLite or SavedModel model, `lumbar-tf predict --heatmaps` or `lumbar-tf-edge --heatmaps` "
    "write the severity grid and the per-disc overlay"
)


class ExplainError(ModelLoadError):
    """A model `explain` cannot use (TFLite, SavedModel). A ModelLoadError, so the CLI exits 2."""


@dataclass(frozen=True)
class CamSource:
    """Where one condition is read: a view, a channel of it, and which slice role that channel is."""

    series_description: str
    side: str  # "midline" | "left" | "right"
    role: str  # words for the reader


CONDITION_SOURCES = {
    "spinal_canal_stenosis": CamSource(SAGITTAL_T2, "midline", "midline"),
    "left_neural_foraminal_narrowing": CamSource(SAGITTAL_T1, "left", "left foramen"),
    "right_neural_foraminal_narrowing": CamSource(SAGITTAL_T1, "right", "right foramen"),
    "left_subarticular_stenosis": CamSource(SAGITTAL_T2, "left", "left paramedian"),
    "right_subarticular_stenosis": CamSource(SAGITTAL_T2, "right", "right paramedian"),
}


# === Model path checks ===


def check_model_path(path) -> None:
    """Raise `ExplainError` for a TFLite file or a SavedModel folder (Grad-CAM needs Keras)."""
    path = Path(path)
    if path.suffix.lower() == ".tflite":
        raise ExplainError(f"{path}: {TFLITE_HINT}")
    if path.is_dir():
        saved = (path / "saved_model.pb").exists() or any(path.glob("*/saved_model.pb"))
        if saved or any(path.glob("saved_model/*/*/saved_model.pb")):
            raise ExplainError(f"{path}: is a SavedModel; {TFLITE_HINT}")


def file_fingerprint(path) -> str:
    """First 12 hex digits of a file's sha256: names the exact model in the report."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


# === Views and slices ===


def channel_for_side(offsets_mm, side: str) -> int:
    """Channel of a view for a side: midline = offset nearest 0, left = most positive, right = most
    negative (offsets are patient-left positive)."""
    offsets = np.asarray(offsets_mm, dtype=np.float64)
    if side == "midline":
        return int(np.argmin(np.abs(offsets)))
    return int(np.argmax(offsets) if side == "left" else np.argmin(offsets))


def source_view(cfg: PreprocessConfig, condition: str) -> tuple[str, int]:
    """(view name, channel) a condition's Grad-CAM is taken on and shown on.

    The first configured view of the condition's series; if the config has none, the localiser view.
    """
    source = CONDITION_SOURCES[condition]
    spec = next((v for v in cfg.views if v.series_description == source.series_description), cfg.views[0])
    return spec.name, channel_for_side(spec.offsets_mm, source.side)


def slice_image(series, index: int, cfg: PreprocessConfig) -> np.ndarray:
    """One source slice as the model's preprocessing shows it: percentile clip + CLAHE -> uint8 [H, W]."""
    from lumbar_tf.preprocess import prepared_slices

    return prepared_slices(series, [index], cfg)[0]


# === Crop <-> source mapping ===


def crop_px_to_source_px(box, xy, series, slice_index: int, grid, cfg: PreprocessConfig) -> np.ndarray:
    """Crop pixel (j, i) ``[..., 2]`` of a level crop -> source pixel (column, row) of a sagittal slice."""
    from lumbar_tf.preprocess import crop_px_to_view_norm, view_norm_to_source_px

    return view_norm_to_source_px(series, slice_index, crop_px_to_view_norm(box, xy, cfg), grid)


def crop_to_source_affine(box, series, slice_index: int, grid, cfg: PreprocessConfig) -> np.ndarray:
    """2x3 affine: crop pixel (j, i) -> source pixel (x, y) (exact: each step of the chain is affine)."""
    last = float(cfg.crop_size - 1)
    corners = np.array([[0.0, 0.0], [last, 0.0], [0.0, last]])
    src = crop_px_to_source_px(box, corners, series, slice_index, grid, cfg)
    return np.stack([(src[1] - src[0]) / last, (src[2] - src[0]) / last, src[0]], axis=1)


def cam_to_source(cam, affine: np.ndarray, source_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Warp a crop-space map ``[S, S]`` onto the source slice ``[rows, cols]``.

    Returns (map, coverage): bilinear, 0 outside the crop; coverage is 1 inside the crop's footprint.
    """
    import cv2

    rows, cols = source_shape
    cam = np.asarray(cam, dtype=np.float32)
    kwargs = {"flags": cv2.INTER_LINEAR, "borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
    warped = cv2.warpAffine(cam, affine.astype(np.float64), (cols, rows), **kwargs)
    # Pad by one pixel so coverage reaches the crop's outer pixel centres at full weight.
    ones = np.pad(np.ones_like(cam), 1)
    shifted = affine.astype(np.float64).copy()
    shifted[:, 2] -= shifted[:, :2].sum(axis=1)  # the padded array starts at crop pixel (-1, -1)
    coverage = cv2.warpAffine(ones, shifted, (cols, rows), **kwargs)
    return warped, np.clip(coverage, 0.0, 1.0)


def upsample_cam(cam_fm: np.ndarray, size: int) -> np.ndarray:
    """Feature-map CAMs ``[N, h, w]`` -> crop-pixel CAMs ``[N, size, size]``.

    Bilinear with half-pixel centres (cv2.resize), so feature cell k's centre lands on the centre of the
    crop pixels it pools.
    """
    import cv2

    cam_fm = np.asarray(cam_fm, dtype=np.float32)
    return np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_LINEAR) for c in cam_fm])


def normalize_cams(cams: np.ndarray) -> np.ndarray:
    """Scale each map ``[N, ...]`` to max 1 (all-zero maps stay zero)."""
    cams = np.maximum(np.asarray(cams, dtype=np.float32), 0.0)
    peak = cams.reshape(len(cams), -1).max(axis=1)
    return cams / np.where(peak > 0, peak, 1.0).reshape((-1,) + (1,) * (cams.ndim - 1))


# === Grad-CAM++ ===


def gradcam_plus_plus(feature_map, grads) -> np.ndarray:
    """Grad-CAM++ maps ``[N, h, w]`` from a feature map and the score's gradient, each ``[N, h, w, C]``.

    The tf-keras-vis ``GradcamPlusPlus`` formula with score ``exp(S)``: ``alpha = g^2 / (2 g^2 +
    g^3 * sum(A))`` (normalised over the map), ``w_k = sum(alpha * relu(g))``, ``cam = relu(sum_k w_k
    A_k)``. The common factor ``exp(S)`` is left out: it scales each map by a positive constant, and
    maps are normalised for display (`normalize_cams`), so leaving it out only avoids overflow.
    """
    a = np.asarray(feature_map, dtype=np.float64)
    g = np.asarray(grads, dtype=np.float64)
    g2, g3 = g * g, g * g * g
    global_sum = a.sum(axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + g3 * global_sum
    denom = np.where(g2 == 0.0, 1.0, denom)
    alphas = np.where(g2 == 0.0, 0.0, g2 / np.where(denom == 0.0, 1.0, denom))
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = alphas / np.where(norm == 0.0, 1.0, norm)
    weights = (np.maximum(g, 0.0) * alphas).sum(axis=(1, 2), keepdims=True)
    return np.maximum((weights * a).sum(axis=-1), 0.0).astype(np.float32)


def find_grader(model):
    """The grader inside an end-to-end model (layer ``grader``, else the nested model with its output)."""
    import keras

    from lumbar_tf.models.networks import GRADER_OUTPUT

    try:
        return model.get_layer("grader")
    except ValueError:
        pass
    for layer in model.layers:
        if isinstance(layer, keras.Model) and any(GRADER_OUTPUT in str(t.name) for t in layer.outputs):
            return layer
    raise ModelLoadError(f"{model.name}: no grader inside this model")


def grader_gradcams(
    grader, crops: dict, condition_views: dict[str, str], threshold: int = TARGET_THRESHOLD
) -> tuple[dict, np.ndarray]:
    """Grad-CAM++ of every condition on its view, for the five levels of one study.

    Args:
        grader: the grader Keras model.
        crops: ``{view: float32 [5, S, S, 3]}`` level crops (0-255), levels in LEVELS order.
        condition_views: ``{condition: view name}`` whose feature map each condition's map is taken on
            (`source_view`).
        threshold: index of the threshold whose logit is the target (1 = ``>=2``).

    Returns:
        ({condition: feature-map CAMs ``[5, h, w]``}, threshold logits ``[5 levels, 5 conditions, 3]``).
    """
    import tensorflow as tf

    from lumbar_tf.models.networks import LEVEL_INPUT, build_grader_gradcam_model, grader_view_names

    names = grader_view_names(grader)
    inputs = {name: tf.convert_to_tensor(np.asarray(crops[name], np.float32)) for name in names}
    inputs[LEVEL_INPUT] = tf.range(L.N_LEVELS, dtype=tf.int32)
    by_view: dict[str, list[int]] = {}
    for ci, condition in enumerate(L.CONDITIONS):
        by_view.setdefault(condition_views[condition], []).append(ci)
    cams, logits = {}, None
    for view, conditions in by_view.items():
        gradcam_model = build_grader_gradcam_model(grader, view)
        with tf.GradientTape(persistent=True) as tape:
            feature_map, view_logits = gradcam_model(inputs, training=False)
            scores = {ci: view_logits[:, ci, threshold] for ci in conditions}
        for ci in conditions:
            grads = tape.gradient(scores[ci], feature_map)  # per sample: the levels are independent
            cams[L.CONDITIONS[ci]] = gradcam_plus_plus(feature_map.numpy(), grads.numpy())
        del tape
        logits = view_logits.numpy()
    return cams, logits


# === Figures ===


@dataclass
class CamPanel:
    """What one Grad-CAM panel shows (all coordinates in source pixels of ``image``)."""

    level: str
    image: np.ndarray  # [rows, cols] uint8
    cam: np.ndarray  # [rows, cols] float in [0, 1]
    coverage: np.ndarray  # [rows, cols] float in [0, 1]
    box: np.ndarray  # [4, 2] crop corners, in drawing order
    point: np.ndarray  # [2] level centre
    peak: np.ndarray | None  # [2] CAM maximum, None when the map is empty
    title: str


def gradcam_figure(panels: list[CamPanel], title: str, subtitle: str):
    """Five Grad-CAM panels side by side, zoomed on each level's crop, with one colour bar."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Polygon

    cmap = colormaps["jet"]
    # Layout in inches: five square panels, a colour bar, titles above, a legend line below.
    panel, gap, left, bottom, top = 3.1, 0.15, 0.15, 0.45, 1.4
    fig_w = left + 5 * panel + 4 * gap + 1.3
    fig_h = bottom + panel + top
    fig = Figure(figsize=(fig_w, fig_h))
    for k, item in enumerate(panels):
        ax = fig.add_axes(((left + k * (panel + gap)) / fig_w, bottom / fig_h, panel / fig_w, panel / fig_h))
        rows, cols = item.image.shape
        extent = (-0.5, cols - 0.5, rows - 0.5, -0.5)
        ax.imshow(item.image, cmap="gray", vmin=0, vmax=255, extent=extent, interpolation="antialiased")
        rgba = cmap(np.clip(item.cam, 0.0, 1.0))
        rgba[..., 3] = 0.55 * np.clip(item.cam, 0.0, 1.0) * item.coverage
        ax.imshow(rgba, extent=extent, interpolation="bilinear")
        ax.add_patch(
            Polygon(item.box, closed=True, fill=False, edgecolor="white", linestyle="--", linewidth=1.2)
        )
        ax.plot(*item.point, marker="+", color="cyan", markersize=14, markeredgewidth=2.2, linestyle="none")
        if item.peak is not None:
            ax.plot(
                *item.peak, marker="x", color="white", markersize=9, markeredgewidth=2.0, linestyle="none"
            )
        # A square window around the crop (margin on every side), clipped to the slice.
        centre = 0.5 * (item.box.min(axis=0) + item.box.max(axis=0))
        half = 0.5 * float((item.box.max(axis=0) - item.box.min(axis=0)).max()) * 1.3
        ax.set_xlim(max(centre[0] - half, -0.5), min(centre[0] + half, cols - 0.5))
        ax.set_ylim(min(centre[1] + half, rows - 0.5), max(centre[1] - half, -0.5))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(item.title, fontsize=10.5)
    cax = fig.add_axes(
        ((left + 5 * panel + 4 * gap + 0.15) / fig_w, bottom / fig_h, 0.18 / fig_w, panel / fig_h)
    )
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax)
    bar.set_label("Grad-CAM++ (max = 1 per panel)", fontsize=9)
    fig.text(left / fig_w, 1 - 0.4 / fig_h, title, fontsize=13, fontweight="bold")
    fig.text(left / fig_w, 1 - 0.68 / fig_h, subtitle, fontsize=9.5)
    fig.text(
        left / fig_w,
        0.12 / fig_h,
        "dashed box: the grader's crop;  cyan +: level centre from the localiser;  white x: map maximum.   "
        + INTENDED_USE,
        fontsize=8.5,
        style="italic",
    )
    return fig


# === Report ===


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure_html(caption: str, path: Path) -> str:
    e = html.escape
    image = f"<img alt='{e(caption)}' src='{_png_data_uri(path)}'>"
    return f"<figure>{image}<figcaption>{e(caption)}</figcaption></figure>"


def _flatten(prefix: str, value, out: list) -> list:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, item in enumerate(value):
            _flatten(f"{prefix}[{i}]", item, out)
    else:
        out.append((prefix, value))
    return out


def write_report(
    path, predictions: dict, summary_images, gradcam_images, model: dict, preprocess: dict, notes
) -> Path:
    """One self-contained HTML page: images as base64 PNG, the 25-cell probability table, model facts.

    ``summary_images`` and ``gradcam_images`` are ``[(caption, png path)]``; nothing is linked, so the
    page can be mailed or archived on its own.
    """
    e = html.escape
    rows = []
    for cell in predictions["cells"]:
        gp, rsna = cell["grade_probs"], cell["rsna"]
        grade = grade_scale(predictions)[int(cell["grade"])]
        rows.append(
            "<tr class='g{g}'><td>{c}</td><td>{lv}</td><td>{grade}</td>{p}{r}<td>{pres:.3f}</td></tr>".format(
                g=int(cell["grade"]),
                c=e(L.CONDITION_TITLES[cell["condition"]]),
                lv=e(L.LEVEL_TITLES[cell["level"]]),
                grade=e(grade),
                p="".join(f"<td>{float(v):.3f}</td>" for v in gp),
                r="".join(f"<td>{float(rsna[k]):.3f}</td>" for k in L.SUBMISSION_COLUMNS),
                pres=float(cell["presence"]),
            )
        )
    model_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in model.items())
    prep_rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(json.dumps(v))}</td></tr>" for k, v in _flatten("", preprocess, [])
    )
    summary_html = "".join(_figure_html(caption, p) for caption, p in summary_images)
    gradcam_html = "".join(_figure_html(caption, p) for caption, p in gradcam_images)
    warnings = predictions.get("warnings") or []
    warn_html = (
        "<ul>" + "".join(f"<li>{e(str(w))}</li>" for w in warnings) + "</ul>" if warnings else "<p>none</p>"
    )
    levels = "".join(
        "<tr><td>{lv}</td><td>{inst}</td><td>{x}</td><td>{y}</td></tr>".format(
            lv=e(L.LEVEL_TITLES[entry["level"]]),
            inst=e(str(entry.get("instance_number"))),
            x="-" if entry.get("x") is None else f"{float(entry['x']):.1f}",
            y="-" if entry.get("y") is None else f"{float(entry['y']):.1f}",
        )
        for entry in predictions["levels"]
    )
    notes_html = "".join(f"<p>{e(str(n))}</p>" for n in notes)
    banner = quality_banner(predictions)
    banner_html = f'<p class="implausible">{e(banner)}</p>' if banner else ""
    grade_heads = "".join(f"<th>P({e(name)})</th>" for name in grade_scale(predictions))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lumbar-tf report: study {e(str(predictions["study_id"]))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1750px; }}
.use {{ background: #fff3cd; border: 1px solid #e0c36a; padding: 8px 12px; font-weight: 600; }}
.implausible {{ background: #f8d7da; border: 2px solid #b00020; padding: 8px 12px; font-weight: 700; }}
table {{ border-collapse: collapse; margin: 8px 0 18px; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
td:nth-child(n+4) {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.g2 td {{ background: #fde6cf; }} tr.g3 td {{ background: #f8c9c4; }}
figure {{ margin: 12px 0 22px; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 13px; color: #555; }}
</style></head><body>
<h1>Lumbar spine degeneration: study {e(str(predictions["study_id"]))}</h1>
<p class="use">{e(INTENDED_USE)}</p>
{banner_html}
<h2>Severity and disc levels</h2>
{summary_html}
<h2>Probabilities (25 cells)</h2>
<table><thead><tr><th>condition</th><th>level</th><th>predicted grade</th>
{grade_heads}
<th>RSNA normal/mild</th><th>RSNA moderate</th><th>RSNA severe</th><th>presence</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<h2>Disc levels (localiser, source pixels of the midline sagittal slice)</h2>
<table><thead><tr><th>level</th><th>instance</th><th>x</th><th>y</th></tr></thead><tbody>{levels}</tbody></table>
<h2>Grad-CAM++ of the level grader</h2>
{notes_html}
{gradcam_html}
<h2>Model</h2>
<table>{model_rows}</table>
<h2>Preprocessing (stored in the model)</h2>
<table>{prep_rows}</table>
<h2>Warnings</h2>
{warn_html}
<p class="use">{e(INTENDED_USE)}</p>
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


# === The whole job ===


def explain_study(model_path, study_dir, out_dir, threshold: int = TARGET_THRESHOLD) -> dict:
    """Predict one study and explain it: predictions.json, grid.png, levels.png, Grad-CAM PNGs, report.html.

    Args:
        model_path: a run folder or an end-to-end ``.keras`` file (TFLite/SavedModel raise `ExplainError`).
        study_dir: one study folder (``.../{study_id}/{series_id}/{instance}.dcm``).
        out_dir: folder for the outputs (created).
        threshold: index of the threshold logit Grad-CAM++ targets (default 1, ``P(grade >= 2)``).

    Returns:
        ``{"study_id", "out_dir", "model_path", "paths": {name: Path, "gradcam": {condition: Path}},
        "predictions": dict,
        "cams": {condition: float32 [5, S, S]} (crop pixels, max 1 per level), "cam_peaks":
        {condition: [5, 2] source px (NaN where empty)}, "cam_slices": {condition: {...}},
        "threshold_logits": [5 conditions, 5 levels, 3], "target_threshold": ">=2"}``.

    Raises:
        ExplainError / ModelLoadError: a model it cannot use; DicomError: an unreadable study.
    """
    from lumbar_tf.preprocess import crop_levels, level_boxes
    from lumbar_tf.runtime.keras_model import KerasPredictor, load_model
    from lumbar_tf.runtime.predictions import write_predictions
    from lumbar_tf.runtime.predictor import predict_study

    if threshold not in range(L.N_THRESHOLDS):
        raise ValueError(f"threshold must be 0, 1 or 2 (index into {L.THRESHOLDS}), got {threshold!r}")
    check_model_path(model_path)
    loaded = load_model(model_path)
    cfg = loaded.preprocess
    result = predict_study(KerasPredictor(loaded), Path(study_dir))  # the path every runtime takes
    study, views, grid, info = result.study, result.views, result.grid, result.view_instances
    study_id = study.study_id
    outputs = result.outputs
    level_xy = np.asarray(result.level_xy, dtype=np.float64)
    predictions = result.predictions
    info_model = predictions["model"]

    # Grad-CAM++ on the numpy crops (the same crops the in-graph LevelCrop takes).
    grader = find_grader(loaded.model)
    crops = crop_levels(views, level_xy, cfg)
    if result.axial is not None:  # an axial model: its crops around the projected levels
        crops[cfg.axial.name] = result.axial[1].astype(np.float32)
    condition_views = {condition: source_view(cfg, condition)[0] for condition in L.CONDITIONS}
    if result.axial is not None:  # an axial model: subarticular maps on its axial crops
        for condition in L.CONDITIONS:
            if condition.endswith("subarticular_stenosis"):
                condition_views[condition] = cfg.axial.name
    cams_fm, logits = grader_gradcams(grader, crops, condition_views, threshold)
    logits_cl = np.swapaxes(logits, 0, 1)  # [condition, level, 3]
    probs_check = 1.0 / (1.0 + np.exp(-logits_cl))
    if np.max(np.abs(probs_check - outputs["threshold_probs"][0])) > 1e-3:
        predictions["warnings"].append("Grad-CAM crops gave other probabilities than the model's own crops")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict = {"predictions": write_predictions(out / PREDICTIONS_FILE, predictions)}
    midline = midline_image(result)  # the slice predictions.json places the levels on
    if midline is None:
        midline = np.zeros((cfg.view_size,) * 2, np.uint8)
    paths["grid"], paths["levels"] = write_heatmaps(predictions, midline, out)

    boxes = level_boxes(level_xy, cfg)
    grade_probs = grade_prob_array(predictions)
    cams, peaks, slices, paths["gradcam"] = {}, {}, {}, {}
    target = L.THRESHOLDS[threshold].replace(">=", "\u2265 ")
    for ci, condition in enumerate(L.CONDITIONS):
        cams[condition] = normalize_cams(upsample_cam(cams_fm[condition], cfg.crop_size))
        peaks[condition] = np.full((L.N_LEVELS, 2), np.nan)
        if condition_views[condition] != source_view(cfg, condition)[0]:
            titles = [
                _panel_title(level, grade_probs[ci, li], logits_cl[ci, li, threshold], predictions, target)
                for li, level in enumerate(L.LEVELS)
            ]
            panels, slices[condition] = _axial_panels(result, cams[condition], peaks[condition], titles)
            if not panels:
                predictions["warnings"].append(f"no axial coverage: no Grad-CAM picture for {condition}")
                continue
            fig = gradcam_figure(
                panels,
                f"Study {study_id}: Grad-CAM++ for {L.CONDITION_TITLES[condition].lower()}",
                f"target: logit of P(grade {target});  shown on each level's Axial T2 slice (the middle "
                f"channel of {cfg.axial.name});  the grader saw it and its two neighbours",
            )
            paths["gradcam"][condition] = save_png(fig, out / f"gradcam_{condition}.png", dpi=90)
            continue
        view, channel = source_view(cfg, condition)
        spec = next(v for v in cfg.views if v.name == view)
        series = study.series_by_description(spec.series_description)
        if series is None or not info.get(view):
            predictions["warnings"].append(
                f"no {spec.series_description} series: no Grad-CAM picture for {condition}"
            )
            continue
        instance = int(info[view][channel])
        index = series.index_of_instance(instance)
        image = slice_image(series, index, cfg)
        source = CONDITION_SOURCES[condition]
        slices[condition] = {
            "view": view,
            "channel": channel,
            "series_description": spec.series_description,
            "instance_number": instance,
            "slice": source.role,
        }
        panels = []
        for li, level in enumerate(L.LEVELS):
            affine = crop_to_source_affine(boxes[li], series, index, grid, cfg)
            logit = logits_cl[ci, li, threshold]
            title = _panel_title(level, grade_probs[ci, li], logit, predictions, target)
            panel = _cam_panel(level, image, cams[condition][li], affine, title)
            if panel.peak is not None:
                peaks[condition][li] = panel.peak
            panels.append(panel)
        fig = gradcam_figure(
            panels,
            f"Study {study_id}: Grad-CAM++ for {L.CONDITION_TITLES[condition].lower()}",
            f"target: logit of P(grade {target});  shown on {spec.series_description}, {source.role} slice "
            f"(instance {instance}; view {view}, channel {channel});  the grader saw all three channels of "
            f"{view}",
        )
        paths["gradcam"][condition] = save_png(fig, out / f"gradcam_{condition}.png", dpi=90)

    # Warnings added above belong in the JSON too.
    write_predictions(out / PREDICTIONS_FILE, predictions)
    notes = [
        "Severity = expected grade sum(g * p_g) over none(0), mild(1), moderate(2), severe(3); grid cells "
        "show the most probable grade and its probability.",
        f"Grad-CAM++ of the level grader, targeting the logit of P(grade {target}); computed on the "
        f"backbone's last feature map of each level's {cfg.crop_mm:g} mm crop (around the localiser's level "
        f"centre) of the view that shows the condition, and warped onto the source slice it is displayed on. "
        f"Maps are scaled to max 1 per panel: they show where the evidence is, not how strong it is.",
        "Canal: Sagittal T2/STIR midline; foramina: Sagittal T1 left/right foramen slices; subarticular "
        "recesses: Sagittal T2/STIR left/right paramedian slices.",
    ]
    model_facts = {
        "file": Path(loaded.path).name,
        "file sha256 (first 12 hex)": file_fingerprint(loaded.path),
        "run folder": Path(loaded.run_dir).name if loaded.run_dir else "-",
        **{key: "-" if value is None else value for key, value in info_model.items()},
        "grader backbone output": _backbone_note(grader),
    }
    summary_images = [
        ("Predicted severity per condition and level", paths["grid"]),
        ("Disc levels on the midline sagittal slice, coloured by worst severity", paths["levels"]),
    ]
    gradcam_images = [(f"Grad-CAM++: {L.CONDITION_TITLES[c]}", p) for c, p in paths["gradcam"].items()]
    paths["report"] = write_report(
        out / REPORT_FILE,
        predictions,
        summary_images,
        gradcam_images,
        model_facts,
        config_to_dict(cfg),
        notes,
    )
    return {
        "study_id": study_id,
        "out_dir": out,
        "model_path": Path(loaded.path),
        "paths": paths,
        "predictions": predictions,
        "cams": cams,
        "cam_peaks": peaks,
        "cam_slices": slices,
        "threshold_logits": logits_cl,
        "target_threshold": L.THRESHOLDS[threshold],
    }


def _panel_title(level: str, gp, logit: float, predictions: dict, target: str) -> str:
    g = int(np.argmax(gp))
    p_target = float(1.0 / (1.0 + np.exp(-logit)))
    name = grade_scale(predictions)[g]
    return f"{L.LEVEL_TITLES[level]}: {name} {gp[g]:.0%}\nP(grade {target}) = {p_target:.2f}"


def _cam_panel(level: str, image: np.ndarray, cam_crop: np.ndarray, affine: np.ndarray, title: str):
    """One level's crop-space map warped onto ``image`` through ``affine`` (crop px -> source px)."""
    cam_src, coverage = cam_to_source(cam_crop, affine, image.shape)
    last = cam_crop.shape[0] - 1
    corners = np.array([[0, 0], [last, 0], [last, last], [0, last]], dtype=np.float64)
    box_src = corners @ affine[:, :2].T + affine[:, 2]
    centre = np.array([last / 2, last / 2]) @ affine[:, :2].T + affine[:, 2]
    peak = None
    if cam_crop.max() > 0:
        i, j = np.unravel_index(int(np.argmax(cam_crop)), cam_crop.shape)
        peak = np.array([j, i], dtype=np.float64) @ affine[:, :2].T + affine[:, 2]
    else:
        title += " (no positive evidence)"
    return CamPanel(level, image, cam_src, coverage, box_src, centre, peak, title)


def _axial_panels(result, cams: np.ndarray, peaks: np.ndarray, titles: list[str]) -> tuple[list, dict]:
    """An axial model's maps on each covered level's own Axial T2 slice (`axial.crop_to_slice_affine`
    maps crop pixels onto it); ``peaks`` is filled in place. Returns (panels, cam_slices entry)."""
    from lumbar_tf import axial

    cfg = result.preprocess
    by_id = {se.series_id: se for se in axial.axial_series(result.study)}
    panels, instances = [], {}
    for li, p in enumerate(result.axial[0]):
        if not p.covered:
            continue
        se = by_id[p.series_id]
        affine = axial.crop_to_slice_affine(
            se.slices[p.slice_index], axial.slice_point_patient(se, p), cfg.axial.crop_mm, cfg.crop_size
        )
        panel = _cam_panel(p.level, slice_image(se, p.slice_index, cfg), cams[li], affine, titles[li])
        if panel.peak is not None:
            peaks[li] = panel.peak
        panels.append(panel)
        instances[p.level] = {"series_id": p.series_id, "instance_number": p.instance_number}
    entry = {"view": cfg.axial.name, "channel": cfg.axial.neighbours, "series_description": "Axial T2"}
    return panels, {**entry, "instances": instances, "slice": "axial slice through each level"}


def _backbone_note(grader) -> str:
    from lumbar_tf.models.networks import BACKBONE_LAYER, grader_last_conv_layer_name

    backbone = grader.get_layer(BACKBONE_LAYER)
    shape = tuple(backbone.outputs[0].shape[1:])
    return f"{grader_last_conv_layer_name(grader)} {shape}"


__all__ = [
    "CONDITION_SOURCES",
    "TARGET_THRESHOLD",
    "ExplainError",
    "cam_to_source",
    "check_model_path",
    "crop_px_to_source_px",
    "crop_to_source_affine",
    "explain_study",
    "gradcam_plus_plus",
    "grader_gradcams",
    "source_view",
]
