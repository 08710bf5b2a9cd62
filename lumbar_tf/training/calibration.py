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


def rescale(threshold_probs, temperatures, biases=None) -> np.ndarray:
    """``[N, 5, 5, 3]`` probabilities through the calibration map (`models.calibration`, in numpy);
    parameters per group, or per group and threshold."""
    from lumbar_tf.models.calibration import apply_numpy

    return apply_numpy(
        threshold_probs, temperatures, biases if biases is not None else (0.0,) * len(temperatures)
    )


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


# === Fitting: temperature + bias per group, never worse than identity out of fold ===

# The parameter grid per group: log T and b, both symmetric so that the identity (0, 0) is a point.
_LOG_T = np.arange(-15, 16) * (np.log(5.0) / 15)  # T from 1/5 to 5
_BIAS = np.arange(-15, 16) * 0.2
_GRID_LOG_T, _GRID_BIAS = (a.ravel() for a in np.meshgrid(_LOG_T, _BIAS, indexing="ij"))
_IDENTITY = int(np.flatnonzero((_GRID_LOG_T == 0) & (_GRID_BIAS == 0))[0])
# Candidate fits, chosen by cross-validation inside the validation fold: the family and the strength
# of the ridge pulling (log T, b) towards the identity.
FAMILIES = ("temperature", "temperature+bias")
RIDGE = (0.0, 0.003, 0.03, 0.3)
CV_FOLDS = 5


def _per_study(values: np.ndarray, study: np.ndarray, n: int, chunk: int = 4096) -> np.ndarray:
    """``[K, M]`` values of M items -> ``[K, n]`` sums per study (``study``: each item's index)."""
    out = np.zeros((values.shape[0], n))
    for start in range(0, values.shape[1], chunk):
        np.add.at(out.T, study[start : start + chunk], values[:, start : start + chunk].T)
    return out


def _group_losses(z, grades, conditions, thresholds, *, floor=None) -> dict:
    """Per grid point and per study, sums over one condition group's threshold tasks, so that any
    subset of studies is scored at every grid point by adding columns.

    ``z``: uncalibrated logits ``[N, 5, 5, 3]``; ``thresholds``: the indices the grid point maps
    (``(0,)``: >=1, raised to at least ``floor``, the mapped >=2 logit; ``(1, 2)``: >=2 and >=3).
    ``nll``/``nll_n``: the threshold log loss of their known tasks. For ``(1, 2)`` also ``rsna``/
    ``rsna_w``: the group's sample-weighted log loss of the RSNA triple (1/2/4 by grade, the
    scorer's eps clip and renormalisation) and, for the spinal group, the any-severe-spinal term's
    sums ``any``/``any_w``.
    """
    from lumbar_tf.training.metrics import rsna_class

    eps = np.finfo(np.float64).eps
    n = len(z)
    z = np.asarray(z)[:, conditions]  # [N, c, 5, 3]
    targets, mask = L.encode_grades(np.asarray(grades)[:, conditions])
    study = np.broadcast_to(np.arange(n)[:, None, None, None], z.shape)
    known = (mask > 0.5)[..., list(thresholds)]
    t, b = np.exp(_GRID_LOG_T)[:, None], _GRID_BIAS[:, None]
    mapped = z[..., list(thresholds)][known][None] / t + b  # [K, tasks]
    if floor is not None:
        mapped = np.maximum(mapped, np.asarray(floor)[:, conditions][..., None][known][None])
    p = np.clip(_sigmoid(mapped), _EPS, 1 - _EPS)
    y = targets[..., list(thresholds)][known][None]
    task_study = study[..., list(thresholds)][known]
    out = {
        "nll": _per_study(-(y * np.log(p) + (1 - y) * np.log1p(-p)), task_study, n),
        "nll_n": np.bincount(task_study, minlength=n).astype(np.float64),
    }
    zeros, none = np.zeros((len(_GRID_LOG_T), n)), np.zeros(n)
    out.update(rsna=zeros, rsna_w=none, any=zeros, any_w=none)
    classes = rsna_class(np.asarray(grades)[:, conditions])  # [N, c, 5]
    scored = classes >= 0
    if thresholds != (1, 2) or not scored.any():
        return out
    weights = np.asarray(L.RSNA_SEVERITY_WEIGHTS)[np.maximum(classes, 0)][scored]
    cls, cell_study = classes[scored], study[..., 0][scored]
    p = _sigmoid(z[scored][None, :, 1:] / t[..., None] + b[..., None])  # [K, cells, 2]
    triple = np.clip(np.stack([1 - p[..., 0], p[..., 0] - p[..., 1], p[..., 1]], axis=-1), 0, 1)
    triple = np.clip(triple, eps, 1 - eps)
    triple = triple / triple.sum(axis=-1, keepdims=True)
    loss = -np.log(np.take_along_axis(triple, cls[None, :, None], axis=-1)[..., 0]) * weights
    out["rsna"] = _per_study(loss, cell_study, n)
    out["rsna_w"] = np.bincount(cell_study, weights=weights, minlength=n)
    if conditions == [0]:  # any severe spinal per study: its largest severe probability
        studies, starts = np.unique(cell_study, return_index=True)  # cells are in study order
        severe = np.clip(np.maximum.reduceat(p[..., 1], starts, axis=1), eps, 1 - eps)
        label = np.maximum.reduceat((cls == 2).astype(np.float64), starts) > 0
        w = np.maximum.reduceat(weights, starts)
        out["any"] = np.zeros((len(_GRID_LOG_T), n))
        out["any"][:, studies] = -w * np.log(np.where(label, severe, 1 - severe))
        out["any_w"] = np.zeros(n)
        out["any_w"][studies] = w
    return out


