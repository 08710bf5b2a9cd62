"""Call the served lumbar-tf model over gRPC and REST with lumbar_tf.serving_client.

    # a whole DICOM study, preprocessed exactly as in training, -> predictions.json
    python serving/client_example.py --metadata export/saved_model/lumbar_spine/1/metadata.json \
        --study data/test_images/44036939 --out predictions.json

    # just check the server answers (blank views of the exported size)
    python serving/client_example.py --metadata export/saved_model/lumbar_spine/1/metadata.json

Research decision support only; not for diagnosis.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lumbar_tf.core.errors import ServingError
from lumbar_tf.runtime.artifacts import load_export_metadata, preprocess_config_from_metadata
from lumbar_tf.runtime.predictions import write_predictions
from lumbar_tf.runtime.predictor import predict_study
from lumbar_tf.runtime.serving.grpc import GrpcClient
from lumbar_tf.runtime.serving.predictor import ServingPredictor
from lumbar_tf.runtime.serving.rest import RestClient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", default="localhost:8500", help="gRPC host:port ('' to skip)")
    parser.add_argument("--rest", default="http://localhost:8501", help="REST base URL ('' to skip)")
    parser.add_argument("--model-name", default="lumbar_spine")
    parser.add_argument("--metadata", required=True, help="the export's metadata.json (or its folder)")
    parser.add_argument("--study", help="a DICOM study folder {study_id}/{series_id}/{instance}.dcm")
    parser.add_argument("--out", help="write predictions.json here (with --study)")
    args = parser.parse_args(argv)

    metadata = load_export_metadata(args.metadata)
    cfg = preprocess_config_from_metadata(metadata)
    clients = []
    if args.grpc:
        clients.append(GrpcClient(args.grpc, model_name=args.model_name, timeout_s=30))
    if args.rest:
        clients.append(RestClient(args.rest, model_name=args.model_name, timeout_s=30))
    try:
        for client in clients:
            if args.study:
                preds = predict_study(ServingPredictor(client, metadata), args.study).predictions
                worst = max(preds["cells"], key=lambda c: c["rsna"]["severe"])
                print(
                    f"{client!r}: study {preds['study_id']}: "
                    f"most severe {worst['condition']} {worst['level']} "
                    f"P(severe)={worst['rsna']['severe']:.3f}; warnings: {preds['warnings'] or 'none'}"
                )
                if args.out:
                    print(f"wrote {write_predictions(args.out, preds)}")
            else:
                blank = np.zeros((1, cfg.view_size, cfg.view_size, 3), np.float32)
                outputs = client.predict({name: blank for name in cfg.view_names})
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(outputs.items()))
                print(f"{client!r}: {shapes}")
    except ServingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
