"""Conditions, levels, grades and the ordinal label encoding (numpy only).

Every array of labels or predictions in lumbar-tf is laid out as
``[..., condition, level, ...]`` with conditions and levels in the order of
``CONDITIONS`` and ``LEVELS`` (the RSNA column order of ``train.csv``).

Grades are stored as integer codes:
  0 none, 1 mild, 2 moderate, 3 severe, ``NORMAL_MILD`` (-2) when only the
  RSNA "Normal/Mild" is known, ``UNKNOWN`` (-1) when the cell is unlabelled.

The model predicts three ordinal thresholds per cell: grade>=1, grade>=2,
grade>=3. ``encode_grades`` turns grade codes into threshold targets plus a
mask that says which thresholds are known.
"""

from __future__ import annotations

import numpy as np

from lumbar_tf.core.errors import LabelError

CONDITIONS = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
GRADES = ("none", "mild", "moderate", "severe")
THRESHOLDS = (">=1", ">=2", ">=3")
N_CONDITIONS, N_LEVELS, N_GRADES, N_THRESHOLDS = 5, 5, 4, 3

UNKNOWN = -1
NORMAL_MILD = -2

# RSNA spellings.
RSNA_SEVERITIES = {"Normal/Mild": NORMAL_MILD, "Moderate": 2, "Severe": 3}
CONDITION_TITLES = {c: c.replace("_", " ").title() for c in CONDITIONS}
LEVEL_TITLES = {lv: lv.upper().replace("_", "/") for lv in LEVELS}
SUBMISSION_COLUMNS = ("normal_mild", "moderate", "severe")

# Competition sample weights for normal-mild / moderate / severe: the metric's weights, the weights
# of the submission's decision rule (`rsna_submission_triple`) and the training loss's defaults.
RSNA_SEVERITY_WEIGHTS = (1.0, 2.0, 4.0)


def column_name(condition: str, level: str) -> str:
    """`train.csv` column for one cell, e.g. ``spinal_canal_stenosis_l1_l2``."""
    return f"{condition}_{level}"


LABEL_COLUMNS = tuple(column_name(c, lv) for c in CONDITIONS for lv in LEVELS)


def parse_rsna_severity(value) -> int:
    """Map an RSNA severity string (or empty) to a grade code."""
    if value is None:
        return UNKNOWN
    text = str(value).strip()
    if text == "" or text.lower() == "nan":
        return UNKNOWN
    if text not in RSNA_SEVERITIES:
        raise LabelError(f"unknown severity {text!r} (expected one of {', '.join(RSNA_SEVERITIES)})")
    return RSNA_SEVERITIES[text]


def parse_grade(value) -> int:
    """Map a `train_grades.csv` value (0-3 or empty) to a grade code."""
    text = "" if value is None else str(value).strip()
    if text == "" or text.lower() == "nan":
        return UNKNOWN
    try:
        grade = int(float(text))
    except ValueError:
        raise LabelError(f"grade {text!r} is not an integer 0-3") from None
    if grade not in (0, 1, 2, 3) or float(text) != grade:
        raise LabelError(f"grade {text!r} is not an integer 0-3")
    return grade


def grade_to_rsna(code: int) -> str:
    """Inverse of `parse_rsna_severity` for codes; fine grades 0/1 become Normal/Mild."""
    if code == UNKNOWN:
        return ""
    if code in (0, 1, NORMAL_MILD):
        return "Normal/Mild"
    if code == 2:
        return "Moderate"
    if code == 3:
        return "Severe"
    raise LabelError(f"unknown grade code {code!r}")


def parse_condition_title(title: str) -> str:
    """'Left Neural Foraminal Narrowing' -> 'left_neural_foraminal_narrowing'."""
    key = str(title).strip().lower().replace(" ", "_")
    if key not in CONDITIONS:
        raise LabelError(f"unknown condition {title!r}")
    return key


def parse_level_title(title: str) -> str:
    """'L4/L5' -> 'l4_l5'."""
    key = str(title).strip().lower().replace("/", "_")
    if key not in LEVELS:
        raise LabelError(f"unknown level {title!r}")
    return key


