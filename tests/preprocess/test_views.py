"""Views on real acquisition geometry: the spine found in the field, slices chosen by anatomy,
series chosen without losing labels, missing or bad series degrading instead of failing.

Every study here is written as real DICOM by `tests/dicom_factory.py` from a drawn spine
(`factory.Spine`) at a chosen geometry, with its label points known in patient mm.
"""

from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.data.dataset import StudyLabels, prepare_study
from lumbar_tf.dicom.reader import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, DicomError, read_study
from lumbar_tf.preprocess import ViewGrid, build_views, choose_slices, find_spine, view_series
from lumbar_tf.runtime import predictions
from lumbar_tf.runtime.predictor import predict_study

try:
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

CFG = PreprocessConfig(view_size=96)
FIELD_340 = {"rows": 512, "cols": 512, "pixel_spacing": (0.664, 0.664)}  # 340 mm at 0.66 mm


def _inside(grid: ViewGrid, points_xyz, margin: float = 0.05) -> np.ndarray:
    """Normalised view position of patient points, asserting they lie inside the view."""
    xy = grid.to_normalized(grid.patient_yz_to_view_px(np.asarray(points_xyz)[:, 1:3]))
    assert np.all((xy > margin) & (xy < 1 - margin)), xy
    return xy


def _low_spine_study(tmp_path, study_id="1", spine=None, **t1):
    """Sagittal T2 and T1 over 340 mm fields with L5/S1 130 mm below the field centre."""
    spine = spine or factory.Spine(l5s1=(10.0, -90.0), x_mid=3.0)
    t2 = factory.spine_series(
        spine, n_slices=15, slice_spacing=4.0, center=(0.0, 0.0, 40.0), seed=1, **FIELD_340
    )
    t1_geometry = {"n_slices": 15, "slice_spacing": 4.0, "center": (1.5, 5.0, 30.0), "seed": 2, **FIELD_340}
    t1_geometry.update(t1)
    t1 = factory.spine_series(
        factory.Spine(spine.l5s1, spine.x_mid, contrast="T1"), SAGITTAL_T1, **t1_geometry
    )
    specs = {"11": t2, "12": t1}
    return factory.write_study(tmp_path, study_id, specs), spine, specs


def test_spine_low_in_a_340mm_field_is_found_and_the_levels_are_in_the_view(tmp_path):
    study_dir, spine, _ = _low_spine_study(tmp_path)
    study = read_study(study_dir)
    found = find_spine(study.series[SAGITTAL_T2], CFG)
    assert found.found
    assert np.linalg.norm(found.l5s1_yz - spine.canal_points()[4, 1:]) < 25.0  # L5/S1 from the sacrum
    views, grid, _, warnings = build_views(study, CFG)
    xy = _inside(grid, spine.canal_points())
    assert xy[4, 1] > xy[0, 1]  # L5/S1 below L1/L2
    # The field-centred grid of before lost L5/S1 (130 mm below a 200 mm grid's centre).
    field = ViewGrid(np.array([0.0, 40.0]), CFG.spine_crop_mm, CFG.view_size)
    assert field.to_normalized(field.patient_yz_to_view_px(spine.canal_points()[4, 1:]))[1] > 1.0
    # The canal is bright on the T2 midline channel at each level.
    for u, v in grid.from_normalized(xy).round().astype(int):
        assert views["sag_t2"][v, u, 1] > 150
    assert not any("no vertebral column" in w for w in warnings)


def test_non_square_t1_matrix_and_t1_only_localiser_view(tmp_path):
    """A Sagittal T1 of 540 x 384 (as RSNA study 4646740), no Sagittal T2: the localiser's view is
    built from T1 on a grid placed on the T1 spine, with a warning; levels land on the T1 midline."""
    spine = factory.Spine(l5s1=(-5.0, -20.0), x_mid=-2.0, contrast="T1")
    t1 = factory.spine_series(
        spine,
        SAGITTAL_T1,
        rows=540,
        cols=384,
        pixel_spacing=(0.6, 0.6),
        n_slices=17,
        slice_spacing=3.5,
        center=(0.0, 0.0, 40.0),
        seed=3,
    )
    study = read_study(factory.write_study(tmp_path, "4646740", {"7": t1}))
    views, grid, info, warnings = build_views(study, CFG)
    _inside(grid, spine.canal_points())
    assert view_series(study, CFG)["sag_t2"].series_id == "7"
    assert info["sag_t2"][1] == info["sag_t1"][1] and views["sag_t2"].any()  # the same T1 midline
    assert any(
        "no 'Sagittal T2/STIR' series; view sag_t2 built from 'Sagittal T1' series 7" in w for w in warnings
    )


