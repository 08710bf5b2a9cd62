"""Ablation: the grader with and without the axial view, same localiser, same budget, same held-out studies.

    PYTHONPATH=. .venv/bin/python benchmarks/axial_ablation.py --train 300 --holdout 50 --out /tmp/axial_abl \
        [--set train.seed=1] [--set KEY=VALUE ...]

One cache of the training phantoms (prepared with the axial view), one localiser, then two graders
fitted with the same stage settings, seed and crop jitter: one reads the sagittal crops only, the
other the sagittal crops plus the per-level axial crops (`preprocess.axial`). Both are evaluated end
to end on held-out phantoms of another seed through `runtime.predictor.predict_study` (localise ->
project the predicted levels onto Axial T2 -> crop -> grade); the axial model is also run with its
axial crops zeroed (a study without an axial series) to show the fallback. Reported: RSNA log loss per
group and ROC-AUC per group (mean of the group's conditions), plus the end-to-end projection: the
chosen axial slice against the labelled subarticular instance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

OVERRIDES = [
    # The CPU demo's sizes and epochs (cpu_demo.yaml). Runs 1-6 of axial_ablation_results.md used
    # 128 px views, 48 px crops, a 96 px localiser of 25 epochs and graders of 20 epochs (16 % lower
    # subarticular loss); at these sizes it is 35-46 % (run 7).
    "preprocess.view_size=192",
    "preprocess.crop_size=64",
    # dropout 0.4: a third of the levels end up outside the 3-slice per-disc stacks end to end (the
    # localiser's error, first run), and the zeroed-axial fallback was below sagittal-only at 0.3 (run 5);
    # in-plane shift 8 mm: the localiser's median error is ~7 mm; 40 mm crop (was 60): both recesses
    # (~8.5 mm off the midline) still inside with the 8 mm shift.
    "preprocess.axial={dropout: 0.4, shift_mm: 8.0, crop_mm: 40.0}",
    "model.localizer_size=128",
    "train.localizer.epochs=40",
    "train.localizer.batch_size=16",
    "train.localizer.learning_rate=0.002",
    "train.localizer.early_stopping_patience=8",
    "train.grader.epochs=30",
    "train.grader.batch_size=64",
    "train.grader.learning_rate=0.002",
    "train.grader.early_stopping_patience=30",  # all 30 epochs, best restored: val loss is noisy
]

GROUPS = {
    "spinal": ("spinal_canal_stenosis",),
    "foraminal": ("left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing"),
    "subarticular": ("left_subarticular_stenosis", "right_subarticular_stenosis"),
}


def _synth(path: Path, n: int, seed: int) -> Path:
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    if not (path / "train.csv").exists():
        synthesize_dataset(path, n, seed=seed, progress=True)
    return path


def _no_axial_model(run: Path, cfg, train_ids, val_ids, cache, jitter: float) -> Path:
    """The sagittal-only grader with the axial run's localiser, saved as an end-to-end model."""
    import keras

    from lumbar_tf.core.config import save_config
    from lumbar_tf.models.end_to_end import build_end_to_end
    from lumbar_tf.training.train import _fit_grader

    run.mkdir(parents=True, exist_ok=True)
    grader, _ = _fit_grader(run, cfg, cache, train_ids, val_ids, jitter, axial=False)
    sagittal = dataclasses.replace(cfg.preprocess, axial=None)
    localizer = keras.models.load_model(run.parent / "axial" / "localizer.keras", compile=False)
    model = build_end_to_end(localizer, grader, sagittal)
    model.save(run / "model.keras")
    save_config(dataclasses.replace(cfg, preprocess=sagittal), run / "config.yaml")
    for name in ("prior.json", "label_semantics.json", "split.json"):
        (run / name).write_bytes((run.parent / "axial" / name).read_bytes())
    return run


