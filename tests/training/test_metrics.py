"""Evaluation metrics: scikit-learn on fixed arrays, and the RSNA metric worked by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from lumbar_tf.core import labels as L
from lumbar_tf.training import metrics as M

NM, UNK = L.NORMAL_MILD, L.UNKNOWN


def _monotone_probs(rng, n):
    """Random monotone threshold probabilities [n, 5, 5, 3]."""
    raw = np.sort(rng.uniform(size=(n, 5, 5, 3)), axis=-1)[..., ::-1]
    return np.ascontiguousarray(raw)


def _fixture(seed=0, n=12, rsna_share=0.3):
    rng = np.random.default_rng(seed)
    grades = rng.choice([0, 1, 2, 3], size=(n, 5, 5), p=[0.4, 0.3, 0.2, 0.1])
    coarse = rng.uniform(size=grades.shape) < rsna_share
    grades = np.where(coarse & (grades <= 1), NM, grades)
    grades = np.where(rng.uniform(size=grades.shape) < 0.1, UNK, grades)
    return _monotone_probs(rng, n), grades


# === Threshold tasks, accuracy, F1, QWK vs scikit-learn ===


def test_threshold_task_metrics_match_sklearn():
    probs, grades = _fixture()
    aucs, aps, per_condition = [], [], {c: [] for c in L.CONDITIONS}
    for ci, condition in enumerate(L.CONDITIONS):
        for ti in range(3):
            g = grades[:, ci].ravel()
            known = g >= 0 if ti == 0 else g != UNK  # >=1 only where the fine grade is known
            y = (g[known] >= ti + 1).astype(int)
            s = probs[:, ci, :, ti].ravel()[known]
            if 0 < y.sum() < y.size:
                aucs.append(skm.roc_auc_score(y, s))
                aps.append(skm.average_precision_score(y, s))
                per_condition[condition].append(aucs[-1])
    out = M.compute_metrics(probs, grades)
    assert len(aucs) == 15  # every task has both classes in this fixture
    np.testing.assert_allclose(out["macro_roc_auc"], np.mean(aucs), rtol=1e-12)
    np.testing.assert_allclose(out["mean_average_precision"], np.mean(aps), rtol=1e-12)
    for c in L.CONDITIONS:
        np.testing.assert_allclose(out["per_condition_roc_auc"][c], np.mean(per_condition[c]), rtol=1e-12)


def test_accuracy_and_balanced_accuracy_match_sklearn():
    probs, grades = _fixture(seed=1)
    grade_probs = L.grade_probs_from_thresholds(probs)
    triple = L.rsna_triple(probs)
    labelled = grades != UNK
    pred = np.where(grades == NM, np.array([NM, 2, 3])[triple.argmax(-1)], grade_probs.argmax(-1))
    y_true, y_pred = grades[labelled], pred[labelled]
    out = M.compute_metrics(probs, grades)
    np.testing.assert_allclose(out["accuracy"], skm.accuracy_score(y_true, y_pred), rtol=1e-12)
    recalls = [np.mean(y_pred[y_true == k] == k) for k in np.unique(y_true)]
    np.testing.assert_allclose(out["balanced_accuracy"], np.mean(recalls), rtol=1e-12)


def test_balanced_accuracy_worked_by_hand():
    """Mean recall over the true classes, Normal/Mild its own class, predicted-only classes ignored."""
    probs, grades = np.full((1, 5, 5, 3), 0.01), np.full((1, 5, 5), UNK)
    none, mild, severe = (0.1, 0.05, 0.01), (0.9, 0.1, 0.05), (0.95, 0.9, 0.9)
    cells = [(0, 0, none), (0, 0, mild), (3, 3, severe), (3, 3, severe)]  # (true, predicted, probs)
    for level, (grade, _, p) in enumerate(cells):
        grades[0, 0, level], probs[0, 0, level] = grade, p
    grades[0, 1, 0], probs[0, 1, 0] = NM, (0.9, 0.8, 0.1)  # Normal/Mild predicted moderate
    assert list(M.predicted_codes(probs, grades)[grades != UNK]) == [0, 1, 3, 3, 2]
    out = M.compute_metrics(probs, grades)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)


def test_per_condition_f1_and_qwk_match_sklearn():
    probs, grades = _fixture(seed=2)
    grades[:, 0] = np.where(grades[:, 0] == NM, 1, grades[:, 0])  # spinal: fine grades only
    out = M.compute_metrics(probs, grades)
    for ci, condition in enumerate(L.CONDITIONS):
        g = grades[:, ci].ravel()
        keep = g != UNK
        if ci == 0:  # 4-grade space
            y_true = g[keep]
            y_pred = L.grade_probs_from_thresholds(probs[:, ci]).reshape(-1, 4).argmax(-1)[keep]
            labels = [0, 1, 2, 3]
        else:  # RSNA 3-class space
            y_true = np.select([g == 3, g == 2], [2, 1], 0)[keep]
            y_pred = L.rsna_triple(probs[:, ci]).reshape(-1, 3).argmax(-1)[keep]
            labels = [0, 1, 2]
        assert M.condition_space(grades, ci) == ("grade" if ci == 0 else "rsna")
        np.testing.assert_allclose(
            out["per_condition_f1"][condition],
            skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            out["quadratic_weighted_kappa"][condition],
            skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"),
            rtol=1e-12,
        )


def test_normal_mild_cells_are_scored_in_the_three_class_space():
    # One study, one labelled cell each case; grade probs say "mild" but RSNA says normal/mild.
    probs = np.full((1, 5, 5, 3), 0.1)
    probs[0, 0, 0] = (0.9, 0.2, 0.1)  # grade probs (0.1, 0.7, 0.1, 0.1): "mild"
    grades = np.full((1, 5, 5), UNK)
    grades[0, 0, 0] = NM
    assert M.compute_metrics(probs, grades)["accuracy"] == 1.0  # 3-class: normal/mild is right
    grades[0, 0, 0] = 0
    assert M.compute_metrics(probs, grades)["accuracy"] == 0.0  # fine: "none" was the truth


def test_output_contract_keys_and_json():
    probs, grades = _fixture(seed=3)
    prior = M.prior_threshold_probs_from_grades(grades)
    out = M.compute_metrics(probs, grades, prior)
    assert tuple(out) == M.METRIC_KEYS
    assert set(out["rsna_log_loss"]) == set(M.RSNA_LOSS_KEYS) == set(out["prior_rsna_log_loss"])
    for key in ("per_condition_f1", "per_condition_roc_auc", "quadratic_weighted_kappa"):
        assert tuple(out[key]) == L.CONDITIONS
    assert out["n_studies"] == 12
    json.loads(json.dumps(out, allow_nan=False))  # plain JSON: no NaN, no numpy types


def test_undefined_metrics_are_none():
    probs = np.full((2, 5, 5, 3), 0.2)
    grades = np.full((2, 5, 5), UNK)
    grades[:, 0, 0] = 2  # one class only, spinal only
    out = M.compute_metrics(probs, grades)
    assert out["macro_roc_auc"] is None and out["mean_average_precision"] is None
    assert out["per_condition_roc_auc"]["spinal_canal_stenosis"] is None
    assert out["per_condition_f1"]["left_subarticular_stenosis"] is None
    assert out["rsna_log_loss"]["foraminal"] is None
    assert out["prior_rsna_log_loss"] is None
    json.dumps(out, allow_nan=False)


def test_bad_shapes_are_rejected():
    with pytest.raises(M.MetricsError, match="threshold_probs"):
        M.compute_metrics(np.zeros((2, 5, 5, 4)), np.zeros((2, 5, 5), int))
    with pytest.raises(M.MetricsError, match="grades"):
        M.compute_metrics(np.zeros((2, 5, 5, 3)), np.full((2, 5, 5), 7))


# === RSNA competition metric ===


def _hand_example():
    """Two studies; every unlisted cell unlabelled with uniform predictions."""
    probs = np.full((2, 5, 5, 3), 1 / 3)
    grades = np.full((2, 5, 5), UNK)
    spinal, left_foramen, right_foramen, left_sub = 0, 1, 2, 3
    # study 0
    grades[0, spinal, 0], probs[0, spinal, 0] = NM, (0.8, 0.15, 0.05)
    grades[0, spinal, 3], probs[0, spinal, 3] = 3, (0.2, 0.3, 0.5)
    probs[0, spinal, 2] = (0.05, 0.05, 0.9)  # unlabelled level: not scored, not in any_severe
    grades[0, left_foramen, 4], probs[0, left_foramen, 4] = 0, (0.9, 0.05, 0.05)
    # study 1
    grades[1, spinal, 1], probs[1, spinal, 1] = 2, (0.6, 0.25, 0.15)
    grades[1, right_foramen, 4], probs[1, right_foramen, 4] = 3, (0.5, 0.3, 0.2)
    grades[1, left_sub, 2], probs[1, left_sub, 2] = 1, (0.6, 0.3, 0.1)  # mild -> normal/mild
    return probs, grades


def test_rsna_log_loss_worked_by_hand():
    probs, grades = _hand_example()
    ln = math.log
    # Sample weights: normal/mild 1, moderate 2, severe 4.
    spinal = (1 * -ln(0.8) + 4 * -ln(0.5) + 2 * -ln(0.25)) / (1 + 4 + 2)
    foraminal = (1 * -ln(0.9) + 4 * -ln(0.2)) / (1 + 4)
    subarticular = -ln(0.6)
    # Study 0: a severe spinal level -> label 1, weight 4, prediction max(0.05, 0.5) = 0.5.
    # Study 1: no severe -> label 0, weight 2 (moderate), prediction 0.15 -> loss -ln(0.85).
    any_severe = (4 * -ln(0.5) + 2 * -ln(0.85)) / (4 + 2)
    out = M.rsna_log_loss(probs, grades)
    expected = {
        "spinal": spinal,
        "foraminal": foraminal,
        "subarticular": subarticular,
        "any_severe_spinal": any_severe,
        "total": (spinal + foraminal + subarticular + any_severe) / 4,
    }
    for key, value in expected.items():
        np.testing.assert_allclose(out[key], value, rtol=1e-12, err_msg=key)


def test_rsna_log_loss_matches_sklearn_log_loss_per_group():
    rng = np.random.default_rng(4)
    _, grades = _fixture(seed=4, n=20)
    probs = rng.dirichlet([1, 1, 1], size=(20, 5, 5))
    out = M.rsna_log_loss(probs, grades)
    classes = M.rsna_class(grades)
    weights = np.array([1.0, 2.0, 4.0])
    for group, conditions in M.RSNA_GROUPS.items():
        y = classes[:, conditions].ravel()
        keep = y >= 0
        p = probs[:, conditions].reshape(-1, 3)[keep]
        expected = skm.log_loss(y[keep], p, sample_weight=weights[y[keep]], labels=[0, 1, 2])
        np.testing.assert_allclose(out[group], expected, rtol=1e-9, err_msg=group)


def test_rsna_log_loss_renormalises_and_clips_like_the_scorer():
    probs, grades = _hand_example()
    scaled = M.rsna_log_loss(probs * 0.5, grades)  # rows summing to 0.5 are renormalised
    plain = M.rsna_log_loss(probs, grades)
    for key in ("spinal", "foraminal", "subarticular"):
        np.testing.assert_allclose(scaled[key], plain[key], rtol=1e-12)
    probs[0, 0, 3] = (1.0, 0.0, 0.0)  # a certain, wrong prediction of a severe level stays finite
    assert np.isfinite(M.rsna_log_loss(probs, grades)["spinal"])


# === Prior and helpers ===


def test_prior_is_a_smoothed_monotone_class_frequency():
    grades = np.full((4, 5, 5), UNK)
    grades[:, 0, 0] = (0, 1, 2, 3)  # fine grades
    grades[:, 1, 0] = (NM, NM, 2, UNK)  # >=1 known only on the moderate cell
    grades[:, 2, 0] = (NM, NM, 3, 3)  # >=1 known on two severe cells
    grades[:, 3, 0] = (NM, NM, UNK, UNK)  # >=1 never known
    prior = M.prior_threshold_probs_from_grades(grades)
    assert prior.shape == (5, 5, 3)
    np.testing.assert_allclose(prior[0, 0], [(3 + 0.5) / 5, (2 + 0.5) / 5, (1 + 0.5) / 5], rtol=1e-6)
    np.testing.assert_allclose(prior[1, 0], [(1 + 0.5) / 2, (1 + 0.5) / 4, 0.5 / 4], rtol=1e-6)
    # >=1 from the two fine-graded cells, >=2 and >=3 from all four.
    np.testing.assert_allclose(prior[2, 0], [2.5 / 3, 2.5 / 5, 2.5 / 5], rtol=1e-6)
    np.testing.assert_allclose(prior[3, 0], [0.5, 0.5 / 3, 0.5 / 3], rtol=1e-6)
    np.testing.assert_allclose(prior[4, 4], [0.5, 0.5, 0.5])  # no labels at all
    assert np.all(np.diff(prior, axis=-1) <= 0)


def test_prior_baseline_is_the_rsna_loss_of_a_constant_prediction():
    probs, grades = _fixture(seed=5)
    prior = M.prior_threshold_probs_from_grades(grades)
    out = M.compute_metrics(probs, grades, prior)
    constant = L.rsna_submission_triple(np.broadcast_to(prior, probs.shape))  # what a writer submits
    assert out["prior_rsna_log_loss"] == M.rsna_log_loss(constant, grades)


def test_curves_and_confusion_matrices():
    probs, grades = _fixture(seed=6)
    curves = M.roc_pr_curves(probs, grades)
    task = curves["spinal_canal_stenosis"][">=2"]
    g = grades[:, 0].ravel()
    keep = g != UNK
    y, s = (g[keep] >= 2).astype(int), probs[:, 0, :, 1].ravel()[keep]
    fpr, tpr, _ = skm.roc_curve(y, s)
    np.testing.assert_array_equal(task["fpr"], fpr)
    np.testing.assert_array_equal(task["tpr"], tpr)
    assert task["n"] == keep.sum() and task["n_positive"] == y.sum()
    matrices = M.confusion_matrices(probs, grades)
    spinal = matrices["spinal_canal_stenosis"]
    assert spinal["space"] == "rsna" and spinal["labels"] == list(M.RSNA_CLASSES)
    assert np.sum(spinal["matrix"]) == keep.sum()