def _scores(losses: dict, studies) -> tuple[np.ndarray, np.ndarray]:
    """(threshold log loss, the group's RSNA loss terms summed) of these studies at every grid point."""
    nll = losses["nll"][:, studies].sum(1) / max(losses["nll_n"][studies].sum(), 1)
    rsna = losses["rsna"][:, studies].sum(1) / max(losses["rsna_w"][studies].sum(), _EPS)
    if losses["any_w"][studies].sum() > 0:
        rsna = rsna + losses["any"][:, studies].sum(1) / losses["any_w"][studies].sum()
    return nll, rsna


def _fit_point(losses: dict, studies, family: str, ridge: float) -> int:
    """The grid point of least ridge-penalised threshold log loss on these studies among those whose
    RSNA loss terms are not above the identity's (the identity is always allowed)."""
    nll, rsna = _scores(losses, studies)
    objective = nll + ridge * (_GRID_LOG_T**2 + _GRID_BIAS**2)
    allowed = rsna <= rsna[_IDENTITY] + 1e-12
    if family == "temperature":
        allowed &= _GRID_BIAS == 0
    allowed[_IDENTITY] = True
    return int(np.argmin(np.where(allowed, objective, np.inf)))


def _cross_validated(losses: dict, n: int, folds: int) -> dict:
    """The map of one group's thresholds: the candidate (family x ridge) with the lowest out-of-fold
    threshold log loss among those that beat the identity out of fold without raising its RSNA
    terms there, refitted on every study; the identity when none does."""
    record = {"temperature": 1.0, "bias": 0.0, "family": "identity", "ridge": None}
    k = min(folds, n)
    if k < 2 or np.count_nonzero(losses["nll_n"]) < 2:
        return {**record, "out_of_fold": None}
    fold_of = np.random.default_rng(0).permutation(n) % k
    splits = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]
    identity = [float(s[_IDENTITY]) for s in _scores(losses, np.arange(n))]
    best = None
    for family in FAMILIES:
        for ridge in RIDGE:
            sums = dict.fromkeys(("nll", "nll_n", "rsna", "rsna_w", "any", "any_w"), 0.0)
            for train, test in splits:
                point = _fit_point(losses, train, family, ridge)
                for key in ("nll", "rsna", "any"):
                    sums[key] += losses[key][point, test].sum()
                for key in ("nll_n", "rsna_w", "any_w"):
                    sums[key] += losses[key][test].sum()
            nll = sums["nll"] / max(sums["nll_n"], 1)
            rsna = sums["rsna"] / max(sums["rsna_w"], _EPS) + (
                sums["any"] / sums["any_w"] if sums["any_w"] else 0
            )
            if nll < identity[0] - 1e-9 and rsna <= identity[1] + 1e-9 and (best is None or nll < best[0]):
                best = (float(nll), float(rsna), family, ridge)
    if best is None:
        return {
            **record,
            "out_of_fold": {"threshold_log_loss": [identity[0]] * 2, "rsna_terms": [identity[1]] * 2},
        }
    point = _fit_point(losses, np.arange(n), best[2], best[3])
    return {
        "temperature": float(np.exp(_GRID_LOG_T[point])),
        "bias": float(_GRID_BIAS[point]),
        "family": best[2],
        "ridge": best[3],
        "out_of_fold": {"threshold_log_loss": [identity[0], best[0]], "rsna_terms": [identity[1], best[1]]},
    }


