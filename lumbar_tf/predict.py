"""`lumbar-tf predict`: one study or a test folder, with any runtime, to predictions.json / a submission.

    lumbar-tf predict --model RUN|model.keras|SAVED_MODEL|EXPORT|x.tflite --study DIR [--out OUT] [--heatmaps]
    lumbar-tf predict --model ... --data TEST_FOLDER --submission submission.csv [--out OUT]
    lumbar-tf predict --server HOST:8500 | --rest http://HOST:8501 --metadata EXPORT/metadata.json --study DIR

Runtimes (`load_predictor` picks one from the path):
  * Keras: a run folder or an end-to-end ``.keras`` file (`lumbar_tf.inference.load_model`);
  * SavedModel: a version folder (``saved_model.pb`` + ``metadata.json``), a model folder
    ``saved_model/<name>`` or an export root (newest version), run through ``serving_default``;
  * TFLite: a ``.tflite`` file from `lumbar-tf export`, through the tablet runner (`lumbar_tf.edge`);
  * TF Serving: ``--server`` (gRPC) / ``--rest`` via `lumbar_tf.serving_client.predict_study`.

Every runtime goes through the same preprocessing and the same `predictions.build_predictions`, so
``predictions.json`` never depends on the runtime. A study lacking one of the model's series is
predicted with that view fed as zeros (as in training's missing-view handling) and says so in
``warnings``; a study with no sagittal series at all is bad input (exit 2, one ``error:`` line).
In folder mode a bad study is skipped, reported on stderr and in ``OUT/summary.json``, and the
batch goes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lumbar_tf import predictions
from lumbar_tf.edge import (
    EdgeError,
    EdgeModel,
    StudyResult,
    descriptions_for_study,
    write_heatmaps_for,
)
from lumbar_tf.edge import predict_study as _predict_study_local
from lumbar_tf.inference import ModelLoadError

PREDICTIONS_FILE = "predictions.json"
SUMMARY_FILE = "summary.json"


# === Local runtimes ===


class KerasPredictor:
    """An end-to-end ``.keras`` model (run folder or file)."""

    def __init__(self, path):
        from lumbar_tf.inference import load_model

        self.loaded = load_model(path)
        self.preprocess = self.loaded.preprocess
        self.fine_grades = True
        self.path = self.loaded.path

    def predict_views(self, views: dict) -> dict:
        return self.loaded.predict_views(views)

    def model_info(self) -> dict:
        return {"name": self.loaded.model.name, "version": None, "format": "keras"}


class SavedModelPredictor:
    """``serving_default`` of an exported SavedModel version, with its ``metadata.json``."""

    def __init__(self, path):
        from lumbar_tf.config import ConfigError
        from lumbar_tf.serving_client import load_export_metadata, preprocess_config_from_metadata

        self.path = Path(path)
        if not (self.path / "metadata.json").is_file():
            raise ModelLoadError(
                f"{self.path}: no metadata.json beside the SavedModel (export it with lumbar-tf export)"
            )
        try:
            self.metadata = load_export_metadata(self.path)
            self.preprocess = preprocess_config_from_metadata(self.metadata)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from None
        self.fine_grades = bool(self.metadata.get("fine_grades", True))
        from lumbar_tf.export import SERVING_SIGNATURE, SavedModelRunner

        try:
            self.runner = SavedModelRunner(self.path)
        except Exception as exc:  # noqa: BLE001  (TF raises OSError, ValueError, KeyError, ... here)
            raise ModelLoadError(f"{self.path}: cannot load SavedModel ({exc.__class__.__name__})") from None
        inputs = set(self.runner.fn.structured_input_signature[1])
        if inputs != set(self.preprocess.view_names):
            raise ModelLoadError(
                f"{self.path}: signature {SERVING_SIGNATURE} takes {sorted(inputs)}, metadata.json says "
                f"{sorted(self.preprocess.view_names)}"
            )

    def predict_views(self, views: dict) -> dict:
        return self.runner.predict_views(views)

    def model_info(self) -> dict:
        return {
            "name": self.metadata.get("name", self.path.parent.name),
            "version": self.metadata.get("version"),
            "format": "saved_model",
        }


def _newest_version(model_dir: Path) -> Path | None:
    versions = sorted(
        (
            p
            for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists()
        ),
        key=lambda p: int(p.name),
    )
    return versions[-1] if versions else None


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
        if head[4:8] == b"TFL3":
            return "tflite", path
        raise ModelLoadError(
            f"{path}: unknown model format (expected .keras, .tflite or a SavedModel folder)"
        )
    if (path / "saved_model.pb").exists():
        return "saved_model", path
    if (path / "model.keras").exists():
        return "keras", path
    newest = _newest_version(path)
    if newest is not None:
        return "saved_model", newest
    models = (
        sorted(p for p in (path / "saved_model").glob("*") if p.is_dir())
        if (path / "saved_model").is_dir()
        else []
    )
    if len(models) == 1 and _newest_version(models[0]) is not None:
        return "saved_model", _newest_version(models[0])
    if len(models) > 1:
        raise ModelLoadError(f"{path}: holds several models ({', '.join(m.name for m in models)}); name one")
    if (path / "config.yaml").exists():
        raise ModelLoadError(f"{path}: no model.keras in this run folder (is the run finished?)")
    raise ModelLoadError(f"{path}: not a run folder, SavedModel or export folder")


def load_predictor(path, *, num_threads: int | None = None):
    """A predictor (``preprocess``, ``fine_grades``, ``predict_views``, ``model_info``) for any model path.

    Raises:
        ModelLoadError: a missing path, an unknown format, a corrupt model, a ``.tflite`` file that is
            not a lumbar-tf model.
    """
    kind, resolved = resolve_model(path)
    if kind == "tflite":
        try:
            return EdgeModel(resolved, num_threads=num_threads)
        except EdgeError as exc:
            raise ModelLoadError(str(exc)) from None
    if kind == "saved_model":
        return SavedModelPredictor(resolved)
    return KerasPredictor(resolved)


# === One study ===


def _write_outputs(result: StudyResult, out_dir, heatmaps: bool) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if heatmaps:
        write_heatmaps_for(result, out)
    predictions.write_predictions(out / PREDICTIONS_FILE, result.predictions)
    return result.predictions


def predict_study_with_model(
    model_path, study_dir, out_dir, heatmaps: bool = False, *, series_descriptions: dict | None = None
) -> dict:
    """Predict one study with a model path (or a predictor from `load_predictor`) and write
    ``OUT/predictions.json`` (plus heatmaps when asked); returns the predictions dict.

    ``model_path``: run folder, ``.keras``, SavedModel version/model/export folder or ``.tflite``.
    """
    predictor = model_path if hasattr(model_path, "predict_views") else load_predictor(model_path)
    result = _predict_study_local(predictor, study_dir, series_descriptions=series_descriptions)
    return _write_outputs(result, out_dir, heatmaps)


class _RemotePredictor:
    """TF Serving through `serving_client.predict_study`, with the export's metadata for preprocessing."""

    def __init__(self, client, metadata: dict):
        from lumbar_tf.serving_client import preprocess_config_from_metadata

        self.client = client
        self.metadata = metadata
        self.preprocess = preprocess_config_from_metadata(metadata)

    def predict(self, study_dir, descriptions) -> StudyResult:
        from lumbar_tf.dicom import read_study
        from lumbar_tf.serving_client import predict_study

        if descriptions is None:
            descriptions = descriptions_for_study(study_dir)
        preds = predict_study(
            self.client, study_dir, metadata=self.metadata, series_descriptions=descriptions
        )
        study = read_study(study_dir, descriptions)  # headers only: for the heatmaps' midline slice
        return StudyResult(preds, study, {}, self.preprocess)


