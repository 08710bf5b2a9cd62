"""Publishing an export: version numbers, the atomic rename of a version folder, the TFLite files.

A version is written into a hidden temporary folder inside ``saved_model/<name>/`` and renamed into
place, so a watching TF Serving never sees half a version; the next free version number
(`runtime.artifacts.published_versions`) is used unless one is given, and a number another exporter
took meanwhile is skipped.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lumbar_tf.core.contract import METADATA_FILE
from lumbar_tf.core.errors import ExportError
from lumbar_tf.core.io import write_bytes_atomic, write_json_atomic
from lumbar_tf.runtime.artifacts import published_versions

TMP_PREFIX = ".tmp-"


def next_version(model_dir) -> int:
    """The next free version number (1 for a new model)."""
    versions = published_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def staging_folder(model_dir: Path) -> Path:
    """A hidden folder name inside ``model_dir`` (not created) that TF Serving ignores."""
    return Path(model_dir) / f"{TMP_PREFIX}{uuid.uuid4().hex}"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def publish_version(staging: Path, model_dir: Path, version, make_metadata) -> int:
    """Write ``make_metadata(number)`` as metadata.json into ``staging`` and rename it to the version
    number (atomic); returns the number. ``version`` None: the next free one."""
    pinned = version is not None
    for _ in range(100):
        number = int(version) if pinned else next_version(model_dir)
        write_json_atomic(staging / METADATA_FILE, make_metadata(number))
        try:
            os.rename(staging, model_dir / str(number))
            return number
        except OSError:
            if pinned or not (model_dir / str(number)).exists():
                raise ExportError(f"{model_dir / str(number)}: cannot publish this version") from None
            # another exporter took this number meanwhile: try the next one
    raise ExportError(f"{model_dir}: cannot find a free version number")


def publish_tflite(folder: Path, name: str, files: dict[str, tuple[bytes, dict]], variants) -> dict:
    """Make ``folder`` hold this version's per-variant files of model ``name`` and nothing older.

    ``files``: ``{variant: (.tflite content with its metadata embedded, sidecar metadata)}``, the
    variants this version publishes. Each ``.tflite`` and then its ``.json`` sidecar is replaced
    atomically; afterwards every ``<name>_<variant>.tflite/.json`` of the known ``variants`` that this
    version did not publish (not exported, or refused by the AUC gate) is removed, with the temporary
    files a killed export left, so no sidecar says an older version than ``metadata.json``. Other
    models' files in the folder are left alone. Returns ``{variant: path}``.
    """
    folder = Path(folder)
    written = {}
    for variant, (content, metadata) in files.items():
        target = folder / f"{name}_{variant}.tflite"
        write_bytes_atomic(target, content)
        write_json_atomic(target.with_suffix(".json"), metadata)
        written[variant] = target
    if folder.is_dir():
        for variant in variants:
            for suffix in (".tflite", ".json"):
                file_name = f"{name}_{variant}{suffix}"
                stale = [] if variant in files else [folder / file_name]
                stale += folder.glob(f".{file_name}.*")  # `write_bytes_atomic` temporaries
                for path in stale:
                    path.unlink(missing_ok=True)
    return written
