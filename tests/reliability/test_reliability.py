"""The README's Reliability table matches the cases (issue 14 item 12), and the hostile cases whose
only home is here: `predict --study` on one hostile file, degenerate geometry warned end to end, a
coronal series described as sagittal.

The other cases live with their features (`table.CASES` names each test); every one of them checks
its own README row through `table.record`.
"""

from __future__ import annotations

import importlib
import json

import pytest

from tests import hostile_files as H
from tests.dicom_factory import CORONAL_IOP, SAGITTAL_IOP, SeriesSpec, Spine, spine_series, write_study
from tests.reliability import table
from tests.reliability.table import record


def test_the_readme_table_lists_every_case_in_order():
    rows = table.readme_rows()
    assert len(rows) == len(table.CASES), (
        f"README has {len(rows)} rows for {len(table.CASES)} cases: run {table.REWRITE}"
    )
    said = table.readme_outcomes()
    for case, line in zip(table.CASES, rows, strict=True):
        assert case.key in said, (
            f"README row for {case.key!r} has the wrong number of parts: run {table.REWRITE}"
        )
        assert line == table.render_row(case, said[case.key]), (
            f"README row {case.key!r} is stale: run {table.REWRITE}"
        )


def test_every_case_names_a_test_that_exists():
    for case in table.CASES:
        for node in case.tests:
            path, name = node.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), node


def test_a_changed_outcome_fails_its_case(tmp_path, monkeypatch):
    case = table.CASES[0]
    readme = tmp_path / "README.md"
    outcomes = {c.key: {p: f"{c.key} {p}".strip() for p in c.parts} for c in table.CASES}
    readme.write_text(f"# x\n\n{table.BEGIN}\n{table.render_table(outcomes)}\n{table.END}\n")
    monkeypatch.setattr(table, "README", readme)
    monkeypatch.delenv(table.ROWS_ENV, raising=False)
    record(case.key, outcomes[case.key][case.parts[0]], case.parts[0])
    with pytest.raises(AssertionError, match="run python -m tests.reliability --write-readme"):
        record(case.key, "something else", case.parts[0])


# === Cases that live here ===


