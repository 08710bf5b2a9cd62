"""lumbar_tf.preprocess: views, slice choice, coordinate maps and level crops."""

from __future__ import annotations

import numpy as np
import pytest

from lumbar_tf.core.config import PreprocessConfig, ViewSpec
from lumbar_tf.dicom.reader import SAGITTAL_T1, SAGITTAL_T2, DicomError, ModalityMap, read_study
from lumbar_tf.preprocess import (
    ViewGrid,
    _histogram_percentiles,
    _normalize_stored,
    apply_clahe,
    build_view,
    build_views,
    choose_slices,
    crop_and_resize,
    crop_levels,
    crop_px_to_view_norm,
    level_boxes,
    normalize_percentile,
    normalized_slices,
    patient_yz_of_source_px,
    slice_to_view_affine,
    source_px_to_view_norm,
    to_uint8,
    view_grid_for_study,
    view_norm_to_crop_px,
    view_norm_to_source_px,
)

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest prepends it)
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

SeriesSpec, write_series, write_study = factory.SeriesSpec, factory.write_series, factory.write_study


# --- intensity ------------------------------------------------------------------------------


def test_normalize_percentile_over_all_slices():
    rng = np.random.default_rng(0)
    dark = rng.uniform(0, 100, (20, 20))
    bright = rng.uniform(900, 1000, (20, 20))
    out = normalize_percentile(np.stack([dark, bright]), 0.5, 99.5)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0].mean() < 0.1 and out[1].mean() > 0.9  # one scale for both slices
    np.testing.assert_array_equal(normalize_percentile(np.full((2, 5, 5), 7.0), 1, 99), 0.0)


@pytest.mark.parametrize(
    "dtype, modality",
    [
        ("<u2", ModalityMap(2.0, -100.0)),
        ("<u2", ModalityMap(None)),
        ("<i2", ModalityMap(1.1406, 75.86)),
        ("<u2", ModalityMap(0.5, 10.0, invert_sum=2057.5)),  # MONOCHROME1: order reversed
        ("<i2", ModalityMap(-0.7, 3.0)),  # negative slope
        ("u1", ModalityMap(1.0, 0.0)),
    ],
)
def test_normalizing_stored_integers_matches_the_float_path(dtype, modality):
    """The histogram + lookup-table path gives the float path's pixels (ties may move one level)."""
    rng = np.random.default_rng(1)
    info = np.iinfo(np.dtype(dtype))
    low, high = max(info.min, -3000), min(info.max, 4095)
    stored = rng.gamma(2.0, (high - low) / 8, (3, 37, 41)).astype(np.int64) + low
    stored = np.clip(stored, low, high).astype(dtype)
    floats = modality.apply(stored)
    expected = to_uint8(normalize_percentile(floats, 0.5, 99.5))
    got = _normalize_stored(stored, modality, 0.5, 99.5)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    assert np.abs(got.astype(int) - expected).max() <= 1
    assert np.mean(got == expected) > 0.999


def test_histogram_percentiles_match_numpy():
    rng = np.random.default_rng(2)
    values = rng.integers(-50, 300, 10_001).astype(np.float32)
    distinct, counts = np.unique(values, return_counts=True)
    for q in (0.0, 0.5, 2.5, 50.0, 99.5, 100.0):
        got = _histogram_percentiles(distinct, counts, [q])[0]
        np.testing.assert_allclose(got, np.percentile(values, q), rtol=1e-6)


def test_normalized_slices_on_a_series(tmp_path):
    """Shared modality map -> stored-integer path; equal to the float path on real files."""
    study = read_study(write_study(tmp_path))
    series = study.series[SAGITTAL_T2]
    got = normalized_slices(series, [1, 3, 4], (0.5, 99.5))
    expected = to_uint8(normalize_percentile(series.load_pixels([1, 3, 4]), 0.5, 99.5))
    assert np.abs(got.astype(int) - expected).max() <= 1 and np.mean(got == expected) > 0.999


