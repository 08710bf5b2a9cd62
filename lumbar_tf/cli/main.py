"""The `lumbar-tf` command: synth | prepare | picture | train | evaluate | predict | explain | export | demo.

Bad input ends with one line on stderr, ``error: <file or item>: <reason>``, exit status 2; other
failures exit 1. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lumbar_tf.cli.errors import run_command
from lumbar_tf.core.contract import INTENDED_USE

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# === Commands ===


def cmd_synth(args) -> int:
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    out = synthesize_dataset(
        args.out,
        args.studies,
        args.seed,
        progress=True,
        split=args.split,
        acquisition=args.acquisition,
        fine_grades=args.labels == "fine",
    )
    print(f"wrote {args.studies} phantom studies to {out}")
    return 0


def cmd_prepare(args) -> int:
    from lumbar_tf.core.config import load_config
    from lumbar_tf.data.dataset import prepare_cache

    cfg = load_config(args.config, args.overrides)
    if args.runner == "pool":
        manifest = prepare_cache(args.data, args.out, cfg.preprocess, workers=args.workers)
    else:
        from lumbar_tf.data.beam_prepare import prepare_cache_beam

        manifest = prepare_cache_beam(args.data, args.out, cfg.preprocess, beam_options(args))
    print(f"cached {len(manifest['study_ids'])} studies in {args.out}; skipped {len(manifest['skipped'])}")
    for sid, reason in manifest["skipped"].items():
        print(f"  skipped {sid}: {reason}")
    return 0


def beam_options(args):
    """Beam pipeline options from the ``--runner`` flags (`_add_runner_flags`)."""
    from lumbar_tf.data.beam_prepare import pipeline_options

    named = {
        k: getattr(args, k)
        for k in ("project", "region", "temp_location", "flink_master", "spark_master_url")
    }
    workers = getattr(args, "workers", None)
    if args.runner == "direct" and workers and workers > 1:
        named.update(direct_running_mode="multi_processing", direct_num_workers=workers)
    return pipeline_options(args.runner, named, args.beam_arg)


def cmd_picture(args) -> int:
    from lumbar_tf.report.study_picture import save_study_picture

    path = save_study_picture(args.data, args.study_id, args.out)
    print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from lumbar_tf.training.train import train

    run = train(
        args.data,
        args.out,
        config_path=args.config,
        overrides=args.overrides,
        stage=args.stage,
        cache_dir=args.cache,
        resume=args.resume,
        overwrite=args.overwrite,
        weights=args.weights,
    )
    print(f"run folder: {run}")
    return 0


def cmd_evaluate(args) -> int:
    from lumbar_tf.training.evaluate import evaluate, format_metrics_table

    metrics = evaluate(args.model, args.data, args.out, cache_dir=args.cache, split_fold=args.fold)
    print(format_metrics_table(metrics))
    print(f"metrics written to {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_calibrate(args) -> int:
    from lumbar_tf.training.calibration import calibrate_run

    record = calibrate_run(args.model, args.data, cache_dir=args.cache)
    before, after = record["uncalibrated"], record
    print(f"fitted on {record['fitted_on']}; T, b of >=1 | >=2 | >=3 (identity unless better out of fold):")
    for group, fits in record["groups"].items():
        maps = [f"T {f['temperature']:.2f} b {f['bias']:+.2f}" for f in fits.values()]
        print(f"  {group}: " + " | ".join(maps))
    for key in ("expected_calibration_error", "threshold_log_loss", "rsna_log_loss"):
        print(f"  {key}: {before[key]:.4f} -> {after[key]:.4f}")
    print(f"stored in {Path(args.model) / 'model.keras'}")
    return 0


def cmd_predict(args) -> int:
    from lumbar_tf.cli.predict import run_predict

    return run_predict(args)


def cmd_serving_status(args) -> int:
    from lumbar_tf.runtime.serving.grpc import GrpcClient
    from lumbar_tf.runtime.serving.status import serving_status, status_lines

    with GrpcClient(args.server, model_name=args.model_name, timeout_s=args.timeout) as client:
        print("\n".join(status_lines(serving_status(client))))
    return 0


def cmd_explain(args) -> int:
    from lumbar_tf.report.explain import explain_study

    result = explain_study(args.model, args.study, args.out)
    paths = result["paths"]
    print(f"study {result['study_id']}: wrote")
    for key in ("predictions", "grid", "levels"):
        print(f"  {paths[key]}")
    for path in paths["gradcam"].values():
        print(f"  {path}")
    print(f"  {paths['report']}")
    print(INTENDED_USE)
    return 0


def cmd_export(args) -> int:
    from lumbar_tf.export.job import run_export

    return run_export(args)


def cmd_pacs(args) -> int:
    from lumbar_tf.pacs.node import run_node

    return run_node(args)


def cmd_demo(args) -> int:
    from lumbar_tf.cli.demo import run_demo

    return run_demo(args)


# === Parser ===


def _add_runner_flags(p, local: str, local_help: str) -> None:
    p.add_argument(
        "--runner",
        choices=(local, "direct", "prism", "dataflow", "flink", "spark"),
        default=local,
        help=f"{local}: {local_help} (default); else an Apache Beam runner (extra [beam])",
    )
    p.add_argument("--project", help="Dataflow: Google Cloud project")
    p.add_argument("--region", help="Dataflow: region")
    p.add_argument("--temp-location", help="Dataflow: gs:// folder for temporary files")
    p.add_argument("--flink-master", help="Flink: HOST:PORT of the JobManager")
    p.add_argument("--spark-master-url", help="Spark: spark://HOST:7077")
    p.add_argument(
        "--beam-arg",
        action="append",
        default=[],
        help="any other Beam pipeline option, e.g. --beam-arg=--num_workers=20",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumbar-tf",
        description=f"Grade lumbar-spine degeneration on MRI. {INTENDED_USE}",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write phantom studies in the RSNA layout")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument(
        "--acquisition",
        choices=("realistic", "centred"),
        default="realistic",
        help="realistic: as RSNA studies are scanned (default); centred: coarse fields centred on the spine",
    )
    p.add_argument(
        "--labels",
        choices=("fine", "rsna"),
        default="fine",
        help="fine: train.csv and train_grades.csv (grades 0-3); rsna: train.csv only (the competition's)",
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="decode studies once into a TFRecord cache of model-ready views")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path)
    p.add_argument("--workers", type=int, help="decoding processes (default: one per core; 1: no pool)")
    _add_runner_flags(p, "pool", "a process pool on this machine")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("picture", help="save a picture of one study with the grades it carries")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--study-id", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_picture)

    p = sub.add_parser("train", help="train the level localiser, then the level grader")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--config", type=Path)
    p.add_argument("--cache", type=Path, help="prepared cache (default: RUN/cache, prepared if absent)")
    p.add_argument("--stage", choices=("localizer", "grader", "all"), default="all")
    p.add_argument("--weights", help="backbone weights: none, imagenet (online) or a local file")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue a run folder")
    group.add_argument("--overwrite", action="store_true", help="replace a finished run")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics on held-out studies, end to end")
    p.add_argument("--model", required=True, type=Path, help="run folder")
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cache", type=Path)
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        help="evaluate this fold of the run's split (default: the validation fold when DATA is the "
        "training data, else every study of DATA)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "calibrate", help="fit calibration (T, b per group) on the validation fold, store it in the model"
    )
    p.add_argument("--model", required=True, type=Path, help="run folder")
    p.add_argument("--data", required=True, type=Path, help="the run's training data")
    p.add_argument("--cache", type=Path)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("predict", help="predict one study, a test folder, or through TF Serving")
    p.add_argument("--model", type=Path, help=".keras run/model, SavedModel folder or .tflite file")
    p.add_argument("--study", type=Path, help="one study folder")
    p.add_argument("--data", type=Path, help="an RSNA-layout test folder (with --submission)")
    p.add_argument("--submission", type=Path, help="write a Kaggle submission CSV")
    p.add_argument("--out", type=Path, help="output folder (default: predictions/, or beside --submission)")
    p.add_argument("--server", help="TF Serving gRPC address HOST:8500")
    p.add_argument("--rest", help="TF Serving REST base URL http://HOST:8501")
    p.add_argument("--model-name", default="lumbar_spine")
    p.add_argument(
        "--metadata",
        type=Path,
        help="export metadata.json for --server/--rest; default: the served model's metadata signature",
    )
    p.add_argument("--heatmaps", action="store_true", help="also write the grid and per-disc overlay")
    p.add_argument(
        "--dicom-out", type=Path, help="also write the DICOM SR and overlay (with --study) for the PACS"
    )
    p.add_argument(
        "--deidentify", action="store_true", help="--dicom-out files without identifiers (research copies)"
    )
    _add_runner_flags(p, "local", "one study after another in this process (with --data)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serving-status", help="is the model served? the version TF Serving answers with")
    p.add_argument("--server", required=True, help="TF Serving gRPC address HOST:8500")
    p.add_argument("--model-name", default="lumbar_spine")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    p.set_defaults(func=cmd_serving_status)

    p = sub.add_parser("explain", help="heatmaps, Grad-CAM and an HTML report for one study")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--study", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="SavedModel for TF Serving and TFLite variants for tablets")
    p.add_argument("--model", required=True, type=Path, help="run folder or end-to-end .keras file")
    p.add_argument("--out", required=True, type=Path, help="export root EXPORT/")
    p.add_argument("--name", default="lumbar_spine", help="model name (TF Serving model_name)")
    p.add_argument("--version", type=int, help="SavedModel version (default: the next free number)")
    p.add_argument(
        "--tflite", default="float32,float16,dynamic,int8", help="comma-separated TFLite variants, or none"
    )
    p.add_argument("--data", type=Path, help="held-out data for the export report's ROC-AUC")
    p.add_argument(
        "--representative-size", type=int, default=64, help="training studies for int8 calibration and checks"
    )
    p.add_argument("--metrics", type=Path, help="an evaluation metrics.json to store in the export metadata")
    p.add_argument("--cache", type=Path, help="prepared cache of the training data (representative studies)")
    p.add_argument(
        "--allow-degraded",
        action="store_true",
        help="publish a TFLite variant even if its held-out ROC-AUC loss exceeds the floor",
    )
    p.add_argument(
        "--calibrate-on-phantoms",
        action="store_true",
        help="calibrate int8 on synthesised phantoms when no training study is found",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("pacs", help="a PACS node: poll DICOMweb and/or receive C-STORE, store SR + overlay")
    p.add_argument("--model", required=True, type=Path, help="run folder, export or .tflite model")
    p.add_argument("--work", required=True, type=Path, help="state file, C-STORE inbox, temporary fetches")
    p.add_argument("--dicomweb", help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--scp-port", type=int, help="serve C-STORE on this port")
    p.add_argument("--aet", default="LUMBARTF", help="this node's AE title (default LUMBARTF)")
    p.add_argument("--store-to", help="send results by C-STORE to AET@HOST:PORT (without --dicomweb)")
    p.add_argument("--settle", type=float, default=60.0, help="seconds a study must be unchanged (60)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between polls (30)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    p.set_defaults(func=cmd_pacs)

    p = sub.add_parser("demo", help="synthesise, train, evaluate, export and explain on phantom data")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--studies", type=int, default=300)
    p.add_argument("--config", type=Path)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
