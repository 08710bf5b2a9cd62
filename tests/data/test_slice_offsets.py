"""Channel offsets learned from the labelled instances (`data.slice_offsets`), resolved once by
`prepare_cache` and carried by the manifest and the trained model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from lumbar_tf import preprocess
from lumbar_tf.core.config import PreprocessConfig, config_to_dict
from lumbar_tf.core.errors import DatasetError
from lumbar_tf.data import dataset, slice_offsets
from lumbar_tf.data.dataset import load_manifest, manifest_preprocess, prepare_cache, read_index
from lumbar_tf.dicom.reader import read_study


def labels_config(cfg: PreprocessConfig) -> PreprocessConfig:
    return dataclasses.replace(cfg, views=[dataclasses.replace(v, offsets="labels") for v in cfg.views])


@pytest.fixture(scope="module")
def index(phantom_dir):
    return read_index(phantom_dir)


@pytest.fixture(scope="module")
def measured(index, tiny_config):
    """Every phantom study's labelled lateral distances, measured once (headers + spine finder)."""
    cfg = labels_config(tiny_config.preprocess)
    tasks = [
        (index.images_dir, index.studies[s], s, index.descriptions.get(s, {}), cfg) for s in index.study_ids
    ]
    return {sid: (sid, per, error) for sid, per, error in map(slice_offsets.study_offsets, tasks)}


def cached_mapper(measured, change=lambda per: per):
    return lambda _f, tasks: [(t[2], change(measured[t[2]][1]), measured[t[2]][2]) for t in tasks]


def _t1_hits(index, ids, cfg) -> float:
    """Share of labelled foraminal points whose sag_t1 side channel is the labelled instance."""
    hits = []
    for sid in ids:
        study = read_study(index.images_dir / sid, index.descriptions.get(sid))
        grid = preprocess.view_grid_for_study(study, cfg)
        t1 = study.series["Sagittal T1"]
        spec = cfg.views[1]
        chosen = preprocess.choose_slices(t1, spec.offsets_mm, grid.midline_xyz)
        channel = slice_offsets.side_channels(spec.offsets_mm)
        for row in index.studies[sid].coordinates:
            if "foraminal" in row["condition"] and row["series_id"] == t1.series_id:
                side = "left" if row["condition"].startswith("left") else "right"
                hits.append(t1.slices[chosen[channel[side]]].instance_number == row["instance_number"])
    return float(np.mean(hits))


def test_learned_offsets_put_the_t1_channel_on_the_labelled_instance(index, measured, tiny_config):
    """Learned on 8 phantom studies, scored on the 4 others: the foramen channel is the labelled
    instance for most points, more often than the fixed +-22 mm."""
    ids = index.study_ids
    cfg = labels_config(tiny_config.preprocess)
    learned, report = slice_offsets.resolve_offsets(
        index.images_dir, index.studies, index.descriptions, ids[:8], cfg, mapper=cached_mapper(measured)
    )
    t1 = learned.views[1]
    assert t1.offsets == "learned" and report["sag_t1"]["left"]["studies"] == 8
    left, mid, right = t1.offsets_mm
    assert 8.0 < left < 20.0 and mid == 0.0 and -20.0 < right < -8.0  # the phantom's foramina, ~15 mm
    assert learned.views[0].offsets == "learned" and 4.0 < learned.views[0].offsets_mm[0] < 12.0  # recesses
    fixed = _t1_hits(index, ids[8:], tiny_config.preprocess)
    ours = _t1_hits(index, ids[8:], learned)
    assert ours >= 0.7 and ours > fixed, (ours, fixed)


