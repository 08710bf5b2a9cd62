"""The Keras predictor: a trained end-to-end model (run folder or ``.keras`` file) run on views."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.core.contract import MODEL_FILE, RUN_CONFIG_FILE, RUN_LABEL_SEMANTICS_FILE, RUN_PRIOR_FILE
from lumbar_tf.core.errors import ModelLoadError


@dataclass
class LoadedModel:
    """An end-to-end Keras model with the preprocessing it was trained with."""

    model: object
    preprocess: PreprocessConfig
    path: Path
    run_dir: Path | None

    def predict_views(
        self, views: dict[str, np.ndarray], batch_size: int = 8, axial: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Views {name: [B, S, S, 3] uint8/float} (and, for an axial model, its axial crops
        ``[B, 5, S, S, 3]`` around the projection of this model's own ``level_xy``) -> the output
        contract's tensors as numpy."""
        inputs = {name: np.asarray(views[name], np.float32) for name in self.preprocess.view_names}
        if self.preprocess.axial is not None:
            if axial is None:
                raise ModelLoadError(
                    f"{self.path}: an axial model needs its axial crops (run it through predict_study)"
                )
            inputs[self.preprocess.axial.name] = np.asarray(axial, np.float32)
        n = len(next(iter(inputs.values())))
        parts = [
            self.model({k: v[i : i + batch_size] for k, v in inputs.items()}, training=False)
            for i in range(0, n, batch_size)
        ]
        return {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}

    def localize_views(self, views: dict[str, np.ndarray]) -> np.ndarray:
        """The end-to-end model's own localiser on the localiser view -> ``level_xy`` ``[B, 5, 2]``."""
        view = np.asarray(views[self.preprocess.localizer_view], np.float32)
        return np.asarray(self.model.get_layer("localizer")(view, training=False))


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
    run = path.parent if (path.parent / RUN_CONFIG_FILE).exists() else None
    return path, run


def load_model(path: str | Path) -> LoadedModel:
    """Load an end-to-end model saved by `lumbar-tf train` (safe mode, no custom objects)."""
    import keras

    import lumbar_tf.models.networks  # noqa: F401  (registers the custom layers)
    from lumbar_tf.models.end_to_end import preprocess_config_of

    file, run = resolve_model_file(path)
    if file.suffix != ".keras":
        raise ModelLoadError(f"{file}: expected a .keras model file")
    try:
        # safe_mode: a Lambda layer (pickled Python code) is refused, never run.
        model = keras.models.load_model(file, safe_mode=True)
    except Exception as exc:  # corrupt zip, foreign model, ...
        raise ModelLoadError(f"{file}: {_load_failure(exc)}") from None
    try:
        preprocess = preprocess_config_of(model)
    except ValueError:
        raise ModelLoadError(f"{file}: not a lumbar-tf end-to-end model") from None
    return LoadedModel(model, preprocess, file, run)


def _load_failure(exc: Exception) -> str:
    """Why Keras would not load a file, in one line (its messages run over many)."""
    import re

    text = " ".join(str(exc).split())
    if "Lambda" in text and "safe_mode" in text:
        return "refused: the model holds a Lambda layer (Python code), which is never loaded"
    unknown = re.search(r"Could not locate (?:class|function) '([^']+)'", text)
    if unknown:
        return f"refused: unknown class {unknown.group(1)!r} (not a lumbar-tf model, or a newer one)"
    return f"cannot load model ({exc.__class__.__name__}: {text[:200]})"


class KerasPredictor:
    """A predictor (`runtime.predictor`) over an end-to-end ``.keras`` model (run folder or file)."""

    def __init__(self, path_or_loaded):
        self.loaded = (
            path_or_loaded if isinstance(path_or_loaded, LoadedModel) else load_model(path_or_loaded)
        )
        self.preprocess = self.loaded.preprocess
        self.label_semantics = label_semantics_of(self.loaded)
        self.fine_grades = self.label_semantics["fine_grades"]
        self.path = self.loaded.path
        self.prior_threshold_probs = run_prior(self.loaded.run_dir)
        self.quality_bounds = quality_bounds_of(self.loaded)

    def predict_views(self, views: dict, axial=None) -> dict:
        return self.loaded.predict_views(views, axial=axial)

    def localize_views(self, views: dict):
        return self.loaded.localize_views(views)

    def model_info(self) -> dict:
        return {"name": self.loaded.model.name, "version": None, "format": "keras"}


def label_semantics_of(loaded: LoadedModel) -> dict:
    """What the model's training labels made known: the run's ``label_semantics.json``, else the flag
    the end-to-end model carries (`models.end_to_end.StudyGrades`), so a bare ``.keras`` file knows too."""
    import json

    if loaded.run_dir is not None and (Path(loaded.run_dir) / RUN_LABEL_SEMANTICS_FILE).is_file():
        try:
            record = json.loads((Path(loaded.run_dir) / RUN_LABEL_SEMANTICS_FILE).read_text())
            return labels.semantics_or_default(record)
        except (OSError, ValueError):
            pass
    from lumbar_tf.models.end_to_end import fine_grades_of

    try:
        fine = fine_grades_of(loaded.model)
    except ValueError:  # no study_grades layer
        return labels.semantics_or_default(None)
    return labels.semantics_or_default({"fine_grades": fine, "source": "model config (no run record)"})


def quality_bounds_of(loaded: LoadedModel) -> dict | None:
    """The input-quality bounds the model carries (`runtime.quality.bounds_from_training`), or None."""
    from lumbar_tf.models.end_to_end import quality_bounds_of as stored

    try:
        return stored(loaded.model)
    except ValueError:  # no level_xy layer
        return None


def run_prior(run_dir) -> list | None:
    """The training split's class frequencies ``[5, 5, 3]`` a run folder stored, or None."""
    import json

    if run_dir is None or not (Path(run_dir) / RUN_PRIOR_FILE).is_file():
        return None
    try:
        return json.loads((Path(run_dir) / RUN_PRIOR_FILE).read_text())["threshold_probs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
