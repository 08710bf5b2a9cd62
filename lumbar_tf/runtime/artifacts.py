"""Finding model artefacts on disk: which runtime a path is, the newest version, the export metadata.

    load_predictor("runs/b3")                              # Keras (run folder or .keras file)
    load_predictor("export/saved_model/lumbar_spine")      # SavedModel, newest version
    load_predictor("export")                               # export root holding one model
    load_predictor("export/tflite/lumbar_spine_int8.tflite")

Every command that takes a model path goes through `resolve_model`, and every lookup of a
SavedModel version or of ``metadata.json`` through `published_versions` / `find_export_metadata`.
"""

from __future__ import annotations

import json
from pathlib import Path

from lumbar_tf.core.config import PreprocessConfig, preprocess_config_from_dict
from lumbar_tf.core.contract import METADATA_FILE, MODEL_FILE, RUN_CONFIG_FILE
from lumbar_tf.core.errors import ConfigError, ModelLoadError

_TFLITE_IDENTIFIER = b"TFL3"


# === Versions ===


def published_versions(model_dir, *, complete: bool = False) -> list[int]:
    """Version numbers in a TF Serving model folder ``saved_model/<name>/`` (numeric folders), oldest
    first; ``complete``: only those holding a ``saved_model.pb``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (not complete or (p / "saved_model.pb").exists())
    )


def newest_version(model_dir) -> Path | None:
    """The newest complete version folder of ``saved_model/<name>/``, or None."""
    versions = published_versions(model_dir, complete=True)
    return Path(model_dir) / str(versions[-1]) if versions else None


def _single_model(export_root: Path) -> Path | None:
    """``EXPORT/saved_model/<name>`` when the export root holds exactly one model."""
    models = sorted(p for p in (export_root / "saved_model").glob("*") if p.is_dir())
    if len(models) > 1:
        raise ModelLoadError(
            f"{export_root}: holds several models ({', '.join(m.name for m in models)}); name one"
        )
    return models[0] if models else None


# === Which runtime ===


def resolve_model(path) -> tuple[str, Path]:
    """``(kind, path)`` with kind ``keras`` | ``saved_model`` | ``tflite`` for a model path.

    A SavedModel may be named by its version folder, its model folder (newest version) or the
    export root holding one model (newest version).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: model not found")
    if path.is_file():
        if path.suffix == ".tflite":
            return "tflite", path
        if path.suffix == ".keras":
            return "keras", path
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head[4:8] == _TFLITE_IDENTIFIER:
            return "tflite", path
        raise ModelLoadError(
            f"{path}: unknown model format (expected .keras, .tflite or a SavedModel folder)"
        )
    if (path / "saved_model.pb").exists():
        return "saved_model", path
    if (path / MODEL_FILE).exists():
        return "keras", path
    newest = newest_version(path)
    if newest is not None:
        return "saved_model", newest
    model = _single_model(path)
    if model is not None and newest_version(model) is not None:
        return "saved_model", newest_version(model)
    if (path / RUN_CONFIG_FILE).exists():
        raise ModelLoadError(f"{path}: no {MODEL_FILE} in this run folder (is the run finished?)")
    raise ModelLoadError(f"{path}: not a run folder, SavedModel or export folder")


def load_predictor(path, *, num_threads: int | None = None):
    """A predictor (`runtime.predictor`) for any model path.

    Raises:
        ModelLoadError: a missing path, an unknown format, a corrupt model, a ``.tflite`` file that is
            not a lumbar-tf model.
    """
    kind, resolved = resolve_model(path)
    if kind == "tflite":
        from lumbar_tf.runtime.tflite_model import EdgeModel

        return EdgeModel(resolved, num_threads=num_threads)
    if kind == "saved_model":
        from lumbar_tf.runtime.saved_model import SavedModelPredictor

        return SavedModelPredictor(resolved)
    from lumbar_tf.runtime.keras_model import KerasPredictor

    return KerasPredictor(resolved)


# === Export metadata ===


def find_export_metadata(path) -> Path:
    """Locate ``metadata.json`` from a file, a version folder, a model folder (newest version) or the
    export root (``EXPORT/metadata.json`` or ``EXPORT/saved_model/<name>/<newest version>/``)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path / METADATA_FILE, path / "assets.extra" / METADATA_FILE]
    newest = newest_version(path)
    if newest is not None:
        candidates += [newest / METADATA_FILE, newest / "assets.extra" / METADATA_FILE]
    try:
        model = _single_model(path)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    if model is not None and newest_version(model) is not None:
        candidates.append(newest_version(model) / METADATA_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{path}: no {METADATA_FILE} found (pass the export's metadata.json)")


def load_export_metadata(path) -> dict:
    """Read the export's ``metadata.json`` (see `find_export_metadata` for what ``path`` may be)."""
    file = find_export_metadata(path)
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return meta


def preprocess_config_from_metadata(meta: dict) -> PreprocessConfig:
    """The `PreprocessConfig` the model was trained with, from metadata ``{"preprocess": {...}}``."""
    if "preprocess" not in meta or not isinstance(meta["preprocess"], dict):
        raise ConfigError(f"{METADATA_FILE}: no 'preprocess' mapping (export with lumbar-tf export)")
    return preprocess_config_from_dict(meta["preprocess"])