def test_too_few_or_swapped_labels_keep_the_configured_offsets(index, measured, tiny_config):
    cfg = labels_config(tiny_config.preprocess)
    with pytest.warns(UserWarning, match=r"need 10 in 3\); left channel kept at \+22 mm"):
        few, report = slice_offsets.resolve_offsets(
            index.images_dir, index.studies, index.descriptions, index.study_ids[:1], cfg,
            mapper=cached_mapper(measured),
        )  # fmt: skip
    assert few.views[1].offsets == "fixed" and few.views[1].offsets_mm == (22.0, 0.0, -22.0)
    assert report["sag_t1"]["fallback_mm"] == [22.0, 0.0, -22.0]

    def swap(per):
        return {view: {"left": sides["right"], "right": sides["left"]} for view, sides in per.items()}

    with pytest.warns(UserWarning, match="left and right swapped"):
        swapped, _ = slice_offsets.resolve_offsets(
            index.images_dir, index.studies, index.descriptions, index.study_ids, cfg,
            mapper=cached_mapper(measured, swap),
        )  # fmt: skip
    assert [v.offsets_mm for v in swapped.views] == [v.offsets_mm for v in cfg.views]
    # No labels at all (a test split): the same fallback, and no study is read.
    with pytest.warns(UserWarning, match="0 labelled"):
        none, _ = slice_offsets.resolve_offsets(index.images_dir, {}, {}, index.study_ids, cfg)
    assert all(v.offsets == "fixed" for v in none.views)


def test_prepare_resolves_once_and_the_manifest_carries_the_learned_offsets(
    phantom_dir, index, tiny_config, tmp_path, monkeypatch
):
    cfg = labels_config(tiny_config.preprocess)
    ids = index.study_ids[:3]
    seen = []
    build_views = dataset.build_views
    monkeypatch.setattr(dataset, "build_views", lambda study, c: seen.append(c) or build_views(study, c))
    manifest = prepare_cache(phantom_dir, tmp_path / "cache", cfg, workers=1, progress=False, study_ids=ids)
    resolved = manifest_preprocess(manifest)
    assert [v.offsets for v in resolved.views] == ["learned", "learned"]
    assert resolved.views[1].offsets_mm != cfg.views[1].offsets_mm
    assert seen == [resolved] * 3  # every view built with the learned numbers, none with the fallback
    report = manifest["slice_offsets"]["sag_t1"]
    assert report["studies_sampled"] == 3 and report["left"]["points"] >= 10
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["preprocess"] == config_to_dict(
        resolved
    )
    # The labels config and the resolved one both accept the cache; other settings do not.
    load_manifest(tmp_path / "cache", cfg)
    load_manifest(tmp_path / "cache", resolved)
    other_fallback = dataclasses.replace(
        cfg, views=[cfg.views[0], dataclasses.replace(cfg.views[1], offsets_mm=(18.0, 0.0, -18.0))]
    )
    for refused in (tiny_config.preprocess, other_fallback, dataclasses.replace(cfg, crop_mm=50.0)):
        with pytest.raises(DatasetError, match="other preprocessing"):
            load_manifest(tmp_path / "cache", refused)


def test_accepts_only_labels_views_resolved_from_the_same_fallback(tiny_config):
    cfg = labels_config(tiny_config.preprocess)
    stored = config_to_dict(cfg)
    stored["views"][1].update(offsets="learned", offsets_mm=[15.0, 0.0, -14.5])
    report = {"sag_t1": {"fallback_mm": [22.0, 0.0, -22.0]}}
    assert not slice_offsets.accepts(stored, cfg, {})  # learned, but the report does not say from what
    stored["views"][0].update(offsets="learned", offsets_mm=[9.0, 0.0, -8.5])
    report["sag_t2"] = {"fallback_mm": [12.0, 0.0, -12.0]}
    assert slice_offsets.accepts(stored, cfg, report)
    renamed = dict(stored, views=[dict(stored["views"][0], name="other"), stored["views"][1]])
    assert not slice_offsets.accepts(renamed, cfg, report)


@pytest.mark.slow
def test_the_trained_model_carries_the_learned_offsets(phantom_dir, tmp_path):
    """train -> model.keras and the run's config hold the cache's learned offsets, so every runtime
    (here the Keras predictor) builds its views with them."""
    import yaml

    from lumbar_tf.core.config import load_config
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.training.train import train
    from tests.conftest import TINY_OVERRIDES

    config = tmp_path / "labels.yaml"
    views = [config_to_dict(v) | {"offsets": "labels"} for v in PreprocessConfig().views]
    config.write_text(yaml.safe_dump({"preprocess": {"views": views}}))
    run = train(phantom_dir, tmp_path / "run", config_path=config, overrides=TINY_OVERRIDES)
    manifest = load_manifest(run / "cache")
    resolved = manifest_preprocess(manifest)
    assert [v.offsets for v in resolved.views] == ["learned", "learned"]
    assert load_config(run / "config.yaml").preprocess == resolved
    assert load_predictor(run / "model.keras").preprocess == resolved