def fit_calibration(threshold_probs, grades, *, folds: int = CV_FOLDS) -> dict:
    """Per group, the maps `lumbar-tf calibrate` stores, and why: ``{group: {">=2,>=3": fit,
    ">=1": fit}}``, each fit ``{"temperature", "bias", "family", "ridge", "out_of_fold"}``
    (out-of-fold threshold log loss and RSNA terms, identity first).

    >=2 and >=3 share one map, chosen under the constraint that the RSNA loss terms (which read only
    them) do not rise; >=1, which the RSNA triple never reads, gets its own, on top of the first
    (raised to at least the mapped >=2). Candidates are cross-validated over the studies
    (`_cross_validated`).
    """
    from lumbar_tf.models.calibration import CONDITION_GROUP, GROUPS

    z = _logit(threshold_probs)
    n = len(z)
    result = {}
    for g, group in enumerate(GROUPS):
        conditions = [c for c, cg in enumerate(CONDITION_GROUP) if cg == g]
        upper = _cross_validated(_group_losses(z, grades, conditions, (1, 2)), n, folds)
        floor = z[..., 1] / upper["temperature"] + upper["bias"]
        first = _cross_validated(_group_losses(z, grades, conditions, (0,), floor=floor), n, folds)
        result[group] = {">=2,>=3": upper, ">=1": first}
    return result


def calibration_table(fitted: dict) -> tuple[list, list]:
    """(temperatures, biases) ``[group][threshold]`` of a `fit_calibration` result."""
    from lumbar_tf.models.calibration import GROUPS

    rows = [(fitted[g][">=1"], fitted[g][">=2,>=3"]) for g in GROUPS]
    return (
        [[a["temperature"], b["temperature"], b["temperature"]] for a, b in rows],
        [[a["bias"], b["bias"], b["bias"]] for a, b in rows],
    )


def _rsna_total(threshold_probs, grades) -> float:
    from lumbar_tf.training.metrics import rsna_log_loss

    return rsna_log_loss(L.rsna_triple(np.asarray(threshold_probs)), grades)["total"]


