"""Evaluation metrics of the ``metrics.json`` contract (numpy + scikit-learn; no TensorFlow).

Inputs are study arrays laid out ``[N, condition, level, ...]`` (see `lumbar_tf.core.labels`):
``threshold_probs`` ``[N, 5, 5, 3]`` (monotone P(>=1), P(>=2), P(>=3)) and grade codes ``[N, 5, 5]``
(0-3, ``NORMAL_MILD``, ``UNKNOWN``).

Definitions (DESIGN.md "Output contract"):
- *threshold task* = (condition, threshold), pooled over levels and studies; ``>=1`` only on cells
  whose fine grade (0-3) is known, ``>=2``/``>=3`` on every labelled cell. ``macro_roc_auc`` and
  ``mean_average_precision`` average the tasks that hold both classes.
- ``accuracy`` / ``balanced_accuracy``: most probable grade vs. true grade per labelled cell; a
  cell labelled only ``Normal/Mild`` is judged in the RSNA 3-class space (normal-mild / moderate /
  severe). Balanced accuracy (scikit-learn's) is the mean recall over the true classes present (Normal/Mild
  counting as its own class).
- ``per_condition_f1`` (macro F1) and ``quadratic_weighted_kappa`` are computed per condition in
  one ordinal space: the 4 grades when every labelled cell of that condition has a fine grade,
  else the RSNA 3 classes for all its cells.
- ``rsna_log_loss``: the RSNA 2024 competition metric (`rsna_log_loss`) of what a submission
  holds, `core.labels.rsna_submission_triple` (the metric's decision rule), for the model and the
  constant-prior anchor alike (`submission_rsna_log_loss`).
Values that are undefined on the data given (no task with both classes, no labelled cell) are
``None`` (``null`` in JSON).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from lumbar_tf.core import labels as L
from lumbar_tf.core.errors import MetricsError

RSNA_GROUPS = {"spinal": (0,), "foraminal": (1, 2), "subarticular": (3, 4)}
RSNA_LOSS_KEYS = ("total", "spinal", "foraminal", "subarticular", "any_severe_spinal")
RSNA_CLASSES = ("normal_mild", "moderate", "severe")
METRIC_KEYS = (
    "macro_roc_auc",
    "mean_average_precision",
    "accuracy",
    "balanced_accuracy",
    "per_condition_f1",
    "per_condition_roc_auc",
    "quadratic_weighted_kappa",
    "rsna_log_loss",
    "prior_rsna_log_loss",
    "n_studies",
)


# === Inputs ===


def _check_inputs(threshold_probs, grades) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(threshold_probs, dtype=np.float64)
    codes = np.asarray(grades)
    expected = (L.N_CONDITIONS, L.N_LEVELS)
    if codes.ndim != 3 or codes.shape[1:] != expected:
        raise MetricsError(f"grades: expected shape [N, 5, 5], got {list(codes.shape)}")
    if probs.shape != codes.shape + (L.N_THRESHOLDS,):
        raise MetricsError(f"threshold_probs: expected shape {[*codes.shape, 3]}, got {list(probs.shape)}")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0.0 or probs.max(initial=0.0) > 1.0:
        raise MetricsError("threshold_probs: values must be finite probabilities in [0, 1]")
    codes = codes.astype(np.int64)
    if not np.all(np.isin(codes, (0, 1, 2, 3, L.NORMAL_MILD, L.UNKNOWN))):
        raise MetricsError("grades: codes must be 0-3, NORMAL_MILD (-2) or UNKNOWN (-1)")
    return probs, codes


def rsna_class(grades) -> np.ndarray:
    """Grade codes -> RSNA class index (0 normal/mild, 1 moderate, 2 severe); -1 where unlabelled."""
    codes = np.asarray(grades, dtype=np.int64)
    out = np.where(codes == 3, 2, np.where(codes == 2, 1, 0))
    return np.where(codes == L.UNKNOWN, -1, out)


def _none_if_nan(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def _mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# === Threshold tasks ===


def threshold_tasks(threshold_probs, grades):
    """Yield ``(condition_index, threshold_index, y_true, y_score)`` for each of the 15 tasks."""
    probs, codes = _check_inputs(threshold_probs, grades)
    targets, mask = L.encode_grades(codes)
    for ci in range(L.N_CONDITIONS):
        for ti in range(L.N_THRESHOLDS):
            known = mask[:, ci, :, ti] > 0.5
            yield ci, ti, targets[:, ci, :, ti][known].astype(np.int64), probs[:, ci, :, ti][known]


def _task_scores(threshold_probs, grades) -> dict:
    """ROC-AUC and average precision of every task that holds both classes."""
    scores = {}
    for ci, ti, y, s in threshold_tasks(threshold_probs, grades):
        if y.size and 0 < y.sum() < y.size:
            scores[ci, ti] = (float(roc_auc_score(y, s)), float(average_precision_score(y, s)))
    return scores


# === Grades ===


def predicted_codes(threshold_probs, grades) -> np.ndarray:
    """The most probable grade per cell, in the space of that cell's label.

    Fine-graded cells get the arg-max of the four grade probabilities; ``Normal/Mild`` cells the
    arg-max of the RSNA triple mapped to codes (``NORMAL_MILD``, 2, 3); unlabelled cells ``UNKNOWN``.
    """
    probs, codes = _check_inputs(threshold_probs, grades)
    fine = L.grade_probs_from_thresholds(probs).argmax(-1)
    coarse = np.array([L.NORMAL_MILD, 2, 3])[L.rsna_triple(probs).argmax(-1)]
    return np.where(codes == L.UNKNOWN, L.UNKNOWN, np.where(codes == L.NORMAL_MILD, coarse, fine))


def condition_space(grades, condition_index: int) -> str:
    """``"grade"`` when every labelled cell of the condition has a fine grade, else ``"rsna"``."""
    codes = np.asarray(grades)[:, condition_index]
    return "rsna" if np.any(codes == L.NORMAL_MILD) else "grade"


def _condition_labels(threshold_probs, grades, condition_index: int):
    """(y_true, y_pred, class names) of one condition's labelled cells in its ordinal space."""
    probs, codes = _check_inputs(threshold_probs, grades)
    c_probs, c_codes = probs[:, condition_index], codes[:, condition_index]
    labelled = c_codes != L.UNKNOWN
    if condition_space(codes, condition_index) == "grade":
        y_pred = L.grade_probs_from_thresholds(c_probs).argmax(-1)
        return c_codes[labelled], y_pred[labelled], L.GRADES
    y_pred = L.rsna_triple(c_probs).argmax(-1)
    return rsna_class(c_codes)[labelled], y_pred[labelled], RSNA_CLASSES


