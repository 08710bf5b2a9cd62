"""Axial projection on hand-built DICOM geometry: stacks, slice choice, in-plane pixels, crops."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from lumbar_tf import axial, preprocess
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom.reader import AXIAL_T2, read_series, read_study

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest prepends it)
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

AXIAL_IOP, SeriesSpec, iop_vectors = factory.AXIAL_IOP, factory.SeriesSpec, factory.iop_vectors
slice_positions, tilted_axial_iop = factory.slice_positions, factory.tilted_axial_iop
write_series, write_stacks, write_study = factory.write_series, factory.write_stacks, factory.write_study

ROWS, COLS, SPACING = 40, 48, (0.9, 0.8)  # PixelSpacing (between rows, between columns)


def test_axial_imports_no_tensorflow():
    """The tablet runs the projection: no TensorFlow or Keras behind it."""
    code = (
        "import sys, lumbar_tf.axial\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'tf_keras', 'jax', 'torch'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def axial_spec(**kw) -> SeriesSpec:
    base = dict(description=AXIAL_T2, rows=ROWS, cols=COLS, pixel_spacing=SPACING, iop=AXIAL_IOP)
    return SeriesSpec(**{**base, **kw})


def disc_stacks() -> list[SeriesSpec]:
    """Three 3-slice stacks angled like lumbar discs (-15, 0, +12 degrees), 40 mm apart."""
    return [
        axial_spec(iop=tilted_axial_iop(tilt), center=(2.0, -10.0 + dy, z), n_slices=3, slice_spacing=4.0)
        for tilt, dy, z in ((-15.0, 4.0, 0.0), (0.0, 0.0, 40.0), (12.0, -3.0, 80.0))
    ]


def expected_pixel(spec: SeriesSpec, offset_row_mm: float, offset_col_mm: float) -> tuple[float, float]:
    """Analytic (column, row) of ``centre + a * row_dir + b * col_dir`` on a slice of ``spec``."""
    return (
        (spec.cols - 1) / 2 + offset_row_mm / spec.pixel_spacing[1],
        (spec.rows - 1) / 2 + offset_col_mm / spec.pixel_spacing[0],
    )


@pytest.fixture(scope="module")
def disc_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("discs") / "7"
    write_stacks(folder, disc_stacks())
    return read_series(folder, "7")[0]


def test_contiguous_stack_nearest_slice_and_analytic_pixel(tmp_path):
    spec = axial_spec(n_slices=20, slice_spacing=4.0, center=(2.0, -10.0, 30.0))
    write_series(tmp_path / "5", spec)
    series = read_series(tmp_path / "5", "5")[0]
    (stack,) = axial.find_stacks(series)
    assert stack.indices == tuple(range(20)) and stack.spacing_mm == pytest.approx(4.0)

    point = np.array([5.0, -8.0, 31.3])  # slice k sits at z = 30 + (k - 9.5) * 4: nearest k = 10 (z 32)
    (p,) = [axial.project_point("l3_l4", point, [series])]
    assert p.covered and p.reason == ""
    assert p.slice_index == 10 and p.instance_number == series.slices[10].instance_number
    assert p.distance_mm == pytest.approx(-0.7, abs=1e-6)
    x, y = expected_pixel(spec, 5.0 - 2.0, -8.0 + 10.0)
    assert abs(p.x_px - x) < 0.01 and abs(p.y_px - y) < 0.01


def test_oblique_disc_stacks_split_and_project(disc_series):
    stacks = axial.find_stacks(disc_series)
    assert [len(s.indices) for s in stacks] == [3, 3, 3]
    assert all(s.spacing_mm == pytest.approx(4.0, abs=1e-3) for s in stacks)
    specs = disc_stacks()
    for stack, spec in zip(stacks, specs, strict=True):
        row_dir, col_dir, normal = iop_vectors(spec.iop)
        assert np.allclose(stack.normal, normal, atol=1e-6)
        # 0.6 mm above the middle plane, off-centre in the plane: the middle slice, analytic pixel.
        point = np.asarray(spec.center) + 0.6 * normal + 3.0 * row_dir + 2.0 * col_dir
        p = axial.project_point("l4_l5", point, [disc_series])
        assert p.covered and p.slice_index == stack.indices[1]
        assert p.distance_mm == pytest.approx(0.6, abs=1e-4)
        x, y = expected_pixel(spec, 3.0, 2.0)
        assert abs(p.x_px - x) < 0.01 and abs(p.y_px - y) < 0.01
        # 3.5 mm above the middle plane: the upper slice is nearer (-0.5 mm).
        q = axial.project_point("l4_l5", np.asarray(spec.center) + 3.5 * normal, [disc_series])
        assert q.slice_index == stack.indices[2] and q.distance_mm == pytest.approx(-0.5, abs=1e-4)


def test_round_trip_patient_pixel_patient(disc_series):
    rng = np.random.default_rng(0)
    for spec in disc_stacks():
        for _ in range(5):
            point = np.asarray(spec.center) + rng.uniform(-6, 6, 3)
            p = axial.project_point("l1_l2", point, [disc_series])
            s = disc_series.slices[p.slice_index]
            back = axial.slice_point_patient(disc_series, p)
            normal = s.normal if s.normal @ disc_series.normal > 0 else -s.normal
            assert np.allclose(back + p.distance_mm * normal, point, atol=1e-6)
            assert np.allclose(s.patient_to_pixel(back), (p.x_px, p.y_px), atol=1e-9)


def test_stack_split_survives_repeated_planes_and_lone_slices(tmp_path):
    # Every plane acquired three times (most gaps are 0 mm): still one stack, 4 mm spacing.
    offsets = tuple(4.0 * (k // 3) for k in range(12))
    write_stacks(tmp_path / "3", [axial_spec(n_slices=12, slice_offsets=offsets, center=(2.0, -10.0, 0.0))])
    series = read_series(tmp_path / "3", "3")[0]
    (stack,) = axial.find_stacks(series)
    # The reader keeps one slice per position (repeats are dropped with a warning): 4 planes remain.
    assert len(stack.indices) == 4 and stack.spacing_mm == pytest.approx(4.0)
    assert axial.project_point("l1_l2", (2.0, -10.0, 14.5), [series]).covered  # 2.5 mm past plane 12
    # Two lone parallel slices 40 mm apart are two one-slice stacks, not a 40 mm stack.
    write_stacks(
        tmp_path / "6", [axial_spec(n_slices=2, slice_offsets=(0.0, 40.0), center=(2.0, -10.0, 60.0))]
    )
    series = read_series(tmp_path / "6", "6")[0]
    assert [len(s.indices) for s in axial.find_stacks(series)] == [1, 1]
    assert not axial.project_point("l1_l2", (2.0, -10.0, 80.0), [series]).covered


def test_reversed_instance_order(tmp_path):
    spec = axial_spec(n_slices=5, slice_spacing=4.0, center=(2.0, -10.0, 30.0))
    write_stacks(tmp_path / "9", [spec], descending_instances=True)
    series = read_series(tmp_path / "9", "9")[0]
    assert series.instance_numbers == [5, 4, 3, 2, 1]  # ordered by position, not by instance
    p = axial.project_point("l2_l3", (2.0, -10.0, 26.5), [series])  # z of slice k = 22 + 4k
    assert p.slice_index == 1 and p.instance_number == 4 and p.distance_mm == pytest.approx(0.5, abs=1e-6)


def test_two_axial_series_nearest_plane_wins_then_more_slices(tmp_path):
    sagittal = SeriesSpec("Sagittal T2/STIR", series_number=1)
    contiguous = axial_spec(series_number=2, n_slices=12, slice_spacing=4.0, center=(2.0, -10.0, 30.0))
    short = axial_spec(series_number=3, n_slices=4, slice_spacing=3.0, center=(2.0, -10.0, 33.7))
    study = read_study(write_study(tmp_path, "1", {"1": sagittal, "2": contiguous, "3": short}))
    assert [s.series_id for s in axial.axial_series(study)] == ["2", "3"]  # the repeat is in extra
    # Planes: contiguous at z = 8 + 4k, short at 29.2 + 3k. At z = 38: 2.0 mm and 0.2 mm away.
    p = axial.project_point("l3_l4", (2.0, -10.0, 38.0), axial.axial_series(study))
    assert p.series_id == "3" and p.distance_mm == pytest.approx(-0.2, abs=1e-6)
    # Same nearest distance in both series: the one with more slices wins.
    q = axial.project_point("l3_l4", (2.0, -10.0, 32.1), axial.axial_series(study))  # 0.1 mm from both
    assert q.series_id == "2" and q.distance_mm == pytest.approx(0.1, abs=1e-6)


def test_level_outside_every_stack_is_not_covered(disc_series):
    specs = disc_stacks()
    between = 0.5 * (np.asarray(specs[0].center) + np.asarray(specs[1].center))  # 20 mm from both
    p = axial.project_point("l5_s1", between, [disc_series])
    assert not p.covered and "mm away" in p.reason and abs(p.distance_mm) > 10
    lateral = np.asarray(specs[1].center) + (60.0, 0.0, 0.0)  # on a plane, but 60 mm to the left
    q = axial.project_point("l5_s1", lateral, [disc_series])
    assert not q.covered and "field of view" in q.reason and abs(q.distance_mm) < 1e-6
    # Just past the end slice: covered up to half the spacing plus the tolerance.
    top = np.asarray(specs[1].center) + (0.0, 0.0, 4.0 + 2.9)
    assert axial.project_point("l4_l5", top, [disc_series]).covered
    assert not axial.project_point("l4_l5", top + (0, 0, 0.2), [disc_series]).covered
    assert axial.project_point("l1_l2", (np.nan,) * 3, [disc_series]).reason == "no level position"
    assert axial.project_point("l1_l2", specs[1].center, []).reason == "no axial series"


def test_project_levels_reads_the_study(tmp_path):
    study = read_study(write_study(tmp_path))  # the factory's default Axial T2: 5 slices 5 mm apart
    points = np.full((5, 3), np.nan)
    points[2] = (2.0, -10.0, 31.0)
    out = axial.project_levels(points, study)
    assert [p.level for p in out] == ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    assert [p.covered for p in out] == [False, False, True, False, False]
    assert out[2].series_id == "13" and out[2].slice_index == 2 and out[2].distance_mm == pytest.approx(1.0)


def test_level_points_patient_inverts_the_view_mapping(tmp_path):
    study = read_study(write_study(tmp_path))
    cfg = PreprocessConfig(view_size=64, crop_size=32)
    views, grid, info, _ = preprocess.build_views(study, cfg)
    series = study.series["Sagittal T2/STIR"]
    midline = series.index_of_instance(info["sag_t2"][1])
    source = np.array([[10.0 + 5 * k, 8.0 + 4 * k] for k in range(5)])  # (column, row) on the midline
    xy_norm = preprocess.source_px_to_view_norm(series, midline, source, grid)
    points = axial.level_points_patient(study, grid, info, xy_norm, cfg)
    assert points.shape == (5, 3)
    assert np.allclose(points, series.pixel_to_patient(midline, source), atol=1e-6)
    assert np.isnan(axial.level_points_patient(study, grid, {}, xy_norm, cfg)).all()


# === Crops ===


def dotted_pixels(spec: SeriesSpec, dots: list[np.ndarray]) -> np.ndarray:
    """Stored pixels: zero, with a 5x5 bright block at patient point ``dots[k]`` on slice k."""
    row_dir, col_dir, _ = iop_vectors(spec.iop)
    pixels = np.zeros((spec.n_slices, spec.rows, spec.cols), np.uint16)
    for k, (ipp, dot) in enumerate(zip(slice_positions(spec), dots, strict=True)):
        c = int(round((dot - ipp) @ row_dir / spec.pixel_spacing[1]))
        r = int(round((dot - ipp) @ col_dir / spec.pixel_spacing[0]))
        pixels[k, r - 2 : r + 3, c - 2 : c + 3] = 3000
    return pixels


def blob_centre(img: np.ndarray) -> np.ndarray:
    """(column, row) centroid of the pixels above half the maximum."""
    rows, cols = np.nonzero(img > img.max() / 2)
    return np.array([cols.mean(), rows.mean()])


@pytest.mark.parametrize("iop", [AXIAL_IOP, (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)], ids=["standard", "flipped"])
def test_axial_crops_centre_scale_orientation_and_channels(tmp_path, iop):
    spec = axial_spec(iop=iop, n_slices=4, slice_spacing=4.0, center=(2.0, -10.0, 30.0))
    planes = [np.asarray(p) for p in slice_positions(spec)]
    z = sorted((p @ (0, 0, 1), k) for k, p in enumerate(planes))  # feet -> head
    point = np.array([0.0, -11.35, z[1][0]])  # on the second slice from the feet, on a pixel centre
    shifts = {
        z[0][1]: (8.0, 0.0, 0.0),
        z[1][1]: (0.0, 0.0, 0.0),
        z[2][1]: (0.0, 6.0, 0.0),
        z[3][1]: (0.0, -6.0, 0.0),
    }
    dots = [np.array([point[0], point[1], planes[k][2]]) + shifts[k] for k in range(4)]
    spec.pixels = dotted_pixels(spec, dots)
    write_series(tmp_path / "4", spec)
    series = read_series(tmp_path / "4", "4")[0]
    p = axial.project_point("l3_l4", point, [series])
    assert p.covered
    missing = axial.AxialProjection(
        "l1_l2", None, None, None, np.nan, np.nan, np.nan, False, "no axial series"
    )
    crop_mm, size = 41.0, 41  # 1 mm per crop pixel, centre pixel 20
    crops = axial.axial_crops(series, [missing, p, p, p, p], PreprocessConfig(), crop_mm=crop_mm, size=size)
    assert crops.shape == (5, size, size, 3) and crops.dtype == np.uint8
    assert not crops[0].any()
    # Channels feet -> head; columns towards patient left (+x), rows towards posterior (+y).
    assert np.allclose(blob_centre(crops[1, ..., 0]), (28.0, 20.0), atol=0.6)
    assert np.allclose(blob_centre(crops[1, ..., 1]), (20.0, 20.0), atol=0.6)
    assert np.allclose(blob_centre(crops[1, ..., 2]), (20.0, 26.0), atol=0.6)
    # A level's crop depends on its own slices only.
    alone = axial.axial_crops(series, [p], PreprocessConfig(), crop_mm=crop_mm, size=size)
    np.testing.assert_array_equal(alone[0], crops[1])
    other = dataclasses.replace(p, series_id="elsewhere")
    with pytest.raises(ValueError, match="elsewhere"):
        axial.axial_crops(series, [other], PreprocessConfig(), crop_mm=crop_mm, size=size)
    # Five neighbours on each side reach past the four-slice stack: those channels are zeros.
    wide = axial.axial_crops(series, [p] * 5, PreprocessConfig(), crop_mm=crop_mm, size=size, neighbours=5)
    assert wide.shape[-1] == 11
    assert [bool(wide[0, ..., c].any()) for c in range(11)] == [False] * 4 + [True] * 4 + [False] * 3
