import numpy as np
import pytest

from lumbar_tf.core import labels as L


def test_rsna_strings_round_trip():
    for text in ("Normal/Mild", "Moderate", "Severe", ""):
        assert L.grade_to_rsna(L.parse_rsna_severity(text)) == text
    assert L.parse_rsna_severity(None) == L.UNKNOWN
    with pytest.raises(L.LabelError, match="unknown severity 'Sever'"):
        L.parse_rsna_severity("Sever")


def test_fine_grades_parse_and_reject():
    assert [L.parse_grade(v) for v in ("0", "1", "2", "3", "", "2.0")] == [0, 1, 2, 3, L.UNKNOWN, 2]
    for bad in ("4", "-1", "x", "1.5"):
        with pytest.raises(L.LabelError):
            L.parse_grade(bad)


def test_condition_and_level_titles_round_trip():
    for condition in L.CONDITIONS:
        assert L.parse_condition_title(L.CONDITION_TITLES[condition]) == condition
    for level in L.LEVELS:
        assert L.parse_level_title(L.LEVEL_TITLES[level]) == level
    assert L.CONDITION_TITLES["left_neural_foraminal_narrowing"] == "Left Neural Foraminal Narrowing"
    assert L.LEVEL_TITLES["l5_s1"] == "L5/S1"
    with pytest.raises(L.LabelError):
        L.parse_condition_title("Left Foraminal Stenosis")


def test_encoding_targets_and_masks():
    grades = np.array([0, 1, 2, 3, L.NORMAL_MILD, L.UNKNOWN])
    targets, mask = L.encode_grades(grades)
    np.testing.assert_array_equal(targets, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]])
    # Normal/Mild leaves >=1 unknown; an empty cell masks all three thresholds.
    np.testing.assert_array_equal(mask, [[1, 1, 1]] * 4 + [[0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(L.decode_thresholds(targets, mask), grades)


def test_encoding_round_trips_full_study_grid():
    rng = np.random.default_rng(0)
    grades = rng.choice([0, 1, 2, 3, L.NORMAL_MILD, L.UNKNOWN], size=(7, 5, 5))
    targets, mask = L.encode_grades(grades)
    assert targets.shape == mask.shape == (7, 5, 5, 3)
    np.testing.assert_array_equal(L.decode_thresholds(targets, mask), grades)


def test_probability_conversions():
    p = np.array([0.9, 0.5, 0.2])
    np.testing.assert_allclose(L.grade_probs_from_thresholds(p), [0.1, 0.4, 0.3, 0.2], atol=1e-6)
    np.testing.assert_allclose(L.rsna_triple(p), [0.5, 0.3, 0.2], atol=1e-6)
    assert L.presence(p) == pytest.approx(0.9)
    assert L.presence(p, fine_grades_known=False) == pytest.approx(0.5)
    assert L.LABEL_COLUMNS[0] == "spinal_canal_stenosis_l1_l2"
    assert L.LABEL_COLUMNS[-1] == "right_subarticular_stenosis_l5_s1"


def test_submission_triple_is_the_argmin_of_the_weighted_log_loss():
    """The metric weighs each cell's log loss by its true class (1/2/4), so the expected loss
    -sum_c w_c p_c log q_c is least at q ∝ w p: found numerically here, from the plain triple."""
    from scipy.optimize import minimize

    w = np.asarray(L.RSNA_SEVERITY_WEIGHTS)
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = np.sort(rng.uniform(size=3))[::-1]  # monotone P(>=1), P(>=2), P(>=3)
        plain = L.rsna_triple(p).astype(np.float64)

        def expected_loss(theta, plain=plain):
            q = np.exp(theta - theta.max())
            return -np.sum(w * plain * np.log(q / q.sum()))

        best = minimize(expected_loss, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
        argmin = np.exp(best - best.max()) / np.exp(best - best.max()).sum()
        submitted = L.rsna_submission_triple(p)
        np.testing.assert_allclose(submitted, argmin, atol=1e-4)
        assert expected_loss(np.log(submitted)) < expected_loss(np.log(plain)) - 1e-6
    # Sums to 1, batched, and the weights move mass towards severe: (0.5, 0.3, 0.2) -> (5, 6, 8) / 19.
    np.testing.assert_allclose(
        L.rsna_submission_triple([[0.9, 0.5, 0.2]]), [[5 / 19, 6 / 19, 8 / 19]], atol=1e-6
    )