def encode_grades(grades: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grade codes ``[..., 5, 5]`` -> (threshold targets, mask), each ``[..., 5, 5, 3]`` float32.

    Normal/Mild leaves the >=1 threshold unknown; UNKNOWN masks all three.
    """
    grades = np.asarray(grades, dtype=np.int64)
    known_fine = grades >= 0
    targets = np.stack([(grades >= 1) & known_fine, grades >= 2, grades >= 3], axis=-1).astype(np.float32)
    mask = np.stack([known_fine, grades != UNKNOWN, grades != UNKNOWN], axis=-1).astype(np.float32)
    return targets * mask, mask


def decode_thresholds(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Inverse of `encode_grades`: (targets, mask) ``[..., 3]`` -> grade codes ``[...]``."""
    targets = np.asarray(targets) > 0.5
    mask = np.asarray(mask) > 0.5
    fine = targets[..., 0].astype(np.int64) + targets[..., 1] + targets[..., 2]
    coarse = np.where(targets[..., 2], 3, np.where(targets[..., 1], 2, NORMAL_MILD))
    out = np.where(mask[..., 0], fine, coarse)
    return np.where(mask[..., 1], out, UNKNOWN)


def grade_probs_from_thresholds(threshold_probs: np.ndarray) -> np.ndarray:
    """Monotone threshold probabilities ``[..., 3]`` -> grade probabilities ``[..., 4]``."""
    p = np.asarray(threshold_probs, dtype=np.float64)
    p1, p2, p3 = p[..., 0], p[..., 1], p[..., 2]
    probs = np.stack([1.0 - p1, p1 - p2, p2 - p3, p3], axis=-1)
    return np.clip(probs, 0.0, 1.0).astype(np.float32)


def rsna_triple(threshold_probs: np.ndarray) -> np.ndarray:
    """Threshold probabilities ``[..., 3]`` -> RSNA (normal_mild, moderate, severe) ``[..., 3]``."""
    p = np.asarray(threshold_probs, dtype=np.float64)
    p2, p3 = p[..., 1], p[..., 2]
    return np.clip(np.stack([1.0 - p2, p2 - p3, p3], axis=-1), 0.0, 1.0).astype(np.float32)


def rsna_submission_triple(threshold_probs: np.ndarray) -> np.ndarray:
    """Threshold probabilities ``[..., 3]`` -> the (normal_mild, moderate, severe) to *submit*:
    `rsna_triple` times the metric's sample weights, renormalised (q_c = w_c p_c / sum w p).

    The RSNA metric is a log loss weighted by the true class, so the expected loss of a cell,
    ``-sum_c w_c p_c log q_c`` over the simplex, is least at this ``q``, not at ``p``: honest
    probabilities go into predictions.json, this into submission.csv (DESIGN.md deviation).
    """
    weighted = rsna_triple(threshold_probs).astype(np.float64) * np.asarray(RSNA_SEVERITY_WEIGHTS)
    return (weighted / weighted.sum(axis=-1, keepdims=True)).astype(np.float32)  # the sum is >= 1


def presence(threshold_probs: np.ndarray, fine_grades_known: bool = True) -> np.ndarray:
    """Probability of degeneration: P(>=1) where grades 0/1 are known, else P(>=2)."""
    p = np.asarray(threshold_probs, dtype=np.float32)
    return p[..., 0] if fine_grades_known else p[..., 1]


FINE_GRADE_SCALE = GRADES  # what a cell's "grade" indexes when grades 0/1 were known in training
RSNA_GRADE_SCALE = SUBMISSION_COLUMNS  # ... and when only the RSNA labels were


def label_semantics(grades: np.ndarray) -> dict:
    """Which thresholds the labels of a training split ``[N, 5, 5]`` ever made known (DESIGN.md).

    A threshold is known when the labels show both of its outcomes. RSNA labels alone never say
    grade < 1 (Normal/Mild leaves ``>=1`` unknown, Moderate/Severe set it): the model's P(>=1) only
    learns to be 1, so presence is P(>=2) and grades live in the 3-class RSNA space.
    """
    grades = np.asarray(grades, dtype=np.int64).reshape(-1, N_CONDITIONS * N_LEVELS)
    targets, mask = (a.reshape(-1, N_THRESHOLDS) for a in encode_grades(grades))
    seen = mask > 0
    known = (seen & (targets > 0.5)).any(axis=0) & (seen & (targets < 0.5)).any(axis=0)
    fine = bool(known[0])
    return {
        "known_thresholds": [t for t, k in zip(THRESHOLDS, known, strict=True) if k],
        "fine_grades": fine,
        "n_studies": int(len(grades)),
        "n_fine_grade_studies": int(np.isin(grades, (0, 1)).any(axis=-1).sum()),
        "presence": THRESHOLDS[0] if fine else THRESHOLDS[1],
        "grade_scale": list(FINE_GRADE_SCALE if fine else RSNA_GRADE_SCALE),
    }


def semantics_or_default(record) -> dict:
    """A stored label-semantics record, completed; without one, the RSNA-only reading (P(>=1) is not
    trusted unless a record says grades 0/1 were known: P(>=2) means the same under both labellings)."""
    if not isinstance(record, dict) or not isinstance(record.get("fine_grades"), bool):
        record = {"known_thresholds": list(THRESHOLDS[1:]), "fine_grades": False, "recorded": False}
    fine = record["fine_grades"]
    return {
        **record,
        "presence": THRESHOLDS[0] if fine else THRESHOLDS[1],
        "grade_scale": list(FINE_GRADE_SCALE if fine else RSNA_GRADE_SCALE),
    }


def level_batch_to_study(per_level) -> np.ndarray:
    """``[B * 5, 5, 3]`` (level-major batch: condition x threshold) -> ``[B, 5, 5, 3]`` (condition, level)."""
    per_level = np.asarray(per_level)
    if per_level.shape[0] % N_LEVELS:
        raise ValueError(f"batch of {per_level.shape[0]} is not a multiple of {N_LEVELS} levels")
    study = per_level.reshape((-1, N_LEVELS) + per_level.shape[1:])
    return np.swapaxes(study, 1, 2)


def study_to_level_batch(per_study) -> np.ndarray:
    """Inverse of `level_batch_to_study`: ``[B, 5, 5, ...]`` (condition, level) -> ``[B * 5, 5, ...]``."""
    per_study = np.asarray(per_study)
    return np.swapaxes(per_study, 1, 2).reshape((-1,) + per_study.shape[1:2] + per_study.shape[3:])