def _evaluate(predictors: dict, holdout: Path) -> dict:
    """End-to-end threshold probabilities of each predictor on every held-out study."""
    from lumbar_tf.data.dataset import read_index
    from lumbar_tf.runtime.predictor import predict_study

    index = read_index(holdout)
    ids = index.study_ids
    probs = {name: [] for name in predictors}
    probs["axial_zeroed"] = []
    projection = {"levels": 0, "covered": 0, "same_instance": 0, "labelled": 0}
    for sid in ids:
        study_dir = index.images_dir / sid
        for name, predictor in predictors.items():
            result = predict_study(predictor, study_dir, series_descriptions=index.descriptions.get(sid))
            probs[name].append(result.threshold_probs)
            if result.axial is None:
                continue
            batch = {n: result.views[n][None] for n in predictor.preprocess.view_names}
            zeros = np.zeros((1, *result.axial[1].shape), np.float32)
            probs["axial_zeroed"].append(predictor.predict_views(batch, axial=zeros)["threshold_probs"][0])
            labelled = {
                (row["level"], row["condition"]): (row["series_id"], row["instance_number"])
                for row in index.studies[sid].coordinates
                if row["condition"].endswith("subarticular_stenosis")
            }
            for p in result.axial[0]:
                projection["levels"] += 1
                projection["covered"] += int(p.covered)
                for side in ("left", "right"):
                    want = labelled.get((p.level, f"{side}_subarticular_stenosis"))
                    if want is not None and p.covered:
                        projection["labelled"] += 1
                        projection["same_instance"] += int(want == (p.series_id, p.instance_number))
    grades = np.stack([index.studies[s].grades for s in ids])
    return {"probs": {k: np.stack(v) for k, v in probs.items()}, "grades": grades, "projection": projection}


def _summary(probs, grades, prior) -> dict:
    from lumbar_tf.training.metrics import compute_metrics

    m = compute_metrics(probs, grades, prior)
    out = {f"loss_{g}": m["rsna_log_loss"][g] for g in (*GROUPS, "any_severe_spinal", "total")}
    for group, conditions in GROUPS.items():
        aucs = [m["per_condition_roc_auc"][c] for c in conditions]
        out[f"auc_{group}"] = float(np.mean([a for a in aucs if a is not None]))
    out["macro_roc_auc"] = m["macro_roc_auc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--holdout", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/axial_ablation"))
    parser.add_argument(
        "--evaluate-only", action="store_true", help="evaluate the runs under OUT/runs again, no training"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied after the ablation's own, e.g. preprocess.view_size=192 (repeatable)",
    )
    args = parser.parse_args()
    overrides = OVERRIDES + args.set

    from lumbar_tf.core.config import load_config
    from lumbar_tf.runtime.keras_model import KerasPredictor, run_prior
    from lumbar_tf.training.train import train

    t0 = time.time()
    train_dir = _synth(args.out / "train", args.train, 0)
    holdout = _synth(args.out / "holdout", args.holdout, 1)
    t_synth = time.time() - t0
    cache = args.out / "cache"
    runs = args.out / "runs"
    t1 = time.time()
    axial_run = runs / "axial"
    if not args.evaluate_only:
        train(train_dir, axial_run, overrides=overrides, cache_dir=cache, overwrite=True)
    t_axial = time.time() - t1
    cfg = load_config(axial_run / "config.yaml")
    split = json.loads((axial_run / "split.json").read_text())
    finished = json.loads((axial_run / "finished.json").read_text())
    t2 = time.time()
    sagittal_run = runs / "sagittal"
    if not args.evaluate_only:
        _no_axial_model(sagittal_run, cfg, split["train"], split["val"], cache, finished["grader_jitter_mm"])
    t_sagittal = time.time() - t2
    t3 = time.time()
    ev = _evaluate({"sagittal": KerasPredictor(sagittal_run), "axial": KerasPredictor(axial_run)}, holdout)
    prior = np.asarray(run_prior(axial_run))
    results = {name: _summary(p, ev["grades"], prior) for name, p in ev["probs"].items()}
    results["prior"] = _summary(np.broadcast_to(prior, ev["probs"]["axial"].shape), ev["grades"], prior)
    report = {
        "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "n_holdout": int(ev["grades"].shape[0]),
        "overrides": overrides,
        "localizer_val_error_mm": finished["localizer_val_error_mm"],
        "grader_jitter_mm": finished["grader_jitter_mm"],
        "projection": ev["projection"],
        "results": results,
        "seconds": {
            "synth": round(t_synth),
            "axial_run (cache + localiser + axial grader)": round(t_axial),
            "sagittal_grader": round(t_sagittal),
            "evaluate": round(time.time() - t3),
        },
    }
    (args.out / "axial_ablation.json").write_text(json.dumps(report, indent=2))
    keys = [f"loss_{g}" for g in (*GROUPS, "any_severe_spinal", "total")] + [f"auc_{g}" for g in GROUPS]
    print("| model | " + " | ".join(keys) + " |")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    sag, ax = results["sagittal"]["loss_subarticular"], results["axial"]["loss_subarticular"]
    print(f"subarticular loss {sag:.3f} -> {ax:.3f}: {100 * (sag - ax) / sag:.1f} % lower with axial")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