def test_apply_clahe_uint8():
    img = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48) ** 2
    out = apply_clahe(img, 2.0, 8)
    assert out.dtype == np.uint8 and out.shape == (64, 48)
    assert out[-1].mean() > out[0].mean()


# --- view grid ------------------------------------------------------------------------------


def test_view_grid_formula():
    grid = ViewGrid(center_yz=np.array([10.0, -20.0]), spine_crop_mm=200.0, size=100)
    # pixel (0, 0): y = y0 + 0.5 * 2 - 100, z = z0 - 0.5 * 2 + 100
    np.testing.assert_allclose(grid.view_px_to_patient_yz([0, 0]), [-89.0, 79.0])
    np.testing.assert_allclose(grid.view_px_to_patient_yz([49.5, 49.5]), [10.0, -20.0])
    uv = np.random.default_rng(1).uniform(-10, 110, (7, 2))
    np.testing.assert_allclose(grid.patient_yz_to_view_px(grid.view_px_to_patient_yz(uv)), uv)
    np.testing.assert_allclose(grid.to_normalized([[0, 0], [99, 99]]), [[0.005, 0.005], [0.995, 0.995]])
    np.testing.assert_allclose(grid.from_normalized(grid.to_normalized(uv)), uv)


def test_view_grid_centre_and_fallback(tmp_path):
    specs = {
        "1": SeriesSpec(SAGITTAL_T2, center=(0.0, 5.0, 40.0)),
        "2": SeriesSpec(SAGITTAL_T1, center=(0.0, -30.0, 10.0), seed=1),
    }
    cfg = PreprocessConfig()
    study = read_study(write_study(tmp_path, "1", specs))
    np.testing.assert_allclose(view_grid_for_study(study, cfg).center_yz, [5.0, 40.0])
    del study.series[SAGITTAL_T2]
    grid = view_grid_for_study(study, cfg)
    np.testing.assert_allclose(grid.center_yz, [-30.0, 10.0])
    assert grid.size == cfg.view_size and grid.spine_crop_mm == cfg.spine_crop_mm


# --- slice choice ---------------------------------------------------------------------------


def test_choose_slices_by_physical_position(tmp_path):
    # uneven spacing, shuffled files, scrambled instance numbers; offsets along the IOP normal
    # (-x), so patient-x = 30 - offset. Lateral positions (x - mean x) are then known.
    offsets = (-20.0, -7.0, -2.0, 0.5, 3.0, 11.0, 25.0)
    spec = SeriesSpec(n_slices=7, slice_offsets=offsets, center=(30.0, 0.0, 0.0))
    write_series(tmp_path / "3" / "1", spec, shuffle_names=True, scramble_instances=True)
    series = read_study(tmp_path / "3").series[SAGITTAL_T2]
    x = np.sort(30.0 - np.array(offsets))  # slice order: ascending patient left
    lateral = x - x.mean()
    np.testing.assert_allclose(series.lateral_positions_mm(), lateral)
    wanted = [12.0, 0.0, -12.0, 100.0, -100.0]
    chosen = choose_slices(series, wanted)
    assert chosen == [int(np.argmin(np.abs(lateral - w))) for w in wanted]
    assert chosen[3] == 6 and chosen[4] == 0  # beyond the stack: the outermost slice
    for i, w in zip(chosen[:3], wanted[:3]):
        assert abs(series.slices[i].position[0] - x.mean() - w) == np.min(np.abs(lateral - w))


# --- views: geometry checked with a bright marker ---------------------------------------------


