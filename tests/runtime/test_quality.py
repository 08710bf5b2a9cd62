"""Input quality control (`lumbar_tf.runtime.quality`): implausible level positions and non-spine
images are flagged in predictions.json, the explain report and the heatmaps; phantom anatomy is not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lumbar_tf.runtime import quality
from tests.reliability.table import record

CROP_MM = 200.0


def _spine(spacing_mm=38.0, lordosis_deg=40.0, top=0.1, x=0.5) -> np.ndarray:
    """Five level centres on a gently curved line, ``spacing_mm`` apart, head to feet."""
    turn = np.radians(lordosis_deg) / 3
    angles = np.radians(-lordosis_deg / 2) + turn * np.arange(4)  # from straight down, per segment
    steps = spacing_mm / CROP_MM * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.vstack([[x, top], [x, top] + np.cumsum(steps, axis=0)])


def _failed(xy) -> list[str]:
    return quality.failed(quality.assess(xy, CROP_MM))


def test_a_plausible_spine_passes_every_level_check():
    for spacing in (25.0, 38.0, 45.0):
        for lordosis in (0.0, 40.0, 70.0):
            assert _failed(_spine(spacing, lordosis)) == [], (spacing, lordosis)


@pytest.mark.parametrize(
    "name, xy, failing",
    [
        ("reversed", _spine()[::-1], "head_to_feet"),
        ("collapsed", np.tile([[0.5, 0.5]], (5, 1)), "spacing_mm"),
        ("5 mm apart", _spine(spacing_mm=5.0, top=0.4), "spacing_mm"),
        ("outside the view", _spine(top=0.6), "inside_view"),
        ("zig-zag", _spine() + [[0, 0], [0.12, 0], [0, 0], [0.12, 0], [0, 0]], "curvature_deg"),
    ],
)
def test_implausible_level_positions_are_flagged(name, xy, failing):
    qc = quality.assess(xy, CROP_MM)
    assert not qc["plausible"], name
    assert failing in quality.failed(qc), (name, qc["checks"])
    assert json.loads(json.dumps(qc)) == qc  # plain JSON: no numpy scalars, no NaN
    record("qc-levels", f"{name}: `plausible: false` ({', '.join(quality.failed(qc))})", name)


def test_levels_120_mm_apart_are_flagged():
    """120 mm steps do not fit a 200 mm view: the same points in a 600 mm view."""
    qc = quality.assess(_spine(spacing_mm=120.0, top=0.05, lordosis_deg=0.0) * CROP_MM / 600.0, 600.0)
    assert qc["checks"]["spacing_mm"]["value"] == pytest.approx([120.0] * 4, abs=0.01)
    assert quality.failed(qc) == ["spacing_mm"]


def test_nan_positions_are_implausible():
    xy = _spine()
    xy[2] = np.nan
    qc = quality.assess(xy, CROP_MM)
    assert not qc["plausible"] and "inside_view" in quality.failed(qc)
    json.dumps(qc, allow_nan=False)


def test_image_checks_tell_texture_from_noise_and_patterns():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = 128 + 60 * np.sin(xx / 7.0) * np.cos(yy / 9.0) + rng.normal(0, 4, (64, 64))
    anatomy_like = np.clip(smooth, 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    checker = (((xx // 8) + (yy // 8)) % 2 * 255).astype(np.uint8)
    blank = np.zeros((64, 64), np.uint8)
    assert quality.failed({"checks": quality.image_checks(anatomy_like)}) == []
    assert quality.failed({"checks": quality.image_checks(noise)}) == ["neighbour_correlation"]
    assert quality.failed({"checks": quality.image_checks(checker)}) == ["entropy_bits"]
    assert set(quality.failed({"checks": quality.image_checks(blank)})) == {
        "neighbour_correlation",
        "entropy_bits",
    }
    for name, image in (("noise", noise), ("checkerboard", checker), ("blank", blank)):
        failed = ", ".join(quality.failed({"checks": quality.image_checks(image)}))
        record("qc-images", f"{name}: `plausible: false` ({failed})", name)


def quality_levels():
    from lumbar_tf.core.labels import LEVELS

    return LEVELS


def test_build_predictions_writes_quality_and_one_warning():
    from lumbar_tf.runtime.predictions import build_predictions

    probs = np.full((5, 5, 3), 0.2)
    positions = [{"level": lv, "instance_number": 1, "x": 1.0, "y": 2.0} for lv in quality_levels()]
    good = quality.assess(_spine(), CROP_MM)
    bad = quality.assess(_spine()[::-1], CROP_MM)
    info = {"name": "m", "version": 1, "format": "keras"}
    ok = build_predictions("1", probs, _spine(), model_info=info, level_positions=positions, quality=good)
    assert ok["quality"]["plausible"] is True
    assert not any("lumbar-spine MRI" in w for w in ok["warnings"])
    flagged = build_predictions(
        "1", probs, _spine()[::-1], model_info=info, level_positions=positions, quality=bad
    )
    assert flagged["quality"]["plausible"] is False
    assert [w for w in flagged["warnings"] if "lumbar-spine MRI" in w] == [
        quality.WARNING.format(failed="head_to_feet")
    ]
    assert quality.banner(flagged).startswith("Implausible input") and quality.banner(ok) is None


def test_labelled_phantom_anatomy_raises_no_false_alarm(phantom_dir, tiny_config):
    """The phantoms' labelled spinal-canal points and their localiser views pass every check: the
    bounds hold real (phantom) anatomy, whatever the 2-epoch tiny model places."""
    from lumbar_tf.data.dataset import _level_points, read_index
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views
    from lumbar_tf.runtime.predictor import descriptions_for_study

    cfg = tiny_config.preprocess
    index = read_index(phantom_dir)
    checked = 0
    for study_id, labels in sorted(index.studies.items()):
        study_dir = phantom_dir / "train_images" / study_id
        study = read_study(study_dir, descriptions_for_study(study_dir))
        views, grid, _, _ = build_views(study, cfg)
        level_xy, present = _level_points(study, grid, labels)
        assert present.all(), study_id
        qc = quality.assess(level_xy, grid.spine_crop_mm, quality.midline_channel(views, cfg))
        assert qc["plausible"], (study_id, qc["checks"])
        spacing = qc["checks"]["spacing_mm"]["value"]
        assert min(spacing) > 20.0 and max(spacing) < 55.0, spacing  # anatomical spacings, not edge cases
        checked += 1
    assert checked == len(index.studies) >= 10


def _noise_study(root, kind: str):
    from tests.dicom_factory import SeriesSpec, write_study

    rng = np.random.default_rng(5)
    n, size = 9, 240
    if kind == "noise":
        pixels = rng.integers(0, 4096, (n, size, size)).astype(np.uint16)
    else:
        yy, xx = np.mgrid[0:size, 0:size]
        board = (((xx // 24) + (yy // 24)) % 2 * 3000 + 500).astype(np.uint16)
        pixels = np.repeat(board[None], n, axis=0)
    spec = dict(n_slices=n, rows=size, cols=size, pixel_spacing=(1.0, 1.0), slice_spacing=4.0, pixels=pixels)
    return write_study(
        root,
        kind,
        {
            "21": SeriesSpec("Sagittal T2/STIR", series_number=21, seed=1, **spec),
            "22": SeriesSpec("Sagittal T1", series_number=22, seed=2, **spec),
        },
    )


@pytest.mark.parametrize("kind", ["noise", "checkerboard"])
def test_a_non_spine_study_is_flagged_end_to_end(tiny_export, tmp_path, kind):
    """A noise or checkerboard series typed as Sagittal T2 through the exported TFLite model: the
    image statistics flag it whatever positions the (2-epoch) localiser makes up."""
    from lumbar_tf.report.heatmaps import write_heatmaps_for
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.tflite_model import EdgeModel

    model = EdgeModel(next((tiny_export / "tflite").glob("*_float32.tflite")))
    result = predict_study(model, _noise_study(tmp_path, kind))
    preds = result.predictions
    assert preds["quality"]["plausible"] is False
    expected = "neighbour_correlation" if kind == "noise" else "entropy_bits"
    assert expected in quality.failed(preds["quality"]), preds["quality"]
    assert sum("does not look like a lumbar-spine MRI" in w for w in preds["warnings"]) == 1
    json.dumps(preds, allow_nan=False)
    assert write_heatmaps_for(result, tmp_path / "heat")  # the banner renders in both figures


def test_phantom_prediction_records_quality(tiny_export, phantom_dir):
    """Phantoms through the tiny model get a quality record whose image checks pass (the level
    checks depend on a 2-epoch localiser, so only their presence is asserted)."""
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.tflite_model import EdgeModel

    model = EdgeModel(next((tiny_export / "tflite").glob("*_float32.tflite")))
    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    preds = predict_study(model, study_dir).predictions
    checks = preds["quality"]["checks"]
    assert set(checks) == {
        "inside_view",
        "head_to_feet",
        "spacing_mm",
        "curvature_deg",
        "neighbour_correlation",
        "entropy_bits",
        "vertical_periodicity",
        "levels_at_view_edge",
    }
    for name in ("neighbour_correlation", "entropy_bits", "vertical_periodicity"):
        assert checks[name]["ok"], checks
    assert (quality.warning_for(preds["quality"]) in preds["warnings"]) == (not preds["quality"]["plausible"])


def test_report_and_heatmap_banner_only_when_implausible(tmp_path):
    from lumbar_tf.report.explain import write_report
    from lumbar_tf.report.heatmaps import levels_figure, severity_grid_figure
    from lumbar_tf.runtime.predictions import build_predictions

    positions = [
        {"level": lv, "instance_number": 1, "x": 10.0 + i, "y": 5.0 + 8 * i}
        for i, lv in enumerate(quality_levels())
    ]
    info = {"name": "m", "version": 1, "format": "keras"}
    pages, titles = {}, {}
    for name, xy in (("ok", _spine()), ("bad", _spine()[::-1])):
        preds = build_predictions(
            "7",
            np.full((5, 5, 3), 0.2),
            xy,
            model_info=info,
            level_positions=positions,
            quality=quality.assess(xy, CROP_MM),
        )
        path = write_report(tmp_path / f"{name}.html", preds, [], [], info, {}, [])
        pages[name] = path.read_text()
        figures = (severity_grid_figure(preds), levels_figure(preds, np.zeros((48, 40))))
        titles[name] = [" ".join(t.get_text() for t in fig.texts) for fig in figures]
    assert 'class="implausible"' in pages["bad"] and "Implausible input" in pages["bad"]
    assert 'class="implausible"' not in pages["ok"] and "Implausible input" not in pages["ok"]
    assert all("Implausible input" in t for t in titles["bad"])
    assert not any("Implausible input" in t for t in titles["ok"])


# === Bounds measured per trained model ===


def test_levels_squeezed_at_the_views_lower_edge_are_advisory_not_implausible():
    """L5/S1 below the view: the localiser presses the two lowest levels into the last millimetres
    (measured on the demo model: every such held-out phantom). That is a cut-off view, not a foreign
    image: its own warning, and the input stays plausible."""
    from lumbar_tf.runtime.predictions import build_predictions

    xy = _spine(spacing_mm=32.0, lordosis_deg=20.0, top=0.53)
    xy[3, 1], xy[4, 1] = 0.92, 0.99  # L4/L5 and L5/S1 squeezed: ~14 mm apart
    qc = quality.assess(xy, CROP_MM)
    assert qc["plausible"], qc["checks"]
    edge = qc["checks"]["levels_at_view_edge"]
    assert not edge["ok"] and edge["levels"] == ["l4_l5", "l5_s1"]
    positions = [{"level": lv, "instance_number": 1, "x": 1.0, "y": 2.0} for lv in quality_levels()]
    info = {"name": "m", "version": 1, "format": "keras"}
    preds = build_predictions(
        "1", np.full((5, 5, 3), 0.2), xy, model_info=info, level_positions=positions, quality=qc
    )
    assert [w for w in preds["warnings"] if "lower edge" in w] == [
        quality.EDGE_WARNING.format(levels="l4_l5, l5_s1")
    ]
    assert not any("lumbar-spine MRI" in w for w in preds["warnings"]) and quality.banner(preds) is None

    # The same squeeze away from the edge, or three squeezed segments, is implausible.
    high = xy.copy()
    high[:, 1] -= 0.1
    assert "spacing_mm" in quality.failed(quality.assess(high, CROP_MM))
    deeper = xy.copy()
    deeper[1, 1] = 0.80
    assert "spacing_mm" in quality.failed(quality.assess(deeper, CROP_MM))
    # A plausible L5/S1 near the edge (not squeezed) raises nothing.
    low = _spine(spacing_mm=30.0, lordosis_deg=20.0, top=0.37)
    assert low[4, 1] > 0.94 and quality.assess(low, CROP_MM)["checks"]["levels_at_view_edge"]["ok"]


def test_a_collapsed_localiser_is_flagged_whatever_the_bounds():
    """An unsure localiser puts all five levels on one spot (the 2-epoch tiny model does: 1-4 mm
    apart on every phantom); near the lower edge too, it is never mistaken for a cut-off view."""
    rng = np.random.default_rng(1)
    for y in (0.5, 0.97):
        xy = np.column_stack([0.5 + rng.normal(0, 0.003, 5), y + np.arange(5) * 0.004])
        qc = quality.assess(xy, CROP_MM, bounds={"spacing_mm": [12.0, 80.0]})
        assert not qc["plausible"] and "spacing_mm" in quality.failed(qc), y


def test_bounds_from_training_cover_the_labels_with_a_margin():
    spines = np.stack([_spine(s, lordosis) for s in (26.0, 30.0, 40.0) for lordosis in (10.0, 40.0)])
    images = [np.tile(np.linspace(0, 255, 48), (48, 1)) for _ in spines]
    bounds = quality.bounds_from_training(spines, np.ones((len(spines), 5)), CROP_MM, images)
    assert bounds["n_studies"] == 6
    assert bounds["measured"]["spacing_mm"] == pytest.approx([26.0, 40.0], abs=0.01)
    assert bounds["spacing_mm"] == pytest.approx([26.0 * 0.75, 40.0 * 1.25], abs=0.01)
    assert bounds["max_lordosis_deg"] == pytest.approx(40.0 + quality.LORDOSIS_MARGIN_DEG, abs=0.01)
    for xy in spines:  # the training labels themselves pass
        assert quality.level_checks(xy, CROP_MM, bounds)["spacing_mm"]["ok"]
    # Tighter than the fallback where the data is: 55 mm passes the fallback, not these bounds.
    wide = _spine(55.0, top=0.05) * CROP_MM / 300.0  # 55 mm apart in a 300 mm view
    assert quality.failed(quality.assess(wide, 300.0, bounds=bounds)) == ["spacing_mm"]
    assert quality.failed(quality.assess(wide, 300.0)) == []
    # Too few complete studies: no bounds (runtimes use the fallback).
    present = np.ones((len(spines), 5))
    present[2:, 1] = 0
    assert quality.bounds_from_training(spines, present, CROP_MM, images) is None


def test_the_trained_models_bounds_travel_to_every_runtime(tiny_run, tiny_export, phantom_dir):
    """Training records the bounds from its training split; the .keras model, metadata.json, the
    TFLite sidecar and embedded metadata, and each predictor carry the same dict, and the quality
    record of a prediction names them."""
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.predictor import predict_study
    from lumbar_tf.runtime.saved_model import SavedModelPredictor
    from lumbar_tf.runtime.tflite_model import EdgeModel, read_embedded_metadata

    recorded = json.loads((tiny_run / "quality_bounds.json").read_text())
    assert recorded["source"].startswith("training labels") and recorded["n_studies"] >= 3
    lo, hi = recorded["measured"]["spacing_mm"]
    assert 15.0 < lo < hi < 60.0  # phantom anatomy, not edge cases
    meta = json.loads((tiny_export / "metadata.json").read_text())
    tflite = next((tiny_export / "tflite").glob("*_float32.tflite"))
    keras_predictor = KerasPredictor(tiny_run)
    version = tiny_export / "saved_model" / "lumbar_spine" / str(meta["version"])
    for carried in (
        keras_predictor.quality_bounds,
        meta["quality_bounds"],
        json.loads(tflite.with_suffix(".json").read_text())["quality_bounds"],
        read_embedded_metadata(tflite.read_bytes())["quality_bounds"],
        EdgeModel(tflite).quality_bounds,
        SavedModelPredictor(version).quality_bounds,
    ):
        assert carried == recorded
    study_dir = sorted((phantom_dir / "train_images").iterdir())[0]
    preds = predict_study(keras_predictor, study_dir).predictions
    assert preds["quality"]["bounds"] == recorded["source"]
    assert preds["quality"]["checks"]["spacing_mm"]["range"] == recorded["spacing_mm"]