class _PerfectLocaliser:
    """A predictor that returns the true level points (and a constant grading): it checks the path
    study -> views -> predictions.json, not a model."""

    def __init__(self, cfg, points_xyz):
        self.preprocess, self.fine_grades, self.points = cfg, True, points_xyz

    def predict_views(self, views):
        grid = self.grid  # set by the test from build_views (the same computation predict_study does)
        xy = grid.to_normalized(grid.patient_yz_to_view_px(self.points[:, 1:3]))
        return {"threshold_probs": np.full((1, 5, 5, 3), 0.2), "level_xy": xy[None].astype(np.float32)}

    def model_info(self):
        return {"name": "perfect", "version": 1, "format": "test"}


def test_no_t2_study_gets_level_positions_on_t1_and_the_series_used(tmp_path):
    study_dir, spine, specs = _low_spine_study(tmp_path, "5")
    for path in (study_dir / "11").iterdir():
        path.unlink()
    (study_dir / "11").rmdir()
    study = read_study(study_dir)
    predictor = _PerfectLocaliser(CFG, spine.canal_points())
    predictor.grid = build_views(study, CFG)[1]
    preds = predict_study(predictor, study_dir, study=study)
    assert preds.predictions["series"] == {"sag_t2": "12", "sag_t1": "12"}
    t1 = study.series[SAGITTAL_T1]
    rows = factory.label_rows("5", "12", specs["12"], spine.canal_points(), "Spinal Canal Stenosis")
    for level, row in zip(preds.predictions["levels"], rows):
        assert (
            level["instance_number"]
            == t1.slices[choose_slices(t1, [0.0], preds.grid.midline_xyz)[0]].instance_number
        )
        assert abs(level["x"] - row[5]) < 1.0 and abs(level["y"] - row[6]) < 1.0
    assert any("built from 'Sagittal T1'" in w for w in preds.predictions["warnings"])
    assert any("level positions are on the midline Sagittal T1" in w for w in preds.predictions["warnings"])


@pytest.mark.parametrize("n_slices, yaw", [(16, 0.0), (15, 6.0)])
def test_midline_and_foramen_slices_from_the_anatomy(tmp_path, n_slices, yaw):
    """Stack centred 9 mm right of the midline, even slice count or rotated: the midline channel is
    the slice through the patient's midline, the foramen channels their offsets from it."""
    spine = factory.Spine(l5s1=(0.0, -30.0), x_mid=9.0)
    iop = factory.oblique_sagittal_iop(yaw, 0.0)
    spec = factory.spine_series(
        spine,
        rows=320,
        cols=320,
        pixel_spacing=(0.8, 0.8),
        n_slices=n_slices,
        slice_spacing=3.3,
        center=(0.0, 0.0, 30.0),
        iop=iop,
        seed=4,
    )
    study = read_study(factory.write_study(tmp_path, "3", {"1": spec}))
    series = study.series[SAGITTAL_T2]
    found = find_spine(series, CFG)
    point = np.array([spine.x_mid, *found.midline_xyz[1:]])
    distance = np.abs(series.positions_mm() - point @ series.normal)
    best = int(np.argmin(distance))
    assert choose_slices(series, [0.0], found.midline_xyz) == [best]
    stack_centre = int(np.argmin(np.abs(series.lateral_positions_mm())))
    assert best != stack_centre  # the stack centre would be 9 mm off
    for offset in (12.0, -12.0):
        target = point + offset * series.normal
        expected = int(np.argmin(np.abs(series.positions_mm() - target @ series.normal)))
        assert abs(choose_slices(series, [offset], found.midline_xyz)[0] - expected) <= 1


def _labels(study_id, rows) -> StudyLabels:
    grades = np.zeros((L.N_CONDITIONS, L.N_LEVELS), np.int64)
    coordinates = [
        {
            "series_id": r[1],
            "instance_number": r[2],
            "condition": L.parse_condition_title(r[3]),
            "level": L.parse_level_title(r[4]),
            "x": r[5],
            "y": r[6],
        }
        for r in rows
    ]
    return StudyLabels(study_id, grades, True, coordinates)


