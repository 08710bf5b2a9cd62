"""Spine low in the field vs centred: is the gap between them larger than the run-to-run spread?

    PYTHONPATH=. .venv/bin/python benchmarks/field_placement.py [--runs 3] [--studies 100] [--holdout 60]

Trains K small runs on the same realistic phantom studies (`synth`'s default acquisition), each with
another training seed (`train.seed`: initialisation, shuffling, augmentation draws), and evaluates each
end to end on the same held-out studies of another seed (`lumbar-tf evaluate`, whose
`by_field_placement` splits them "low" / "centred", `training.evaluate.LOW_FIELD_SHARE`). Reports per
run and as mean +- SD over the runs: RSNA loss, macro ROC-AUC and the localiser's median level error
for each group and the gap (low - centred); and per run a 95% study-bootstrap interval of the gap
(studies resampled within each group, the model fixed): the spread a single run's held-out split
gives, beside the spread between training seeds. One data cache serves every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumbar_tf.core.config import load_config  # noqa: E402
from lumbar_tf.data.dataset import load_studies, prepare_cache  # noqa: E402
from lumbar_tf.synthetic.phantom import synthesize_dataset  # noqa: E402
from lumbar_tf.training.evaluate import evaluate, field_placement  # noqa: E402
from lumbar_tf.training.metrics import compute_metrics  # noqa: E402

CONFIG = "cpu_demo"
# Small enough for 3 runs in ~20 min on 2 shared cores: 96 px views, 48 px crops, fewer epochs.
OVERRIDES = [
    "preprocess.view_size=96",
    "preprocess.crop_size=48",
    "model.localizer_size=96",
    "train.localizer.epochs=20",
    "train.grader.epochs=15",
]
GROUPS = ("low", "centred")
METRICS = ("rsna_loss", "auc", "level_error_mm")


def _group_metrics(outputs: dict, studies: dict, keep: np.ndarray, crop_mm: float) -> dict:
    """RSNA loss, macro AUC and median level error (mm) of the studies ``keep``."""
    scores = compute_metrics(outputs["threshold_probs"][keep], studies["grades"][keep])
    err = np.linalg.norm(outputs["level_xy"][keep] - studies["level_xy"][keep], axis=-1) * crop_mm
    err = err[studies["level_present"][keep] > 0.5]
    return {
        "rsna_loss": scores["rsna_log_loss"]["total"],
        "auc": scores["macro_roc_auc"],
        "level_error_mm": float(np.median(err)) if err.size else float("nan"),
    }


def _bootstrap_gap(outputs, studies, groups, crop_mm, n_boot: int, rng) -> dict:
    """95% interval of each metric's gap (low - centred), studies resampled within each group."""
    index = {g: np.flatnonzero(groups == g) for g in GROUPS}
    gaps = {m: [] for m in METRICS}
    for _ in range(n_boot):
        low, centred = (
            _group_metrics(outputs, studies, rng.choice(index[g], index[g].size), crop_mm) for g in GROUPS
        )
        for m in METRICS:
            if low[m] is not None and centred[m] is not None:
                gaps[m].append(low[m] - centred[m])
    return {m: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for m, v in gaps.items()}


def one_run(k: int, data: Path, holdout: Path, caches: tuple[Path, Path], out: Path, n_boot: int) -> dict:
    from lumbar_tf.runtime.keras_model import load_model
    from lumbar_tf.training.train import train

    t = time.perf_counter()
    run = train(
        data,
        out / f"run{k}",
        config_path=CONFIG,
        overrides=[*OVERRIDES, f"train.seed={k}"],
        cache_dir=caches[0],
        overwrite=True,
    )
    train_s = time.perf_counter() - t
    metrics = evaluate(run, holdout, out / f"eval{k}", cache_dir=caches[1])
    loaded = load_model(run)
    cfg = loaded.preprocess
    studies = load_studies(caches[1], cfg)
    outputs = loaded.predict_views(studies["views"])
    placement = field_placement(holdout, studies["study_id"])
    groups = np.array([placement[s] for s in studies["study_id"]])
    row = {"seed": k, "train_s": round(train_s), "n": {g: int(np.sum(groups == g)) for g in GROUPS}}
    for g in GROUPS:
        row[g] = _group_metrics(outputs, studies, groups == g, cfg.spine_crop_mm)
        split = metrics["by_field_placement"][g]  # what `evaluate` reports: the same numbers
        assert abs(split["rsna_log_loss"] - row[g]["rsna_loss"]) < 1e-6, (split, row[g])
    row["gap"] = {m: row["low"][m] - row["centred"][m] for m in METRICS}
    row["gap_ci95"] = _bootstrap_gap(
        outputs, studies, groups, cfg.spine_crop_mm, n_boot, np.random.default_rng(k)
    )
    row["overall"] = {"rsna_loss": metrics["rsna_log_loss"]["total"], "auc": metrics["macro_roc_auc"]}
    return row


def _fmt_row(row: dict) -> str:
    parts = [f"run seed {row['seed']} (train {row['train_s']} s)"]
    for g in GROUPS:
        m = row[g]
        parts.append(
            f"{g} n={row['n'][g]}: loss {m['rsna_loss']:.3f} AUC {m['auc']:.3f}"
            f" err {m['level_error_mm']:.1f} mm"
        )
    gap, ci = row["gap"], row["gap_ci95"]
    parts.append(
        "gap low-centred: "
        + ", ".join(f"{m} {gap[m]:+.3f} [{ci[m][0]:+.3f}, {ci[m][1]:+.3f}]" for m in METRICS)
    )
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--holdout", type=int, default=60)
    parser.add_argument("--holdout-seed", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=300)
    parser.add_argument("--out", default="/tmp/field_placement")
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides (a.b=value)")
    args = parser.parse_args()
    OVERRIDES.extend(args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = synthesize_dataset(out / "data", args.studies, seed=0)
    holdout = synthesize_dataset(out / "holdout", args.holdout, seed=args.holdout_seed)
    # The held-out cache is prepared by the first `evaluate`, with the run's learned offsets (the
    # same in every run: they come from the one training cache).
    caches = (out / "cache_train", out / "cache_holdout")
    prepare_cache(data, caches[0], load_config(CONFIG, OVERRIDES).preprocess, progress=False)
    print(f"data and caches: {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for k in range(args.runs):
        rows.append(one_run(k, data, holdout, caches, out, args.bootstrap))
        print(_fmt_row(rows[-1]), flush=True)
    summary = {}
    for key in (*GROUPS, "gap"):
        summary[key] = {
            m: [float(np.mean([r[key][m] for r in rows])), float(np.std([r[key][m] for r in rows], ddof=1))]
            for m in METRICS
        }
    for key, values in summary.items():
        print(
            f"mean +- SD over {len(rows)} runs, {key}: "
            + ", ".join(f"{m} {mu:+.3f} +- {sd:.3f}" for m, (mu, sd) in values.items()),
            flush=True,
        )
    print(f"total {time.perf_counter() - start:.0f} s")
    (out / "results.json").write_text(
        json.dumps({"runs": rows, "mean_sd": summary, "args": vars(args)}, indent=1)
    )


if __name__ == "__main__":
    main()
