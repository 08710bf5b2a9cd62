"""The TFLite predictor for offline tablets: numpy + OpenCV + ai-edge-litert, never TensorFlow.

    lumbar-tf-edge --model lumbar_spine_int8.tflite --study train_images/4003253 --out result/
    (the command line is `lumbar_tf.cli.edge`)

A lumbar-tf ``.tflite`` file (written by `lumbar-tf export`) holds two signatures, because the
in-graph level crop of the SavedModel has no builtin TFLite op:

- ``localize``: the localiser view ``[B, S, S, 3]`` float32 0-255 (input named by the view,
  ``sag_t2`` by default) -> ``level_xy`` ``[B, 5, 2]`` (normalised x, y of each disc level);
- ``grade``: one crop per view ``[N, C, C, 3]`` float32 0-255 (inputs named by the views) and
  ``level_index`` ``[N]`` int32 -> ``threshold_probs`` ``[N, 5, 3]`` (sigmoid applied); an axial
  model's ``grade`` also takes each level's axial crop ``[N, C, C, 2n+1]`` (input ``ax_t2``), cut
  by `runtime.predictor.predict_study` with `lumbar_tf.axial` around the projection of ``localize``'s
  levels (`localize_views`, then `predict_views(views, axial=)`).

Between the two, the runner crops every view around each level with `preprocess.crop_levels`, the
numpy twin of the SavedModel's in-graph crop (``tf.image.crop_and_resize`` to float rounding), so
the tablet, TF Serving and training see the same pixels. The preprocessing parameters travel inside
the ``.tflite`` file (flatbuffer metadata ``lumbar_tf_metadata``), in a sidecar JSON next to it
(``<name>_<variant>.json``) and in the export's ``metadata.json``; the runner takes the first it
finds, in that order.

`EdgeModel` is a predictor of `runtime.predictor` (the one path from a study to predictions.json).
The import-linter contracts (`make lint`) hold this module and every module the tablet needs free
of TensorFlow and Keras; a test also runs the tablet command in a fresh interpreter and checks
that neither loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lumbar_tf import preprocess
from lumbar_tf.core import labels
from lumbar_tf.core.config import PreprocessConfig, preprocess_config_from_dict
from lumbar_tf.core.contract import (
    GRADE,
    LEVEL_INDEX,
    LEVEL_XY,
    LOCALIZE,
    TFLITE_METADATA_NAME,
    TFLITE_SIGNATURES,
    THRESHOLD_PROBS,
)
from lumbar_tf.core.errors import ConfigError, ModelLoadError

MODEL_FORMAT = "tflite"
_TFLITE_IDENTIFIER = b"TFL3"


# === Metadata ===


def read_embedded_metadata(content: bytes) -> dict | None:
    """The JSON stored under `TFLITE_METADATA_NAME` in a ``.tflite`` flatbuffer, or None if absent.

    Reads the flatbuffer with ai-edge-litert's generated schema (flatbuffers only, no TensorFlow).
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(content), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != TFLITE_METADATA_NAME.encode():
            continue
        buffer = model.Buffers(entry.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        try:
            value = json.loads(buffer.DataAsNumpy().tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, dict) else None
    return None


def sidecar_path(model_path) -> Path:
    """``EXPORT/tflite/<name>_<variant>.json`` beside ``<name>_<variant>.tflite``."""
    return Path(model_path).with_suffix(".json")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def find_metadata(model_path, content: bytes) -> tuple[dict, str]:
    """The model's metadata and where it came from: embedded, sidecar JSON or ``EXPORT/metadata.json``."""
    embedded = read_embedded_metadata(content)
    if embedded and "preprocess" in embedded:
        return embedded, "embedded"
    path = Path(model_path)
    for candidate, where in (
        (sidecar_path(path), "sidecar"),
        (path.parent.parent / "metadata.json", "export metadata.json"),
        (path.parent / "metadata.json", "metadata.json"),
    ):
        if candidate.is_file():
            meta = _read_json(candidate)
            if meta and "preprocess" in meta:
                return meta, where
    raise ModelLoadError(
        f"{path}: no preprocessing metadata (not embedded, and no {sidecar_path(path).name} "
        "or metadata.json next to it); export the model with lumbar-tf export"
    )


# === The model ===


class EdgeModel:
    """A lumbar-tf ``.tflite`` model in the LiteRT interpreter.

    Args:
        path: the ``.tflite`` file.
        metadata: the export metadata (``{"preprocess": ..., ...}``); default: read from the file
            (embedded), its sidecar JSON or the export's metadata.json.
        num_threads: interpreter threads; default: all CPU cores.

    Raises:
        ModelLoadError: a missing file, a file that is not a TFLite model, or one without the
            ``localize`` / ``grade`` signatures or preprocessing metadata.
    """

    def __init__(self, path, *, metadata: dict | None = None, num_threads: int | None = None):
        self.path = Path(path)
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            raise ModelLoadError(f"{self.path}: model file not found") from None
        except IsADirectoryError:
            raise ModelLoadError(f"{self.path}: is a folder, expected a .tflite file") from None
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read ({exc.strerror})") from None
        if len(content) < 8 or content[4:8] != _TFLITE_IDENTIFIER:
            raise ModelLoadError(f"{self.path}: not a TFLite model (no TFL3 flatbuffer identifier)")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ModelLoadError(
                f"{self.path}: the LiteRT runtime is not installed (pip install 'lumbar-tf[edge]')"
            ) from None
        threads = num_threads if num_threads is not None else max(1, os.cpu_count() or 1)
        try:
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            raise ModelLoadError(f"{self.path}: not a valid TFLite model ({reason})") from None
        signatures = self.interpreter.get_signature_list()
        missing = [s for s in TFLITE_SIGNATURES if s not in signatures]
        if missing:
            raise ModelLoadError(
                f"{self.path}: not a lumbar-tf TFLite export (no {', '.join(missing)} signature; "
                f"has {', '.join(sorted(signatures)) or 'none'})"
            )
        if metadata is None:
            metadata, self.metadata_source = find_metadata(self.path, content)
        else:
            self.metadata_source = "given"
        self.metadata = metadata
        try:
            self.preprocess: PreprocessConfig = preprocess_config_from_dict(metadata["preprocess"])
        except (ConfigError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{self.path}: bad preprocessing metadata ({exc})") from None
        self.label_semantics = labels.semantics_or_default(metadata.get("label_semantics"))
        self.fine_grades = self.label_semantics["fine_grades"]
        self.prior_threshold_probs = (metadata.get("prior") or {}).get("threshold_probs")
        self.quality_bounds = metadata.get("quality_bounds")
        self._localize = self.interpreter.get_signature_runner(LOCALIZE)
        self._grade = self.interpreter.get_signature_runner(GRADE)
        self._check_signatures(signatures)

    def _check_signatures(self, signatures: dict) -> None:
        cfg = self.preprocess
        loc_inputs = signatures[LOCALIZE]["inputs"]
        if len(loc_inputs) != 1 or LEVEL_XY not in signatures[LOCALIZE]["outputs"]:
            raise ModelLoadError(f"{self.path}: signature 'localize' must map one view to level_xy")
        self.localize_input = loc_inputs[0]
        expected = {*cfg.view_names, LEVEL_INDEX, *([cfg.axial.name] if cfg.axial is not None else [])}
        got = set(signatures[GRADE]["inputs"])
        if got != expected or THRESHOLD_PROBS not in signatures[GRADE]["outputs"]:
            raise ModelLoadError(
                f"{self.path}: signature 'grade' takes {sorted(got)}, but the metadata's views need "
                f"{sorted(expected)}"
            )

    @property
    def variant(self) -> str:
        return str(self.metadata.get("variant", "unknown"))

    def model_info(self) -> dict:
        """``{"name", "version", "format"}`` for predictions.json (format ``tflite_<variant>``)."""
        return {
            "name": self.metadata.get("name", self.path.stem),
            "version": self.metadata.get("version"),
            "format": f"{MODEL_FORMAT}_{self.variant}",
        }

    def localize(self, views: np.ndarray) -> np.ndarray:
        """Localiser views ``[B, S, S, 3]`` 0-255 -> ``level_xy`` ``[B, 5, 2]``."""
        x = np.ascontiguousarray(views, dtype=np.float32)
        return np.array(self._localize(**{self.localize_input: x})[LEVEL_XY], dtype=np.float32)

    def grade(self, crops: dict[str, np.ndarray], level_index) -> np.ndarray:
        """Crops ``{view: [N, C, C, 3]}`` 0-255 (an axial model's also ``{ax_t2: [N, C, C, 2n+1]}``)
        and level indices ``[N]`` -> ``[N, 5, 3]`` probabilities."""
        names = list(self.preprocess.view_names)
        if self.preprocess.axial is not None:
            names.append(self.preprocess.axial.name)
        feed = {name: np.ascontiguousarray(crops[name], dtype=np.float32) for name in names}
        feed[LEVEL_INDEX] = np.ascontiguousarray(level_index, dtype=np.int32)
        return np.array(self._grade(**feed)[THRESHOLD_PROBS], dtype=np.float32)

    def localize_views(self, views: dict[str, np.ndarray]) -> np.ndarray:
        """``localize`` on the localiser view of ``views`` ``{name: [B, S, S, 3]}`` -> ``[B, 5, 2]``."""
        return self.localize(np.asarray(views[self.preprocess.localizer_view], dtype=np.float32))

    def predict_views(
        self, views: dict[str, np.ndarray], batch_size: int = 8, axial: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Views ``{name: [B, S, S, 3]}`` (an axial model: and its axial crops ``[B, 5, C, C, 2n+1]``
        around the projection of this model's own ``level_xy``) -> the SavedModel's output tensors.

        ``localize`` -> numpy level crops (`preprocess.crop_levels`) -> ``grade`` on the B x 5 crops.
        """
        cfg = self.preprocess
        arrays = {name: np.asarray(views[name], dtype=np.float32) for name in cfg.view_names}
        if cfg.axial is not None:
            if axial is None:
                raise ModelLoadError(
                    f"{self.path}: an axial model needs its axial crops (run it through predict_study)"
                )
            arrays[cfg.axial.name] = np.asarray(axial, dtype=np.float32)
        n = len(arrays[cfg.view_names[0]])
        level_xy_parts, probs_parts = [], []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
            level_xy = self.localize(chunk[cfg.localizer_view])
            crops = {name: [] for name in cfg.view_names}
            for b in range(len(level_xy)):
                study_views = {k: chunk[k][b] for k in cfg.view_names}
                per_study = preprocess.crop_levels(study_views, level_xy[b], cfg)
                for name in cfg.view_names:
                    crops[name].append(per_study[name])
            crops = {k: np.concatenate(v) for k, v in crops.items()}
            if cfg.axial is not None:  # [b, 5, C, C, ch] -> [b * 5, C, C, ch], level-major per study
                ax = chunk[cfg.axial.name]
                crops[cfg.axial.name] = ax.reshape(-1, *ax.shape[2:])
            level_index = np.tile(np.arange(labels.N_LEVELS, dtype=np.int32), len(level_xy))
            probs_parts.append(labels.level_batch_to_study(self.grade(crops, level_index)))
            level_xy_parts.append(level_xy)
        threshold_probs = np.concatenate(probs_parts).astype(np.float32)
        return {
            "grade_probs": labels.grade_probs_from_thresholds(threshold_probs),
            "threshold_probs": threshold_probs,
            "presence": labels.presence(threshold_probs, fine_grades_known=self.fine_grades),
            "level_xy": np.concatenate(level_xy_parts).astype(np.float32),
        }