def test_two_t2_series_labels_on_the_smaller_one_are_kept(tmp_path):
    spine = factory.Spine(l5s1=(0.0, -40.0))
    geometry = {"rows": 384, "cols": 384, "pixel_spacing": (0.7, 0.7), "center": (0.0, 0.0, 20.0)}
    big = factory.spine_series(spine, n_slices=17, slice_spacing=3.5, seed=5, **geometry)
    small = factory.spine_series(spine, n_slices=11, slice_spacing=4.0, seed=6, **geometry)
    t1 = factory.spine_series(
        factory.Spine(spine.l5s1, contrast="T1"),
        SAGITTAL_T1,
        n_slices=13,
        slice_spacing=4.0,
        seed=7,
        **geometry,
    )
    images = tmp_path / "train_images"
    factory.write_study(images, "42", {"20": big, "30": small, "40": t1})
    rows = factory.label_rows("42", "30", small, spine.canal_points(), "Spinal Canal Stenosis")
    record = prepare_study(images, _labels("42", rows), "42", {}, CFG)
    assert record["level_present"].tolist() == [1.0] * 5  # none lost to the repeat series
    assert any(
        "series 30 and 20 are both 'Sagittal T2/STIR'; used 30 (named by the labels)" in w
        for w in record["warnings"]
    )
    # Without labels (inference), the series covering most wins, with a warning naming both.
    study = read_study(images / "42")
    assert study.series[SAGITTAL_T2].series_id == "20"
    assert "series 20 and 30 are both 'Sagittal T2/STIR'; used 20 (covers most)" in study.warnings
    # The labelled points lie inside the view grid the image alone gives.
    views, grid, _, _ = build_views(study, CFG)
    xy = _inside(grid, spine.canal_points())
    np.testing.assert_allclose(record["level_xy"], xy, atol=0.02)  # both grids land on the same spine


@pytest.mark.parametrize("same_field", [True, False])
def test_a_slice_of_another_size_is_resampled_or_dropped_not_the_study(tmp_path, same_field):
    """The midline T2 slice rewritten at 256x256: over the same 340 mm field (PixelSpacing doubled,
    the first pixel's centre moved to the new grid) it is resampled and kept, and the view shows it
    where the 512 slice was; over another field (170 mm) it is dropped. The study predicts either way."""
    study_dir, spine, _ = _low_spine_study(tmp_path, "6")
    before = build_views(read_study(study_dir), CFG)[0]["sag_t2"]
    files = sorted((study_dir / "11").iterdir())
    odd = min(files, key=lambda f: abs(float(pydicom.dcmread(f).ImagePositionPatient[0]) - spine.x_mid))
    pixels = pydicom.dcmread(odd).pixel_array.astype(np.float64)
    ds = factory.halve_matrix(odd)
    if not same_field:  # the file's own PixelSpacing: a 170 mm field
        ds.PixelSpacing = [v / 2 for v in ds.PixelSpacing]
        ds.save_as(odd)
    study = read_study(study_dir)
    t2 = study.series[SAGITTAL_T2]
    views, grid, info, warnings = build_views(study, CFG)
    if same_field:
        assert len(t2.slices) == 15
        assert (
            "series 11: resampled 1 slice(s) of 256x256 (the series' slices are 512x512, "
            "the same field of view)" in warnings
        )
        header = t2.slices[t2.index_of_instance(int(ds.InstanceNumber))]
        neighbour = t2.slices[t2.index_of_instance(int(ds.InstanceNumber)) - 1]
        assert (header.rows, header.cols, header.pixel_spacing) == (512, 512, neighbour.pixel_spacing)
        corners = np.array([[0.0, 0.0], [511.0, 511.0]])
        assert np.allclose(
            header.pixel_to_patient(corners)[:, 1:], neighbour.pixel_to_patient(corners)[:, 1:], atol=1e-3
        )
        assert np.allclose(header.file_px_to_px([[0.0, 0.0], [255.0, 255.0]]), [[0.5, 0.5], [510.5, 510.5]])
        assert int(ds.InstanceNumber) == info["sag_t2"][1]  # the resampled slice is the midline channel
        # Decoded, it is the 512 slice at half resolution, aligned: no one-pixel shift matches better.
        resampled = t2.load_pixels([t2.index_of_instance(int(ds.InstanceNumber))])[0][4:-4, 4:-4]
        misfit = {
            (dy, dx): np.abs(np.roll(pixels, (dy, dx), (0, 1))[4:-4, 4:-4] - resampled).mean()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        }
        assert min(misfit, key=misfit.get) == (0, 0), misfit
        # And the view's midline channel shows it where the 512 slice was (another slice: r ~ 0.5).
        blur = [
            cv2.GaussianBlur(v[..., 1].astype(np.float32), (0, 0), 2).ravel()
            for v in (before, views["sag_t2"])
        ]
        assert np.corrcoef(*blur)[0, 1] > 0.98
    else:
        assert len(t2.slices) == 14
        assert "series 11: dropped 1 slice(s) of 256x256 (the series' slices are 512x512)" in warnings
        assert int(ds.InstanceNumber) not in t2.instance_numbers
    _inside(grid, spine.canal_points())
    predictor = _PerfectLocaliser(CFG, spine.canal_points())
    predictor.grid = grid
    preds = predict_study(predictor, study_dir, study=study)
    assert [level["level"] for level in preds.predictions["levels"]] == list(L.LEVELS)
    assert any("256x256" in w for w in preds.predictions["warnings"])


