"""Every OS error is one line naming its file, exit 2 (issue 14 item 8): permission denied, an
output path that is a file or a folder, a full disk (RLIMIT_FSIZE); no 0-byte or temporary file
is left behind, and a batch loses only the study it could not read."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lumbar_tf.data.dataset import read_index
from tests.reliability.table import record, shape

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, prefix=(), preexec=None):
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "lumbar_tf.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
        preexec_fn=preexec,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc.returncode, proc.stdout, errors, proc.stderr


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root bypasses them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def sid(phantom_dir):
    return read_index(phantom_dir).study_ids[0]


def test_output_under_a_file_is_one_line(phantom_dir, sid, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    code, _, errors, stderr = _cli(
        "picture", "--data", phantom_dir, "--study-id", sid, "--out", blocker / "p.png"
    )
    assert code == 2 and errors == [f"error: {blocker}: File exists"], stderr
    assert blocker.read_text() == "keep me"
    record("os-errors", f"exit {code}, `{shape(errors[0], file=blocker)}`, the file kept", "under-file")


def test_output_that_is_a_folder_is_one_line(phantom_dir, sid, tmp_path):
    folder = tmp_path / "p.png"
    (folder / "inside").mkdir(parents=True)
    code, _, errors, stderr = _cli("picture", "--data", phantom_dir, "--study-id", sid, "--out", folder)
    assert code == 2 and errors == [f"error: {folder}: Is a directory"], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    assert [p.name for p in folder.iterdir()] == ["inside"]
    record("os-errors", f"exit {code}, `{shape(errors[0], folder=folder)}`, the folder untouched", "folder")


def test_a_full_disk_leaves_no_png(phantom_dir, sid, tmp_path):
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "pictures" / "p.png"
    code, _, errors, stderr = _cli(
        "picture", "--data", phantom_dir, "--study-id", sid, "--out", out, preexec=small_disk
    )
    assert code == 2 and errors == [f"error: {out}: File too large"], stderr
    assert list(out.parent.iterdir()) == []  # neither a 0-byte PNG nor a temporary file
    record(
        "os-errors",
        f"exit {code}, `{shape(errors[0], out=out)}`, neither a 0-byte PNG nor a temporary file",
        "full-disk",
    )


def test_an_unwritable_output_folder_is_one_line(phantom_dir, sid, tmp_path):
    prefix = _unprivileged()
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, errors, stderr = _cli(
            "picture", "--data", phantom_dir, "--study-id", sid, "--out", folder / "p.png", prefix=prefix
        )
    finally:
        folder.chmod(0o755)
    assert code == 2 and errors == [f"error: {folder / 'p.png'}: Permission denied"], stderr
    assert list(folder.iterdir()) == []
    record(
        "os-errors", f"exit {code}, `{shape(errors[0], out=folder / 'p.png')}`, nothing written", "read-only"
    )


def test_an_unreadable_study_costs_only_that_study(phantom_dir, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    prefix = _unprivileged()
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    ids = read_index(root).study_ids[:3]
    for folder in (root / "train_images").iterdir():
        if folder.name not in ids:
            shutil.rmtree(folder)
    locked = root / "train_images" / ids[0]
    locked.chmod(0o000)
    cache = tmp_path / "cache"
    try:
        code, stdout, errors, stderr = _cli(
            "prepare", "--data", root, "--out", cache, "--workers", "1", *TINY_OVERRIDES, prefix=prefix
        )
    finally:
        locked.chmod(0o755)
    assert code == 0 and not errors, stderr
    with open(cache / "skipped_studies.csv", newline="") as handle:
        reasons = {r["study_id"]: r["reason"] for r in csv.DictReader(handle)}
    assert reasons[ids[0]] == f"{locked}: Permission denied"
    assert f"cached 2 studies in {cache}" in stdout
    record(
        "prepare-unreadable",
        f"exit {code}; listed in `skipped_studies.csv` as `{shape(reasons[ids[0]], study=locked)}`; "
        "the other 2 studies cached",
    )
