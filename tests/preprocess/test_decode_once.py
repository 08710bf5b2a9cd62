"""A study's slices are decoded once: the spine finder's coarse pass, its canal trace and the views
share the decoded slices of the reference series (`Series.keeping_decoded`), with the same views."""

from __future__ import annotations

import collections
import contextlib

import numpy as np

from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom import reader
from lumbar_tf.dicom.reader import read_study
from lumbar_tf.preprocess import build_views

try:
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

CFG = PreprocessConfig(view_size=96)


def _views_and_decodes(study_dir, monkeypatch, keep: bool):
    decodes = collections.Counter()
    decode = reader.decode_stored

    def counting(header):
        decodes[header.path] += 1
        return decode(header)

    with monkeypatch.context() as patch:
        patch.setattr(reader, "decode_stored", counting)
        if not keep:
            patch.setattr(reader.Series, "keeping_decoded", lambda self: contextlib.nullcontext(self))
        study = read_study(study_dir)
        views, grid, instances, warnings = build_views(study, CFG)
    return views, (grid.center_yz, instances, warnings), decodes, study


def test_build_views_decodes_each_slice_once_with_the_same_views(tmp_path, monkeypatch):
    study_dir = factory.write_study(tmp_path)
    views, rest, decodes, study = _views_and_decodes(study_dir, monkeypatch, keep=True)
    plain_views, plain_rest, plain_decodes, _ = _views_and_decodes(study_dir, monkeypatch, keep=False)
    assert max(plain_decodes.values()) > 1  # without sharing, the views decode slices again
    assert set(decodes) == set(plain_decodes) and max(decodes.values()) == 1
    for name in views:
        np.testing.assert_array_equal(views[name], plain_views[name])
    np.testing.assert_array_equal(rest[0], plain_rest[0])
    assert rest[1:] == plain_rest[1:]
    # The decoded slices are let go once the views are built.
    assert all(series._kept is None for series in study.series.values())


def test_kept_slices_are_read_only_and_released(tmp_path):
    series = read_study(factory.write_study(tmp_path)).sagittal_series()[0]
    with series.keeping_decoded():
        ((first, _),) = series.load_stored([1])
        with series.keeping_decoded():  # nested: still the outer one's slices
            ((again, _),) = series.load_stored([1])
        assert again is first and not first.flags.writeable
    assert series._kept is None
    ((fresh, _),) = series.load_stored([1])
    assert fresh is not first and fresh.flags.writeable
    np.testing.assert_array_equal(fresh, first)