def _study_with_halved_slices(tmp_path, study_id="43"):
    """Sagittal T2 (384 x 384 at 0.7 mm) and an Axial T2 stack through L3/L4 (96 x 96 at 0.8 mm), the
    midline T2 slice and the middle axial slice written at half their series' matrix over the same
    field -> (study dir, spine, axial slice centre, {"t2"/"axial": the halved file's dataset})."""
    spine = factory.Spine(l5s1=(0.0, -40.0), x_mid=1.0)
    t2 = factory.spine_series(
        spine,
        n_slices=11,
        slice_spacing=4.0,
        rows=384,
        cols=384,
        pixel_spacing=(0.7, 0.7),
        center=(0.0, 0.0, 20.0),
        seed=11,
    )
    axial_centre = spine.canal_points()[2] + np.array([0.0, 5.0, 0.0])
    ax = factory.SeriesSpec(
        AXIAL_T2,
        n_slices=5,
        rows=96,
        cols=96,
        pixel_spacing=(0.8, 0.8),
        slice_spacing=4.0,
        iop=factory.AXIAL_IOP,
        center=tuple(axial_centre),
        seed=12,
    )
    study_dir = factory.write_study(tmp_path, study_id, {"11": t2, "13": ax})
    midline = int(np.argmin([abs(p[0] - spine.x_mid) for p in factory.slice_positions(t2)]))
    halved = {
        "t2": factory.halve_matrix(study_dir / "11" / f"{midline + 1}.dcm"),  # instance = slice k + 1
        "axial": factory.halve_matrix(study_dir / "13" / "3.dcm"),  # the middle slice
    }
    return study_dir, spine, axial_centre, halved


