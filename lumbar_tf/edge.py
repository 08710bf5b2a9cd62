"""TFLite runner for offline tablets: numpy + OpenCV + pydicom + ai-edge-litert, never TensorFlow.

    lumbar-tf-edge --model lumbar_spine_int8.tflite --study train_images/4003253 --out result/

A lumbar-tf ``.tflite`` file (written by `lumbar-tf export`) holds two signatures, because the
in-graph level crop of the SavedModel has no builtin TFLite op:

- ``localize``: the localiser view ``[B, S, S, 3]`` float32 0-255 (input named by the view,
  ``sag_t2`` by default) -> ``level_xy`` ``[B, 5, 2]`` (normalised x, y of each disc level);
- ``grade``: one crop per view ``[N, C, C, 3]`` float32 0-255 (inputs named by the views) and
  ``level_index`` ``[N]`` int32 -> ``threshold_probs`` ``[N, 5, 3]`` (sigmoid applied).

Between the two, the runner crops every view around each level with `preprocess.crop_levels`, the
numpy twin of the SavedModel's in-graph crop (``tf.image.crop_and_resize`` to float rounding), so
the tablet, TF Serving and training see the same pixels. The preprocessing parameters travel inside
the ``.tflite`` file (flatbuffer metadata ``lumbar_tf_metadata``), in a sidecar JSON next to it
(``<name>_<variant>.json``) and in the export's ``metadata.json``; the runner takes the first it
finds, in that order.

The study is read and preprocessed exactly as in training (`preprocess.build_views`); a missing
series gives a zero view and a warning in ``predictions.json``; a study without any sagittal series
is bad input. The output is the same ``predictions.json`` as every other runtime
(`predictions.build_predictions`).

This module imports only numpy, OpenCV (through preprocess), pydicom and, when a model is loaded,
ai-edge-litert; from lumbar_tf only labels, config, dicom, preprocess, predictions (and heatmaps when
asked for). A test runs it in a fresh interpreter and checks that TensorFlow and Keras never load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumbar_tf import labels, predictions, preprocess
from lumbar_tf.config import ConfigError, PreprocessConfig, preprocess_config_from_dict
from lumbar_tf.dicom import DicomError, Study, read_series_descriptions, read_study

LOCALIZE = "localize"
GRADE = "grade"
SIGNATURES = (LOCALIZE, GRADE)
LEVEL_INDEX = "level_index"
LEVEL_XY = "level_xy"
THRESHOLD_PROBS = "threshold_probs"
METADATA_NAME = "lumbar_tf_metadata"  # flatbuffer metadata entry holding the JSON metadata
MODEL_FORMAT = "tflite"
_TFLITE_IDENTIFIER = b"TFL3"


class EdgeError(ValueError):
    """A file that is not a usable lumbar-tf TFLite model (message: ``<file>: <reason>``)."""


# === Metadata ===


def read_embedded_metadata(content: bytes) -> dict | None:
    """The JSON stored under `METADATA_NAME` in a ``.tflite`` flatbuffer, or None if absent.

    Reads the flatbuffer with ai-edge-litert's generated schema (flatbuffers only, no TensorFlow).
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(content), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != METADATA_NAME.encode():
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
    raise EdgeError(
        f"{path}: no preprocessing metadata (not embedded, and no {sidecar_path(path).name} "
        "or metadata.json next to it); export the model with lumbar-tf export"
    )


# === The model ===


def _level_batch_to_study(per_level: np.ndarray) -> np.ndarray:
    """``[B * 5, 5, 3]`` (level-major: condition x threshold) -> ``[B, 5 condition, 5 level, 3]``."""
    per_level = np.asarray(per_level)
    study = per_level.reshape((-1, labels.N_LEVELS) + per_level.shape[1:])
    return np.swapaxes(study, 1, 2)