def _marker_series(tmp_path, iop, markers, spacing=(0.8, 0.6), rows=96, cols=120):
    """Series whose slice k (write order) has a bright 9x9 marker at source pixel markers[k].

    Returns (series, marker (column, row) of each slice in the series' order).
    """
    n = len(markers)
    yy, xx = np.mgrid[0:rows, 0:cols]
    background = 100 + 100 * xx / cols + 100 * yy / rows  # smooth: CLAHE keeps the marker on top
    pixels = np.repeat(background[None], n, axis=0).astype(np.uint16)
    for k, (c, r) in enumerate(markers):
        pixels[k, r - 4 : r + 5, c - 4 : c + 5] = 4000  # 9x9: above the 99.5th percentile
    spec = SeriesSpec(
        n_slices=n,
        rows=rows,
        cols=cols,
        pixel_spacing=spacing,
        iop=iop,
        pixels=pixels,
        slice_spacing=3.0,
        center=(4.0, 12.0, -6.0),
    )
    write_series(tmp_path / "8" / "2", spec, shuffle_names=True, scramble_instances=True)
    series = read_study(tmp_path / "8").series[SAGITTAL_T2]
    written = np.array(factory.slice_positions(spec))
    order = [int(np.argmin(np.linalg.norm(written - s.position, axis=1))) for s in series.slices]
    return series, [np.array(markers[k], dtype=float) for k in order]


def _bright_centroid(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img >= img.max() - 30)
    assert len(xs) < 150
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize(
    "iop", [factory.SAGITTAL_IOP, factory.oblique_sagittal_iop(10.0, 15.0)], ids=["plain", "oblique"]
)
def test_build_view_puts_anatomy_where_the_coordinates_say(tmp_path, iop):
    markers = [(30, 20), (60, 48), (90, 70), (45, 30), (75, 60)]
    series, slice_markers = _marker_series(tmp_path, iop, markers)
    cfg = PreprocessConfig(spine_crop_mm=120.0, view_size=128)
    grid = ViewGrid(center_yz=np.array([15.0, -4.0]), spine_crop_mm=120.0, size=128)
    spec = ViewSpec("v", SAGITTAL_T2, (3.0, 0.0, -3.0))
    view, instances = build_view(series, spec, grid, cfg)
    assert view.shape == (128, 128, 3) and view.dtype == np.uint8
    chosen = choose_slices(series, spec.offsets_mm)
    assert chosen == [3, 2, 1]  # 5 slices 3 mm apart, ascending patient left
    assert instances == [series.slices[i].instance_number for i in chosen]
    for c, i in enumerate(chosen):
        src_xy = slice_markers[i]
        # expected view pixel straight from the contract's formulas (not the affine helpers)
        y, z = series.pixel_to_patient(i, src_xy)[1:]
        mm = 120.0 / 128
        expected = np.array([(y - 15.0 + 60.0) / mm - 0.5, (-4.0 + 60.0 - z) / mm - 0.5])
        np.testing.assert_allclose(_bright_centroid(view[..., c]), expected, atol=0.6)
        np.testing.assert_allclose(
            source_px_to_view_norm(series, i, src_xy, grid), (expected + 0.5) / 128, atol=1e-9
        )
        np.testing.assert_allclose(patient_yz_of_source_px(series, i, src_xy), [y, z])
        back = view_norm_to_source_px(series, i, (expected + 0.5) / 128, grid)
        np.testing.assert_allclose(back, src_xy, atol=1e-9)


def test_view_channels_are_left_mid_right(tmp_path):
    markers = [(20, 20), (40, 40), (60, 60), (80, 80), (100, 80)]
    series, slice_markers = _marker_series(tmp_path, factory.SAGITTAL_IOP, markers)
    grid = ViewGrid(center_yz=np.array([12.0, -6.0]), spine_crop_mm=120.0, size=120)
    spec = ViewSpec("v", SAGITTAL_T2, (6.0, 0.0, -6.0))
    view, _ = build_view(series, spec, grid, PreprocessConfig())
    # The IOP normal is -x, so write index 0 is the leftmost slice: +6 mm is written slice 0.
    for c, k in enumerate([0, 2, 4]):
        expected = slice_to_view_affine(series, 0, grid) @ np.append(markers[k], 1.0)
        np.testing.assert_allclose(_bright_centroid(view[..., c]), expected, atol=0.6)
    assert [tuple(m) for m in slice_markers] == [tuple(map(float, m)) for m in markers[::-1]]


