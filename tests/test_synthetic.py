"""Tests for the phantom generator: DICOM validity, RSNA CSV layout, geometry, determinism, leak-freedom."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage

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
    phi_values,
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
        assert sorted(r["series_description"] for r in rows) == sorted(SERIES_DESCRIPTIONS)
        for r in rows:
            assert 8 <= len(r["series_id"]) <= 10
            series_dir = dataset / "train_images" / r["study_id"] / r["series_id"]
            assert series_dir.is_dir()

    coords = read_csv(dataset / "train_label_coordinates.csv")
    assert list(coords[0]) == ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    expected_cells = {
        (s.study_id, CONDITION_TITLES[c], LEVEL_TITLES[lv])
        for s in studies
        for i, c in enumerate(CONDITIONS)
        for k, lv in enumerate(LEVELS)
        if s.known[i, k]
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
    assert len(list(out.glob("test_images/*/*/*.dcm"))) > 40
    with pytest.raises(ValueError):
        synthesize_dataset(tmp_path / "x", 1, split="valid")


# -------------------------------------------------------------------------------------------- DICOM


def test_files_are_valid_mr_dicom(dataset, studies):
    files = dicom_files(dataset)
    assert len(files) == sum(se.geometry.n for s in studies for se in s.series)
    frames, slopes = {}, set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for keyword in REQUIRED_TAGS:
            assert keyword in ds, keyword
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert uid.is_valid
        assert ds.Modality == "MR" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.SamplesPerPixel) == (16, 1) and ds.PixelRepresentation in (0, 1)
        assert path.stem == str(ds.InstanceNumber)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert pixels.dtype == (np.int16 if ds.PixelRepresentation else np.uint16)
        iop = [float(v) for v in ds.ImageOrientationPatient]
        if ds.SeriesDescription.startswith("Sagittal"):
            assert iop == [0, 1, 0, 0, 0, -1]
            assert 160 <= ds.Rows <= 224
        else:
            assert iop[:3] == [1, 0, 0] and abs(iop[3]) < 1e-9 and iop[4] > 0.7  # tilted about x only
            assert 128 <= ds.Rows <= 160
        assert 0.9 <= float(ds.PixelSpacing[0]) <= 1.4
        frames.setdefault(path.parts[-3], set()).add(ds.FrameOfReferenceUID)
        slopes.add(float(ds.RescaleSlope))
    assert all(len(uids) == 1 for uids in frames.values())  # one patient frame per study
    assert len(slopes) > 3  # rescale varies between series and studies
    for study in studies:
        t1, t2, axial = study.series
        assert 15 <= t1.geometry.n <= 21 and 15 <= t2.geometry.n <= 21 and axial.geometry.n == 15
        assert 3.0 <= t2.geometry.spacing <= 4.5


def test_fast_writer_matches_pydicom(studies):
    """The spliced per-instance bytes equal pydicom's own encoding of the full dataset."""
    study = studies[0]
    for se in study.series:
        template = synthetic._series_template(study, se, np.random.default_rng(0))
        k = se.geometry.n // 2
        fast = synthetic._SeriesWriter(study, se, template).instance_bytes(k)
        ds = copy.deepcopy(template)
        uid = synthetic._uid(study, "instance", se.series_id, int(se.instance_numbers[k]))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "LUMBAR_TF_SYNTH"
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = int(se.instance_numbers[k])
        ds.ImagePositionPatient = [synthetic._ds(v) for v in se.geometry.ipp[k]]
        ds.ImageOrientationPatient = [synthetic._ds(v) for v in se.geometry.iop[k]]
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


def test_geometry_conventions(studies):
    for study in studies:
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
        assert 9.0 <= phantom.recess_offset <= 15.0
        assert 18.0 <= phantom.foramen_offset <= 26.0
        # Every axial middle slice passes through its disc's canal centre.
        for k in range(len(LEVELS)):
            _, _, off_plane = axial.geometry.patient_to_pixel(3 * k + 1, canal[k])
            assert abs(off_plane) < 0.05


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    a = synthesize_dataset(tmp_path / "a", 2, seed=11)
    b = synthesize_dataset(tmp_path / "b", 2, seed=11)
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
    """On the midline T2 slice, the bright CSF column at a severe level is far narrower than at grade 0."""
    widths = {0: [], 3: []}
    for study, _ in iter_studies(24, seed=5):
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
            grade = study.grades[0, LEVELS.index(r[4].lower().replace("/", "_"))]
            if grade in widths:
                widths[grade].append(_csf_run_mm(image, r[5], r[6], 0.55 * csf, spacing))
    assert len(widths[3]) >= 2 and len(widths[0]) >= 10
    assert max(widths[3]) < 6.0 < 8.0 < min(widths[0])
    assert np.median(widths[3]) < 0.4 * np.median(widths[0])
