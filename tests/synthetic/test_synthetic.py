"""Tests for the phantom generator: DICOM validity, RSNA CSV layout, acquisitions like real scans,
geometry, determinism, leak-freedom, the Bayes limit of its grades."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEGLosslessSV1, MRImageStorage

from lumbar_tf.core.labels import (
    CONDITION_TITLES,
    CONDITIONS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    grade_to_rsna,
)
from lumbar_tf.synthetic import phantom as synthetic
from lumbar_tf.synthetic.phantom import (
    AXIAL_T2,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SERIES_DESCRIPTIONS,
    iter_studies,
    nearest_slice,
    phi_values,
    read_on,
    sample_grades,
    synthesize_dataset,
)

N_STUDIES, SEED = 4, 3
REQUIRED_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "SeriesDescription",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthesize_dataset(tmp_path_factory.mktemp("synth"), N_STUDIES, SEED)


@pytest.fixture(scope="module")
def studies():
    """The same studies in memory, with their ground-truth phantoms."""
    return [study for study, _ in iter_studies(N_STUDIES, SEED)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def dicom_files(root: Path) -> list[Path]:
    return sorted(root.glob("train_images/*/*/*.dcm"))


def pixel_to_patient(ds, col: float, row: float) -> np.ndarray:
    """Independent of the generator: P = IPP + col * dc * row_dir + row * dr * col_dir."""
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return np.array(ds.ImagePositionPatient, float) + col * dc * iop[:3] + row * dr * iop[3:]


# ------------------------------------------------------------------------------------------- layout


def test_layout_and_csvs(dataset, studies):
    names = {p.name for p in dataset.iterdir()}
    assert names == {
        "train_images",
        "train.csv",
        "train_grades.csv",
        "train_label_coordinates.csv",
        "train_series_descriptions.csv",
        "train_latent.csv",
    }
    labels = read_csv(dataset / "train.csv")
    grades = read_csv(dataset / "train_grades.csv")
    assert list(labels[0]) == ["study_id", *LABEL_COLUMNS] == list(grades[0])
    assert [int(r["study_id"]) for r in labels] == sorted(s.study_id for s in studies)
    for label_row, grade_row in zip(labels, grades, strict=True):
        assert label_row["study_id"] == grade_row["study_id"]
        assert 8 <= len(label_row["study_id"]) <= 10
        for column in LABEL_COLUMNS:
            fine = grade_row[column]
            assert fine in ("", "0", "1", "2", "3")
            assert label_row[column] == ("" if fine == "" else grade_to_rsna(int(fine)))

    by_id = {s.study_id: s for s in studies}
    for row in grades:  # the CSVs hold the grades the anatomy was drawn with, minus unknown cells
        study = by_id[int(row["study_id"])]
        expected = np.where(study.known, study.grades, -1).ravel()
        assert [int(row[c]) if row[c] else -1 for c in LABEL_COLUMNS] == expected.tolist()

    descriptions = read_csv(dataset / "train_series_descriptions.csv")
    assert list(descriptions[0]) == ["study_id", "series_id", "series_description"]
    for study in studies:
        rows = [r for r in descriptions if int(r["study_id"]) == study.study_id]
        assert sorted(r["series_description"] for r in rows) == sorted(se.description for se in study.series)
        assert {r["series_description"] for r in rows} <= set(SERIES_DESCRIPTIONS)
        for r in rows:
            assert 8 <= len(r["series_id"]) <= 10
            series_dir = dataset / "train_images" / r["study_id"] / r["series_id"]
            assert series_dir.is_dir()

    coords = read_csv(dataset / "train_label_coordinates.csv")
    assert list(coords[0]) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    expected_cells = {  # every known cell whose series the study holds
        (s.study_id, CONDITION_TITLES[c], LEVEL_TITLES[lv])
        for s in studies
        for i, c in enumerate(CONDITIONS)
        for k, lv in enumerate(LEVELS)
        if s.known[i, k] and read_on(c) in {se.description for se in s.series}
    }
    got_cells = {(int(r["study_id"]), r["condition"], r["level"]) for r in coords}
    assert got_cells == expected_cells and len(coords) == len(expected_cells)
    series_of = {(r["study_id"], r["series_id"]): r["series_description"] for r in descriptions}
    wanted = {
        "Spinal Canal Stenosis": SAGITTAL_T2,
        "Left Neural Foraminal Narrowing": SAGITTAL_T1,
        "Right Neural Foraminal Narrowing": SAGITTAL_T1,
        "Left Subarticular Stenosis": AXIAL_T2,
        "Right Subarticular Stenosis": AXIAL_T2,
    }
    for r in coords:
        assert series_of[(r["study_id"], r["series_id"])] == wanted[r["condition"]]
        path = dataset / "train_images" / r["study_id"] / r["series_id"] / f"{r['instance_number']}.dcm"
        assert path.is_file()
        assert np.isfinite([float(r["x"]), float(r["y"])]).all()


def test_test_split_layout(tmp_path):
    out = synthesize_dataset(tmp_path, 1, SEED, split="test", progress=True)
    assert {p.name for p in out.iterdir()} == {"test_images", "test_series_descriptions.csv"}
    test_ids = {int(r["study_id"]) for r in read_csv(out / "test_series_descriptions.csv")}
    train_ids = {s.study_id for s, _ in iter_studies(1, SEED)}
    assert not test_ids & train_ids  # the same seed never yields the same patients in both splits
    assert len(list(out.glob("test_images/*/*/*.dcm"))) > 20
    with pytest.raises(ValueError):
        synthesize_dataset(tmp_path / "x", 1, split="valid")


# -------------------------------------------------------------------------------------------- DICOM


def test_files_are_valid_mr_dicom(dataset, studies):
    files = dicom_files(dataset)
    assert len(files) == sum(se.geometry.n for s in studies for se in s.series)
    frames, slopes = {}, set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, JPEGLosslessSV1)
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in REQUIRED_TAGS:
            assert keyword in ds, keyword
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert uid.is_valid
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel) == (16, 12, 11, 1)
        assert path.stem == str(ds.InstanceNumber)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        if ds.PixelRepresentation:  # 12-bit values
            assert pixels.min() >= -2048 and pixels.max() <= 2047
        else:
            assert pixels.min() >= 0 and pixels.max() <= 4095
        iop = np.array(ds.ImageOrientationPatient, float)
        assert abs(np.linalg.norm(iop[:3]) - 1) < 1e-5 and abs(iop[:3] @ iop[3:]) < 1e-5
        normal = np.cross(iop[:3], iop[3:])
        if ds.SeriesDescription.startswith("Sagittal"):
            assert abs(normal[0]) > np.cos(np.radians(6))  # sagittal, rotated by a few degrees at most
        else:
            assert list(iop[:3]) == [1, 0, 0] and abs(iop[3]) < 1e-9 and iop[4] > 0.7  # tilted about x only
        assert min(ds.Rows, ds.Columns) >= 320 and max(ds.Rows, ds.Columns) <= 640
        assert 0.5 <= float(ds.PixelSpacing[0]) <= 0.9
        frames.setdefault(path.parts[-3], set()).add(ds.FrameOfReferenceUID)
        slopes.add(float(ds.RescaleSlope))
    assert all(len(uids) == 1 for uids in frames.values())  # one patient frame per study
    assert len(slopes) > 3  # rescale varies between series and studies


def _sagittal_plans(n: int = 300):
    """Geometry of `n` realistic sagittal series planned on phantoms (no rendering)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        phantom, _ = synthetic._place(synthetic._sample_phantom(rng, sample_grades(rng)), rng)
        out.append((phantom, synthetic._sagittal_realistic(rng, phantom)))
    return out


