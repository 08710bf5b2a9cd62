"""A folder of studies -> predictions.json per study and a complete submission, on Apache Beam.

The same result as `runtime.batch.predict_folder`, with the work spread over a Beam runner:

    study ids -> Read (read_study + preprocess.build_views, as `predict_study` does)
              [an axial model: -> RunInference(localize)   batches of studies through the localiser
                               -> CutAxial (`predictor.axial_inputs` on the localiser's levels)]
              -> RunInference(predict)   batches of studies through the model
              -> Finish (`predictor.study_result`: level positions, predictions.json written)

An axial model's crops depend on where its own localiser puts the levels, so it takes two passes
through the model, as `predict_study` makes two calls. A study that fails in Read, CutAxial or
Finish is reported and gets the prior's rows, as in the loop; the driver then writes the
submission and report with `batch.write_batch_outputs`. The handler loads the model with
`artifacts.load_predictor` (SavedModel, ``.keras`` or ``.tflite``) once per worker and pass:
Beam's own `TFModelHandlerTensor` loads through ``tf.keras.models.load_model``, which in Keras 3
cannot open a SavedModel, and feeds one tensor where the model takes one per view.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumbar_tf.core.errors import DatasetError, one_line
from lumbar_tf.runtime import batch, predictions
from lumbar_tf.runtime.artifacts import load_predictor

_STATUS = ".beam_status"


@dataclass
class ModelFacts:
    """What Finish needs of the predictor, without the model (picklable, shipped to the workers)."""

    preprocess: object
    fine_grades: bool
    info: dict

    def model_info(self) -> dict:
        return dict(self.info)


@dataclass
class ReadStudy:
    """One study read and preprocessed, on its way to the model."""

    study_id: str
    study: object
    built: tuple  # preprocess.build_views(study, cfg): (views, grid, info, warnings)
    axial: tuple | None = None  # an axial model's (projections, crops [5, S, S, C]) after CutAxial


def _study_model_handler(model_path, max_batch_size: int, *, localize: bool = False):
    """The RunInference handler for ``model_path``: the whole model (``predict_views``: outputs per
    study), or only its localiser (``localize_views``: ``{"level_xy": [1, 5, 2]}`` per study)."""
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult

    class StudyModelHandler(ModelHandler):
        """RunInference handler: batches of `ReadStudy` through a lumbar-tf model's views input."""

        def __init__(self):
            super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
            self.model_path = str(model_path)

        def load_model(self):
            return load_predictor(self.model_path)

        def run_inference(self, batch_, model, inference_args=None):
            views = {n: np.stack([s.built[0][n] for s in batch_]) for n in model.preprocess.view_names}
            if localize:
                outputs = {"level_xy": np.asarray(model.localize_views(views))}
            else:  # axial= only for an axial model, as predict_study calls a predictor
                axial = (
                    {}
                    if model.preprocess.axial is None
                    else {"axial": np.stack([s.axial[1] for s in batch_])}
                )
                outputs = {k: np.asarray(v) for k, v in model.predict_views(views, **axial).items()}
            return [
                PredictionResult(s, {k: v[i : i + 1] for k, v in outputs.items()}, self.model_path)
                for i, s in enumerate(batch_)
            ]

        def get_num_bytes(self, batch_) -> int:
            return sum(v.nbytes for s in batch_ for v in s.built[0].values())

        def get_metrics_namespace(self) -> str:
            return "lumbar_tf"

    return StudyModelHandler()


def _read(study_id, images: Path, descriptions: dict, cfg):
    from apache_beam import pvalue

    from lumbar_tf import preprocess
    from lumbar_tf.dicom.reader import read_study

    try:
        study = read_study(images / study_id, descriptions.get(study_id, {}))
        yield ReadStudy(study_id, study, preprocess.build_views(study, cfg))
    except Exception as exc:  # noqa: BLE001  (one bad study must not stop the batch)
        yield pvalue.TaggedOutput("failed", json.dumps({"study_id": study_id, "error": one_line(exc)}))


