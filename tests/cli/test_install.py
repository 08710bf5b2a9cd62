"""A non-editable install works outside a checkout: the built-in configs are package data.

The wheel is built from a copy of the files `setup.cfg` needs (no network, no build isolation) and
installed with ``pip --target``; then, from another folder, the demo's config lookup runs against the
installed copy only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_FILES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md")


def _pip(*args, cwd):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *args,
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_wheel_holds_the_configs_and_the_demo_finds_them_outside_a_checkout(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO / "lumbar_tf", source / "lumbar_tf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, source / name)
    _pip("wheel", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lumbar_tf-*.whl")
    configs = sorted(p.name for p in (REPO / "lumbar_tf" / "configs").glob("*.yaml"))
    assert "cpu_demo.yaml" in configs
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"lumbar_tf/configs/{name}" for name in configs} <= names

    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import lumbar_tf\n"
        "from lumbar_tf.cli.demo import DEMO_CONFIG\n"
        "from lumbar_tf.core.config import load_config, resolve_config_path\n"
        "cfg = load_config(DEMO_CONFIG)\n"
        "print(lumbar_tf.__file__)\n"
        "print(resolve_config_path(DEMO_CONFIG))\n"
        "print(cfg.model.backbone)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=elsewhere, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    package, config, backbone = done.stdout.strip().splitlines()[-3:]
    assert Path(package).is_relative_to(site), package  # the installed copy, not this checkout
    assert Path(config) == site / "lumbar_tf" / "configs" / "cpu_demo.yaml"

    from lumbar_tf.core.config import load_config

    assert backbone == load_config(REPO / "lumbar_tf" / "configs" / "cpu_demo.yaml").model.backbone