def test_sagittal_acquisitions_span_real_ranges():
    """Pixels 0.5-0.9 mm, matrices 320-640 (some not square, e.g. 540 x 384), fields 220-340 mm,
    13-25 slices (even counts too) 3-4.8 mm apart: the ranges of RSNA 2024 sagittal series."""
    plans = [g for _, g in _sagittal_plans()]
    ps = np.array([g.pixel_spacing[0] for g in plans])
    rows, cols = np.array([g.rows for g in plans]), np.array([g.cols for g in plans])
    counts, spacing = np.array([g.n for g in plans]), np.array([g.spacing for g in plans])
    assert ps.min() >= 0.5 and ps.max() <= 0.9
    assert cols.min() >= 320 and rows.max() <= 640
    assert (rows * ps).min() >= 220 and (rows * ps).max() <= 340 + 1e-6
    assert 0.1 < np.mean(rows != cols) < 0.4 and np.all(rows >= cols)  # some taller than wide
    big = np.mean(np.maximum(rows, cols) >= 512)
    assert np.mean(cols <= 384) > 0.75 and 0.05 < big < 0.25  # most 320-384, a share 512-640
    assert counts.min() >= 13 and counts.max() <= 25 and np.mean(counts % 2 == 0) > 0.2
    assert spacing.min() >= 3.0 and spacing.max() <= 4.8
    stack_offset = [abs(g.ipp[:, 0].mean() - p.x_mid) for p, g in _sagittal_plans(60)]
    assert 1.0 < np.median(stack_offset) < 6.0  # stacks sit a few mm off the midline
    rotated = [np.degrees(np.arccos(min(1.0, abs(g.iop[0, 1])))) for g in plans]
    assert 0.3 < np.mean(np.array(rotated) > 0.5) < 0.7 and max(rotated) < 6.0


