"""`lumbar-tf predict`: one study or a test folder, with any runtime, to predictions.json / a submission.

    lumbar-tf predict --model RUN|model.keras|SAVED_MODEL|EXPORT|x.tflite --study DIR [--out OUT] [--heatmaps]
        [--dicom-out DIR [--deidentify]]      # also the SR + overlay for the PACS (lumbar_tf.pacs)
    lumbar-tf predict --model ... --data TEST_FOLDER --submission submission.csv [--out OUT]
    lumbar-tf predict --server HOST:8500 | --rest http://HOST:8501 --study DIR   # preprocessing from the
        [--metadata EXPORT/metadata.json]     # served model; a local file only for older exports

The runtime is chosen from the model path (`runtime.artifacts.load_predictor`) or the server flag
(`runtime.serving.predictor.ServingPredictor`); every runtime then takes the same path from the study
to predictions.json (`runtime.predictor.predict_study`), and a folder the same path to a complete
submission (`runtime.batch.predict_folder`).
"""

from __future__ import annotations

from pathlib import Path

from lumbar_tf.core.contract import INTENDED_USE, PREDICTIONS_FILE
from lumbar_tf.core.errors import UsageError
from lumbar_tf.runtime import predictions
from lumbar_tf.runtime.batch import report_path
from lumbar_tf.runtime.predictor import predict_study


def _predictor(args):
    if args.server or args.rest:
        from lumbar_tf.runtime.serving.predictor import ServingPredictor

        source = args.metadata or args.model  # None: the served model's own metadata signature
        if args.server:
            from lumbar_tf.runtime.serving.grpc import GrpcClient

            client = GrpcClient(args.server, model_name=args.model_name)
        else:
            from lumbar_tf.runtime.serving.rest import RestClient

            client = RestClient(args.rest, model_name=args.model_name)
        return ServingPredictor(client, source)
    from lumbar_tf.runtime.artifacts import load_predictor

    return load_predictor(args.model)


def _report_lines(report, submission) -> list[str]:
    lines = [
        f"predicted {report['n_predicted']} of {report['n_studies']} studies; "
        f"{report['n_from_prior']} from the training prior, {report['n_refused']} refused; "
        f"submission: {submission} ({report['n_rows']} rows); report: {report_path(submission)}"
    ]
    lines += [f"  warning: study {sid}: {reason}" for sid, reason in report["from_prior"].items()]
    warnings = report["n_from_prior"] + report["n_refused"]
    if warnings:
        lines.append(f"{warnings} warning(s)")
    return lines


def _run_beam(args) -> int:
    """``predict --data --submission --runner BEAM_RUNNER``: `runtime.beam_predict`."""
    if not args.data or args.server or args.rest or args.heatmaps:
        raise UsageError(
            f"predict --runner {args.runner}",
            "needs --model, --data and --submission (not --server, --rest or --heatmaps)",
        )
    from lumbar_tf.cli.main import beam_options
    from lumbar_tf.runtime.beam_predict import predict_folder_beam

    options = beam_options(args)
    report = predict_folder_beam(args.model, args.data, args.submission, args.out, options=options)
    print("\n".join(_report_lines(report, args.submission)))
    print(INTENDED_USE)
    return 0


def run_predict(args) -> int:
    """``lumbar-tf predict`` (options: `lumbar_tf.cli.main.build_parser`)."""
    if bool(args.study) == bool(args.data):
        raise UsageError("predict: give exactly one of --study DIR or --data DIR")
    if args.data and not args.submission:
        raise UsageError("predict: --data needs --submission FILE")
    if (args.dicom_out or args.deidentify) and not args.study:
        raise UsageError("predict: --dicom-out/--deidentify work with --study (one study)")
    if args.deidentify and not args.dicom_out:
        raise UsageError("predict: --deidentify needs --dicom-out DIR")
    if args.server and args.rest:
        raise UsageError("predict: give --server or --rest, not both")
    if not (args.server or args.rest) and args.model is None:
        raise UsageError("predict: --model is required (or --server/--rest with --metadata)")
    if getattr(args, "runner", "local") != "local":
        return _run_beam(args)
    predictor = _predictor(args)
    heatmaps = None
    if args.heatmaps:
        from lumbar_tf.report.heatmaps import write_heatmaps_for as heatmaps
    try:
        if args.study:
            result = predict_study(predictor, args.study)
            out = Path(args.out or "predictions")
            if heatmaps is not None:
                heatmaps(result, out)
            if args.dicom_out:
                from lumbar_tf.pacs.results import write_dicom_results

                for dicom_path in write_dicom_results(result, args.dicom_out, deidentify=args.deidentify):
                    print(f"wrote {dicom_path}")
            path = predictions.write_predictions(out / PREDICTIONS_FILE, result.predictions)
            print("\n".join(predictions.summary_lines(result.predictions, path)))
        else:
            from lumbar_tf.runtime.batch import predict_folder

            report = predict_folder(predictor, args.data, args.submission, args.out, on_result=heatmaps)
            print("\n".join(_report_lines(report, args.submission)))
    finally:
        close = getattr(predictor, "close", None)
        if close is not None:
            close()
    print(INTENDED_USE)
    return 0
