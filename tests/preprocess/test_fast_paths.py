"""The preparation's fast paths give what the plain code gives (benchmarks/README.md, issue 10).

A study's slices are decoded once: the spine finder's coarse pass, its canal trace and the views
share the decoded slices of the reference series (`Series.keeping_decoded`), with the same views.
The spine finder's column trace and the normalisation's histogram equal their plain numpy forms.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest

from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom import reader
from lumbar_tf.dicom.reader import read_study
from lumbar_tf.preprocess import _histogram, build_views, trace_column

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


def _plain_trace_column(strength, valid_rows, penalty=0.5):
    """`trace_column` as first written: argmax over the three stacked candidates per row."""
    rows = np.flatnonzero(valid_rows)
    h, w = strength.shape
    path = np.zeros(h, np.int64)
    if rows.size == 0:
        return path
    norm = strength / (np.percentile(strength[rows], 99) + 1e-6)
    idx = np.arange(w)
    score = norm[rows[0]].copy()
    back = np.zeros((rows.size, w), np.int64)
    for n, r in enumerate(rows[1:], start=1):
        cand = np.stack([np.r_[-np.inf, score[:-1]] - penalty, score, np.r_[score[1:], -np.inf] - penalty])
        k = np.argmax(cand, axis=0)
        score = cand[k, idx] + norm[r]
        back[n] = idx + (k - 1)
    col = int(np.argmax(score))
    for n in range(rows.size - 1, -1, -1):
        path[rows[n]] = col
        col = back[n, col]
    path[: rows[0]] = path[rows[0]]
    path[rows[-1] + 1 :] = path[rows[-1]]
    return path


@pytest.mark.parametrize("kind", ["ties", "float32", "float64"])
def test_trace_column_equals_the_argmax_form(kind):
    rng = np.random.default_rng(0)
    for _ in range(15):
        h, w = int(rng.integers(5, 120)), int(rng.integers(2, 80))
        if kind == "ties":
            strength = rng.integers(0, 3, (h, w)).astype(np.float32)  # ties everywhere
        else:
            strength = rng.random((h, w)).astype(kind)
        valid = rng.random(h) > 0.2
        for penalty in (0.0, 0.2, 0.5):
            np.testing.assert_array_equal(
                trace_column(strength, valid, penalty), _plain_trace_column(strength, valid, penalty)
            )


def test_histogram_equals_bincount():
    rng = np.random.default_rng(1)
    for dtype, top in [(np.uint8, 256), (np.uint16, 4096), (np.uint16, 65536), (np.uint16, 2)]:
        for shape in [(3, 40, 48), (1, 7, 5), (2, 1, 1), (6, 9)]:
            codes = rng.integers(0, top, shape).astype(dtype)
            np.testing.assert_array_equal(_histogram(codes), np.bincount(codes.ravel()))
    for value in (0, 65535):
        codes = np.full((2, 3, 3), value, np.uint16)
        np.testing.assert_array_equal(_histogram(codes), np.bincount(codes.ravel()))