def test_lumbar_spine_sits_from_centre_to_lower_half_under_thoracic_vertebrae():
    """The canal points' middle lies from the field centre to the lower half (RSNA 4003253: L1/L2 at
    row 228, L5/S1 at 484 of 512), every canal point inside; a low field shows T12 above L1, one of
    280 mm or more T10-T12."""
    low = []
    for phantom, g in _sagittal_plans(120):
        k = g.n // 2
        canal = np.array([phantom.landmark("spinal_canal_stenosis", lv) for lv in LEVELS])
        pix = np.array([g.patient_to_pixel(k, p)[:2] for p in canal])
        assert np.all(pix >= 0) and np.all(pix[:, 0] < g.cols) and np.all(pix[:, 1] < g.rows)
        fraction = 0.5 * (pix[:, 1].min() + pix[:, 1].max()) / g.rows  # 0 = top of the field
        assert 0.45 < fraction < 0.8
        if fraction > 0.65:
            low.append((phantom, g))
    assert len(low) > 10
    for phantom, g in low:
        names = [v[0] for v in synthetic._VERTEBRAE]
        tall = g.rows * g.pixel_spacing[0] >= 280
        for name in ("T10", "T11", "T12") if tall else ("T12",):
            j = names.index(name)
            centre = phantom.to_patient((phantom.centre[j], 0.0, 0.0))
            col, row, _ = g.patient_to_pixel(g.n // 2, centre)
            assert 0 <= row < g.rows and 0 <= col < g.cols, name


def test_thoracic_vertebrae_are_drawn():
    """The upper part of a sagittal T1 field shows the thoracic column: marrow at the centre of T11,
    brighter than the T11/T12 disc below it."""
    study, _ = next(iter_studies(1, seed=3))
    se = study.series_by_description(SAGITTAL_T1)
    phantom = study.phantom
    j = [v[0] for v in synthetic._VERTEBRAE].index("T11")
    centre = phantom.to_patient((phantom.centre[j], 0.0, 0.0))
    k = nearest_slice(se.geometry, centre)
    col, row, _ = se.geometry.patient_to_pixel(k, centre)
    image = se.pixels[k].astype(float)
    disc = phantom.to_patient((phantom.bottom[j] + 0.5 * phantom.disc_height[j], 0.0, 0.0))
    dcol, drow, _ = se.geometry.patient_to_pixel(k, disc)

    def mean_at(c, r):
        return image[int(r) - 1 : int(r) + 2, int(c) - 3 : int(c) + 4].mean()

    assert mean_at(col, row) > 1.3 * mean_at(dcol, drow)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLosslessSV1])
def test_fast_writer_matches_pydicom(studies, syntax):
    """The spliced per-instance bytes equal pydicom's own encoding of the full dataset, native or
    JPEG Lossless SV1 encapsulated."""
    study = studies[0]
    for se in study.series:
        se = dataclasses.replace(se, transfer_syntax=syntax, pixels=np.abs(se.pixels).astype(np.uint16))
        template = synthetic._series_template(study, se, np.random.default_rng(0))
        k = se.geometry.n // 2
        fast = synthetic._SeriesWriter(study, se, template).instance_bytes(k)
        ds = copy.deepcopy(template)
        uid = synthetic._uid(study, "instance", se.series_id, int(se.instance_numbers[k]))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "LUMBAR_TF_SYNTH"
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = int(se.instance_numbers[k])
        ds.ImagePositionPatient = [synthetic._ds(v) for v in se.geometry.ipp[k]]
        ds.ImageOrientationPatient = [synthetic._ds(v) for v in se.geometry.iop[k]]
        if syntax == JPEGLosslessSV1:
            ds.PixelData = encapsulate([synthetic._jpeg_lossless(se.pixels[k])], has_bot=False)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = se.pixels[k].tobytes()
            ds["PixelData"].VR = "OW"
        reference = io.BytesIO()
        pydicom.dcmwrite(reference, ds, enforce_file_format=True)
        assert fast == reference.getvalue()


def test_phi_values_are_in_headers(dataset, studies):
    study = studies[0]
    values = phi_values(study.study_id)
    assert f"PHI-{study.study_id}" in values and len(values) == len(synthetic.FAKE_PHI)
    for path in (dataset / "train_images" / str(study.study_id)).glob("*/*.dcm"):
        raw = path.read_bytes()
        for value in values:
            assert value.encode() in raw, value
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientID == f"PHI-{study.study_id}"
        assert str(ds.PatientName) == f"PHANTOM^PATIENT^S{study.study_id}"


