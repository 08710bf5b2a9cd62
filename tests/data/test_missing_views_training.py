"""A training study lacking a series is cached with that view degraded, as inference treats it."""

from __future__ import annotations

import csv
import shutil

import numpy as np

from lumbar_tf.data.dataset import load_studies, prepare_cache, read_index
from lumbar_tf.dicom.reader import read_study
from lumbar_tf.preprocess import build_views


def _series_id(root, study_id: str, description: str) -> str:
    with open(root / "train_series_descriptions.csv", newline="") as handle:
        return next(
            r["series_id"]
            for r in csv.DictReader(handle)
            if r["study_id"] == study_id and r["series_description"] == description
        )


def test_a_study_without_sagittal_t2_is_cached_with_its_labels(phantom_dir, tiny_config, tmp_path):
    root = tmp_path / "data"
    index = read_index(phantom_dir)
    lacking, whole = index.study_ids[:2]
    (root / "train_images").mkdir(parents=True)
    for name in (
        "train.csv",
        "train_grades.csv",
        "train_label_coordinates.csv",
        "train_series_descriptions.csv",
    ):
        shutil.copy(phantom_dir / name, root / name)
    for sid in (lacking, whole):
        shutil.copytree(phantom_dir / "train_images" / sid, root / "train_images" / sid)
    shutil.rmtree(root / "train_images" / lacking / _series_id(root, lacking, "Sagittal T2/STIR"))
    cfg = tiny_config.preprocess

    manifest = prepare_cache(
        root, tmp_path / "cache", cfg, workers=1, progress=False, study_ids=[lacking, whole]
    )
    assert manifest["study_ids"] == [lacking, whole] and not manifest["skipped"]
    t1 = _series_id(root, lacking, "Sagittal T1")
    assert (
        f"no 'Sagittal T2/STIR' series; view sag_t2 built from 'Sagittal T1' series {t1}"
        in (manifest["warnings"][lacking])
    )
    cached = load_studies(tmp_path / "cache", cfg, [lacking])
    # Labels kept: every grade, and the level centres from the foraminal points on Sagittal T1.
    np.testing.assert_array_equal(cached["grades"][0], index.studies[lacking].grades)
    assert cached["level_present"][0].tolist() == [1.0] * 5
    # The localiser's view is the T1 midline, exactly what inference builds for this study.
    views, _, _, _ = build_views(read_study(root / "train_images" / lacking), cfg)
    for name in cfg.view_names:
        np.testing.assert_array_equal(cached["views"][name][0], views[name])
    assert cached["views"]["sag_t2"][0].any()