def _cut_axial(result, facts: ModelFacts):
    """The axial crops around the projection of the localiser's levels (``result.inference``)."""
    from apache_beam import pvalue

    from lumbar_tf.runtime.predictor import axial_inputs

    read = result.example
    views, grid, info, _ = read.built
    batch = {n: np.asarray(views[n])[None] for n in facts.preprocess.view_names}
    try:
        cut = axial_inputs(facts, read.study, batch, grid, info, level_xy=result.inference["level_xy"])
        yield ReadStudy(read.study_id, read.study, read.built, cut)
    except Exception as exc:  # noqa: BLE001  (one bad study must not stop the batch)
        yield pvalue.TaggedOutput("failed", json.dumps({"study_id": read.study_id, "error": one_line(exc)}))


def _finish(result, facts: ModelFacts, out: Path) -> str:
    from lumbar_tf.runtime.predictor import study_result

    read = result.example
    try:
        done = study_result(
            facts, read.study, read.built, result.inference, study_id=read.study_id, axial=read.axial
        )
        predictions.write_predictions(out / read.study_id / "predictions.json", done.predictions)
    except Exception as exc:  # noqa: BLE001
        return json.dumps({"study_id": read.study_id, "error": one_line(exc)})
    return json.dumps(
        {
            "study_id": read.study_id,
            "threshold_probs": np.asarray(done.threshold_probs, np.float64).tolist(),
            "warnings": list(done.predictions["warnings"]),
        }
    )


def predict_folder_beam(
    model, data_dir, submission, out_dir=None, *, options, max_batch_size: int = 8
) -> dict:
    """`batch.predict_folder` for the model at ``model`` on a Beam runner (``options``:
    `data.beam_prepare.pipeline_options`); returns the same report."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    images, study_ids, descriptions, refused = batch.find_test_studies(data_dir)
    if not study_ids and not refused:
        raise DatasetError(f"{images}: no studies")
    predictor = load_predictor(model)  # here first: a model that cannot load stops the batch at once
    facts = ModelFacts(
        predictor.preprocess, bool(getattr(predictor, "fine_grades", True)), predictor.model_info()
    )
    out = Path(out_dir) if out_dir is not None else batch.default_out_dir(submission)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(_STATUS + "*"):
        stale.unlink()
    if study_ids:
        with beam.Pipeline(options=options) as pipeline:
            read = (
                pipeline
                | "Studies" >> beam.Create(study_ids)
                | "Read"
                >> beam.FlatMap(_read, images, descriptions, facts.preprocess).with_outputs(
                    "failed", main="read"
                )
            )
            failed = [read.failed]
            ready = read.read
            if facts.preprocess.axial is not None:
                cut = (
                    ready
                    | "Localize" >> RunInference(_study_model_handler(model, max_batch_size, localize=True))
                    | "CutAxial" >> beam.FlatMap(_cut_axial, facts).with_outputs("failed", main="cut")
                )
                ready = cut.cut
                failed.append(cut.failed)
            finished = (
                ready
                | "Predict" >> RunInference(_study_model_handler(model, max_batch_size))
                | "Finish" >> beam.Map(_finish, facts, out)
            )
            (
                (finished, *failed)
                | "Status" >> beam.Flatten()
                | "WriteStatus" >> beam.io.WriteToText(str(out / _STATUS))
            )
    outcome = {}
    for path in sorted(out.glob(_STATUS + "*")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            outcome[entry["study_id"]] = entry
        path.unlink()

    prior = batch.prior_threshold_probs(predictor)
    rows, done, from_prior, warnings = [], [], {}, {}
    for study_id in study_ids:
        entry = outcome[study_id]
        if "error" in entry:
            from_prior[study_id] = entry["error"]
            print(f"warning: study {study_id}: {entry['error']}; rows from the prior", file=sys.stderr)
            rows.extend(predictions.submission_rows(study_id, prior))
            continue
        rows.extend(predictions.submission_rows(study_id, entry["threshold_probs"]))
        done.append(study_id)
        if entry["warnings"]:
            warnings[study_id] = entry["warnings"]
    return batch.write_batch_outputs(
        predictor, submission, study_ids, rows, done, from_prior, refused, warnings
    )