def paired_bootstrap_se(before, after, grades, metric=None, *, n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error (studies resampled) of ``metric(after) - metric(before)``: the noise
    a change of the RSNA loss on these studies is judged against."""
    metric = metric or _rsna_total
    rng = np.random.default_rng(seed)
    n = len(grades)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a, b = metric(after[idx], grades[idx]), metric(before[idx], grades[idx])
        if a is not None and b is not None:
            diffs.append(a - b)
    return float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")


def calibration_report(threshold_probs, grades, before=None, calibration=None) -> dict:
    """ECE, threshold log loss and RSNA loss of the predictions; given the predictions ``before``
    calibration (and the model's ``calibration`` tables), the same for those and the RSNA loss's
    change with its paired bootstrap standard error over the studies (the noise to judge it by)."""
    report = {
        "expected_calibration_error": expected_calibration_error(threshold_probs, grades),
        "threshold_log_loss": threshold_log_loss(threshold_probs, grades),
        "rsna_log_loss": _rsna_total(threshold_probs, grades),
        "temperatures": None,
        "biases": None,
    }
    if before is not None:
        from lumbar_tf.models.calibration import GROUPS

        if calibration is not None:
            report["temperatures"] = dict(zip(GROUPS, calibration[0], strict=True))
            report["biases"] = dict(zip(GROUPS, calibration[1], strict=True))
        report["uncalibrated"] = {
            "expected_calibration_error": expected_calibration_error(before, grades),
            "threshold_log_loss": threshold_log_loss(before, grades),
            "rsna_log_loss": _rsna_total(before, grades),
        }
        report["rsna_log_loss_change"] = report["rsna_log_loss"] - report["uncalibrated"]["rsna_log_loss"]
        report["rsna_log_loss_change_se"] = paired_bootstrap_se(
            np.asarray(before), np.asarray(threshold_probs), np.asarray(grades)
        )
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


def save_reliability(path, threshold_probs, grades, before=None, title="") -> Path:
    from lumbar_tf.core.io import save_png

    curves = {}
    if before is not None:
        curves["before calibration"] = (before, grades)
        curves["after calibration"] = (threshold_probs, grades)
    else:
        curves["model"] = (threshold_probs, grades)
    return save_png(reliability_figure(curves, title or "Reliability of the threshold probabilities"), path)


def _uncalibrated(loaded):
    """``loaded`` with its end-to-end model rebuilt on the grader without its calibration layer."""
    from dataclasses import replace

    from lumbar_tf.models.calibration import uncalibrated_grader
    from lumbar_tf.models.end_to_end import build_end_to_end, fine_grades_of

    model = loaded.model
    grader = uncalibrated_grader(model.get_layer("grader"))
    rebuilt = build_end_to_end(
        model.get_layer("localizer"), grader, loaded.preprocess, fine_grades=fine_grades_of(model)
    )
    return replace(loaded, model=rebuilt)


def evaluate_calibration(loaded, views, threshold_probs, grades, out_dir) -> dict:
    """What `lumbar-tf evaluate` reports: `calibration_report` of the evaluated predictions (and,
    where the model is calibrated, of the same model without its calibration on the same ``views``)
    and ``OUT/reliability.png``."""
    from lumbar_tf.models.calibration import calibration_of

    try:
        calibration = calibration_of(loaded.model.get_layer("grader"))
    except ValueError:
        calibration = None
    before = None
    if calibration is not None:
        before = _uncalibrated(loaded).predict_views(views)["threshold_probs"]
    save_reliability(Path(out_dir) / RELIABILITY_FILE, threshold_probs, grades, before)
    return calibration_report(threshold_probs, grades, before, calibration)


# === The command ===


def calibrate_run(run_dir, data_dir, *, cache_dir=None) -> dict:
    """Fit the calibration on the run's validation fold, store it in ``RUN/model.keras``.

    Returns the calibration record written to ``RUN/calibration.json``.
    """
    from lumbar_tf.core.contract import MODEL_FILE
    from lumbar_tf.data.dataset import load_manifest, load_studies, prepare_cache
    from lumbar_tf.models.calibration import calibrated_grader
    from lumbar_tf.models.end_to_end import build_end_to_end, fine_grades_of
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
    base = _uncalibrated(loaded)  # fit on the uncalibrated logits
    probs = base.predict_views(studies["views"])["threshold_probs"]
    fitted = fit_calibration(probs, studies["grades"])
    calibration = calibration_table(fitted)
    after = rescale(probs, *calibration)

    model = build_end_to_end(
        loaded.model.get_layer("localizer"),
        calibrated_grader(base.model.get_layer("grader"), *calibration),
        cfg,
        fine_grades=fine_grades_of(loaded.model),
    )
    if not (run / UNCALIBRATED_MODEL_FILE).exists():
        (run / MODEL_FILE).replace(run / UNCALIBRATED_MODEL_FILE)
    tmp = run / f".{MODEL_FILE}.tmp.keras"
    model.save(tmp)
    tmp.replace(run / MODEL_FILE)

    record = {
        "fitted_on": f"validation fold {split['val_fold']} ({len(ids)} studies)",
        "groups": fitted,
        **calibration_report(after, studies["grades"], probs, calibration),
    }
    write_json_atomic(run / CALIBRATION_FILE, record)
    save_reliability(
        run / RELIABILITY_FILE,
        after,
        studies["grades"],
        probs,
        title=f"Validation fold {split['val_fold']} ({len(ids)} studies), fitted on it",
    )
    return record