def confusion_matrices(threshold_probs, grades) -> dict:
    """Per condition ``{"space", "labels", "matrix"}`` (rows true, columns predicted) for plots."""
    out = {}
    for ci, condition in enumerate(L.CONDITIONS):
        y_true, y_pred, names = _condition_labels(threshold_probs, grades, ci)
        matrix = (
            confusion_matrix(y_true, y_pred, labels=list(range(len(names))))
            if y_true.size
            else (np.zeros((len(names), len(names)), dtype=np.int64))
        )
        out[condition] = {
            "space": condition_space(grades, ci),
            "labels": list(names),
            "matrix": np.asarray(matrix).tolist(),
        }
    return out


def roc_pr_curves(threshold_probs, grades) -> dict:
    """``{condition: {">=k": {fpr, tpr, precision, recall, roc_auc, average_precision, n, n_positive}}}``
    for every threshold task that holds both classes (numpy arrays, ready to plot)."""
    out: dict = {c: {} for c in L.CONDITIONS}
    for ci, ti, y, s in threshold_tasks(threshold_probs, grades):
        if not (y.size and 0 < y.sum() < y.size):
            continue
        fpr, tpr, _ = roc_curve(y, s)
        precision, recall, _ = precision_recall_curve(y, s)
        out[L.CONDITIONS[ci]][L.THRESHOLDS[ti]] = {
            "fpr": fpr,
            "tpr": tpr,
            "precision": precision,
            "recall": recall,
            "roc_auc": float(roc_auc_score(y, s)),
            "average_precision": float(average_precision_score(y, s)),
            "n": int(y.size),
            "n_positive": int(y.sum()),
        }
    return out


# === RSNA competition metric ===