class EdgeModel:
    """A lumbar-tf ``.tflite`` model in the LiteRT interpreter.

    Args:
        path: the ``.tflite`` file.
        metadata: the export metadata (``{"preprocess": ..., ...}``); default: read from the file
            (embedded), its sidecar JSON or the export's metadata.json.
        num_threads: interpreter threads; default: all CPU cores.

    Raises:
        EdgeError: a missing file, a file that is not a TFLite model, or one without the
            ``localize`` / ``grade`` signatures or preprocessing metadata.
    """

    def __init__(self, path, *, metadata: dict | None = None, num_threads: int | None = None):
        self.path = Path(path)
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            raise EdgeError(f"{self.path}: model file not found") from None
        except IsADirectoryError:
            raise EdgeError(f"{self.path}: is a folder, expected a .tflite file") from None
        except OSError as exc:
            raise EdgeError(f"{self.path}: cannot read ({exc.strerror})") from None
        if len(content) < 8 or content[4:8] != _TFLITE_IDENTIFIER:
            raise EdgeError(f"{self.path}: not a TFLite model (no TFL3 flatbuffer identifier)")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise EdgeError(
                f"{self.path}: the LiteRT runtime is not installed (pip install 'lumbar-tf[edge]')"
            ) from None
        threads = num_threads if num_threads is not None else max(1, os.cpu_count() or 1)
        try:
            self.interpreter = Interpreter(model_content=content, num_threads=threads)
        except (ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
            raise EdgeError(f"{self.path}: not a valid TFLite model ({reason})") from None
        signatures = self.interpreter.get_signature_list()
        missing = [s for s in SIGNATURES if s not in signatures]
        if missing:
            raise EdgeError(
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
            raise EdgeError(f"{self.path}: bad preprocessing metadata ({exc})") from None
        self.fine_grades = bool(metadata.get("fine_grades", True))
        self._localize = self.interpreter.get_signature_runner(LOCALIZE)
        self._grade = self.interpreter.get_signature_runner(GRADE)
        self._check_signatures(signatures)

    def _check_signatures(self, signatures: dict) -> None:
        cfg = self.preprocess
        loc_inputs = signatures[LOCALIZE]["inputs"]
        if len(loc_inputs) != 1 or LEVEL_XY not in signatures[LOCALIZE]["outputs"]:
            raise EdgeError(f"{self.path}: signature 'localize' must map one view to level_xy")
        self.localize_input = loc_inputs[0]
        expected = {*cfg.view_names, LEVEL_INDEX}
        got = set(signatures[GRADE]["inputs"])
        if got != expected or THRESHOLD_PROBS not in signatures[GRADE]["outputs"]:
            raise EdgeError(
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
        """Crops ``{view: [N, C, C, 3]}`` 0-255 and level indices ``[N]`` -> ``[N, 5, 3]`` probabilities."""
        feed = {
            name: np.ascontiguousarray(crops[name], dtype=np.float32) for name in self.preprocess.view_names
        }
        feed[LEVEL_INDEX] = np.ascontiguousarray(level_index, dtype=np.int32)
        return np.array(self._grade(**feed)[THRESHOLD_PROBS], dtype=np.float32)

    def predict_views(self, views: dict[str, np.ndarray], batch_size: int = 8) -> dict[str, np.ndarray]:
        """Views ``{name: [B, S, S, 3]}`` -> the SavedModel's output tensors, as numpy.

        ``localize`` -> numpy level crops (`preprocess.crop_levels`) -> ``grade`` on the B x 5 crops.
        """
        cfg = self.preprocess
        arrays = {name: np.asarray(views[name], dtype=np.float32) for name in cfg.view_names}
        n = len(arrays[cfg.view_names[0]])
        level_xy_parts, probs_parts = [], []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in arrays.items()}
            level_xy = self.localize(chunk[cfg.localizer_view])
            crops = {name: [] for name in cfg.view_names}
            for b in range(len(level_xy)):
                per_study = preprocess.crop_levels({k: v[b] for k, v in chunk.items()}, level_xy[b], cfg)
                for name in cfg.view_names:
                    crops[name].append(per_study[name])
            crops = {k: np.concatenate(v) for k, v in crops.items()}
            level_index = np.tile(np.arange(labels.N_LEVELS, dtype=np.int32), len(level_xy))
            probs_parts.append(_level_batch_to_study(self.grade(crops, level_index)))
            level_xy_parts.append(level_xy)
        threshold_probs = np.concatenate(probs_parts).astype(np.float32)
        return {
            "grade_probs": labels.grade_probs_from_thresholds(threshold_probs),
            "threshold_probs": threshold_probs,
            "presence": labels.presence(threshold_probs, fine_grades_known=self.fine_grades),
            "level_xy": np.concatenate(level_xy_parts).astype(np.float32),
        }


# === One study, any local runtime ===


@dataclass
class StudyResult:
    """What predicting one study produced: the predictions.json dict and the tensors behind it."""

    predictions: dict
    study: Study
    outputs: dict  # the model's outputs for this study (batch of one)
    preprocess: PreprocessConfig


def descriptions_for_study(study_dir) -> dict[str, str] | None:
    """Series descriptions of a study in the RSNA layout (``DATA/{split}_images/{study_id}``), if the
    ``{split}_series_descriptions.csv`` is there; else None (series are typed from their headers)."""
    study_dir = Path(study_dir)
    images = study_dir.parent
    split = images.name[: -len("_images")] if images.name.endswith("_images") else None
    if not split:
        return None
    csv_path = images.parent / f"{split}_series_descriptions.csv"
    if not csv_path.is_file():
        return None
    try:
        return read_series_descriptions(csv_path).get(study_dir.name)
    except DicomError:
        return None


def predict_study(
    predictor, study_dir, *, study_id: str | None = None, series_descriptions: dict | None = None
) -> StudyResult:
    """Read a DICOM study, preprocess it as in training, run ``predictor``, build predictions.json.

    Args:
        predictor: anything with ``preprocess`` (`PreprocessConfig`), ``fine_grades``,
            ``predict_views(views) -> {"threshold_probs", "level_xy", ...}`` and ``model_info()``
            (`EdgeModel`, and the Keras / SavedModel predictors of `lumbar_tf.predict`).
        study_dir: ``{study_id}/{series_id}/{instance}.dcm``.
        series_descriptions: ``series_id -> description`` (RSNA CSV); default: the CSV of the
            study's data folder when it is in the RSNA layout, else typed from the headers.

    Raises:
        DicomError: unreadable study or no sagittal series.
    """
    cfg = predictor.preprocess
    if series_descriptions is None:
        series_descriptions = descriptions_for_study(study_dir)
    study = read_study(study_dir, series_descriptions)
    views, grid, info, warnings = preprocess.build_views(study, cfg)
    warnings = list(warnings)
    batch = {name: np.asarray(views[name])[None] for name in cfg.view_names}
    outputs = predictor.predict_views(batch)
    threshold_probs = np.asarray(outputs["threshold_probs"])[0]
    level_xy = np.asarray(outputs["level_xy"])[0]
    positions = predictions.level_positions_from_views(study, grid, info, level_xy, cfg, warnings)
    preds = predictions.build_predictions(
        study_id if study_id is not None else study.study_id,
        threshold_probs,
        level_xy,
        model_info=predictor.model_info(),
        level_positions=positions,
        warnings=warnings,
        fine_grades=bool(getattr(predictor, "fine_grades", True)),
    )
    return StudyResult(preds, study, outputs, cfg)


# === Heatmaps hook ===


def midline_image(study: Study, preds: dict, cfg: PreprocessConfig) -> np.ndarray | None:
    """The source midline slice the level positions lie on, normalised as the views are
    (percentile clip + CLAHE): uint8 ``[H, W]``; None when the study has no such slice."""
    instance = next(
        (lv["instance_number"] for lv in preds.get("levels", []) if lv.get("instance_number")), None
    )
    if instance is None:
        return None
    for spec in cfg.views:
        series = study.series_by_description(spec.series_description)
        if series is None or int(instance) not in series.instance_numbers:
            continue
        index = series.index_of_instance(int(instance))
        return preprocess.prepared_slices(series, [index], cfg)[0]
    return None


def write_heatmaps_for(result: StudyResult, out_dir) -> list[Path]:
    """Hook for ``--heatmaps``: `lumbar_tf.heatmaps.write_heatmaps(predictions, midline, out_dir)`.

    Returns the files written; an install without the heatmaps module, or a study without a midline
    slice, adds a warning to the predictions instead (the prediction itself still stands).
    """
    try:
        from lumbar_tf.heatmaps import write_heatmaps
    except ImportError as exc:
        result.predictions["warnings"].append(f"heatmaps not written: lumbar_tf.heatmaps unavailable ({exc})")
        return []
    image = midline_image(result.study, result.predictions, result.preprocess)
    if image is None:
        result.predictions["warnings"].append("heatmaps not written: no midline sagittal slice")
        return []
    return [Path(p) for p in write_heatmaps(result.predictions, image, Path(out_dir))]


# === Command line ===


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumbar-tf-edge",
        description=(
            "Grade one lumbar-spine MRI study offline with a lumbar-tf TFLite model (no TensorFlow). "
            "Research decision support only; not for diagnosis."
        ),
    )
    parser.add_argument("--model", required=True, type=Path, help="a .tflite file from lumbar-tf export")
    parser.add_argument("--study", required=True, type=Path, help="study folder {study_id}/{series_id}/*.dcm")
    parser.add_argument("--out", required=True, type=Path, help="output folder (predictions.json)")
    parser.add_argument("--heatmaps", action="store_true", help="also write heatmap overlays")
    parser.add_argument("--threads", type=int, default=None, help="interpreter threads (default: all cores)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run(args) -> int:
    model = EdgeModel(args.model, num_threads=args.threads)
    result = predict_study(model, args.study)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heatmaps:
        for path in write_heatmaps_for(result, out):
            print(f"heatmap: {path}")
    path = predictions.write_predictions(out / "predictions.json", result.predictions)
    preds = result.predictions
    worst = sorted(preds["cells"], key=lambda c: -c["grade_probs"][3])[:3]
    print(f"study {preds['study_id']}: {path}")
    for cell in worst:
        print(
            f"  {cell['condition']} {cell['level']}: grade {labels.GRADES[cell['grade']]}, "
            f"P(severe) {cell['grade_probs'][3]:.2f}"
        )
    for warning in preds["warnings"]:
        print(f"  warning: {warning}")
    print(predictions.INTENDED_USE)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script ``lumbar-tf-edge``: exit 0, 2 with one ``error:`` line for bad input, 1 otherwise."""
    args = build_parser().parse_args(argv)
    if args.debug:
        return run(args)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (EdgeError, DicomError, ConfigError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line, no traceback (DESIGN.md errors contract)
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {exc.__class__.__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
