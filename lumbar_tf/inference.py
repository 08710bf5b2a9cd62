"""Load a trained end-to-end model (run folder or ``.keras`` file) and run it on views."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumbar_tf.config import PreprocessConfig

MODEL_FILE = "model.keras"


class ModelLoadError(ValueError):
    """A model path that is missing or not a lumbar-tf model."""


@dataclass
class LoadedModel:
    """An end-to-end Keras model with the preprocessing it was trained with."""

    model: object
    preprocess: PreprocessConfig
    path: Path
    run_dir: Path | None

    def predict_views(self, views: dict[str, np.ndarray], batch_size: int = 8) -> dict[str, np.ndarray]:
        """Views {name: [B, S, S, 3] uint8/float} -> the output contract's tensors as numpy."""
        inputs = {name: np.asarray(views[name], np.float32) for name in self.preprocess.view_names}
        n = len(next(iter(inputs.values())))
        parts = [
            self.model({k: v[i : i + batch_size] for k, v in inputs.items()}, training=False)
            for i in range(0, n, batch_size)
        ]
        return {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}


def resolve_model_file(path: str | Path) -> tuple[Path, Path | None]:
    """A run folder or a ``.keras`` file -> (model file, run folder or None)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILE
        if not candidate.exists():
            raise ModelLoadError(f"{path}: no {MODEL_FILE} in this folder (is it a finished run?)")
        return candidate, path
    if not path.exists():
        raise ModelLoadError(f"{path}: model file not found")
    run = path.parent if (path.parent / "config.yaml").exists() else None
    return path, run


def load_model(path: str | Path) -> LoadedModel:
    """Load an end-to-end model saved by `lumbar-tf train` (safe mode, no custom objects)."""
    import keras

    import lumbar_tf.model  # noqa: F401  (registers the custom layers)
    from lumbar_tf.pipeline_model import preprocess_config_of

    file, run = resolve_model_file(path)
    if file.suffix != ".keras":
        raise ModelLoadError(f"{file}: expected a .keras model file")
    try:
        model = keras.models.load_model(file)
    except Exception as exc:  # corrupt zip, foreign model, ...
        raise ModelLoadError(f"{file}: cannot load model ({exc.__class__.__name__})") from None
    try:
        preprocess = preprocess_config_of(model)
    except ValueError:
        raise ModelLoadError(f"{file}: not a lumbar-tf end-to-end model") from None
    return LoadedModel(model, preprocess, file, run)
