"""`lumbar-tf calibrate`: fit temperature scaling on a run's validation fold and store it in the model.

    lumbar-tf calibrate --model RUN --data DATA      # RUN/model.keras now applies the temperatures

One temperature per condition group (spinal, foraminal, subarticular), fitted by minimising the
log loss of the known threshold tasks (P(>=1), P(>=2), P(>=3)) of the validation fold's end-to-end
predictions (the grader on the localiser's crops, as served). The temperatures go into the grader
(`models.calibration`), so every runtime and export applies them; the uncalibrated model stays
beside it as ``model_uncalibrated.keras``. ``calibration.json`` records the temperatures and the
expected calibration error and RSNA loss before and after; ``reliability.png`` shows both.
`calibration_report` is what `lumbar-tf evaluate` adds to metrics.json for any model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.errors import DatasetError
from lumbar_tf.core.io import write_json_atomic

CALIBRATION_FILE = "calibration.json"
RELIABILITY_FILE = "reliability.png"
UNCALIBRATED_MODEL_FILE = "model_uncalibrated.keras"
N_BINS = 10
_EPS = 1e-6


# === Numbers (numpy) ===


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def rescale(threshold_probs, temperatures) -> np.ndarray:
    """``[N, 5, 5, 3]`` probabilities with each condition's logits divided by its group temperature
    (``temperatures`` per group; pass reciprocals to undo a calibration)."""
    from lumbar_tf.models.calibration import CONDITION_GROUP

    t = np.asarray([float(temperatures[g]) for g in CONDITION_GROUP])[None, :, None, None]
    return _sigmoid(_logit(threshold_probs) / t)


def _known(threshold_probs, grades, conditions=None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted probability and 0/1 outcome of every known threshold task (optionally of some conditions)."""
    targets, mask = L.encode_grades(grades)
    probs = np.asarray(threshold_probs, dtype=np.float64)
    if conditions is not None:
        probs, targets, mask = probs[:, conditions], targets[:, conditions], mask[:, conditions]
    known = mask > 0.5
    return probs[known], targets[known]


def threshold_log_loss(threshold_probs, grades, conditions=None) -> float:
    p, y = _known(threshold_probs, grades, conditions)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(p) else float("nan")


def reliability(threshold_probs, grades, n_bins: int = N_BINS) -> dict:
    """Equal-width bins over the known threshold tasks: mean confidence, observed frequency, count."""
    p, y = _known(threshold_probs, grades)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=p, minlength=n_bins) / count
        observed = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"edges": edges, "confidence": confidence, "observed": observed, "count": count}


def expected_calibration_error(threshold_probs, grades, n_bins: int = N_BINS) -> float:
    """ECE over the known threshold tasks: sum over bins of |observed - confidence| x bin share."""
    bins = reliability(threshold_probs, grades, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    gap = np.nan_to_num(np.abs(bins["observed"] - bins["confidence"]))
    return float(np.sum(gap * bins["count"]) / total)


def fit_temperatures(threshold_probs, grades) -> tuple[float, float, float]:
    """Per group, the temperature minimising the threshold log loss (grid over log T, then refined).

    A group without known tasks keeps T = 1.
    """
    from lumbar_tf.models.calibration import CONDITION_GROUP, GROUPS

    logits = _logit(threshold_probs)
    out = []
    for g in range(len(GROUPS)):
        conditions = [c for c, group in enumerate(CONDITION_GROUP) if group == g]
        z, y = _known(_sigmoid(logits), grades, conditions)
        z = _logit(z)
        if len(z) == 0 or len(np.unique(y)) < 2:
            out.append(1.0)
            continue

        def loss(log_t, z=z, y=y):
            p = np.clip(_sigmoid(z / np.exp(log_t)), _EPS, 1 - _EPS)
            return -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))

        grid = np.linspace(np.log(0.05), np.log(20.0), 241)
        best = grid[int(np.argmin([loss(t) for t in grid]))]
        lo, hi = best - (grid[1] - grid[0]), best + (grid[1] - grid[0])
        for _ in range(40):  # golden-section refinement inside the best grid cell
            a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
            lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
        out.append(float(np.exp((lo + hi) / 2)))
    return tuple(out)


def _rsna_total(threshold_probs, grades) -> float:
    from lumbar_tf.training.metrics import rsna_log_loss

    return rsna_log_loss(L.rsna_triple(np.asarray(threshold_probs)), grades)["total"]


def calibration_report(threshold_probs, grades, temperatures=None) -> dict:
    """ECE, threshold log loss and RSNA loss of the predictions; with the model's ``temperatures``,
    the same for the predictions before calibration (the temperatures undone)."""
    report = {
        "expected_calibration_error": expected_calibration_error(threshold_probs, grades),
        "threshold_log_loss": threshold_log_loss(threshold_probs, grades),
        "rsna_log_loss": _rsna_total(threshold_probs, grades),
        "temperatures": None,
    }
    if temperatures is not None:
        from lumbar_tf.models.calibration import GROUPS

        before = rescale(threshold_probs, [1.0 / t for t in temperatures])
        report["temperatures"] = dict(zip(GROUPS, (float(t) for t in temperatures), strict=True))
        report["uncalibrated"] = {
            "expected_calibration_error": expected_calibration_error(before, grades),
            "threshold_log_loss": threshold_log_loss(before, grades),
            "rsna_log_loss": _rsna_total(before, grades),
        }
    return report


