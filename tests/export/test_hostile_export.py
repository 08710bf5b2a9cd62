"""An export killed at any point leaves no partial version folder (issue 14 item 5).

Through the command line, as a user would run it: `lumbar-tf export` is killed (SIGKILL, no clean-up
of its own) when the staging folder appears, when its SavedModel is written, and right after the
version is published; every numbered version folder left must be complete, and the next export
must succeed beside whatever was left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability.table import record

ROOT = Path(__file__).resolve().parents[2]
MODEL = "lumbar_spine"


def _export_cmd(run, cache, out):
    return [sys.executable, "-m", "lumbar_tf.cli.main", "export", "--model", str(run), "--out", str(out)] + [
        "--tflite",
        "float32",
        "--representative-size",
        "4",
        "--cache",
        str(cache),
    ]


def _complete(version_dir: Path) -> bool:
    return (
        (version_dir / "saved_model.pb").is_file()
        and any((version_dir / "variables").glob("variables.index"))
        and (version_dir / "metadata.json").is_file()
    )


_POINTS = {
    "staging": lambda d: any(d.glob(".tmp-*")),
    "saved_model": lambda d: any(d.glob(".tmp-*/saved_model.pb")),
    "published": lambda d: (d / "1").exists(),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(_POINTS))
def test_a_killed_export_leaves_no_partial_version(tiny_run, phantom_cache, tmp_path, point):
    out = tmp_path / "export"
    model_dir = out / "saved_model" / MODEL
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(_export_cmd(tiny_run, phantom_cache, out), env=env, stdout=subprocess.DEVNULL)
    reached = False
    while proc.poll() is None:  # watch the file system, not the clock
        if model_dir.is_dir() and _POINTS[point](model_dir):
            reached = True
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, f"export ended (rc {proc.returncode}) before reaching {point}"
    versions = [p for p in model_dir.iterdir() if p.name.isdigit()]
    assert all(_complete(v) for v in versions), [sorted(q.name for q in v.iterdir()) for v in versions]
    # A second export publishes beside what the killed one left.
    done = subprocess.run(_export_cmd(tiny_run, phantom_cache, out), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    assert versions == ([1, 2] if point == "published" else [1])
    assert all(_complete(model_dir / str(v)) for v in versions)
    left = "version 1 whole" if point == "published" else "no version folder"
    record(
        "killed-export",
        f"{point}: {left}; the next export exits 0 and publishes version {versions[-1]}",
        point,
    )