def _predict(model, study, out, capsys):
    """`lumbar-tf predict --study` in this process: (exit status, the error lines, predictions.json)."""
    from lumbar_tf.cli.main import main

    code = main(["predict", "--model", str(model), "--study", str(study), "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    preds = out / "predictions.json"
    return (
        code,
        [line for line in err.splitlines() if line.startswith("error:")],
        (json.loads(preds.read_text()) if preds.exists() else None),
    )


@pytest.fixture(scope="module")
def tflite_model(tiny_export):
    return next((tiny_export / "tflite").glob("*_float32.tflite"))


def _drawn_study(root, sag_t2: SeriesSpec | None = None, study_id: str = "1001"):
    """A study with a drawn lumbar spine: Sagittal T2/STIR (or ``sag_t2``) and Sagittal T1."""
    spine = Spine()
    geometry = dict(
        n_slices=9, rows=96, cols=96, pixel_spacing=(2.5, 2.5), slice_spacing=4.0, center=(0.0, 0.0, 30.0)
    )
    t1 = spine_series(Spine(contrast="T1"), "Sagittal T1", series_number=12, **geometry)
    specs = {"11": sag_t2 or spine_series(spine, series_number=11, **geometry), "12": t1}
    return write_study(root, study_id, specs)


_HOSTILE = {
    "bomb": lambda p: H.deflate_bomb(p, 160 * 2**20),
    "giant": lambda p: H.sparse_giant(p, 65535, 65535),
    "frames": lambda p: H.with_raw_value(H.valid_file(p), 0x00280008, "IS", b"abc "),
    "spacing": lambda p: H.valid_file(p, SeriesSpec(n_slices=1, pixel_spacing=(1e-6, 1e-6))),
    "slope": lambda p: H.valid_file(p, SeriesSpec(n_slices=1, slope=0.0)),
}


@pytest.mark.parametrize("part", list(_HOSTILE))
def test_predict_grades_a_study_past_one_hostile_file(tflite_model, tmp_path, capsys, part):
    """One hostile file among the Sagittal T1's slices costs that file, not the study: graded, the
    file named in a warning, the cells read from that series flagged, the others not."""
    study = _drawn_study(tmp_path / "data")
    _HOSTILE[part](study / "12" / "90.dcm")
    code, errors, preds = _predict(tflite_model, study, tmp_path / "out", capsys)
    assert code == 0 and not errors, errors
    (warning,) = [w for w in preds["warnings"] if "unreadable" in w]
    assert warning.startswith("series 12: dropped unreadable file 12/90.dcm ("), warning
    flags = {(c["condition"], c["level"]): c["flags"] for c in preds["cells"]}
    for (condition, _), cell in flags.items():
        if "foraminal" in condition:
            assert cell == ["sag_t1: files_dropped"], (condition, cell)
        elif condition == "spinal_canal_stenosis":
            assert cell == [], (condition, cell)
    record(
        "predict-bad-file",
        f"{part}: exit {code}, graded; warning `{warning}`; foraminal cells flagged `sag_t1: files_dropped`",
        part,
    )


def test_duplicate_positions_and_a_single_slice_are_warned_in_predictions(tflite_model, tmp_path, capsys):
    """Graded, with each problem named in predictions.json: the duplicates dropped, the single-slice
    series set aside (its views read from what is left)."""
    offsets = (-16.0, -12.0, -8.0, -4.0, 0.0, 0.0, 0.0, 4.0, 8.0, 12.0, 16.0)
    sag_t2 = spine_series(
        Spine(),
        series_number=11,
        n_slices=len(offsets),
        slice_offsets=offsets,
        rows=96,
        cols=96,
        pixel_spacing=(2.5, 2.5),
        center=(0.0, 0.0, 30.0),
    )
    study = _drawn_study(tmp_path / "data", sag_t2)
    single = SeriesSpec("Sagittal T1", series_number=13, n_slices=1, iop=SAGITTAL_IOP)
    write_study(tmp_path / "data", study.name, {"13": single})
    code, errors, preds = _predict(tflite_model, study, tmp_path / "out", capsys)
    assert code == 0 and not errors
    duplicated = "series 11: dropped 2 slice(s) at duplicated positions"
    assert duplicated in preds["warnings"], preds["warnings"]
    single_line = next(w for w in preds["warnings"] if w.startswith("series 13 ") and "single slice" in w)
    assert len(preds["cells"]) == 25
    # Sagittal T2 places every level: each cell is flagged with what reading it cost.
    assert all("sag_t2: duplicates_dropped" in c["flags"] for c in preds["cells"])
    record(
        "geometry-warned",
        f"exit {code}, graded; in predictions.json `warnings`: `{duplicated}`, `{single_line}`; every "
        "cell flagged `sag_t2: duplicates_dropped`",
    )


@pytest.mark.parametrize("part", ["header", "csv", "content"])
def test_a_coronal_series_described_as_sagittal_is_not_graded(tflite_model, tmp_path, capsys, part):
    """A coronal series of the drawn spine described as Sagittal T2 (in its header, or in the RSNA
    descriptions CSV) is set aside by its geometry, with a warning, and the view built from the
    Sagittal T1. ``content``: the same coronal pixels behind a header that claims a sagittal plane;
    nothing in the file tells, and the spine check passes it (a known gap, README)."""
    import csv

    geometry = dict(n_slices=9, rows=96, cols=96, pixel_spacing=(2.5, 2.5), slice_spacing=3.0)
    coronal = spine_series(
        Spine(), "Sagittal T2", series_number=11, iop=CORONAL_IOP, center=(0.0, -26.0, 30.0), **geometry
    )
    if part == "content":
        lying = spine_series(
            Spine(), "Sagittal T2", series_number=11, iop=SAGITTAL_IOP, center=(0.0, 0.0, 30.0), **geometry
        )
        lying.pixels = coronal.pixels
        coronal = lying
    images = tmp_path / "data" / "test_images"
    study = _drawn_study(images, coronal)
    if part == "csv":
        with open(tmp_path / "data" / "test_series_descriptions.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(
                [
                    ["study_id", "series_id", "series_description"],
                    [study.name, "11", "Sagittal T2/STIR"],
                    [study.name, "12", "Sagittal T1"],
                ]
            )
    code, errors, preds = _predict(tflite_model, study, tmp_path / "out", capsys)
    assert code == 0 and not errors
    warned = [w for w in preds["warnings"] if w.startswith("series 11") or "view sag_t2" in w]
    periodicity = preds["quality"]["checks"]["vertical_periodicity"]
    if part == "content":
        assert warned == [] and periodicity["ok"], (warned, periodicity)
        outcome = (
            "coronal pixels under a sagittal header: graded with no warning; the spine check passes it "
            "(known gap)"
        )
    else:
        assert any("coronal" in w and "skipped" in w for w in warned), preds["warnings"]
        assert all("sag_t2: series_set_aside" in c["flags"] for c in preds["cells"]), preds["cells"][0]
        assert any(
            w.startswith("no 'Sagittal T2/STIR' series; view sag_t2 built from 'Sagittal T1'") for w in warned
        )
        outcome = (
            f"{part}: exit {code}, the series set aside by its geometry and graded from the Sagittal T1, "
            "every cell flagged `sag_t2: series_set_aside`; warnings " + ", ".join(f"`{w}`" for w in warned)
        )
    record("coronal", outcome, part)