# ----------------------------------------------------------------------------------------- geometry


def test_coordinates_map_onto_the_anatomy(dataset, studies):
    """Label pixel -> patient mm through the written IPP/IOP/PixelSpacing lands on the anatomical point."""
    by_id = {s.study_id: s for s in studies}
    rows = read_csv(dataset / "train_label_coordinates.csv")
    for r in rows:
        study = by_id[int(r["study_id"])]
        path = dataset / "train_images" / r["study_id"] / r["series_id"] / f"{r['instance_number']}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        col, row = float(r["x"]), float(r["y"])
        assert 0 <= col < ds.Columns and 0 <= row < ds.Rows
        point = pixel_to_patient(ds, col, row)
        condition = CONDITIONS[list(CONDITION_TITLES.values()).index(r["condition"])]
        level = LEVELS[list(LEVEL_TITLES.values()).index(r["level"])]
        truth = study.phantom.landmark(condition, level)
        iop = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        offset = truth - point
        in_plane = offset - (offset @ normal) * normal
        assert np.linalg.norm(in_plane) < min(float(v) for v in ds.PixelSpacing)  # within 1 px
        assert abs(offset @ normal) <= float(ds.SpacingBetweenSlices) / 2 + 0.01  # the nearest slice


def test_centred_acquisition_conventions():
    """The "centred" acquisition (the pipeline's assumptions): fields within 15 mm of the spine, stacks
    on the midline, one series of each description, native pixels."""
    studies = [study for study, _ in iter_studies(2, SEED, acquisition="centred")]
    for study in studies:
        assert [se.description for se in study.series] == list(SERIES_DESCRIPTIONS)
        assert all(se.transfer_syntax == ExplicitVRLittleEndian for se in study.series)
        phantom = study.phantom
        t1, t2, axial = study.series
        canal = np.array([phantom.landmark("spinal_canal_stenosis", lv) for lv in LEVELS])
        for se in (t1, t2):
            g = se.geometry
            assert abs(g.ipp[:, 0].mean() - phantom.x_mid) <= 2.0  # midline near the stack centre
            fov = g.ipp[0] + (g.cols - 1) / 2 * g.pixel_spacing[1] * g.iop[0, :3]
            fov = fov + (g.rows - 1) / 2 * g.pixel_spacing[0] * g.iop[0, 3:]
            spine = 0.5 * (canal.min(axis=0) + canal.max(axis=0))
            assert np.all(np.abs(fov[1:] - spine[1:]) <= 15.0 + 1e-6)
            if se is t2:  # a 200 mm square about the T2 FOV centre holds every level with margin
                assert np.all(np.abs(canal[:, 1:] - fov[1:]) < 100.0 - 5.0)
        assert 7.5 <= phantom.recess_offset <= 9.5
        assert 13.0 <= phantom.foramen_offset <= 16.5
        # Every axial middle slice passes through its disc's canal centre.
        for k in range(len(LEVELS)):
            _, _, off_plane = axial.geometry.patient_to_pixel(3 * k + 1, canal[k])
            assert abs(off_plane) < 0.05


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    a = synthesize_dataset(tmp_path / "a", 2, seed=11, workers=1)
    b = synthesize_dataset(tmp_path / "b", 2, seed=11, workers=2)  # a pool writes the same bytes
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = synthesize_dataset(tmp_path / "c", 2, seed=12)
    assert (c / "train.csv").read_bytes() != (a / "train.csv").read_bytes()


# ------------------------------------------------------------------------------------------ grades


def test_grade_prevalence_is_clinical():
    draws = [sample_grades(np.random.default_rng(i)) for i in range(60)]
    grades = np.stack([d.grades for d in draws])  # [study, condition, level]
    shares = np.bincount(grades.ravel(), minlength=4) / grades.size
    assert shares[0] + shares[1] > 0.7
    assert 0.10 <= shares[2] <= 0.20
    assert 0.03 <= shares[3] <= 0.10
    # Tighter, and the structure, on more draws.
    draws = [sample_grades(np.random.default_rng(i)) for i in range(2000)]
    grades = np.stack([d.grades for d in draws])
    shares = np.bincount(grades.ravel(), minlength=4) / grades.size
    assert 0.12 <= shares[2] <= 0.18 and 0.05 <= shares[3] <= 0.08
    severe_or_moderate = (grades >= 2).mean(axis=(0, 1))  # per level
    assert severe_or_moderate[3:].min() > 2 * severe_or_moderate[0]  # L4/L5, L5/S1 more affected
    left, right = grades[:, 1].ravel(), grades[:, 2].ravel()  # foramina at one level correlate
    assert np.corrcoef(left, right)[0, 1] > 0.2
    unknown = 1 - np.stack([d.known for d in draws]).mean()
    assert 0.01 <= unknown <= 0.03