def test_labels_on_a_resampled_slice_land_where_the_file_puts_them(tmp_path):
    """Canal points clicked on a half-size midline T2 file and a subarticular point on a half-size
    axial file (coordinates in those files' own pixels): the view targets and the measured channel
    offset are those of the true points (the resampled header's pixels would put them ~2x out)."""
    from dataclasses import replace

    from lumbar_tf.core.config import ViewSpec
    from lumbar_tf.data.slice_offsets import study_offsets

    study_dir, spine, axial_centre, halved = _study_with_halved_slices(tmp_path)
    canal = spine.canal_points()
    t2_ds, ax_ds = halved["t2"], halved["axial"]
    rows = [
        ["43", "11", int(t2_ds.InstanceNumber), "Spinal Canal Stenosis", level, *factory.file_px(t2_ds, p)]
        for level, p in zip(factory.LEVEL_NAMES[:4], canal[:4])
    ]
    recess = axial_centre + np.array([9.0, 0.0, 0.0])  # 9 mm left of the canal, in the slice's plane
    recess_xy = factory.file_px(ax_ds, recess)
    rows.append(["43", "13", int(ax_ds.InstanceNumber), "Left Subarticular Stenosis", "L5/S1", *recess_xy])
    record = prepare_study(tmp_path, _labels("43", rows), "43", {}, CFG)
    assert any("resampled 1 slice(s) of 192x192" in w for w in record["warnings"])
    assert any("resampled 1 slice(s) of 48x48" in w for w in record["warnings"])
    study = read_study(study_dir)
    grid = build_views(study, CFG)[1]
    # L5/S1 has no canal point: its target is the subarticular point projected on the sagittal plane.
    truth = grid.to_normalized(grid.patient_yz_to_view_px(np.vstack([canal[:4], recess])[:, 1:]))
    assert record["level_present"].tolist() == [1.0] * 5
    assert np.abs(record["level_xy"] - truth).max() * CFG.view_size < 0.1  # view pixels
    axial_series = study.series[AXIAL_T2]
    header = axial_series.slices[axial_series.index_of_instance(int(ax_ds.InstanceNumber))]
    assert header.file_shape == (48, 48) and (header.rows, header.cols) == (96, 96)
    # The recess channel's offset is measured from the true point too.
    cfg = replace(CFG, views=[ViewSpec(offsets="labels")])
    _, offsets, error = study_offsets((tmp_path, _labels("43", rows), "43", {}, cfg))
    assert error is None
    midline = find_spine(study.series[SAGITTAL_T2], cfg).midline_xyz
    expected = (recess - midline) @ study.series[SAGITTAL_T2].normal
    assert offsets["sag_t2"]["left"] == [pytest.approx(expected, abs=0.01)]


class _PerfectAxialLocaliser(_PerfectLocaliser):
    """`_PerfectLocaliser` for a config with an axial view (two calls: localise, then grade)."""

    def localize_views(self, views):
        return self.predict_views(views)["level_xy"]

    def predict_views(self, views, axial=None):
        return super().predict_views(views)


def test_predicted_pixels_on_a_resampled_slice_are_the_files_own(tmp_path):
    """predictions.json's level and axial pixels on half-size files, mapped through those files' own
    headers, are the true points (the midline slice and the axial slice were resampled on reading)."""
    from dataclasses import replace

    from lumbar_tf.core.config import AxialSpec
    from lumbar_tf.report.heatmaps import midline_image

    study_dir, spine, _, halved = _study_with_halved_slices(tmp_path, "44")
    cfg = replace(CFG, axial=AxialSpec())
    study = read_study(study_dir)
    predictor = _PerfectAxialLocaliser(cfg, spine.canal_points())
    predictor.grid = build_views(study, cfg)[1]
    result = predict_study(predictor, study_dir, study=study)
    preds = result.predictions
    t2_ds, ax_ds = halved["t2"], halved["axial"]
    assert midline_image(result).shape == (t2_ds.Rows, t2_ds.Columns)  # the overlay's pixels: the file's
    assert {lv["instance_number"] for lv in preds["levels"]} == {int(t2_ds.InstanceNumber)}
    xy = np.array([[lv["x"], lv["y"]] for lv in preds["levels"]])
    assert np.all((xy >= 0) & (xy < t2_ds.Rows))  # on the 192 x 192 file, not the 384 x 384 resampled
    assert np.abs(factory.file_px_to_patient(t2_ds, xy)[:, 1:] - spine.canal_points()[:, 1:]).max() < 0.05
    on_halved = [
        e for e in preds["axial"] if e["covered"] and e["instance_number"] == int(ax_ds.InstanceNumber)
    ]
    assert [e["level"] for e in on_halved] == ["l3_l4"]
    entry = on_halved[0]
    point = factory.file_px_to_patient(ax_ds, [entry["x"], entry["y"]])
    truth = spine.canal_points()[2]
    truth[0] = float(t2_ds.ImagePositionPatient[0])  # the level point lies on the midline slice
    assert np.abs(point[:2] - truth[:2]).max() < 0.5