def reliability_figure(curves: dict, title: str):
    """Reliability diagram: observed frequency against confidence, one line per curve."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.add_axes((0.13, 0.12, 0.82, 0.78))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (label, (probs, grades)), marker in zip(curves.items(), "os^", strict=False):
        bins = reliability(probs, grades)
        ok = bins["count"] > 0
        ece = expected_calibration_error(probs, grades)
        ax.plot(bins["confidence"][ok], bins["observed"][ok], marker=marker, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability P(grade >= t)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8.5)
    return fig


def save_reliability(path, threshold_probs, grades, temperatures=None, title="") -> Path:
    from lumbar_tf.core.io import save_png

    curves = {}
    if temperatures is not None:
        curves["before calibration"] = (rescale(threshold_probs, [1.0 / t for t in temperatures]), grades)
        curves["after calibration"] = (threshold_probs, grades)
    else:
        curves["model"] = (threshold_probs, grades)
    return save_png(reliability_figure(curves, title or "Reliability of the threshold probabilities"), path)


def evaluate_calibration(loaded, threshold_probs, grades, out_dir) -> dict:
    """What `lumbar-tf evaluate` reports: `calibration_report` of the evaluated predictions (before
    and after, where the model holds temperatures) and ``OUT/reliability.png``."""
    from lumbar_tf.models.calibration import temperatures_of

    try:
        temperatures = temperatures_of(loaded.model.get_layer("grader"))
    except ValueError:
        temperatures = None
    save_reliability(Path(out_dir) / RELIABILITY_FILE, threshold_probs, grades, temperatures)
    return calibration_report(threshold_probs, grades, temperatures)


# === The command ===


def calibrate_run(run_dir, data_dir, *, cache_dir=None) -> dict:
    """Fit the temperatures on the run's validation fold, store them in ``RUN/model.keras``.

    Returns the calibration record written to ``RUN/calibration.json``.
    """
    from lumbar_tf.core.contract import MODEL_FILE
    from lumbar_tf.data.dataset import load_manifest, load_studies, prepare_cache
    from lumbar_tf.models.calibration import calibrated_grader, temperatures_of
    from lumbar_tf.models.end_to_end import build_end_to_end
    from lumbar_tf.runtime.keras_model import load_model

    run = Path(run_dir)
    loaded = load_model(run)
    if loaded.run_dir is None:
        raise DatasetError(f"{run}: calibrate needs a run folder (its split names the validation fold)")
    split_file = run / "split.json"
    if not split_file.is_file():
        raise DatasetError(f"{split_file}: missing (is {run} a finished run?)")
    split = json.loads(split_file.read_text())
    cfg = loaded.preprocess
    cache = Path(cache_dir) if cache_dir else run / "cache"
    try:
        manifest = load_manifest(cache, cfg)
    except DatasetError:
        manifest = prepare_cache(data_dir, cache, cfg)
    cached = set(manifest["study_ids"])
    ids = [s for s, f in split["folds"].items() if f == split["val_fold"] and s in cached]
    if not ids:
        raise DatasetError(f"{cache}: no study of the validation fold {split['val_fold']} is cached")
    studies = load_studies(cache, cfg, ids)
    grader = loaded.model.get_layer("grader")
    current = temperatures_of(grader)
    probs = loaded.predict_views(studies["views"])["threshold_probs"]
    if current is not None:  # fit on the uncalibrated logits
        probs = rescale(probs, [1.0 / t for t in current])
    temperatures = fit_temperatures(probs, studies["grades"])
    after = rescale(probs, temperatures)

    model = build_end_to_end(
        loaded.model.get_layer("localizer"), calibrated_grader(grader, temperatures), cfg
    )
    if not (run / UNCALIBRATED_MODEL_FILE).exists():
        (run / MODEL_FILE).replace(run / UNCALIBRATED_MODEL_FILE)
    tmp = run / f".{MODEL_FILE}.tmp.keras"
    model.save(tmp)
    tmp.replace(run / MODEL_FILE)

    record = {
        "fitted_on": f"validation fold {split['val_fold']} ({len(ids)} studies)",
        **calibration_report(after, studies["grades"], temperatures),
    }
    write_json_atomic(run / CALIBRATION_FILE, record)
    save_reliability(
        run / RELIABILITY_FILE,
        after,
        studies["grades"],
        temperatures,
        title=f"Validation fold {split['val_fold']} ({len(ids)} studies), fitted on it",
    )
    return record
