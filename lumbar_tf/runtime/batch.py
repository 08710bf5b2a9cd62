"""A folder of studies -> predictions.json per study and a complete Kaggle submission.

Every study the folder or its series CSV names gets its 25 rows: a study that cannot be read, has no
sagittal series, or fails in any other way gets the rows of the training prior (the model's stored
class frequencies) and is listed with its reason in the report beside the submission and on stderr.
Kaggle rejects a submission that lacks rows, so a skipped study must never mean missing rows.

Only a server that cannot be reached, or a model that cannot be loaded, stops the batch: then every
study would fail the same way, and filling the submission with the prior would hide it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels
from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.core.errors import DatasetError, ModelLoadError, ServingError, one_line
from lumbar_tf.core.ids import is_plain_id, study_sort_key
from lumbar_tf.core.io import write_json_atomic
from lumbar_tf.dicom.reader import read_series_descriptions
from lumbar_tf.runtime import predictions
from lumbar_tf.runtime.predictor import StudyResult, predict_study


def report_path(submission) -> Path:
    """``submission.csv`` -> ``submission.report.json`` beside it."""
    submission = Path(submission)
    return submission.with_name(submission.stem + ".report.json")


def default_out_dir(submission) -> Path:
    """Per-study outputs of a submission run go beside the submission, never into the working folder."""
    submission = Path(submission)
    return submission.with_name(submission.stem + "_studies")


def find_test_studies(data_dir) -> tuple[Path, list[str], dict[str, dict[str, str]], dict[str, str]]:
    """``(images folder, study ids, descriptions, refused)`` of an RSNA-layout folder (``test_images``
    preferred, else ``train_images``).

    The ids are the study folders plus any study the CSV names; an id that is not a plain integer is
    refused (it could name a path outside the folder or a formula in a spreadsheet) and listed in
    ``refused`` with its reason; a symbolic link that leaves the images folder likewise.
    """
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
    names = {p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")}
    names |= set(descriptions)
    refused: dict[str, str] = {}
    ids = []
    root = images.resolve()
    for name in names:
        if not is_plain_id(name):
            refused[name] = "study_id is not a plain integer; refused"
        elif (images / name).exists() and root not in (images / name).resolve().parents:
            refused[name] = "study folder is a link that leaves the images folder; refused"
        else:
            ids.append(name.strip())
    return images, sorted(ids, key=study_sort_key), descriptions, refused


def prior_threshold_probs(predictor) -> np.ndarray:
    """The training prior ``[5, 5, 3]`` the predictor carries (class frequencies of its training
    split), or an uninformed 0.5 everywhere when it carries none (the report says `prior_source: none`)."""
    prior = getattr(predictor, "prior_threshold_probs", None)
    if prior is None:
        return np.full((labels.N_CONDITIONS, labels.N_LEVELS, labels.N_THRESHOLDS), 0.5)
    return np.asarray(prior, dtype=np.float64)


def predict_folder(
    predictor,
    data_dir,
    submission,
    out_dir=None,
    *,
    predict=None,
    on_result=None,
    progress: bool = True,
) -> dict:
    """Predict every study of a test folder; write the submission and its report beside it.

    Args:
        predictor: any predictor of `runtime.predictor`.
        data_dir: an RSNA-layout folder (``test_images/`` + ``test_series_descriptions.csv``).
        submission: the Kaggle submission CSV to write.
        out_dir: where each study's ``<study_id>/predictions.json`` goes; default: beside the
            submission (`default_out_dir`).
        predict: ``(study_dir, descriptions) -> StudyResult``; default `predict_study` with ``predictor``.
        on_result: called with ``(StudyResult, study_out_dir)`` after each study (heatmaps, ...).

    Returns the report (also written to `report_path`): counts, the predicted ids, the ids filled
    from the prior with their reasons, and each study's warnings.
    """
    from tqdm import tqdm

    images, study_ids, descriptions, refused = find_test_studies(data_dir)
    if not study_ids and not refused:
        raise DatasetError(f"{images}: no studies")
    out = Path(out_dir) if out_dir is not None else default_out_dir(submission)
    prior = prior_threshold_probs(predictor)
    if predict is None:

        def predict(study_dir, study_descriptions) -> StudyResult:
            return predict_study(predictor, study_dir, series_descriptions=study_descriptions)

    rows: list = []
    done: list[str] = []
    from_prior: dict[str, str] = {}
    warnings: dict[str, list[str]] = {}
    bar = tqdm(study_ids, desc="predict", unit="study", disable=not progress, file=sys.stderr)
    for study_id in bar:
        try:
            result = predict(images / study_id, descriptions.get(study_id, {}))
            predictions.write_predictions(out / study_id / "predictions.json", result.predictions)
            if on_result is not None:
                on_result(result, out / study_id)
            study_rows = predictions.submission_rows(study_id, result.threshold_probs)
        except KeyboardInterrupt:
            raise
        except (ServingError, ModelLoadError) as exc:
            if isinstance(exc, ServingError) and exc.bad_input:
                from_prior[study_id] = one_line(exc)
                rows.extend(predictions.submission_rows(study_id, prior))
                continue
            raise
        except Exception as exc:  # noqa: BLE001  (one bad study must not stop the batch)
            from_prior[study_id] = one_line(exc)
            tqdm.write(
                f"warning: study {study_id}: {from_prior[study_id]}; rows from the prior", file=sys.stderr
            )
            rows.extend(predictions.submission_rows(study_id, prior))
            continue
        rows.extend(study_rows)
        done.append(study_id)
        if result.predictions["warnings"]:
            warnings[study_id] = list(result.predictions["warnings"])
    bar.close()
    return write_batch_outputs(predictor, submission, study_ids, rows, done, from_prior, refused, warnings)


def write_batch_outputs(predictor, submission, study_ids, rows, done, from_prior, refused, warnings) -> dict:
    """Write the submission and its report (`report_path`) and return the report; shared by
    `predict_folder` and `runtime.beam_predict`."""
    for name, reason in sorted(refused.items()):
        print(f"warning: study {name!r}: {reason}", file=sys.stderr)
    predictions.write_submission(submission, rows)
    report = {
        "submission": Path(submission).name,
        "n_studies": len(study_ids),
        "n_predicted": len(done),
        "n_from_prior": len(from_prior),
        "n_refused": len(refused),
        "n_rows": len(rows),
        "predicted": done,
        "from_prior": from_prior,
        "refused": refused,
        "prior_source": "model" if getattr(predictor, "prior_threshold_probs", None) is not None else "none",
        "warnings": warnings,
        "intended_use": INTENDED_USE,
    }
    write_json_atomic(report_path(submission), report)
    return report