def test_bad_series_are_skipped_with_a_warning_or_fail_in_one_line(tmp_path):
    spine = factory.Spine(l5s1=(0.0, -40.0))
    geometry = {"rows": 256, "cols": 256, "pixel_spacing": (1.0, 1.0), "center": (0.0, 0.0, 20.0)}
    axial_as_sagittal = factory.SeriesSpec(SAGITTAL_T2, n_slices=6, iop=factory.AXIAL_IOP, seed=8)
    single = factory.spine_series(spine, n_slices=1, seed=9, **geometry)
    t1 = factory.spine_series(
        factory.Spine(spine.l5s1, contrast="T1"), SAGITTAL_T1, n_slices=9, seed=10, **geometry
    )
    study_dir = factory.write_study(tmp_path, "8", {"1": axial_as_sagittal, "2": single, "3": t1})
    # A repeat acquisition: every T1 slice written twice (same position), under other instance numbers.
    for path in sorted((study_dir / "3").iterdir()):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(ds.InstanceNumber) + 100
        ds.save_as(path.with_name(f"{ds.InstanceNumber}.dcm"))
    descriptions = {"1": SAGITTAL_T2, "2": SAGITTAL_T2, "3": SAGITTAL_T1}
    study = read_study(study_dir, descriptions)
    assert "series 1 is described as 'Sagittal T2/STIR' but its slices are axial; skipped" in study.warnings
    assert "series 2 has a single slice; skipped" in study.warnings
    assert "series 3: dropped 9 slice(s) at duplicated positions" in study.warnings
    assert sorted(s.instance_number for s in study.series[SAGITTAL_T1].slices) == list(range(1, 10))
    views, grid, _, warnings = build_views(study, CFG)  # the localiser's view from T1
    assert views["sag_t2"].any() and any("built from 'Sagittal T1' series 3" in w for w in warnings)
    assert not any(str(tmp_path) in w for w in warnings)  # no paths in warnings
    # Nothing usable: one line naming the study.
    only_bad = factory.write_study(tmp_path, "9", {"1": axial_as_sagittal, "2": single})
    with pytest.raises(DicomError) as err:
        build_views(read_study(only_bad, descriptions), CFG)
    assert str(err.value) == f"{only_bad}: no sagittal series" and "\n" not in str(err.value)
    assert AXIAL_T2 not in read_study(only_bad, descriptions).series


def test_noise_has_no_spine_and_the_grid_falls_back_to_the_field(tmp_path):
    study = read_study(
        factory.write_study(tmp_path, "2", {"1": factory.SeriesSpec(SAGITTAL_T2, rows=200, cols=200)})
    )
    found = find_spine(study.series[SAGITTAL_T2], CFG)
    assert not found.found and found.midline_offset_mm == 0.0
    field = np.array([s.center for s in study.series[SAGITTAL_T2].slices])[:, 1:3].mean(axis=0)
    np.testing.assert_allclose(found.center_yz, field)
    assert any("no vertebral column found" in w for w in build_views(study, CFG)[3])


def test_predictions_record_the_series_per_view():
    preds = predictions.build_predictions(
        "1",
        np.full((5, 5, 3), 0.3),
        np.full((5, 2), 0.5),
        model_info={"name": "m", "version": 1, "format": "keras"},
        level_positions=[{"level": lv, "instance_number": None, "x": None, "y": None} for lv in L.LEVELS],
        series={"sag_t2": 11, "sag_t1": None},
    )
    assert preds["series"] == {"sag_t2": "11", "sag_t1": None}


def test_a_series_described_sagittal_with_axial_slices_is_warned_without_a_descriptions_csv(tmp_path):
    """No RSNA CSV: the SeriesDescription text says sagittal, the slices are axial. The series is
    typed by its orientation and the study says so (series id only, no header text)."""
    spine = factory.Spine(l5s1=(0.0, -40.0))
    geometry = {"rows": 256, "cols": 256, "pixel_spacing": (1.0, 1.0), "center": (0.0, 0.0, 20.0)}
    axial_as_sagittal = factory.SeriesSpec(SAGITTAL_T2, n_slices=6, iop=factory.AXIAL_IOP, seed=8)
    t2 = factory.spine_series(spine, n_slices=9, seed=10, **geometry)
    study = read_study(factory.write_study(tmp_path, "8", {"1": axial_as_sagittal, "2": t2}))
    assert (
        "series 1: SeriesDescription names a sagittal series but its slices are axial; "
        "typed as 'Axial T2'" in study.warnings
    )
    assert study.series[SAGITTAL_T2].series_id == "2"
    assert not any("series 2" in w for w in study.warnings)