def _study_runner(args):
    """``(predict(study_dir, descriptions) -> StudyResult, closer)`` for the chosen runtime."""
    if args.server or args.rest:
        from lumbar_tf.cli import UsageError
        from lumbar_tf.serving_client import GrpcClient, RestClient, load_export_metadata

        source = args.metadata or args.model
        if source is None:
            raise UsageError("--metadata: required with --server/--rest (the export's metadata.json)")
        metadata = load_export_metadata(source)
        if args.server:
            client = GrpcClient(args.server, model_name=args.model_name)
            closer = client.close
        else:
            client = RestClient(args.rest, model_name=args.model_name)
            closer = None
        remote = _RemotePredictor(client, metadata)
        return remote.predict, closer
    predictor = load_predictor(args.model)

    def predict(study_dir, descriptions):
        return _predict_study_local(predictor, study_dir, series_descriptions=descriptions)

    return predict, None


# === A folder of studies ===


def _threshold_probs(result: StudyResult) -> np.ndarray:
    """The study's ``[5, 5, 3]`` threshold probabilities (from the outputs, else from the cells)."""
    if result.outputs and "threshold_probs" in result.outputs:
        return np.asarray(result.outputs["threshold_probs"])[0]
    from lumbar_tf import labels

    tp = np.zeros((labels.N_CONDITIONS, labels.N_LEVELS, labels.N_THRESHOLDS))
    for cell in result.predictions["cells"]:
        ci, li = labels.CONDITIONS.index(cell["condition"]), labels.LEVELS.index(cell["level"])
        none, mild, moderate, severe = cell["grade_probs"]
        tp[ci, li] = (1.0 - none, moderate + severe, severe)
    return np.clip(tp, 0.0, 1.0)


def _sort_key(study_id: str):
    return (0, int(study_id), "") if study_id.isdigit() else (1, 0, study_id)


