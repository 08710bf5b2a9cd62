"""lumbar_tf.dicom.reader: reading studies, geometry, pixels, series types and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from lumbar_tf.dicom.reader import (
    AXIAL_T2,
    SAGITTAL_T1,
    SAGITTAL_T2,
    DicomError,
    read_instance_header,
    read_series_descriptions,
    read_study,
)

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest prepends it)
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

AXIAL_IOP, CORONAL_IOP, SeriesSpec = factory.AXIAL_IOP, factory.CORONAL_IOP, factory.SeriesSpec
oblique_sagittal_iop, rewrite = factory.oblique_sagittal_iop, factory.rewrite
write_series, write_study = factory.write_series, factory.write_study


def left_to_right(spec: SeriesSpec) -> np.ndarray:
    """Write-order indices sorted by patient x (the reader's order for a sagittal series)."""
    return np.argsort([p[0] for p in factory.slice_positions(spec)])


def modality(stored: np.ndarray, spec: SeriesSpec) -> np.ndarray:
    slope = 1.0 if spec.slope is None else spec.slope
    intercept = 0.0 if spec.intercept is None else spec.intercept
    return stored.astype(np.float64) * slope + intercept


# --- transfer syntaxes ---------------------------------------------------------------------


@pytest.mark.parametrize("syntax", ["explicit", "deflated", "rle", "jpeg_lossless", "jpeg2000_lossless"])
def test_transfer_syntaxes_read_to_identical_pixels(tmp_path, syntax):
    if syntax == "jpeg_lossless":
        pytest.importorskip("imagecodecs", reason="imagecodecs encodes JPEG Lossless SV1")
    spec = SeriesSpec(n_slices=3, bits_stored=12, slope=2.0, intercept=-100.0)
    src, stored = write_series(tmp_path / "src" / "1" / "7", spec)
    for path in src:
        rewrite(path, tmp_path / syntax / "1" / "7" / path.name, syntax)
    expected_uid = {
        "explicit": "1.2.840.10008.1.2.1",
        "deflated": "1.2.840.10008.1.2.1.99",
        "rle": "1.2.840.10008.1.2.5",
        "jpeg_lossless": "1.2.840.10008.1.2.4.70",
        "jpeg2000_lossless": "1.2.840.10008.1.2.4.90",
    }[syntax]
    first = tmp_path / syntax / "1" / "7" / src[0].name
    assert pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID == expected_uid

    study = read_study(tmp_path / syntax / "1")
    series = study.series[SAGITTAL_T2]
    pixels = series.load_pixels(range(3))
    assert pixels.dtype == np.float32 and pixels.shape == (3, spec.rows, spec.cols)
    expected = modality(stored[left_to_right(spec)], spec).astype(np.float32)
    np.testing.assert_array_equal(pixels, expected)


def test_compressed_decoders_are_available():
    """pylibjpeg plugins back the compressed transfer syntaxes (installed with the package)."""
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder, JPEGLosslessSV1Decoder

    assert "pylibjpeg" in JPEGLosslessSV1Decoder.available_plugins
    assert "pylibjpeg" in JPEG2000LosslessDecoder.available_plugins


# --- geometry and order ---------------------------------------------------------------------


def test_slices_ordered_by_position_not_name_or_instance(tmp_path):
    spec = SeriesSpec(n_slices=9, slice_offsets=(-8, 6, 0, 4, -4, 12, -12, 2, 9))
    paths, stored = write_series(tmp_path / "5" / "10", spec, shuffle_names=True, scramble_instances=True)
    series = read_study(tmp_path / "5").series[SAGITTAL_T2]
    x = np.array([s.position[0] for s in series.slices])
    assert np.all(np.diff(x) > 0), "ascending patient left"
    np.testing.assert_allclose(series.normal, [1, 0, 0], atol=1e-12)
    # Files were written in IOP-normal order (normal = -x): slice k has x = -offset[k].
    order = left_to_right(spec)
    assert list(order) == list(np.argsort(-np.array(spec.slice_offsets)))
    assert [s.path for s in series.slices] == [paths[k] for k in order]
    np.testing.assert_array_equal(
        series.load_pixels(range(9)), modality(stored[order], spec).astype(np.float32)
    )
    lateral = series.lateral_positions_mm()
    offsets_x = np.sort(-np.array(spec.slice_offsets, dtype=float))
    np.testing.assert_allclose(lateral, offsets_x - offsets_x.mean(), atol=1e-9)
    assert abs(lateral.mean()) < 1e-9
    # Instance numbers travel with their files, whatever they are.
    for s in series.slices:
        assert pydicom.dcmread(s.path, stop_before_pixels=True).InstanceNumber == s.instance_number


def test_axial_series_ascends_towards_head(tmp_path):
    spec = SeriesSpec("AX T2 FSE", n_slices=5, iop=AXIAL_IOP, slice_spacing=5.0)
    write_series(tmp_path / "5" / "3", spec, shuffle_names=True, scramble_instances=True)
    series = read_study(tmp_path / "5").series[AXIAL_T2]
    z = np.array([s.position[2] for s in series.slices])
    assert series.plane == "axial" and np.all(np.diff(z) > 0)
    np.testing.assert_allclose(series.lateral_positions_mm(), z - z.mean())


def test_oblique_sagittal_order_and_pixel_patient_round_trip(tmp_path):
    spec = SeriesSpec(iop=oblique_sagittal_iop(12.0, -8.0), pixel_spacing=(0.7, 0.9))
    write_series(tmp_path / "5" / "1", spec, scramble_instances=True)
    series = read_study(tmp_path / "5").series[SAGITTAL_T2]
    assert series.plane == "sagittal" and series.normal[0] > 0.9
    assert np.all(np.diff(series.positions_mm()) > 0)
    np.testing.assert_allclose(np.diff(series.positions_mm()), 4.0, atol=1e-9)

    s0 = series.slices[0]
    np.testing.assert_allclose(series.pixel_to_patient(0, [0, 0]), s0.position)
    # One column step moves col_mm along row_dir; one row step moves row_mm along col_dir.
    np.testing.assert_allclose(series.pixel_to_patient(0, [1, 0]) - s0.position, 0.9 * s0.row_dir)
    np.testing.assert_allclose(series.pixel_to_patient(0, [0, 1]) - s0.position, 0.7 * s0.col_dir)
    xy = np.random.default_rng(0).uniform(-5, 50, (4, 6, 2))
    np.testing.assert_allclose(series.patient_to_pixel(0, series.pixel_to_patient(0, xy)), xy)


# --- pixel values ---------------------------------------------------------------------------


def test_rescale_and_monochrome1(tmp_path):
    stored = np.tile(np.arange(0, 48 * 4, 4, dtype=np.uint16), (3, 40, 1))
    mono1 = SeriesSpec(n_slices=3, pixels=stored, photometric="MONOCHROME1", slope=0.5, intercept=10.0)
    mono2 = SeriesSpec(n_slices=3, pixels=stored, photometric="MONOCHROME2", slope=0.5, intercept=10.0)
    plain = SeriesSpec(n_slices=3, pixels=stored, slope=None)
    write_series(tmp_path / "1" / "1", mono1)
    write_series(tmp_path / "2" / "1", mono2)
    write_series(tmp_path / "3" / "1", plain)
    p1 = read_study(tmp_path / "1").series[SAGITTAL_T2].load_pixels([0])[0]
    p2 = read_study(tmp_path / "2").series[SAGITTAL_T2].load_pixels([0])[0]
    p3 = read_study(tmp_path / "3").series[SAGITTAL_T2].load_pixels([0])[0]
    np.testing.assert_array_equal(p3, stored[0].astype(np.float32))
    np.testing.assert_array_equal(p2, stored[0] * 0.5 + 10.0)
    # MONOCHROME1: low stored values display bright -> inverted over the 12-bit rescaled range.
    lo, hi = 10.0, (2**12 - 1) * 0.5 + 10.0
    np.testing.assert_allclose(p1, lo + hi - p2)
    assert np.all(np.diff(p1[0]) < 0) and np.all(np.diff(p2[0]) > 0)


def test_headers_only_reading_decodes_no_pixels(tmp_path, spy_decodes):
    study = read_study(write_study(tmp_path))
    assert spy_decodes == []
    series = study.series[SAGITTAL_T1]
    series.load_pixels([2, 5])
    assert spy_decodes == [str(series.slices[2].path), str(series.slices[5].path)]


# --- series types ---------------------------------------------------------------------------


def test_series_types_from_headers(tmp_path):
    specs = {
        "1": SeriesSpec("t2_tse_sag", n_slices=5),
        "2": SeriesSpec("SAG T1 FSE", n_slices=5, seed=2),
        "3": SeriesSpec("AX T2", n_slices=4, iop=AXIAL_IOP),
        "4": SeriesSpec("COR T2", n_slices=3, iop=CORONAL_IOP),
        "5": SeriesSpec("sag", n_slices=5, echo_time=9.0, repetition_time=500.0),  # no word: TE/TR
    }
    study = read_study(write_study(tmp_path, "9", specs))
    assert study.series[SAGITTAL_T2].series_id == "1"
    assert study.series[AXIAL_T2].series_id == "3"
    # two Sagittal T1 candidates with equal slice counts: the first in series-id order is kept
    assert study.series[SAGITTAL_T1].series_id == "2"
    assert sorted(s.series_id for s in study.extra) == ["4", "5"]
    assert any("coronal" in w for w in study.warnings)
    assert any("both 'Sagittal T1'" in w for w in study.warnings)
    assert study.series_by_description("sagittal t2/stir") is study.series[SAGITTAL_T2]
    assert study.series_by_description("Axial T1") is None


def test_descriptions_csv_wins_and_duplicates_keep_more_slices(tmp_path):
    specs = {
        "100": SeriesSpec("whatever", n_slices=5),
        "200": SeriesSpec("whatever", n_slices=8, seed=1),
        "300": SeriesSpec("T2 STIR", n_slices=6, seed=2),
    }
    study_dir = write_study(tmp_path / "images", "42", specs)
    csv_path = tmp_path / "train_series_descriptions.csv"
    csv_path.write_text(
        "study_id,series_id,series_description\n42,100,Sagittal T1\n42,200,Sagittal T1\n7,1,Axial T2\n"
    )
    descriptions = read_series_descriptions(csv_path)
    assert descriptions == {"42": {"100": SAGITTAL_T1, "200": SAGITTAL_T1}, "7": {"1": AXIAL_T2}}
    study = read_study(study_dir, descriptions["42"])
    assert study.study_id == "42"
    assert study.series[SAGITTAL_T1].series_id == "200"  # 8 slices beat 5
    assert study.series[SAGITTAL_T2].series_id == "300"  # not in the CSV: from its header
    assert [s.series_id for s in study.extra] == ["100"]
    assert AXIAL_T2 not in study.series  # missing series: not an error


def test_descriptions_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("study_id,series\n1,2\n")
    with pytest.raises(DicomError, match=r"bad\.csv: missing column\(s\) series_description"):
        read_series_descriptions(bad)
    with pytest.raises(DicomError, match="nope.csv: cannot read"):
        read_series_descriptions(tmp_path / "nope.csv")


# --- bad input --------------------------------------------------------------------------------


def _one_series(tmp_path, **kwargs):
    paths, _ = write_series(tmp_path / "77" / "1", SeriesSpec(n_slices=4, **kwargs))
    return tmp_path / "77", paths


def _expect(study_dir, path, reason):
    with pytest.raises(DicomError) as info:
        read_study(study_dir)
    err = info.value
    assert err.path == path
    assert reason in err.reason
    assert str(err) == f"{path}: {err.reason}"


def _expect_dropped(study_dir, path, reason):
    """One bad file among good ones costs that file (warned, named relative to the study), not the
    study; the same file alone is refused in one line naming it."""
    study = read_study(study_dir)
    series = study.series[SAGITTAL_T2]
    assert path not in [s.path for s in series.slices] and len(series.slices) == 3
    assert series.issues == {"files_dropped"}
    (warning,) = [w for w in study.warnings if "unreadable" in w]
    assert warning.startswith(f"series 1: dropped unreadable file 1/{path.name} (") and reason in warning
    for other in path.parent.iterdir():
        if other != path:
            other.unlink()
    _expect(study_dir, path, reason)


def test_truncated_file(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    _expect_dropped(study_dir, paths[1], "truncated pixel data")


def test_truncated_compressed_file(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    rewrite(paths[2], paths[2], "rle")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 100])
    _expect_dropped(study_dir, paths[2], "truncated pixel data")


@pytest.mark.parametrize("syntax", ["explicit", "rle", "deflated"])
def test_any_truncation_is_a_dicom_error(tmp_path, syntax):
    """Cut one file at many points: always a DicomError naming it, never a crash or a pass."""
    _, paths = _one_series(tmp_path)
    rewrite(paths[0], paths[0], syntax)
    data = paths[0].read_bytes()
    allowed = ("truncated", "not a DICOM file", "empty file", "corrupt", "no pixel data")
    for cut in range(0, len(data), 37):
        paths[0].write_bytes(data[:cut])
        with pytest.raises(DicomError) as info:
            read_instance_header(paths[0])
        assert info.value.path == paths[0]
        # "no pixel data" only where the cut falls exactly between two elements
        assert info.value.reason.startswith(allowed), (cut, info.value.reason)


def test_non_dicom_file(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    paths[3].write_text("this is not DICOM\n" * 50)
    _expect_dropped(study_dir, paths[3], "not a DICOM file")


def test_instance_without_pixel_data(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(paths[0])
    _expect_dropped(study_dir, paths[0], "no pixel data")


def test_a_slice_of_another_size_is_dropped_with_a_warning(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns = 20, 24
    ds.PixelData = np.zeros((20, 24), "<u2").tobytes()
    ds.save_as(paths[2])
    study = read_study(study_dir)  # the odd slice is dropped, not the study
    assert paths[2] not in [s.path for s in study.series[SAGITTAL_T2].slices]
    assert len(study.series[SAGITTAL_T2].slices) == 3
    assert "series 1: dropped 1 slice(s) of 20x24 (the series' slices are 40x48)" in study.warnings


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows"]
)
def test_missing_geometry_tag(tmp_path, keyword):
    study_dir, paths = _one_series(tmp_path)
    ds = pydicom.dcmread(paths[1])
    delattr(ds, keyword)
    ds.save_as(paths[1])
    _expect_dropped(study_dir, paths[1], f"missing required tag {keyword}")


def test_empty_and_missing_study_folder(tmp_path):
    (tmp_path / "empty" / "1").mkdir(parents=True)
    _expect(tmp_path / "empty", tmp_path / "empty", "empty study folder")
    _expect(tmp_path / "nowhere", tmp_path / "nowhere", "study folder not found")


def test_undecodable_pixels_fail_at_load_time(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    rewrite(paths[1], paths[1], "jpeg2000_lossless")
    ds = pydicom.dcmread(paths[1])
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.save_as(paths[1])
    series = read_study(study_dir).series[SAGITTAL_T2]  # header is fine
    index = [s.path for s in series.slices].index(paths[1])
    with pytest.raises(DicomError, match="cannot decode pixel data") as info:
        series.load_pixels([index])
    assert info.value.path == paths[1]


def test_non_dicom_files_of_other_types_are_ignored(tmp_path):
    study_dir, paths = _one_series(tmp_path)
    (paths[0].parent / "notes.txt").write_text("hello")
    (paths[0].parent / ".DS_Store").write_bytes(b"\0\1")
    assert len(read_study(study_dir).series[SAGITTAL_T2].slices) == 4


def test_files_directly_in_study_folder_grouped_by_series_uid(tmp_path):
    write_series(tmp_path / "a", SeriesSpec("Sag T2", n_slices=3, series_number=4))
    write_series(tmp_path / "b", SeriesSpec("Sag T1", n_slices=3, series_number=5, seed=1))
    flat = tmp_path / "flat"
    flat.mkdir()
    for k, p in enumerate(sorted((tmp_path / "a").iterdir()) + sorted((tmp_path / "b").iterdir())):
        shutil.copy(p, flat / f"{k}.dcm")
    study = read_study(flat)
    assert study.series[SAGITTAL_T2].series_id == "4"
    assert study.series[SAGITTAL_T1].series_id == "5"
