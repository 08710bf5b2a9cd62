"""The spine finder on realistic phantom acquisitions (the default `synth` geometry), and the split of
held-out metrics by where the spine sits in the field.

Three studies of fixed seeds, chosen for their Sagittal T2 geometry (`_STUDIES`): lumbar spine in the
lower half of a 330 mm field; a non-square matrix with an even slice count and the spine low; an
even slice count with the spine centred. Label points come from the coordinates CSV,
mapped through the DICOM geometry, as for real data.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from lumbar_tf import preprocess
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.core.labels import LEVELS
from lumbar_tf.dicom.reader import SAGITTAL_T2, read_study
from lumbar_tf.synthetic import phantom
from lumbar_tf.training.evaluate import LOW_FIELD_SHARE, field_placement

CFG = PreprocessConfig()
# study id -> (generator seed, what its Sagittal T2 is): the seeds were picked by geometry.
_STUDIES = {1001: (58, "low"), 1002: (42, "low"), 1003: (10, "centred")}


@pytest.fixture(scope="module")
def realistic_dir(tmp_path_factory):
    """The three studies written by `synthesize_dataset` (its plan replaced by the chosen seeds)."""
    plan = [(sid, tuple(sid * 10 + i for i in range(1, 5)), seed) for sid, (seed, _) in _STUDIES.items()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(phantom, "_plan", lambda n, seed, split: plan)
        return phantom.synthesize_dataset(tmp_path_factory.mktemp("realistic"), len(plan), workers=1)


def _canal_points(root, study_id: int, study) -> np.ndarray:
    """[level, (x, y, z)] of the labelled canal points, through the DICOM geometry."""
    with open(root / "train_label_coordinates.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["study_id"]) == study_id]
    series = {s.series_id: s for s in study.series.values()}
    points = {}
    for r in rows:
        if r["condition"] == "Spinal Canal Stenosis":
            se = series[r["series_id"]]
            k = se.index_of_instance(int(r["instance_number"]))
            points[r["level"]] = se.pixel_to_patient(k, [[float(r["x"]), float(r["y"])]])[0]
    return np.array([points[lv.upper().replace("_", "/")] for lv in LEVELS])


def test_realistic_fields_hold_all_five_levels_in_the_view(realistic_dir):
    geometry = {}
    for sid in _STUDIES:
        study = read_study(realistic_dir / "train_images" / str(sid))
        t2 = study.series[SAGITTAL_T2]
        s0 = t2.slices[0]
        geometry[sid] = (s0.rows, s0.cols, len(t2.slices), s0.rows * s0.pixel_spacing[0])
        canal = _canal_points(realistic_dir, sid, study)
        found = preprocess.find_spine(t2, CFG)
        assert found.found
        assert np.linalg.norm(found.l5s1_yz - canal[4, 1:]) < 15.0  # L5/S1 from the end of the sac
        grid = preprocess._grid_from_spine(found, CFG)  # = view_grid_for_study: T2 is the reference
        xy = grid.to_normalized(grid.patient_yz_to_view_px(canal[:, 1:]))
        assert np.all((xy > 0.05) & (xy < 0.95)), (sid, xy)
        # The field-centred grid cuts the low spines off: the finder is what holds them.
        field = preprocess.ViewGrid(
            np.array([s.center for s in t2.slices])[:, 1:].mean(axis=0), CFG.spine_crop_mm, CFG.view_size
        )
        field_xy = field.to_normalized(field.patient_yz_to_view_px(canal[:, 1:]))
        if _STUDIES[sid][1] == "low":
            assert field_xy[:, 1].max() > 0.95
    # The acquisitions are the ones this test is about.
    assert geometry[1001][3] > 320 and geometry[1001][0] == geometry[1001][1]
    assert geometry[1002][0] != geometry[1002][1] and geometry[1002][2] % 2 == 0
    assert geometry[1003][2] % 2 == 0


def test_field_placement_from_the_labelled_canal_points(realistic_dir, tmp_path):
    assert field_placement(realistic_dir, list(_STUDIES)) == {str(s): p for s, (_, p) in _STUDIES.items()}
    # Without canal points (here: coordinates dropped) a study is "unknown", not guessed.
    copy = tmp_path / "copy"
    shutil.copytree(realistic_dir, copy, ignore=shutil.ignore_patterns("train_images"))
    (copy / "train_images").symlink_to(realistic_dir / "train_images")
    path = copy / "train_label_coordinates.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "".join(line for line in lines[1:] if not line.startswith("1003,")))
    assert field_placement(copy, ["1003"]) == {"1003": "unknown"}
    assert 0.0 < LOW_FIELD_SHARE < 0.5


@pytest.mark.slow  # evaluate() with its plots: ~8 s on the shared cores
def test_evaluate_reports_metrics_by_field_placement(tiny_run, phantom_dir, phantom_cache, tmp_path):
    """The tiny run's studies (centred phantoms), four of them relabelled as lying low in the field
    (only the placement reads the edited coordinates; the views come from the run's cache)."""
    from lumbar_tf.training.evaluate import evaluate, format_metrics_table

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data, ignore=shutil.ignore_patterns("train_images"))
    (data / "train_images").symlink_to(phantom_dir / "train_images")
    path = data / "train_label_coordinates.csv"
    with open(path) as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    ids = sorted({r["study_id"] for r in rows}, key=int)
    low = set(ids[:4])
    for r in rows:  # canal points pushed down by 40% of a 160-200 px field: "low"
        if r["study_id"] in low and r["condition"] == "Spinal Canal Stenosis":
            r["y"] = str(float(r["y"]) + 80.0)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    metrics = evaluate(tiny_run, data, tmp_path / "eval", cache_dir=phantom_cache)
    block = metrics["by_field_placement"]
    assert block["low"]["n_studies"] == 4
    assert block["centred"]["n_studies"] == metrics["n_studies"] - 4
    assert block["unknown"]["n_studies"] == 0
    for group in ("low", "centred"):
        assert np.isfinite(block[group]["rsna_log_loss"])
        assert block[group]["localizer_error_mm"]["median"] >= 0.0
    table = format_metrics_table(metrics)
    assert "spine low (n=4)" in table and f"spine centred (n={metrics['n_studies'] - 4})" in table


