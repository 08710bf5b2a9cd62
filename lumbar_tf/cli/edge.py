"""`lumbar-tf-edge`: grade one study offline on a tablet with a TFLite model (never TensorFlow).

    lumbar-tf-edge --model lumbar_spine_int8.tflite --study train_images/4003253 --out result/ [--heatmaps]

The same path from a study to predictions.json as every other runtime (`runtime.predictor`), with
the LiteRT interpreter as the predictor (`runtime.tflite_model.EdgeModel`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lumbar_tf.cli.errors import run_command
from lumbar_tf.core.contract import INTENDED_USE, PREDICTIONS_FILE
from lumbar_tf.runtime import predictions
from lumbar_tf.runtime.predictor import predict_study
from lumbar_tf.runtime.tflite_model import EdgeModel


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumbar-tf-edge",
        description=f"Grade one lumbar-spine MRI study offline with a lumbar-tf TFLite model. {INTENDED_USE}",
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
    if args.heatmaps:
        from lumbar_tf.report.heatmaps import write_heatmaps_for

        for path in write_heatmaps_for(result, out):
            print(f"heatmap: {path}")
    path = predictions.write_predictions(out / PREDICTIONS_FILE, result.predictions)
    print("\n".join(predictions.summary_lines(result.predictions, path)))
    print(INTENDED_USE)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console script ``lumbar-tf-edge``: exit 0, 2 with one ``error:`` line for bad input, 1 otherwise."""
    args = build_parser().parse_args(argv)
    return run_command(run, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