def test_build_views_missing_series_and_no_sagittal(tmp_path):
    specs = {"1": SeriesSpec(SAGITTAL_T2), "3": SeriesSpec("Axial T2", iop=factory.AXIAL_IOP)}
    study = read_study(write_study(tmp_path, "5", specs))
    cfg = PreprocessConfig(view_size=64)
    views, grid, info, warnings = build_views(study, cfg)
    assert set(views) == {"sag_t2", "sag_t1"} and grid.size == 64
    assert views["sag_t1"].shape == (64, 64, 3) and not views["sag_t1"].any()
    assert views["sag_t2"].any() and len(info["sag_t2"]) == 3 and info["sag_t1"] == []
    assert any("Sagittal T1" in w and "sag_t1" in w for w in warnings)

    del study.series[SAGITTAL_T2]
    with pytest.raises(DicomError, match="no sagittal series") as err:
        build_views(study, cfg)
    assert err.value.path == study.path


def test_build_views_decodes_only_what_it_needs(tmp_path, spy_decodes):
    """The spine finder reads the reference series' slices near the stack centre; the other views
    decode only their chosen slices, and the axial series nothing."""
    study = read_study(write_study(tmp_path))
    cfg = PreprocessConfig(view_size=64)
    _, grid, _, _ = build_views(study, cfg)
    t2, t1 = study.series[SAGITTAL_T2], study.series[SAGITTAL_T1]
    near = [str(s.path) for s, lat in zip(t2.slices, t2.lateral_positions_mm()) if abs(lat) <= 28.0]
    chosen_t1 = [
        str(t1.slices[i].path)
        for i in sorted(set(choose_slices(t1, cfg.views[1].offsets_mm, grid.midline_xyz)))
    ]
    assert {p for p in spy_decodes if "/11/" in p} == set(near)  # the chosen T2 slices are among them
    assert not any("/13/" in p for p in spy_decodes)
    assert [p for p in spy_decodes if "/12/" in p] == chosen_t1


# --- level crops ----------------------------------------------------------------------------


def test_level_boxes_formula():
    cfg = PreprocessConfig(spine_crop_mm=200.0, crop_mm=60.0)
    xy = np.array([[[0.5, 0.25], [0.4, 0.35], [0.45, 0.45], [0.5, 0.55], [0.55, 0.65]]] * 2)
    boxes = level_boxes(xy, cfg)
    assert boxes.shape == (2, 5, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[0, 0], [0.25 - 0.15, 0.5 - 0.15, 0.25 + 0.15, 0.5 + 0.15])


@pytest.mark.parametrize("out_size", [1, 7, 32])
def test_crop_and_resize_matches_tensorflow(out_size):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(out_size)
    image = rng.uniform(0, 255, (37, 53, 3)).astype(np.float32)
    boxes = np.array(
        [
            [0.1, 0.2, 0.6, 0.7],
            [-0.3, -0.2, 0.4, 0.5],  # top-left outside
            [0.7, 0.8, 1.3, 1.4],  # bottom-right outside
            [0.9, 0.1, 0.2, 0.6],  # flipped
            [0.5, 0.5, 0.5, 0.5],  # degenerate
            [-1.5, -1.5, -0.5, -0.5],  # entirely outside
            *rng.uniform(-0.3, 1.3, (10, 4)),
        ],
        dtype=np.float32,
    )
    ours = crop_and_resize(image, boxes, out_size)
    theirs = tf.image.crop_and_resize(
        image[None],
        boxes,
        np.zeros(len(boxes), np.int32),
        (out_size, out_size),
        method="bilinear",
        extrapolation_value=0.0,
    ).numpy()
    assert ours.shape == theirs.shape == (len(boxes), out_size, out_size, 3)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    u8 = image.astype(np.uint8)
    theirs_u8 = tf.image.crop_and_resize(
        u8[None], boxes, np.zeros(len(boxes), np.int32), (out_size, out_size)
    ).numpy()
    np.testing.assert_allclose(crop_and_resize(u8, boxes, out_size), theirs_u8, atol=1e-3, rtol=0)


