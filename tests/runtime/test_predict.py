"""`lumbar-tf predict`: every runtime gives the same predictions.json; test folders give a Kaggle
submission (bad studies skipped); TF Serving through --rest; one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core import labels

NAME = "lumbar_spine"


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def study_dirs(phantom_dir):
    return sorted((phantom_dir / "train_images").iterdir())


def copy_study_without(study_dir: Path, dest: Path, *, planes=(), descriptions=()) -> Path:
    from lumbar_tf.dicom.reader import read_study

    target = dest / study_dir.name
    shutil.copytree(study_dir, target)
    for description, series in read_study(target).series.items():
        if series.plane in planes or description in descriptions:
            shutil.rmtree(series.path)
    return target


def _grade_probs(preds: dict) -> np.ndarray:
    return np.array([c["grade_probs"] for c in preds["cells"]])


def test_every_runtime_gives_the_same_predictions(export_dir, tiny_run, study_dirs, tmp_path):
    from tests.conftest import predict_to

    study = study_dirs[1]
    models = {
        "keras": tiny_run,
        "keras_file": tiny_run / "model.keras",
        "saved_model": export_dir / "saved_model" / NAME / "1",
        "export_root": export_dir,
        "tflite": export_dir / "tflite" / f"{NAME}_float32.tflite",
    }
    results = {}
    for key, path in models.items():
        out = tmp_path / key
        preds = predict_to(path, study, out)
        assert json.loads((out / "predictions.json").read_text())["study_id"] == study.name
        assert [(c["condition"], c["level"]) for c in preds["cells"]] == [
            (c, lv) for c in labels.CONDITIONS for lv in labels.LEVELS
        ]
        assert [lv["level"] for lv in preds["levels"]] == list(labels.LEVELS)
        assert all(isinstance(lv["instance_number"], int) for lv in preds["levels"])
        results[key] = preds
    assert results["keras"]["model"]["format"] == "keras"
    assert results["saved_model"]["model"] == {"name": NAME, "version": 1, "format": "saved_model"}
    assert results["export_root"]["model"]["version"] == 1
    assert results["tflite"]["model"]["format"] == "tflite_float32"
    reference = _grade_probs(results["keras"])
    np.testing.assert_allclose(_grade_probs(results["saved_model"]), reference, atol=1e-5)
    np.testing.assert_allclose(_grade_probs(results["keras_file"]), reference, atol=1e-6)
    np.testing.assert_allclose(_grade_probs(results["tflite"]), reference, atol=1e-3)


def test_missing_view_warns_and_is_zeroed(export_dir, study_dirs, tmp_path, capsys):
    from lumbar_tf.cli.main import main

    no_t1 = copy_study_without(study_dirs[0], tmp_path / "data", descriptions=("Sagittal T1",))
    out = tmp_path / "out"
    model = export_dir / "saved_model" / NAME / "1"
    assert main(["predict", "--model", str(model), "--study", str(no_t1), "--out", str(out)]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert any("no 'Sagittal T1' series; view sag_t1 is zeros" in w for w in preds["warnings"])
    assert "warning:" in capsys.readouterr().out
    assert len(preds["cells"]) == 25


def _cli(*args, timeout=180):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "lumbar_tf.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_cli_bad_inputs_exit_2_with_one_line(export_dir, study_dirs, tmp_path):
    axial_only = copy_study_without(study_dirs[0], tmp_path / "data", planes=("sagittal",))
    tflite = export_dir / "tflite" / f"{NAME}_int8.tflite"
    done = _cli("predict", "--model", tflite, "--study", axial_only, "--out", tmp_path / "o1")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {axial_only}: no sagittal series"]
    assert "Traceback" not in done.stderr

    bogus = tmp_path / "model.tflite"
    bogus.write_text("not a model")
    done = _cli("predict", "--model", bogus, "--study", study_dirs[0], "--out", tmp_path / "o2")
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bogus) in errors[0] and "not a TFLite model" in errors[0]
    assert "Traceback" not in done.stderr


def test_cli_usage_errors(tmp_path, capsys):
    from lumbar_tf.cli.main import main

    assert main(["predict", "--model", str(tmp_path), "--study", "a", "--data", "b"]) == 2
    assert "exactly one of --study" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "--submission" in capsys.readouterr().err
    assert main(["predict", "--study", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nope.keras"), "--study", str(tmp_path)]) == 2
    assert "model not found" in capsys.readouterr().err


# Ids a hostile test folder holds besides its studies (issue 14 items 2 and 3): a CSV row naming a
# path out of the folder, a folder named like a spreadsheet formula, a study folder linked elsewhere.
TRAVERSAL_ID = "../../outside/train_images/{sid}"
FORMULA_ID = '=HYPERLINK("http:x")'
LINKED_ID = "1002"


@pytest.fixture(scope="module")
def test_folder(phantom_dir, tmp_path_factory):
    """An RSNA test-layout folder: two good studies, one without any sagittal series, and the
    hostile ids above, each of which leads to a real study if followed."""
    base = tmp_path_factory.mktemp("testdata")
    root = base / "data"
    images = root / "test_images"
    images.mkdir(parents=True)
    studies = sorted((phantom_dir / "train_images").iterdir())
    good = [studies[2], studies[3]]
    for study in good:
        shutil.copytree(study, images / study.name)
    bad = copy_study_without(studies[4], images, planes=("sagittal",))
    outside = base / "outside" / "train_images"
    shutil.copytree(studies[5], outside / studies[5].name)
    shutil.copytree(studies[5], images / FORMULA_ID)
    (images / LINKED_ID).symlink_to(outside / studies[5].name, target_is_directory=True)
    with open(phantom_dir / "train_series_descriptions.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["study_id"] in {s.name for s in [*good, bad]}]
    rows.append(
        {
            "study_id": TRAVERSAL_ID.format(sid=studies[5].name),
            "series_id": "1",
            "series_description": "Sagittal T1",
        }
    )
    with open(root / "test_series_descriptions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["study_id", "series_id", "series_description"])
        writer.writeheader()
        writer.writerows(rows)
    refused = {TRAVERSAL_ID.format(sid=studies[5].name), FORMULA_ID, LINKED_ID}
    return root, [s.name for s in good], bad.name, refused


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_submission_for_a_test_folder_skips_bad_studies(
    export_dir, test_folder, tmp_path, capsys, monkeypatch
):
    """A bad study gets the prior's rows and is reported; hostile ids are refused, never read or
    written: the per-study outputs go beside the submission, nothing lands outside it."""
    from lumbar_tf.cli.main import main
    from lumbar_tf.runtime.batch import default_out_dir
    from tests.reliability.table import record, shape

    root, good, bad, refused = test_folder
    out_root = tmp_path / "results"
    submission = out_root / "submission.csv"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data_files = _files_under(root.parent)
    model = export_dir / "tflite" / f"{NAME}_float32.tflite"
    args = ["predict", "--model", str(model), "--data", str(root), "--submission", str(submission)]
    code = main(args)
    assert code == 0
    captured = capsys.readouterr()
    assert f"warning: study {bad}" in captured.err and "no sagittal series" in captured.err
    for name in refused:
        assert f"warning: study {name!r}: " in captured.err
    with open(submission) as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["row_id", "normal_mild", "moderate", "severe"]
    body = rows[1:]
    assert len(body) == 25 * (len(good) + 1)  # the unreadable study gets the prior's rows
    order = sorted([*good, bad], key=int)
    assert [r[0] for r in body] == [
        f"{sid}_{c}_{lv}" for sid in order for c in labels.CONDITIONS for lv in labels.LEVELS
    ]
    for row in body:
        assert sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-5)
    report = json.loads((out_root / "submission.report.json").read_text())
    assert report["n_predicted"] == 2 and report["n_from_prior"] == 1
    assert "no sagittal series" in report["from_prior"][bad]
    assert set(report["refused"]) == refused
    prior_rows = [r for r in body if r[0].startswith(f"{bad}_")]
    assert len({tuple(r[1:]) for r in prior_rows}) > 1  # per-cell class frequencies, not one constant
    studies_out = default_out_dir(submission)
    for sid in good:
        assert json.loads((studies_out / sid / "predictions.json").read_text())["study_id"] == sid
    # Nothing written but the submission, its report and the two predicted studies' folders.
    assert _files_under(tmp_path) == {
        submission,
        out_root / "submission.report.json",
        *(studies_out / sid / "predictions.json" for sid in good),
    }
    assert _files_under(root.parent) == data_files
    reasons = sorted({shape(r, data=root) for r in report["refused"].values()})
    record(
        "submission-ids",
        f"exit {code}; refused, listed in `submission.report.json` and on stderr: "
        f"{', '.join(f'`{r}`' for r in reasons)}; "
        f"the study without sagittal series gets the prior's 25 rows; only plain-integer row_ids; "
        f"nothing written but the submission, its report and `submission_studies/ID/predictions.json`",
    )


def _serving_fixtures():
    try:
        from tests import serving_fixtures
    except ImportError:
        import serving_fixtures  # tests/ on sys.path
    return serving_fixtures


def test_rest_server_path_matches_local_saved_model(export_dir, study_dirs, tmp_path):
    from lumbar_tf.cli.main import main
    from tests.conftest import predict_to

    fixtures = _serving_fixtures()
    study = study_dirs[5]
    local = predict_to(export_dir, study, tmp_path / "local")
    with fixtures.rest_server({NAME: export_dir / "saved_model" / NAME}) as server:
        out = tmp_path / "rest"
        args = ["predict", "--rest", server.base_url, "--metadata", str(export_dir / "metadata.json")]
        assert main([*args, "--study", str(study), "--out", str(out)]) == 0
    remote = json.loads((out / "predictions.json").read_text())
    assert remote["model"]["format"] == "saved_model" and remote["model"]["version"] == 1
    np.testing.assert_allclose(_grade_probs(remote), _grade_probs(local), atol=1e-5)
    assert [lv["instance_number"] for lv in remote["levels"]] == [
        lv["instance_number"] for lv in local["levels"]
    ]


def test_heatmaps_hook_is_called_with_the_midline_slice(export_dir, study_dirs, tmp_path, monkeypatch):
    from lumbar_tf.report import heatmaps
    from tests.conftest import predict_to

    calls = []

    def write_heatmaps(predictions, midline_image, out_dir):
        calls.append((predictions, midline_image, Path(out_dir)))
        path = Path(out_dir) / "fake_heatmap.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        return [path]

    monkeypatch.setattr(heatmaps, "write_heatmaps", write_heatmaps)
    out = tmp_path / "out"
    preds = predict_to(export_dir / "tflite" / f"{NAME}_float32.tflite", study_dirs[0], out, True)
    assert len(calls) == 1
    given, image, where = calls[0]
    assert given["cells"] == preds["cells"] and where == out and (out / "fake_heatmap.png").exists()
    assert image.dtype == np.uint8 and image.ndim == 2 and image.max() > 0
    # the slice the level positions are on, in its own pixel grid
    assert image.shape[1] > max(lv["x"] for lv in preds["levels"]) >= 0


def test_cell_flags_follow_the_series_each_condition_is_read_on():
    from lumbar_tf.core.config import AxialSpec, PreprocessConfig
    from lumbar_tf.runtime.predictions import cell_flags

    cfg = PreprocessConfig(axial=AxialSpec())
    by_view = {"sag_t2": [], "sag_t1": ["files_dropped"], "ax_t2": []}
    flags = cell_flags(by_view, cfg, uncovered_levels=["l5_s1"])
    assert flags["spinal_canal_stenosis", "l5_s1"] == []
    assert flags["left_neural_foraminal_narrowing", "l1_l2"] == ["sag_t1: files_dropped"]
    assert flags["right_subarticular_stenosis", "l5_s1"] == ["ax_t2: not_covered"]
    assert flags["right_subarticular_stenosis", "l4_l5"] == []
    # The localiser's view places every level: what it cost reaches every cell.
    by_view["sag_t2"] = ["duplicates_dropped"]
    flags = cell_flags(by_view, cfg)
    assert all("sag_t2: duplicates_dropped" in f for f in flags.values())
    assert flags["left_neural_foraminal_narrowing", "l1_l2"] == [
        "sag_t2: duplicates_dropped",
        "sag_t1: files_dropped",
    ]