# sha256 of the canal and foraminal grades, known mask, their latents and the disc degeneration of
# seeds 0-199 as drawn before the subarticular cells got their own factor (commit 929e37e): that change
# must leave every other label of a seed as it was.
_NON_SUBARTICULAR_DIGEST = "3226d83bf3007f4fdf7d6286e2c97f70fc1d18445ca47988911586e2076b3436"


def test_subarticular_own_factor_leaves_every_other_draw_unchanged():
    import hashlib

    h = hashlib.sha256()
    for i in range(200):
        d = sample_grades(np.random.default_rng(i))
        h.update(d.grades[:3].tobytes())
        h.update(d.known.tobytes())
        h.update(np.round(d.latent[:3], 9).tobytes())
        h.update(np.round(d.degeneration, 9).tobytes())
    assert h.hexdigest() == _NON_SUBARTICULAR_DIGEST


def test_subarticular_grades_keep_their_share_but_correlate_less():
    """Grade shares as the canal's calibration gave them; correlation with the canal and the same-side
    foramen ~0.45 (it was ~0.65 / ~0.72 with fully shared factors), so the sagittal series cannot
    stand in for the recess."""
    draws = [sample_grades(np.random.default_rng(i)) for i in range(4000)]
    grades = np.stack([d.grades for d in draws])
    latent = np.stack([d.latent for d in draws])
    shares = np.bincount(grades[:, 3:].ravel(), minlength=4) / grades[:, 3:].size
    np.testing.assert_allclose(shares, [0.446, 0.325, 0.155, 0.075], atol=0.012)
    np.testing.assert_allclose(latent[:, 3:].std(axis=0), 0.986, rtol=0.04)  # per cell, as before
    for sub, foramen in ((3, 1), (4, 2)):
        canal = np.corrcoef(grades[:, sub].ravel(), grades[:, 0].ravel())[0, 1]
        side = np.corrcoef(grades[:, sub].ravel(), grades[:, foramen].ravel())[0, 1]
        assert 0.38 < canal < 0.5 and 0.4 < side < 0.53, (sub, canal, side)
    # Left and right recess of one study still differ: their own factors are independent.
    assert np.corrcoef(latent[:, 3].ravel(), latent[:, 4].ravel())[0, 1] < 0.5


def test_written_grades_come_from_sample_grades(dataset):
    """synthesize_study draws the grades first, so sample_grades reproduces them without rendering."""
    rows = {int(r["study_id"]): r for r in read_csv(dataset / "train_grades.csv")}
    plan = synthetic._plan(N_STUDIES, SEED, "train")
    assert sorted(rows) == sorted(study_id for study_id, _, _ in plan)
    for study_id, _, seed_sequence in plan:
        draw = sample_grades(np.random.default_rng(seed_sequence))
        written = [int(rows[study_id][c]) if rows[study_id][c] else -1 for c in LABEL_COLUMNS]
        assert written == np.where(draw.known, draw.grades, -1).ravel().tolist()


# ----------------------------------------------------------------------------------------- leakage


def test_file_order_and_instance_numbers_do_not_reveal_slice_order(studies, tmp_path, monkeypatch):
    monotone = 0
    for study in studies:
        for se in study.series:
            position = se.geometry.ipp @ np.cross(se.geometry.iop[0, :3], se.geometry.iop[0, 3:])
            numbers = se.instance_numbers[np.argsort(position)]
            assert sorted(numbers) == list(range(numbers.min(), numbers.min() + len(numbers)))
            monotone += bool(np.all(np.diff(numbers) > 0) or np.all(np.diff(numbers) < 0))
    assert monotone == 0
    assert len({int(se.instance_numbers.min()) for s in studies for se in s.series}) > 1

    written = []
    original = Path.write_bytes

    def record(self, data):
        written.append(self)
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", record)
    study, rng = next(iter_studies(1, SEED))
    synthetic.write_study(study, tmp_path, rng)
    assert len(written) == sum(se.geometry.n for se in study.series)
    order_of = {se.series_id: i for i, se in enumerate(study.series)}
    series_sequence = [order_of[int(p.parent.name)] for p in written]
    assert series_sequence != sorted(series_sequence)  # series interleaved
    for se in study.series:
        mine = [int(p.stem) for p in written if int(p.parent.name) == se.series_id]
        assert mine != sorted(mine) and mine != sorted(mine, reverse=True)