def _canal_with(signal) -> preprocess._Canal:
    """A straight canal on a 1 mm grid: rows 20-379 inside the field, its centre at row 150."""
    n = len(signal)
    grid = preprocess.ViewGrid(np.zeros(2), float(n), n)
    return preprocess._Canal(
        grid, np.full(n, n // 2), np.asarray(signal, np.float32), np.arange(n, dtype=np.float64),
        top=20, bottom=379, highest=190.0, centre=150.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case, expected",
    [
        # The CSF ends for good at row 300: L5/S1 40 mm up the canal (the 15 mm median window reads a
        # step a few mm late; SAC_TAIL_MM was measured with it).
        ("end", (265.0, "sac end")),
        ("bright", (379 - preprocess.SAC_CUT_MM, "sac off the field")),  # CSF to the edge
        ("narrowed", (379 - preprocess.SAC_CUT_MM, "sac off the field")),  # a narrowing, bright at the edge
        # The canal fades towards the edge without a step (no end) and is not CSF-bright there (no sac
        # cut by the edge): halfway between that and a spine-centred field (L5/S1 62 mm below row 150).
        ("fading", (0.5 * (379 - preprocess.SAC_CUT_MM + 150 + preprocess.LEVELS_HALF_SPAN_MM), "uncertain")),
    ],
)
def test_l5s1_from_the_sac_end_or_off_the_field_or_uncertain(case, expected):
    signal = np.full(400, 0.8)
    if case == "end":
        signal[300:] = 0.1
    elif case == "narrowed":
        signal[350:356] = 0.1
    elif case == "fading":
        signal[280:] = np.interp(np.arange(280, 400), [280, 380], [0.8, 0.52])
    row, how = preprocess._sac_end_row(_canal_with(signal))
    assert how == expected[1]
    assert row == pytest.approx(expected[0], abs=3.0)
