"""The severity grid and the per-disc overlay (numpy + OpenCV + matplotlib; no TensorFlow)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from lumbar_tf.core import labels as L
from lumbar_tf.report import heatmaps
from lumbar_tf.runtime.predictions import build_predictions

# Disc levels top to bottom on a 240 x 200 (rows x cols) midline slice, in source pixels.
LEVEL_XY = np.array([[96.0, 52.5], [101.0, 88.0], [104.5, 121.0], [103.0, 158.5], [96.5, 191.0]])


def _predictions(seed: int = 0, level_xy=LEVEL_XY) -> dict:
    rng = np.random.default_rng(seed)
    threshold_probs = np.sort(rng.uniform(0, 1, (5, 5, 3)), axis=-1)[..., ::-1]  # monotone
    threshold_probs[0, 3] = (0.99, 0.97, 0.9)  # one clearly severe cell: canal L4/L5
    positions = [
        {"level": lv, "instance_number": 9, "x": float(level_xy[i][0]), "y": float(level_xy[i][1])}
        for i, lv in enumerate(L.LEVELS)
    ]
    return build_predictions(
        "1234",
        threshold_probs,
        np.full((5, 2), 0.5),
        model_info={"name": "lumbar_spine", "version": "test", "format": "keras"},
        level_positions=positions,
    )


def _slice(rows: int = 240, cols: int = 200) -> np.ndarray:
    """A grey slice with structure (R = G = B once drawn): a gradient plus a bright stripe."""
    image = np.tile(np.linspace(20, 200, cols, dtype=np.float64), (rows, 1))
    image[:, 90:110] = 235
    return image.astype(np.uint8)


def test_severity_grid_is_the_expected_grade_of_each_cell():
    preds = _predictions()
    grid = heatmaps.severity_grid(preds)
    assert grid.shape == (5, 5)
    for cell in preds["cells"]:
        ci, li = L.CONDITIONS.index(cell["condition"]), L.LEVELS.index(cell["level"])
        expected = sum(g * p for g, p in enumerate(cell["grade_probs"]))
        np.testing.assert_allclose(grid[ci, li], expected, atol=1e-12)
    np.testing.assert_array_less(-1e-9, grid)
    np.testing.assert_array_less(grid, 3 + 1e-9)


def test_cells_are_found_by_name_not_by_position():
    preds = _predictions()
    shuffled = dict(preds, cells=list(reversed(preds["cells"])))
    np.testing.assert_array_equal(heatmaps.severity_grid(shuffled), heatmaps.severity_grid(preds))
    with pytest.raises(ValueError, match="25"):
        heatmaps.severity_grid(dict(preds, cells=preds["cells"][:-1]))


def test_predicted_grade_and_worst_level():
    preds = _predictions()
    grades, probs = heatmaps.predicted_grades(preds)
    for cell in preds["cells"]:
        ci, li = L.CONDITIONS.index(cell["condition"]), L.LEVELS.index(cell["level"])
        assert grades[ci, li] == cell["grade"]
        assert probs[ci, li] == pytest.approx(max(cell["grade_probs"]))
    worst, which = heatmaps.worst_level_severity(preds)
    grid = heatmaps.severity_grid(preds)
    np.testing.assert_allclose(worst, grid.max(axis=0))
    np.testing.assert_array_equal(which, grid.argmax(axis=0))
    assert which[3] == 0  # the severe canal cell is the worst at L4/L5


def _marker_blobs(rgb: np.ndarray) -> np.ndarray:
    """Centroids (x, y) of the coloured blobs in an otherwise grey RGB image, top to bottom."""
    rgb = rgb.astype(np.int16)
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    n, _, stats, centroids = cv2.connectedComponentsWithStats((chroma > 30).astype(np.uint8))
    blobs = [centroids[k] for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] > 20]
    return np.array(sorted(blobs, key=lambda c: c[1]))


def test_overlay_draws_the_five_levels_where_predictions_put_them_top_to_bottom():
    preds = _predictions()
    image = _slice()
    overlay = heatmaps.render_levels_overlay(preds, image)
    ys = [entry["y"] for entry in preds["levels"]]
    assert [entry["level"] for entry in preds["levels"]] == list(L.LEVELS)
    assert ys == sorted(ys)  # L1/L2 highest on the slice, L5/S1 lowest
    assert overlay.rgb.shape[:2] == (round(240 * overlay.scale), round(200 * overlay.scale))
    expected = (LEVEL_XY + 0.5) * overlay.scale - 0.5
    np.testing.assert_allclose(overlay.markers, expected)
    blobs = _marker_blobs(overlay.rgb)
    assert len(blobs) == 5
    # The k-th blob from the top is level k, at its source position (within a pixel of the slice).
    np.testing.assert_allclose(blobs / overlay.scale, expected / overlay.scale, atol=1.0)
    # Each marker carries its level's worst-severity colour.
    for li, (x, y) in enumerate(expected):
        colour = overlay.rgb[int(round(y)), int(round(x))]
        np.testing.assert_allclose(colour, heatmaps.severity_rgb(overlay.severity[li]), atol=2)


def test_overlay_skips_levels_without_a_position():
    preds = _predictions()
    preds["levels"][2].update(x=None, y=None)
    overlay = heatmaps.render_levels_overlay(preds, _slice())
    assert np.isnan(overlay.markers[2]).all()
    assert len(_marker_blobs(overlay.rgb)) == 4
    heatmaps.levels_figure(preds, _slice())  # draws without the missing level


def test_labels_are_spread_apart_in_order():
    y = np.array([100.0, 101.0, 102.0, np.nan, 300.0])
    placed = heatmaps.spread_labels(y, 10.0, 0.0, 400.0)
    assert np.isnan(placed[3])
    np.testing.assert_allclose(np.diff(placed[:3]), 10.0)
    assert placed[:3].mean() == pytest.approx(101.0)  # centred on the points they label
    assert placed[4] == 300.0  # a label with room stays where its point is
    np.testing.assert_allclose(heatmaps.spread_labels([1.0, 2.0], 10.0, 0.0, 100.0), [0.0, 10.0])


def test_write_heatmaps_writes_two_pngs_with_fixed_metadata_only(tmp_path):
    preds = _predictions()
    paths = heatmaps.write_heatmaps(preds, _slice(), tmp_path / "out")
    assert [p.name for p in paths] == ["grid.png", "levels.png"]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size[0] > 600 and img.size[1] > 400
            assert dict(img.text) == heatmaps.PNG_METADATA


def test_write_heatmaps_accepts_float_slice_and_json_roundtrip(tmp_path):
    preds = json.loads(json.dumps(_predictions(seed=3)))
    image = _slice().astype(np.float32) / 255.0
    paths = heatmaps.write_heatmaps(preds, image, tmp_path)
    assert all(p.stat().st_size > 10_000 for p in paths)
    with pytest.raises(ValueError, match="2-D"):
        heatmaps.write_heatmaps(preds, np.zeros((4, 4, 3), np.uint8), tmp_path)