def test_grades_do_not_touch_headers(dataset):
    """Series-level tags do not depend on the grades: same tags across studies with different grades."""
    seen = {}
    for path in dicom_files(dataset):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        keys = tuple(sorted(e.keyword for e in ds if e.keyword))
        seen.setdefault(ds.SeriesDescription, set()).add(keys)
    for description, key_sets in seen.items():
        contrast_tags = {"InversionTime"}  # STIR series add one tag, independent of grades
        stripped = {tuple(k for k in keys if k not in contrast_tags) for keys in key_sets}
        assert len(stripped) == 1, description


# ---------------------------------------------------------------------------------------- anatomy


def _csf_run_mm(image: np.ndarray, col: float, row: float, threshold: float, spacing: float) -> float:
    """Length (mm) of the above-threshold run along the image row through (col, row)."""
    line = image[int(round(row))] > threshold
    c = int(round(col))
    if not line[c]:
        return 0.0
    lo, hi = c, c
    while lo > 0 and line[lo - 1]:
        lo -= 1
    while hi < len(line) - 1 and line[hi + 1]:
        hi += 1
    return (hi - lo + 1) * spacing


def test_severe_canal_stenosis_narrows_the_csf_column():
    """On the midline T2 slice, the bright CSF column at a severe level is far narrower than at grade 0
    (grades of the anatomy: the latent severity, cut without the reader's noise)."""
    widths = {0: [], 3: []}
    for study, _ in iter_studies(24, seed=5, acquisition="centred"):
        t2 = study.series_by_description(SAGITTAL_T2)
        rows = [r for r in study.coordinates if r[3] == "Spinal Canal Stenosis"]
        if not rows:
            continue
        k = int(np.flatnonzero(t2.instance_numbers == rows[0][2])[0])
        image = t2.pixels[k] * t2.slope + t2.intercept
        spacing = t2.geometry.pixel_spacing[1]
        xs, ys = [r[5] for r in rows], [r[6] for r in rows]
        column = image[
            int(min(ys)) : int(max(ys)) + 1, int(min(xs) - 10 / spacing) : int(max(xs) + 10 / spacing)
        ]
        csf = np.percentile(column, 99)  # CSF is the brightest tissue on T2 and STIR
        for r in rows:
            grade = int(
                np.digitize(
                    study.latent[0, LEVELS.index(r[4].lower().replace("/", "_"))], synthetic.GRADE_CUTS
                )
            )
            if grade in widths:
                widths[grade].append(_csf_run_mm(image, r[5], r[6], 0.55 * csf, spacing))
    assert len(widths[3]) >= 2 and len(widths[0]) >= 10
    assert max(widths[3]) < 6.0 < 8.0 < min(widths[0])
    assert np.median(widths[3]) < 0.4 * np.median(widths[0])


# ------------------------------------------------------------------------------ real acquisitions


def _forced(tmp_path, monkeypatch, n: int = 2, **shares) -> tuple[Path, list]:
    """`n` realistic studies written in-process with some acquisition shares forced (e.g. every study
    with a repeat series); returns the folder and the studies in memory."""
    for name, value in shares.items():
        monkeypatch.setattr(synthetic, name, value)
    out = synthesize_dataset(tmp_path / "data", n, SEED, workers=1)
    return out, [study for study, _ in iter_studies(n, SEED)]


def _coordinates_by_series(root: Path) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in read_csv(root / "train_label_coordinates.csv"):
        out.setdefault((r["study_id"], r["series_id"]), set()).add(r["condition"])
    return out


def test_repeat_series_carry_the_labels_on_the_named_one(tmp_path, monkeypatch):
    root, studies = _forced(tmp_path, monkeypatch, REPEAT_SHARE=1.0, MISSING_SHARE=0.0)
    labelled = _coordinates_by_series(root)
    for study in studies:
        descriptions = [se.description for se in study.series]
        (repeated,) = [d for d in set(descriptions) if descriptions.count(d) == 2]
        pair = [se for se in study.series if se.description == repeated]
        named = [se for se in pair if (str(study.study_id), str(se.series_id)) in labelled]
        assert len(named) == 1 and named[0].labelled and named[0] is study.series_by_description(repeated)
        conditions = labelled[(str(study.study_id), str(named[0].series_id))]
        assert {read_on(CONDITIONS[list(CONDITION_TITLES.values()).index(c)]) for c in conditions} == {
            repeated
        }
        for se in pair:  # both are written, with their own geometry
            assert (
                len(list((root / "train_images" / str(study.study_id) / str(se.series_id)).glob("*.dcm")))
                == se.geometry.n
            )
        assert pair[0].geometry.ipp.shape != pair[1].geometry.ipp.shape or not np.allclose(
            pair[0].geometry.ipp, pair[1].geometry.ipp
        )
    repeated_rows = [r for r in read_csv(root / "train_series_descriptions.csv")]
    assert len(repeated_rows) == sum(len(s.series) for s in studies) == 4 * len(studies)


