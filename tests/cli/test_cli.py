"""The command line: one-line errors with exit status 2 for bad input, no traceback.

Commands run in this process through `lumbar_tf.cli.main.main` (what the console script calls), so
each test does not pay a fresh TensorFlow import; `--help` runs the module in a new interpreter.
"""

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lumbar_tf.cli.main import main
from lumbar_tf.data.dataset import read_index
from tests.conftest import TINY_OVERRIDES


def run_cli(*args):
    """(exit status, stdout, stderr) of ``lumbar-tf ARGS``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_command():
    done = subprocess.run(
        [sys.executable, "-m", "lumbar_tf.cli.main", "--help"], capture_output=True, text=True, timeout=300
    )
    code, out = done.returncode, done.stdout
    assert code == 0, done.stderr
    for command in (
        "synth",
        "prepare",
        "picture",
        "train",
        "evaluate",
        "predict",
        "explain",
        "export",
        "demo",
    ):
        assert command in out


def test_picture_of_a_study(phantom_dir, tmp_path):
    sid = read_index(phantom_dir).study_ids[0]
    code, out, err = run_cli("picture", "--data", phantom_dir, "--study-id", sid, "--out", tmp_path / "p.png")
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# (A slice of another size is no bad file: it is dropped with a warning, tests/preprocess/test_views.py.)
def _damage(victim, damage):
    import pydicom

    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:400])
    elif damage == "not_dicom":
        victim.write_text("hello")
    else:
        ds = pydicom.dcmread(victim)
        del ds.PixelData
        ds.save_as(victim)


@pytest.mark.parametrize("damage", ["truncated", "not_dicom", "no_pixels"])
def test_one_bad_file_costs_that_file_not_the_study(phantom_dir, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    sid = read_index(data).study_ids[0]
    series = sorted((data / "train_images" / sid).iterdir())[0]
    victim = sorted(series.glob("*.dcm"))[0]
    _damage(victim, damage)
    code, _, err = run_cli("picture", "--data", data, "--study-id", sid, "--out", tmp_path / "p.png")
    assert code == 0, err
    assert "Traceback" not in err
    (line,) = [w for w in err.splitlines() if "unreadable" in w]
    assert line.startswith(f"warning: study {sid}: series {series.name}: dropped unreadable file ")
    assert f"{series.name}/{victim.name} (" in line
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_of_only_bad_files_is_refused_in_one_line(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    sid = read_index(data).study_ids[0]
    files = sorted((data / "train_images" / sid).glob("*/*.dcm"))
    for victim in files:
        _damage(victim, "not_dicom")
    code, _, err = run_cli("picture", "--data", data, "--study-id", sid, "--out", tmp_path / "p.png")
    assert_one_line_error(code, err, f"{files[0]}: not a DICOM file")
    assert f"(and {len(files) - 1} more unreadable file(s))" in err
    assert not (tmp_path / "p.png").exists()


def test_study_id_that_escapes_is_refused(phantom_dir, tmp_path):
    code, _, err = run_cli(
        "picture", "--data", phantom_dir, "--study-id", "../../etc", "--out", tmp_path / "p.png"
    )
    assert_one_line_error(code, err, "not a plain integer")


def test_bad_config_key_is_named(phantom_dir, tmp_path):
    code, _, err = run_cli("train", "--data", phantom_dir, "--out", tmp_path / "run", "train.grader.epoch=3")
    assert_one_line_error(code, err, "train.grader.epoch")


def test_finished_run_is_refused(phantom_dir, tiny_run):
    code, _, err = run_cli("train", "--data", phantom_dir, "--out", tiny_run)
    assert_one_line_error(code, err, "finished run", "--overwrite")


def train_with_weights(phantom_dir, phantom_cache, tmp_path, weights, *overrides):
    return run_cli(
        "train", "--data", phantom_dir, "--out", tmp_path / "run", "--cache", phantom_cache,
        "--weights", weights, *overrides,
    )  # fmt: skip


def test_missing_weights_file_is_named(phantom_dir, phantom_cache, tmp_path):
    code, _, err = train_with_weights(phantom_dir, phantom_cache, tmp_path, tmp_path / "nope.weights.h5")
    assert_one_line_error(code, err, "nope.weights.h5", "not found")


def test_mismatching_weights_file_is_named(phantom_dir, phantom_cache, tmp_path):
    wrong = tmp_path / "wrong.weights.h5"
    wrong.write_bytes(b"this is not an HDF5 weights file")
    code, _, err = train_with_weights(phantom_dir, phantom_cache, tmp_path, wrong, *TINY_OVERRIDES)
    assert_one_line_error(code, err, "wrong.weights.h5")
    assert not (tmp_path / "run" / "localizer.keras").exists()  # refused before the localiser trained


def test_grader_stage_needs_a_localizer(phantom_dir, phantom_cache, tmp_path):
    code, _, err = run_cli("train", "--data", phantom_dir, "--out", tmp_path / "run", "--stage", "grader")
    assert_one_line_error(code, err, "--stage localizer")


def test_evaluate_goes_on_past_a_bad_study(tiny_run, phantom_dir, tmp_path):
    """A study whose every file is unreadable is left out of `evaluate`, counted in its table and
    metrics.json and listed with its file in skipped_studies.csv; the others are evaluated."""
    import csv
    import json

    from tests.reliability.table import record, shape

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    index = read_index(data)
    bad = index.study_ids[0]
    files = sorted((data / "train_images" / bad).glob("*/*.dcm"))
    for victim in files:
        victim.write_text("not DICOM")
    out = tmp_path / "eval"
    code, stdout, err = run_cli("evaluate", "--model", tiny_run, "--data", data, "--out", out)
    assert code == 0, err
    assert "Traceback" not in err
    cache = out / "cache"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_studies"] == {"count": 1, "listed_in": str(cache / "skipped_studies.csv")}
    assert metrics["n_studies"] == len(index.study_ids) - 1
    (line,) = [row for row in stdout.splitlines() if "skipped (unreadable)" in row]
    assert line.split() == ["skipped", "(unreadable)", "1,", "see", str(cache / "skipped_studies.csv")]
    with open(cache / "skipped_studies.csv", newline="") as handle:
        reasons = {r["study_id"]: r["reason"] for r in csv.DictReader(handle)}
    named, _, reason = reasons[bad].partition(": ")
    assert Path(named) in files and reason.startswith("not a DICOM file"), reasons  # its first file read
    record(
        "evaluate-bad-study",
        f"exit {code}; the other {metrics['n_studies']} studies evaluated; the table says "
        f"`skipped (unreadable)  1, see <cache>/skipped_studies.csv`, metrics.json `skipped_studies`; "
        f"listed as `{shape(reasons[bad], file=named)}`",
    )