def _weighted_log_loss(classes: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> float:
    """sklearn-style weighted log loss: clip to [eps, 1 - eps], renormalise rows, weighted mean.

    The RSNA 2024 scorer called ``sklearn.metrics.log_loss(y_true, y_pred, sample_weight=w)``;
    scikit-learn of that time clipped with float64 eps, renormalised each row to sum to 1 and
    returned ``np.average(row_losses, weights=w)``.
    """
    eps = np.finfo(np.float64).eps
    probs = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    probs = probs / probs.sum(axis=1, keepdims=True)
    row_losses = -np.log(probs[np.arange(len(classes)), classes])
    return float(np.average(row_losses, weights=weights))


def rsna_log_loss(rsna_probs, grades) -> dict:
    """RSNA 2024 Lumbar Spine metric on study arrays.

    Args:
        rsna_probs: ``[N, 5, 5, 3]`` (normal_mild, moderate, severe) per cell.
        grades: ``[N, 5, 5]`` grade codes; unlabelled cells are not scored.

    Returns:
        ``{"total", "spinal", "foraminal", "subarticular", "any_severe_spinal"}``. Each group is a
        weighted log loss with sample weights 1 / 2 / 4 for normal-mild / moderate / severe
        (left and right pooled). ``any_severe_spinal`` is a binary log loss per study over its
        labelled spinal levels: label = any of them severe, prediction = the largest severe
        probability among them, weight = the largest of their sample weights (the scorer grouped
        the *scored* rows by study). ``total`` is the mean of the four (of those defined, when a
        group has no labelled row; ``None`` if none is).
    """
    probs = np.asarray(rsna_probs, dtype=np.float64)
    codes = np.asarray(grades)
    if codes.ndim != 3 or codes.shape[1:] != (L.N_CONDITIONS, L.N_LEVELS):
        raise MetricsError(f"grades: expected shape [N, 5, 5], got {list(codes.shape)}")
    if probs.shape != codes.shape + (3,):
        raise MetricsError(f"rsna_probs: expected shape {[*codes.shape, 3]}, got {list(probs.shape)}")
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0.0:
        raise MetricsError("rsna_probs: values must be finite and non-negative")
    classes = rsna_class(codes)
    weights = np.asarray(L.RSNA_SEVERITY_WEIGHTS)[np.maximum(classes, 0)]
    result: dict = {}
    for group, condition_indices in RSNA_GROUPS.items():
        group_classes = classes[:, condition_indices].reshape(-1)
        scored = group_classes >= 0
        if not scored.any():
            result[group] = None
            continue
        result[group] = _weighted_log_loss(
            group_classes[scored],
            probs[:, condition_indices].reshape(-1, 3)[scored],
            weights[:, condition_indices].reshape(-1)[scored],
        )
    spinal_classes, spinal_scored = classes[:, 0], classes[:, 0] >= 0
    studies = spinal_scored.any(axis=1)
    if studies.any():
        any_severe = np.any((spinal_classes == 2) & spinal_scored, axis=1)[studies].astype(np.int64)
        severe_pred = np.max(np.where(spinal_scored, probs[:, 0, :, 2], -np.inf), axis=1)[studies]
        study_weights = np.max(np.where(spinal_scored, weights[:, 0], 0.0), axis=1)[studies]
        binary = np.stack([1.0 - severe_pred, severe_pred], axis=-1)
        result["any_severe_spinal"] = _weighted_log_loss(any_severe, binary, study_weights)
    else:
        result["any_severe_spinal"] = None
    parts = [result[k] for k in ("spinal", "foraminal", "subarticular", "any_severe_spinal")]
    return {"total": _mean_or_none(parts), **{k: result[k] for k in RSNA_LOSS_KEYS[1:]}}


def submission_rsna_log_loss(threshold_probs, grades) -> dict:
    """`rsna_log_loss` of the rows a submission writer would write for these threshold probabilities
    (`core.labels.rsna_submission_triple`; the any-severe term then reads the submitted severe)."""
    return rsna_log_loss(L.rsna_submission_triple(threshold_probs), grades)


# === Prior ===


def prior_threshold_probs_from_grades(grades) -> np.ndarray:
    """Class-frequency prior ``[5, 5, 3]`` per (condition, level) cell of a training split.

    Each threshold's frequency over the cells where it is known, smoothed as
    ``(positives + 0.5) / (known + 1)`` so an unseen grade keeps a finite log loss (and a cell
    with no labels gets 0.5), then made monotone (P(>=1) >= P(>=2) >= P(>=3)).
    """
    codes = np.asarray(grades)
    if codes.ndim != 3 or codes.shape[1:] != (L.N_CONDITIONS, L.N_LEVELS):
        raise MetricsError(f"grades: expected shape [N, 5, 5], got {list(codes.shape)}")
    targets, mask = L.encode_grades(codes)
    positives = (targets * mask).sum(axis=0, dtype=np.float64)
    known = mask.sum(axis=0, dtype=np.float64)
    prior = (positives + 0.5) / (known + 1.0)
    # Monotone from the top: >=2 at least >=3, then >=1 at least >=2.
    prior[..., 1] = np.maximum(prior[..., 1], prior[..., 2])
    prior[..., 0] = np.maximum(prior[..., 0], prior[..., 1])
    return prior.astype(np.float32)


# === Bayes limit of the phantom ===


def bayes_optimal_threshold_probs(latent, noise) -> np.ndarray:
    """P(grade >= 1, 2, 3) ``[..., 3]`` given each cell's latent severity, under the phantom's grade
    noise: the label is ``latent + N(0, sd)`` cut at ``cuts`` (`lumbar_tf.synthetic.phantom`).

    The best any predictor can do when the anatomy shows the latent severity exactly; its metrics
    are the phantom's limit, beside the model's. ``noise``: ``{"sd": float, "cuts": (c1, c2, c3)}``.
    """
    from scipy.special import ndtr

    z = np.asarray(latent, np.float64)[..., None]
    cuts = np.asarray(noise["cuts"], np.float64)
    sd = float(noise["sd"])
    if cuts.shape != (3,) or not np.all(np.diff(cuts) > 0) or sd <= 0:
        raise MetricsError(f"noise: need sd > 0 and three increasing cuts, got {noise}")
    return ndtr((z - cuts) / sd)  # decreasing in the cut: monotone by construction


# === All metrics ===


def compute_metrics(threshold_probs, grades, prior_threshold_probs=None) -> dict:
    """Every metric of the ``metrics.json`` contract (keys `METRIC_KEYS`).

    Args:
        threshold_probs: ``[N, 5, 5, 3]`` predicted threshold probabilities.
        grades: ``[N, 5, 5]`` true grade codes.
        prior_threshold_probs: ``[5, 5, 3]`` (or ``[N, 5, 5, 3]``) constant-prediction baseline,
            e.g. `prior_threshold_probs_from_grades` of the training split; without it
            ``prior_rsna_log_loss`` is ``None``.
    """
    probs, codes = _check_inputs(threshold_probs, grades)
    task_scores = _task_scores(probs, codes)
    macro_auc = _mean_or_none([auc for auc, _ in task_scores.values()])
    mean_ap = _mean_or_none([ap for _, ap in task_scores.values()])
    per_condition_auc = {
        c: _mean_or_none([auc for (ci, _), (auc, _) in task_scores.items() if ci == index])
        for index, c in enumerate(L.CONDITIONS)
    }

    labelled = codes != L.UNKNOWN
    y_true, y_pred = codes[labelled], predicted_codes(probs, codes)[labelled]
    accuracy = float(np.mean(y_true == y_pred)) if y_true.size else None
    balanced = None
    if y_true.size:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a predicted class absent from y_true has no recall: skipped
            balanced = float(balanced_accuracy_score(y_true, y_pred))

    per_condition_f1, kappa = {}, {}
    for index, condition in enumerate(L.CONDITIONS):
        c_true, c_pred, names = _condition_labels(probs, codes, index)
        if not c_true.size:
            per_condition_f1[condition] = kappa[condition] = None
            continue
        per_condition_f1[condition] = float(f1_score(c_true, c_pred, average="macro", zero_division=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undefined (one class only) comes back as NaN: None
            qwk = cohen_kappa_score(c_true, c_pred, labels=list(range(len(names))), weights="quadratic")
        kappa[condition] = _none_if_nan(qwk)

    prior_loss = None
    if prior_threshold_probs is not None:
        prior = np.broadcast_to(np.asarray(prior_threshold_probs, dtype=np.float64), probs.shape)
        prior_loss = submission_rsna_log_loss(prior, codes)

    return {
        "macro_roc_auc": macro_auc,
        "mean_average_precision": mean_ap,
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "per_condition_f1": per_condition_f1,
        "per_condition_roc_auc": per_condition_auc,
        "quadratic_weighted_kappa": kappa,
        "rsna_log_loss": submission_rsna_log_loss(probs, codes),
        "prior_rsna_log_loss": prior_loss,
        "n_studies": int(codes.shape[0]),
    }