def test_missing_series_drop_only_their_coordinates(tmp_path, monkeypatch):
    root, studies = _forced(tmp_path, monkeypatch, REPEAT_SHARE=0.0, MISSING_SHARE=1.0)
    grades = {int(r["study_id"]): r for r in read_csv(root / "train_grades.csv")}
    coords = read_csv(root / "train_label_coordinates.csv")
    for study in studies:
        held = {se.description for se in study.series}
        assert len(study.series) == 2 and len(held) == 2
        (missing,) = set(SERIES_DESCRIPTIONS) - held
        mine = [r for r in coords if int(r["study_id"]) == study.study_id]
        lost = [c for c in CONDITIONS if read_on(c) == missing]
        assert mine and not any(r["condition"] in {CONDITION_TITLES[c] for c in lost} for r in mine)
        column = f"{lost[0]}_{LEVELS[0]}"
        assert grades[study.study_id][column] != "" or not study.known[CONDITIONS.index(lost[0]), 0]


def test_foraminal_instances_lie_on_the_labelled_side(dataset, studies):
    """Left foramina (patient +x) are labelled on a Sagittal T1 slice 2-5 slices left of the midline
    slice, right ones as far right: the instance that shows them (RSNA 4003253: instances 4-6 and
    11-12 of 15)."""
    by_id = {s.study_id: s for s in studies}
    seen = {"Left": 0, "Right": 0}
    for r in read_csv(dataset / "train_label_coordinates.csv"):
        if "Foraminal" not in r["condition"]:
            continue
        study = by_id[int(r["study_id"])]
        se = next(s for s in study.series if s.series_id == int(r["series_id"]))
        assert se.description == SAGITTAL_T1 and se.labelled
        k = int(np.flatnonzero(se.instance_numbers == int(r["instance_number"]))[0])
        point = se.geometry.ipp[k] + float(r["x"]) * se.geometry.pixel_spacing[1] * se.geometry.iop[k, :3]
        point = point + float(r["y"]) * se.geometry.pixel_spacing[0] * se.geometry.iop[k, 3:]
        lateral = point[0] - study.phantom.x_mid
        level = LEVELS[list(LEVEL_TITLES.values()).index(r["level"])]
        midline = nearest_slice(se.geometry, study.phantom.landmark("spinal_canal_stenosis", level))
        side = r["condition"].split()[0]
        seen[side] += 1
        across = (se.geometry.ipp[k] - se.geometry.ipp[midline]) @ np.cross(*se.geometry.iop[0].reshape(2, 3))
        slices = abs(k - midline)
        if side == "Left":
            assert 10.5 < lateral < 19.5 and -across > 0  # +x; the slice normal points to -x
        else:
            assert -19.5 < lateral < -10.5 and across > 0
        assert 2 <= slices <= 6
    assert seen["Left"] and seen["Right"]


def test_subarticular_points_are_on_the_axial_series(dataset, studies):
    by_id = {s.study_id: s for s in studies}
    rows = [r for r in read_csv(dataset / "train_label_coordinates.csv") if "Subarticular" in r["condition"]]
    assert rows
    for r in rows:
        study = by_id[int(r["study_id"])]
        se = next(s for s in study.series if s.series_id == int(r["series_id"]))
        assert se.description == AXIAL_T2
        condition = CONDITIONS[list(CONDITION_TITLES.values()).index(r["condition"])]
        level = LEVELS[list(LEVEL_TITLES.values()).index(r["level"])]
        k = int(np.flatnonzero(se.instance_numbers == int(r["instance_number"]))[0])
        _, _, off_plane = se.geometry.patient_to_pixel(k, study.phantom.landmark(condition, level))
        assert abs(off_plane) <= se.geometry.spacing / 2 + 0.01
        # The slice belongs to that level's stack: nearer that disc's canal point than any other level's.
        canal = [study.phantom.landmark("spinal_canal_stenosis", lv) for lv in LEVELS]
        distance = [abs(se.geometry.patient_to_pixel(k, p)[2]) for p in canal]
        assert int(np.argmin(distance)) == LEVELS.index(level)


