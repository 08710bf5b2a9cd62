"""`lumbar-tf demo` (what `make demo` runs): the whole job end to end on phantom studies.

synthesise training and held-out studies -> picture of one study -> train (CPU config) ->
evaluate on the held-out studies -> export (SavedModel + TFLite) -> predict one held-out study
through the SavedModel and the int8 TFLite model -> explain it (heatmaps, Grad-CAM, HTML report).
"""

from __future__ import annotations

import time
from pathlib import Path

from lumbar_tf.core.contract import INTENDED_USE

DEMO_CONFIG = "cpu_demo"  # built-in config (package data)
HOLDOUT_STUDIES = 60


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(args) -> int:
    from lumbar_tf.data.dataset import read_index
    from lumbar_tf.report.study_picture import save_study_picture
    from lumbar_tf.synthetic.phantom import synthesize_dataset
    from lumbar_tf.training.evaluate import evaluate, format_metrics_table
    from lumbar_tf.training.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = args.config or DEMO_CONFIG
    start = time.perf_counter()

    t = _step(f"synthesise {args.studies} training and {HOLDOUT_STUDIES} held-out phantom studies")
    data = synthesize_dataset(out / "data", args.studies, seed=0, progress=True)
    holdout = synthesize_dataset(out / "holdout", HOLDOUT_STUDIES, seed=1, progress=True)
    print(f"done in {time.perf_counter() - t:.0f} s")

    study_id = read_index(holdout).study_ids[0]
    picture = save_study_picture(holdout, study_id, out / "study.png")
    print(f"study picture: {picture}")

    t = _step("train (localiser, then grader)")
    run = train(data, out / "run", config_path=config, overwrite=True)
    print(f"done in {time.perf_counter() - t:.0f} s")

    t = _step("evaluate on held-out studies (end to end: grader on the localiser's crops)")
    metrics = evaluate(run, holdout, out / "eval")
    print(format_metrics_table(metrics))
    print(f"done in {time.perf_counter() - t:.0f} s")

    _export_and_predict(run, holdout, study_id, out)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    print(INTENDED_USE)
    return 0


def _export_and_predict(run: Path, holdout: Path, study_id: str, out: Path) -> None:
    """Export, predict one held-out study through SavedModel and int8 TFLite, and explain it."""
    from lumbar_tf.export.job import export_model
    from lumbar_tf.report.explain import explain_study
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.predictions import write_predictions
    from lumbar_tf.runtime.predictor import predict_study

    t = _step("export SavedModel and TFLite (float32, float16, dynamic, int8)")
    report = export_model(run, out / "export", data_dir=holdout, metrics=out / "eval" / "metrics.json")
    evaluation = report.get("evaluation") or {}
    for variant, result in (evaluation.get("tflite") or {}).items():
        delta = result.get("delta_vs_keras")
        print(f"  {variant:>8}: held-out macro ROC-AUC {result['macro_roc_auc']:.4f} (vs Keras {delta:+.4f})")
    print(f"done in {time.perf_counter() - t:.0f} s; report: {out / 'export' / 'export_report.json'}")

    study = holdout / "train_images" / study_id
    t = _step(f"predict held-out study {study_id} through the SavedModel and the int8 TFLite model")
    runtimes = {
        "SavedModel": (out / "export", out / "predict_saved_model"),
        "int8 TFLite": (out / "export" / "tflite" / "lumbar_spine_int8.tflite", out / "predict_int8"),
    }
    for name, (model, where) in runtimes.items():
        if not Path(model).exists():  # a TFLite variant the AUC gate refused (see the report)
            print(f"{name:>12}: not published ({report['tflite']['int8'].get('reason')})")
            continue
        preds = predict_study(load_predictor(model), study).predictions
        write_predictions(where / "predictions.json", preds)
        worst = max(preds["cells"], key=lambda c: (c["grade"], c["grade_probs"][c["grade"]]))
        print(
            f"{name:>12}: worst cell {worst['condition']} {worst['level']} "
            f"grade {worst['grade']} (p={worst['grade_probs'][worst['grade']]:.2f})"
        )
    print(f"done in {time.perf_counter() - t:.0f} s")

    t = _step(f"explain held-out study {study_id} (heatmaps, Grad-CAM, HTML report)")
    result = explain_study(run, study, out / "report")
    print(f"report: {result['paths']['report']}")
    print(f"done in {time.perf_counter() - t:.0f} s")
