"""`lumbar-tf calibrate`: fit temperature scaling on a run's validation fold and store it in the model.

    lumbar-tf calibrate --model RUN --data DATA      # RUN/model.keras now applies the maps

A temperature and a bias per condition group and threshold (``logit / T + b``), each fitted by
minimising the plain log loss of its threshold task on the validation fold's end-to-end predictions
(the grader on the localiser's crops, as served), cross-validated over the fold's studies and kept
at the identity unless it beats it out of fold: honest probabilities. The RSNA metric's sample
weights are answered by the submission's decision rule (`core.labels.rsna_submission_triple`), not
here. The maps go into the grader (`models.calibration`), so every runtime and export applies them;
the uncalibrated model stays beside it as ``model_uncalibrated.keras``. ``calibration.json`` records
the maps and the expected calibration error and RSNA loss before and after; ``reliability.png``
shows both. `calibration_report` is what `lumbar-tf evaluate` adds to metrics.json for any model.
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


# === Fitting: temperature + bias per group and threshold, never worse than identity out of fold ===

# The parameter grid per map: log T and b, on steps that put the identity (0, 0) on a point. T is
# kept above MIN_TEMPERATURE: the RSNA metric weighs a confident miss of a moderate or severe cell 2-4
# times, and the sharper maps that a 10-study validation fold chose (T 0.2-0.3, lower threshold log
# loss out of fold) doubled the held-out RSNA loss of 40 phantoms (README "Calibrated probabilities").
MIN_TEMPERATURE = 0.5
_LOG_STEP = np.log(5.0) / 15
_LOG_T = np.arange(np.ceil(np.log(MIN_TEMPERATURE) / _LOG_STEP), 16) * _LOG_STEP  # T from 0.53 to 5
_BIAS = np.arange(-15, 16) * 0.2
_GRID_LOG_T, _GRID_BIAS = (a.ravel() for a in np.meshgrid(_LOG_T, _BIAS, indexing="ij"))
_IDENTITY = int(np.flatnonzero((_GRID_LOG_T == 0) & (_GRID_BIAS == 0))[0])
# Candidate fits, chosen by cross-validation inside the validation fold: the family and the strength
# of the ridge pulling (log T, b) towards the identity.
FAMILIES = ("temperature", "temperature+bias")
RIDGE = (0.0, 0.003, 0.03, 0.3)
CV_FOLDS = 5
# Fitting order: >=2 is the layer's anchor; >=3 is then capped at it and >=1 raised to it.
FIT_ORDER = (1, 2, 0)


def _per_study(values: np.ndarray, study: np.ndarray, n: int, chunk: int = 4096) -> np.ndarray:
    """``[K, M]`` values of M items -> ``[K, n]`` sums per study (``study``: each item's index)."""
    out = np.zeros((values.shape[0], n))
    for start in range(0, values.shape[1], chunk):
        np.add.at(out.T, study[start : start + chunk], values[:, start : start + chunk].T)
    return out


def _group_losses(z, grades, conditions, threshold: int, *, anchor=None) -> dict:
    """Per grid point and per study, the log loss summed over one condition group's known tasks of
    one threshold (``nll``) and their count (``nll_n``), so that any subset of studies is scored at
    every grid point by adding columns.

    ``z``: uncalibrated logits ``[N, 5, 5, 3]``; ``anchor``: the mapped >=2 logit ``[N, 5, 5]``,
    which the layer makes >=3 stay below and >=1 above (so they are fitted as the layer applies them).
    """
    n = len(z)
    z = np.asarray(z)[:, conditions][..., threshold]  # [N, c, 5]
    targets, mask = L.encode_grades(np.asarray(grades)[:, conditions])
    known = mask[..., threshold] > 0.5
    study = np.broadcast_to(np.arange(n)[:, None, None], z.shape)[known]
    mapped = z[known][None] / np.exp(_GRID_LOG_T)[:, None] + _GRID_BIAS[:, None]  # [K, tasks]
    if anchor is not None:
        bound = np.asarray(anchor)[:, conditions][known][None]
        mapped = np.minimum(mapped, bound) if threshold == 2 else np.maximum(mapped, bound)
    p = np.clip(_sigmoid(mapped), _EPS, 1 - _EPS)
    y = targets[..., threshold][known][None]
    return {
        "nll": _per_study(-(y * np.log(p) + (1 - y) * np.log1p(-p)), study, n),
        "nll_n": np.bincount(study, minlength=n).astype(np.float64),
    }


def _nll(losses: dict, studies) -> np.ndarray:
    """Threshold log loss of these studies at every grid point."""
    return losses["nll"][:, studies].sum(1) / max(losses["nll_n"][studies].sum(), 1)


def _fit_point(losses: dict, studies, family: str, ridge: float) -> int:
    """The grid point of least ridge-penalised threshold log loss on these studies."""
    objective = _nll(losses, studies) + ridge * (_GRID_LOG_T**2 + _GRID_BIAS**2)
    if family == "temperature":
        objective = np.where(_GRID_BIAS == 0, objective, np.inf)
    return int(np.argmin(objective))


def _cross_validated(losses: dict, n: int, folds: int) -> dict:
    """One map: the candidate (family x ridge) with the lowest out-of-fold threshold log loss, if
    it beats the identity out of fold, refitted on every study; else the identity."""
    record = {"temperature": 1.0, "bias": 0.0, "family": "identity", "ridge": None}
    k = min(folds, n)
    if k < 2 or np.count_nonzero(losses["nll_n"]) < 2:
        return {**record, "out_of_fold": None}
    fold_of = np.random.default_rng(0).permutation(n) % k
    splits = [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]
    identity = float(_nll(losses, np.arange(n))[_IDENTITY])
    best = None
    for family in FAMILIES:
        for ridge in RIDGE:
            total = sum(losses["nll"][_fit_point(losses, tr, family, ridge), te].sum() for tr, te in splits)
            nll = float(total / max(losses["nll_n"].sum(), 1))
            if nll < identity - 1e-9 and (best is None or nll < best[0]):
                best = (nll, family, ridge)
    if best is None:
        return {**record, "out_of_fold": {"threshold_log_loss": [identity, identity]}}
    point = _fit_point(losses, np.arange(n), best[1], best[2])
    return {
        "temperature": float(np.exp(_GRID_LOG_T[point])),
        "bias": float(_GRID_BIAS[point]),
        "family": best[1],
        "ridge": best[2],
        "out_of_fold": {"threshold_log_loss": [identity, best[0]]},
    }


def fit_calibration(threshold_probs, grades, *, folds: int = CV_FOLDS) -> dict:
    """Per group and threshold, the maps `lumbar-tf calibrate` stores, and why: ``{group: {">=1":
    fit, ">=2": fit, ">=3": fit}}``, each fit ``{"temperature", "bias", "family", "ridge",
    "out_of_fold"}`` (out-of-fold threshold log loss, identity first).

    Each map minimises the plain log loss of its threshold (honest probabilities; the submission's
    decision rule, not the calibration, answers the RSNA metric's weights). >=2 is fitted first;
    >=3 and >=1 then under the layer's monotone bound on the mapped >=2. Candidates are
    cross-validated over the studies (`_cross_validated`).
    """
    from lumbar_tf.models.calibration import CONDITION_GROUP, GROUPS

    z = _logit(threshold_probs)
    n = len(z)
    result = {}
    for g, group in enumerate(GROUPS):
        conditions = [c for c, cg in enumerate(CONDITION_GROUP) if cg == g]
        fits, anchor = {}, None
        for t in FIT_ORDER:
            fit = _cross_validated(_group_losses(z, grades, conditions, t, anchor=anchor), n, folds)
            fits[L.THRESHOLDS[t]] = fit
            if t == 1:
                anchor = z[..., 1] / fit["temperature"] + fit["bias"]
        result[group] = {k: fits[k] for k in L.THRESHOLDS}
    return result


def calibration_table(fitted: dict) -> tuple[list, list]:
    """(temperatures, biases) ``[group][threshold]`` of a `fit_calibration` result."""
    from lumbar_tf.models.calibration import GROUPS

    return (
        [[fitted[g][t]["temperature"] for t in L.THRESHOLDS] for g in GROUPS],
        [[fitted[g][t]["bias"] for t in L.THRESHOLDS] for g in GROUPS],
    )


def _rsna_total(threshold_probs, grades) -> float:
    """RSNA loss of the submission these probabilities make (the metric's decision rule)."""
    from lumbar_tf.training.metrics import submission_rsna_log_loss

    return submission_rsna_log_loss(np.asarray(threshold_probs), grades)["total"]


def _rsna_plain_total(threshold_probs, grades) -> float:
    """RSNA loss of the plain triple (1 - p2, p2 - p3, p3) submitted as it is (the rule before)."""
    from lumbar_tf.training.metrics import rsna_log_loss

    return rsna_log_loss(L.rsna_triple(np.asarray(threshold_probs)), grades)["total"]


def paired_bootstrap_se(
    before, after, grades, metric=None, *, metric_before=None, n_boot: int = 200, seed: int = 0
) -> float:
    """Bootstrap standard error (studies resampled) of ``metric(after) - metric_before(before)``
    (``metric_before`` defaults to ``metric``, which defaults to the submission's RSNA loss): the
    noise a change of the RSNA loss on these studies is judged against."""
    metric = metric or _rsna_total
    metric_before = metric_before or metric
    rng = np.random.default_rng(seed)
    n = len(grades)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a, b = metric(after[idx], grades[idx]), metric_before(before[idx], grades[idx])
        if a is not None and b is not None:
            diffs.append(a - b)
    return float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")


def _scores(threshold_probs, grades) -> dict:
    return {
        "expected_calibration_error": expected_calibration_error(threshold_probs, grades),
        "threshold_log_loss": threshold_log_loss(threshold_probs, grades),
        "rsna_log_loss": _rsna_total(threshold_probs, grades),
        "rsna_log_loss_plain_triple": _rsna_plain_total(threshold_probs, grades),
    }


def calibration_report(threshold_probs, grades, before=None, calibration=None) -> dict:
    """ECE, threshold log loss and RSNA loss (of the submission, and of the plain triple for
    reference) of the predictions; given the predictions ``before`` calibration (and the model's
    ``calibration`` tables), the same for those and the change of the submission's RSNA loss with
    its paired bootstrap standard error over the studies (the noise to judge it by): against the
    uncalibrated model under the same rule (``rsna_log_loss_change``) and against the uncalibrated
    model's plain triple, the submission before the decision rule (``..._vs_plain``)."""
    report = {**_scores(threshold_probs, grades), "temperatures": None, "biases": None}
    if before is not None:
        from lumbar_tf.models.calibration import GROUPS

        if calibration is not None:
            report["temperatures"] = dict(zip(GROUPS, calibration[0], strict=True))
            report["biases"] = dict(zip(GROUPS, calibration[1], strict=True))
        before, after, grades = np.asarray(before), np.asarray(threshold_probs), np.asarray(grades)
        report["uncalibrated"] = _scores(before, grades)
        old = report["uncalibrated"]
        report["rsna_log_loss_change"] = report["rsna_log_loss"] - old["rsna_log_loss"]
        report["rsna_log_loss_change_se"] = paired_bootstrap_se(before, after, grades)
        report["rsna_log_loss_change_vs_plain"] = report["rsna_log_loss"] - old["rsna_log_loss_plain_triple"]
        report["rsna_log_loss_change_vs_plain_se"] = paired_bootstrap_se(
            before, after, grades, metric_before=_rsna_plain_total
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


def evaluate_calibration(loaded, views, threshold_probs, grades, out_dir, axial=None) -> dict:
    """What `lumbar-tf evaluate` reports: `calibration_report` of the evaluated predictions (and,
    where the model is calibrated, of the same model without its calibration on the same ``views``
    and, for an axial model, ``axial`` crops) and ``OUT/reliability.png``."""
    from lumbar_tf.models.calibration import calibration_of

    try:
        calibration = calibration_of(loaded.model.get_layer("grader"))
    except ValueError:
        calibration = None
    before = None
    if calibration is not None:
        before = _uncalibrated(loaded).predict_views(views, axial=axial)["threshold_probs"]
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
    data_dir = data_dir or split.get("data_dir")  # where the run was trained, when not given
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
    axial = None
    if cfg.axial is not None:  # fit on what inference sees: crops around the model's own levels
        from lumbar_tf.training.evaluate import axial_crops_end_to_end

        axial, _ = axial_crops_end_to_end(loaded, Path(data_dir), studies)
    base = _uncalibrated(loaded)  # fit on the uncalibrated logits
    probs = base.predict_views(studies["views"], axial=axial)["threshold_probs"]
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