def test_jpeg_lossless_studies_read_back_exactly(tmp_path, monkeypatch):
    """Files of a JPEG Lossless SV1 study decode, through `read_study`, to the values rendered."""
    from lumbar_tf.dicom.reader import read_study

    root, studies = _forced(tmp_path, monkeypatch, n=1, JPEG_LOSSLESS_SHARE=1.0)
    study = studies[0]
    folder = root / "train_images" / str(study.study_id)
    for path in folder.glob("*/*.dcm"):
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    read = read_study(folder)
    for se in study.series:
        if not se.labelled:
            continue
        series = read.series_by_description(se.description)
        assert series is not None and series.series_id == str(se.series_id)
        got = series.load_pixels(range(len(series.slices)))
        order = np.argsort([series.index_of_instance(int(n)) for n in se.instance_numbers])
        want = se.pixels[order].astype(np.float32) * np.float32(se.slope) + np.float32(se.intercept)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-2)


# ------------------------------------------------------------------------------------- Bayes limit


def test_latent_file_holds_every_cell_and_the_noise_model(dataset, studies):
    latent, noise = synthetic.read_latent(dataset / synthetic.LATENT_FILE)
    assert noise == {"sd": synthetic.READER_NOISE_SD, "cuts": synthetic.GRADE_CUTS}
    for study in studies:
        np.testing.assert_allclose(latent[str(study.study_id)], study.latent, atol=1e-5)


def test_bayes_predictor_is_calibrated_to_the_generator():
    """Grades drawn by the generator occur as often as the Bayes predictor says, per threshold and
    probability decile, and the predictor beats the constant prior by far."""
    from lumbar_tf.core.labels import encode_grades
    from lumbar_tf.training.metrics import (
        bayes_optimal_threshold_probs,
        compute_metrics,
        prior_threshold_probs_from_grades,
    )

    draws = [sample_grades(np.random.default_rng(i)) for i in range(3000)]
    grades = np.stack([d.grades for d in draws])
    noise = {"sd": synthetic.READER_NOISE_SD, "cuts": synthetic.GRADE_CUTS}
    probs = bayes_optimal_threshold_probs(np.stack([d.latent for d in draws]), noise)
    assert probs.shape == (*grades.shape, 3) and np.all(np.diff(probs, axis=-1) <= 0)
    targets, _ = encode_grades(grades)
    for t in range(3):
        p, y = probs[..., t].ravel(), targets[..., t].ravel()
        bins = np.digitize(p, np.linspace(0.1, 0.9, 9))
        for b in np.unique(bins):
            inside = bins == b
            if inside.sum() > 500:  # within 3 binomial standard errors (+0.01 for the bin's width)
                mean = p[inside].mean()
                allowed = 0.01 + 3.0 * np.sqrt(mean * (1.0 - mean) / inside.sum())
                assert abs(mean - y[inside].mean()) < allowed, (t, b)
    scores = compute_metrics(probs[:300], grades[:300], prior_threshold_probs_from_grades(grades))
    assert scores["rsna_log_loss"]["total"] < 0.7 * scores["prior_rsna_log_loss"]["total"]
    assert scores["macro_roc_auc"] > 0.9


def test_evaluate_reports_the_bayes_limit_of_a_phantom_folder(dataset, studies, tmp_path):
    """On a handful of rendered studies the Bayes predictor beats the prior; a folder without the
    latent file has no limit."""
    from lumbar_tf.core.labels import rsna_submission_triple
    from lumbar_tf.training.evaluate import bayes_limit, format_metrics_table
    from lumbar_tf.training.metrics import prior_threshold_probs_from_grades, rsna_log_loss

    ids = [str(s.study_id) for s in studies]
    grades = np.stack([np.where(s.known, s.grades, -1) for s in studies])
    limit = bayes_limit(dataset, ids, grades)
    prior = np.broadcast_to(prior_threshold_probs_from_grades(grades), (*grades.shape, 3))
    assert limit["n_studies"] == len(studies)
    assert limit["rsna_log_loss"] < rsna_log_loss(rsna_submission_triple(prior), grades)["total"]
    assert bayes_limit(tmp_path, ids, grades) is None
    metrics = {
        "n_studies": 4,
        "macro_roc_auc": 0.5,
        "mean_average_precision": 0.5,
        "accuracy": 0.5,
        "balanced_accuracy": 0.5,
        "rsna_log_loss": {"total": 1.0},
        "prior_rsna_log_loss": {"total": 1.1},
        "per_condition_roc_auc": {},
        "per_condition_f1": {},
        "quadratic_weighted_kappa": {},
        "bayes_limit": limit,
    }
    assert f"{limit['rsna_log_loss']:.3f} / " in format_metrics_table(metrics)
