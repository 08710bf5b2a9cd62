"""Index -> cache -> tf.data, and how bad studies are skipped."""

import csv
import shutil

import numpy as np
import pytest

from lumbar_tf.core import labels as L
from lumbar_tf.data.dataset import (
    DatasetError,
    grader_dataset,
    load_studies,
    localizer_dataset,
    prepare_cache,
    read_index,
    split_folds,
)


def test_index_reads_fine_grades_and_coordinates(phantom_dir):
    index = read_index(phantom_dir)
    assert len(index.study_ids) == 12 and not index.problems
    first = index.studies[index.study_ids[0]]
    assert first.grades.shape == (5, 5) and first.fine_grades
    assert {row["condition"] for row in first.coordinates} <= set(L.CONDITIONS)
    # train.csv and train_grades.csv agree where both are known.
    with open(phantom_dir / "train.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["study_id"] == first.study_id)
    for ci, c in enumerate(L.CONDITIONS):
        for li, lv in enumerate(L.LEVELS):
            assert L.grade_to_rsna(int(first.grades[ci, li])) == row[L.column_name(c, lv)]


def test_pipeline_batch_shapes_and_masks(phantom_cache, tiny_config):
    p = tiny_config.preprocess
    ids = load_studies(phantom_cache, p)["study_id"]
    x, y = next(iter(localizer_dataset(phantom_cache, p, ids, batch_size=4, training=True)))
    assert x.shape == (4, 64, 64, 3) and y.shape == (4, 5, 3)
    shown = y[..., :2].numpy()[y[..., 2].numpy() > 0.5]  # levels the augmentation kept in the view
    assert shown.size and float(np.min(shown)) > 0 and float(np.max(shown)) < 1

    inputs, y = next(iter(grader_dataset(phantom_cache, p, ids, batch_size=8, training=False)))
    assert set(inputs) == {"sag_t2", "sag_t1", "level_index"}
    assert inputs["sag_t2"].shape == (8, 32, 32, 3) and inputs["level_index"].shape == (8,)
    assert y.shape == (8, 5, 3, 2)
    targets, mask = y[..., 0].numpy(), y[..., 1].numpy()
    assert np.all(targets <= mask)  # nothing is a positive where it is unknown


def test_training_pipelines_run_without_the_autotune_thread(phantom_cache, tiny_config):
    """An autotuned iterator makes its deletion wait for the tuner's timer: seconds of idle per epoch
    (benchmarks/iterator_teardown.py); every pipeline Keras fits or validates on has it off."""
    p = tiny_config.preprocess
    ids = load_studies(phantom_cache, p)["study_id"]
    for training in (True, False):
        for ds in (
            localizer_dataset(phantom_cache, p, ids, batch_size=4, training=training),
            grader_dataset(phantom_cache, p, ids, batch_size=8, training=training),
        ):
            assert ds.options().autotune.enabled is False


def test_grader_labels_follow_the_encoding(phantom_cache, tiny_config):
    p = tiny_config.preprocess
    studies = load_studies(phantom_cache, p)
    sid = studies["study_id"][0]
    batches = list(grader_dataset(phantom_cache, p, [sid], batch_size=5, training=False))
    inputs, y = batches[0]
    grades = studies["grades"][0]
    targets, mask = L.encode_grades(grades.T)  # level-major like the grader's rows
    present = studies["level_present"][0] > 0.5
    np.testing.assert_array_equal(y[..., 0].numpy(), targets[present])
    np.testing.assert_array_equal(y[..., 1].numpy(), mask[present])
    np.testing.assert_array_equal(inputs["level_index"].numpy(), np.arange(5)[present])


def test_level_points_land_inside_views(phantom_cache, tiny_config):
    studies = load_studies(phantom_cache, tiny_config.preprocess)
    xy, present = studies["level_xy"], studies["level_present"]
    assert present.mean() > 0.95
    # Inside the view, on a grid placed by the spine finder (its error is a few cm: docs/architecture.md).
    assert np.all((xy[present > 0] > 0.02) & (xy[present > 0] < 0.98))
    # Levels run from head (top, small y) to sacrum (bottom).
    assert np.all(np.diff(xy[..., 1], axis=1) > 0)


def test_folds_are_seeded_and_by_study():
    ids = [str(i) for i in range(100, 140)]
    a, b = split_folds(ids, 5, seed=3), split_folds(list(reversed(ids)), 5, seed=3)
    assert a == b and sorted(set(a.values())) == [0, 1, 2, 3, 4]
    assert split_folds(ids, 5, seed=4) != a


def _damage(root, index):
    """Seven studies, seven different kinds of damage."""
    ids = index.study_ids
    images = root / "train_images"
    # Damage the Sagittal T2/STIR series: the views read it (an unused axial series is never opened).
    sag_t2 = {
        r["study_id"]: r["series_id"]
        for r in _read(root / "train_series_descriptions.csv")
        if r["series_description"] == "Sagittal T2/STIR"
    }
    series_of = {sid: [images / sid / sag_t2[sid]] for sid in ids}
    # 0: every sagittal file truncated (one bad file costs only that file: 1)
    sagittal = {
        r["series_id"]
        for r in _read(root / "train_series_descriptions.csv")
        if r["study_id"] == ids[0] and r["series_description"].startswith("Sagittal")
    }
    for victim in sorted(p for sid in sagittal for p in (images / ids[0] / sid).glob("*.dcm")):
        victim.write_bytes(victim.read_bytes()[:300])
    # 1: a non-DICOM file among the slices: dropped with a warning, the study prepared
    (series_of[ids[1]][0] / "99999.dcm").write_text("not a dicom file")
    # 2: a missing series (drop every sagittal T1)
    sag_t1 = {
        r["series_id"]
        for r in _read(root / "train_series_descriptions.csv")
        if r["series_description"] == "Sagittal T1" and r["study_id"] == ids[2]
    }
    shutil.rmtree(images / ids[2] / sag_t1.pop())
    # 3: unknown severity string, 4: unknown condition in the coordinates
    rows = _read(root / "train.csv")
    for r in rows:
        if r["study_id"] == ids[3]:
            r[L.LABEL_COLUMNS[0]] = "Sever"
    _write(root / "train.csv", rows)
    grade_rows = [r for r in _read(root / "train_grades.csv") if r["study_id"] != ids[3]]
    _write(root / "train_grades.csv", grade_rows)
    coords = _read(root / "train_label_coordinates.csv")
    for r in coords:
        if r["study_id"] == ids[4]:
            r["condition"] = "Spinal Stenosis Of Doom"
            break
    # 5: a study_id that would escape the images folder; 6: one that is not an integer
    coords.append({**coords[0], "study_id": "../../etc"})
    _write(root / "train_label_coordinates.csv", coords)
    rows = _read(root / "train.csv")
    rows.append({**rows[0], "study_id": "12ab"})
    _write(root / "train.csv", rows)
    return ids


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_bad_studies_are_skipped_and_reported(phantom_dir, tiny_config, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    ids = _damage(root, read_index(root))
    manifest = prepare_cache(root, tmp_path / "cache", tiny_config.preprocess, progress=False)
    skipped = manifest["skipped"]
    assert {ids[0], *ids[3:5]} <= set(skipped)
    assert set(manifest["study_ids"]) == {ids[1], ids[2], *ids[5:]}
    assert "Sever" in skipped[ids[3]] and "Spinal Stenosis Of Doom" in skipped[ids[4]]
    # A missing series degrades the study (zero view, warning), as at inference; it is not skipped.
    assert "no 'Sagittal T1' series; view sag_t1 is zeros" in manifest["warnings"][ids[2]]
    # So does a bad file among good ones: it is left out, named relative to the study.
    bad_file = "/99999.dcm (not a DICOM file"
    assert any(bad_file in w for w in manifest["warnings"][ids[1]]), manifest["warnings"][ids[1]]
    assert "12ab" in skipped and "../../etc" in skipped
    assert "not a plain integer" in skipped["../../etc"]
    assert str(root / "train_images" / ids[0]) in skipped[ids[0]]
    assert "more unreadable file(s)" in skipped[ids[0]]
    with open(tmp_path / "cache" / "skipped_studies.csv") as handle:
        reported = {r["study_id"]: r["reason"] for r in csv.DictReader(handle)}
    assert reported == skipped


def test_dataset_without_usable_labels_is_an_error(tmp_path):
    (tmp_path / "train_images").mkdir()
    with pytest.raises(DatasetError, match="no usable studies"):
        prepare_cache(tmp_path, tmp_path / "cache", read_index_cfg(), progress=False)


def read_index_cfg():
    from lumbar_tf.core.config import PreprocessConfig

    return PreprocessConfig(view_size=32, crop_size=16)


def test_series_the_views_do_not_use_are_never_opened(phantom_dir, tiny_config, tmp_path):
    """Preparing reads only the sagittal series: a broken axial file does not cost the study."""
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    sid = read_index(root).study_ids[0]
    axial = next(
        r["series_id"]
        for r in _read(root / "train_series_descriptions.csv")
        if r["study_id"] == sid and r["series_description"] == "Axial T2"
    )
    for path in (root / "train_images" / sid / axial).glob("*.dcm"):
        path.write_bytes(b"broken")
    manifest = prepare_cache(
        root, tmp_path / "cache", tiny_config.preprocess, progress=False, study_ids=[sid]
    )
    assert manifest["study_ids"] == [sid] and not manifest["skipped"]


def test_in_process_and_pool_give_the_same_cache(phantom_dir, phantom_cache, tiny_config, tmp_path):
    """workers=1 decodes in this process; the shared cache was made by a 2-process pool, whose
    workers hand the views over through files that are gone afterwards."""
    assert not (phantom_cache / ".handover").exists()
    cfg = tiny_config.preprocess
    manifest = prepare_cache(phantom_dir, tmp_path / "cache", cfg, workers=1, progress=False)
    serial, pooled = load_studies(tmp_path / "cache", cfg), load_studies(phantom_cache, cfg)
    assert serial["study_id"] == pooled["study_id"] == sorted(manifest["study_ids"], key=int)
    for name in cfg.view_names:
        np.testing.assert_array_equal(serial["views"][name], pooled["views"][name])
    for key in ("level_xy", "level_present", "grades"):
        np.testing.assert_array_equal(serial[key], pooled[key])