def test_crop_levels_shapes_and_centre():
    cfg = PreprocessConfig(view_size=96, crop_size=33, spine_crop_mm=200.0, crop_mm=50.0)
    view = np.zeros((96, 96, 3), np.uint8)
    view[40, 60] = [255, 128, 64]
    xy_norm = np.tile([[(60 + 0.5) / 96, (40 + 0.5) / 96]], (5, 1))
    crops = crop_levels({"sag_t2": view, "sag_t1": view}, xy_norm, cfg)
    assert crops["sag_t2"].shape == (5, 33, 33, 3) and crops["sag_t2"].dtype == np.float32
    peak = np.unravel_index(np.argmax(crops["sag_t2"][0, ..., 0]), (33, 33))
    expected = view_norm_to_crop_px(level_boxes(xy_norm, cfg)[0], xy_norm[0], cfg)
    assert np.abs(np.array(peak[::-1]) - expected).max() <= 0.5


def test_coordinate_round_trip_source_view_crop(tmp_path):
    markers = [(30, 20), (60, 48), (90, 70)]
    series, _ = _marker_series(tmp_path, factory.oblique_sagittal_iop(-7.0, 11.0), markers)
    cfg = PreprocessConfig()
    study = read_study(tmp_path / "8")
    grid = view_grid_for_study(study, cfg)
    rng = np.random.default_rng(5)
    for index in range(len(series.slices)):
        src = rng.uniform([0, 0], [119, 95], (5, 2))  # one point per level
        norm = source_px_to_view_norm(series, index, src, grid)
        boxes = level_boxes(norm + rng.uniform(-0.02, 0.02, norm.shape), cfg)  # levels near them
        crop_xy = view_norm_to_crop_px(boxes, norm, cfg)
        assert np.all((crop_xy > 0) & (crop_xy < cfg.crop_size - 1))
        back_norm = crop_px_to_view_norm(boxes, crop_xy, cfg)
        back = view_norm_to_source_px(series, index, back_norm, grid)
        np.testing.assert_allclose(back, src, atol=1e-6)  # well within the 0.5 px contract
        assert np.abs(back - src).max() < 0.5


def test_axial_points_project_onto_the_view_but_views_need_sagittal(tmp_path):
    study = read_study(write_study(tmp_path))
    axial = study.series["Axial T2"]
    cfg = PreprocessConfig()
    grid = view_grid_for_study(study, cfg)
    xy = np.array([[10.0, 12.0], [30.5, 7.25]])
    y_z = axial.pixel_to_patient(2, xy)[:, 1:]
    np.testing.assert_allclose(
        source_px_to_view_norm(axial, 2, xy, grid), grid.to_normalized(grid.patient_yz_to_view_px(y_z))
    )
    with pytest.raises(DicomError, match="not a sagittal slice"):
        view_norm_to_source_px(axial, 2, [[0.5, 0.5]], grid)
    with pytest.raises(DicomError, match="not a sagittal slice"):
        build_view(axial, ViewSpec("ax", "Axial T2", (0.0, 0.0, 0.0)), grid, cfg)


def test_crop_maps_agree_with_crop_pixels():
    """crop_px_to_view_norm says where crop pixels sample the view: check it on the pixels."""
    cfg = PreprocessConfig(view_size=80, crop_size=16, spine_crop_mm=100.0, crop_mm=30.0)
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float32)
    view = np.stack([xx, yy, xx + yy], axis=-1)  # linear ramps: bilinear sampling is exact
    xy_norm = np.array([[0.3, 0.6], [0.5, 0.5], [0.7, 0.2], [0.45, 0.8], [0.6, 0.4]])
    crops = crop_levels({"v": view}, xy_norm, cfg)["v"]
    boxes = level_boxes(xy_norm, cfg)
    jj, ii = np.meshgrid(np.arange(16), np.arange(16))
    for k in range(5):
        uv = crop_px_to_view_norm(boxes[k], np.stack([jj, ii], -1), cfg) * 80 - 0.5
        np.testing.assert_allclose(crops[k, ..., 0], uv[..., 0], atol=1e-3)
        np.testing.assert_allclose(crops[k, ..., 1], uv[..., 1], atol=1e-3)