def find_test_studies(data_dir) -> tuple[Path, list[str], dict[str, dict[str, str]]]:
    """(images folder, study ids, descriptions) of an RSNA-layout folder (``test_images`` preferred,
    else ``train_images``); the ids are the study folders plus any study the CSV names."""
    from lumbar_tf.data import DatasetError
    from lumbar_tf.dicom import read_series_descriptions

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: data folder not found")
    for split in ("test", "train"):
        images = data_dir / f"{split}_images"
        if images.is_dir():
            break
    else:
        raise DatasetError(f"{data_dir}: no test_images (or train_images) folder")
    csv_path = data_dir / f"{split}_series_descriptions.csv"
    descriptions = read_series_descriptions(csv_path) if csv_path.is_file() else {}
    ids = {p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")}
    ids |= set(descriptions)
    return images, sorted(ids, key=_sort_key), descriptions


def predict_folder(
    predict, data_dir, submission, out_dir, *, heatmaps: bool = False, progress: bool = True
) -> dict:
    """Predict every study of a test folder; write the Kaggle submission and ``OUT/summary.json``.

    ``predict(study_dir, descriptions) -> StudyResult``. A study that fails (bad DICOM, no sagittal
    series, ...) is skipped with its reason on stderr and in the summary; serving or model errors stop
    the batch. Each study's predictions.json goes to ``OUT/<study_id>/``.
    """
    from tqdm import tqdm

    from lumbar_tf.data import DatasetError
    from lumbar_tf.serving_client import ServingError

    images, study_ids, descriptions = find_test_studies(data_dir)
    if not study_ids:
        raise DatasetError(f"{images}: no studies")
    out = Path(out_dir)
    rows: list = []
    done: list[str] = []
    skipped: dict[str, str] = {}
    warnings: dict[str, list[str]] = {}
    bar = tqdm(study_ids, desc="predict", unit="study", disable=not progress, file=sys.stderr)
    for study_id in bar:
        try:
            result = predict(images / study_id, descriptions.get(study_id))
            _write_outputs(result, out / study_id, heatmaps)
        except (KeyboardInterrupt, MemoryError, ServingError, ModelLoadError):
            raise
        except Exception as exc:  # noqa: BLE001  (one bad study must not stop the batch)
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            skipped[study_id] = reason
            tqdm.write(f"skipped study {study_id}: {reason}", file=sys.stderr)
            continue
        rows.extend(predictions.submission_rows(study_id, _threshold_probs(result)))
        done.append(study_id)
        if result.predictions["warnings"]:
            warnings[study_id] = list(result.predictions["warnings"])
    bar.close()
    if not done:
        raise DatasetError(f"{data_dir}: no study could be predicted ({len(skipped)} skipped)")
    predictions.write_submission(submission, rows)
    summary = {
        "data_dir": str(data_dir),
        "submission": str(submission),
        "n_studies": len(study_ids),
        "n_predicted": len(done),
        "n_skipped": len(skipped),
        "predicted": done,
        "skipped": skipped,
        "warnings": warnings,
        "intended_use": predictions.INTENDED_USE,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


# === Command line ===


def _print_study(preds: dict, path: Path) -> None:
    from lumbar_tf import labels

    model = preds["model"]
    print(f"study {preds['study_id']} ({model['format']} {model['name']} v{model['version']}): {path}")
    for cell in sorted(preds["cells"], key=lambda c: -c["grade_probs"][3])[:3]:
        print(
            f"  {cell['condition']} {cell['level']}: grade {labels.GRADES[cell['grade']]}, "
            f"P(severe) {cell['grade_probs'][3]:.2f}"
        )
    for warning in preds["warnings"]:
        print(f"  warning: {warning}")


def run_predict(args) -> int:
    """``lumbar-tf predict`` (options: `lumbar_tf.cli.build_parser`)."""
    from lumbar_tf.cli import UsageError

    if bool(args.study) == bool(args.data):
        raise UsageError("predict: give exactly one of --study DIR or --data DIR")
    if args.data and not args.submission:
        raise UsageError("predict: --data needs --submission FILE")
    if args.server and args.rest:
        raise UsageError("predict: give --server or --rest, not both")
    if not (args.server or args.rest) and args.model is None:
        raise UsageError("predict: --model is required (or --server/--rest with --metadata)")
    predict, closer = _study_runner(args)
    try:
        if args.study:
            result = predict(args.study, None)
            preds = _write_outputs(result, args.out, args.heatmaps)
            _print_study(preds, Path(args.out) / PREDICTIONS_FILE)
        else:
            summary = predict_folder(predict, args.data, args.submission, args.out, heatmaps=args.heatmaps)
            print(
                f"predicted {summary['n_predicted']} of {summary['n_studies']} studies; "
                f"skipped {summary['n_skipped']}; submission: {args.submission}; "
                f"summary: {Path(args.out) / SUMMARY_FILE}"
            )
            for study_id, reason in summary["skipped"].items():
                print(f"  skipped {study_id}: {reason}")
    finally:
        if closer is not None:
            closer()
    print(predictions.INTENDED_USE)
    return 0


__all__ = [
    "KerasPredictor",
    "SavedModelPredictor",
    "find_test_studies",
    "load_predictor",
    "predict_folder",
    "predict_study_with_model",
    "resolve_model",
    "run_predict",
]
