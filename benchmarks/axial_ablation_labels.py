"""How much of a subarticular grade the sagittal series can give without seeing the recess.

    PYTHONPATH=. .venv/bin/python benchmarks/axial_ablation_labels.py --studies 2000

No images: grade draws of the phantom (`synthetic.phantom.sample_grades`) only, seconds. Per (study,
level, side) a multinomial logistic regression predicts the subarticular RSNA class from what a
perfect sagittal reader would know -- the canal grade at that level, both foramina's grades at that
level and the study's mean canal/foraminal grade (``labels``), or the same cells' noise-free latents
(``latents``) -- cross-validated by study (5 folds). Reported: the RSNA subarticular group loss
(`training.metrics.rsna_log_loss`, weights 1/2/4) of those predictions, of the training folds' class
prior per level, and of a perfect reader of the recess (the Bayes predictor from the cell's own
latent), for the phantom before issue 11 (``--shared 1.0``: every factor shared with the canal and
foramina) and after (`SUBARTICULAR_SHARED`). The gap between ``labels`` and the prior is what a
sagittal-only grader can learn without the recess; the gap down to the perfect reader is what only
the axial view can add.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from lumbar_tf.core import labels as L
from lumbar_tf.synthetic import phantom
from lumbar_tf.training.metrics import bayes_optimal_threshold_probs, rsna_class, rsna_log_loss

CANAL, LEFT_FORAMEN, RIGHT_FORAMEN, LEFT_RECESS, RIGHT_RECESS = range(5)
SIDES = ((LEFT_RECESS, LEFT_FORAMEN, RIGHT_FORAMEN), (RIGHT_RECESS, RIGHT_FORAMEN, LEFT_FORAMEN))


def _draws(n: int, shared: float):
    draws = [phantom.sample_grades(np.random.default_rng(i), subarticular_shared=shared) for i in range(n)]
    grades = np.stack([np.where(d.known, d.grades, L.UNKNOWN) for d in draws])
    return grades, np.stack([d.latent for d in draws])


def _one_hot(codes: np.ndarray) -> np.ndarray:
    """Grade codes -> 4 columns (an unknown cell: all zeros)."""
    return (codes[..., None] == np.arange(4)).astype(np.float64)


def _rows(grades, latent, source: str):
    """Features, RSNA class and study of every (study, level, side) subarticular cell."""
    n = grades.shape[0]
    level = np.broadcast_to(np.eye(L.N_LEVELS), (n, L.N_LEVELS, L.N_LEVELS))
    if source == "labels":
        known = grades[:, :3] >= 0
        mean = np.where(known, grades[:, :3], 0).sum(axis=2) / np.maximum(known.sum(axis=2), 1)
        cell = _one_hot
    else:
        mean = latent[:, :3].mean(axis=2)
        cell = np.asarray  # the latent itself, one column
    values = grades if source == "labels" else latent
    features, targets, studies = [], [], []
    for recess, same, other in SIDES:
        parts = [cell(values[:, k]).reshape(n, L.N_LEVELS, -1) for k in (CANAL, same, other)]
        study_mean = np.repeat(mean[:, None, :], L.N_LEVELS, axis=1)
        features.append(np.concatenate([*parts, level, study_mean], axis=-1))
        targets.append(rsna_class(grades[:, recess]))
        studies.append(np.repeat(np.arange(n)[:, None], L.N_LEVELS, axis=1))
    x = np.concatenate(features, axis=1).reshape(n * 2 * L.N_LEVELS, -1)
    y = np.concatenate(targets, axis=1).reshape(-1)
    groups = np.concatenate(studies, axis=1).reshape(-1)
    scored = y >= 0
    return x[scored], y[scored], groups[scored], scored


def _cross_validated(x, y, groups, folds: int):
    """Out-of-fold RSNA class probabilities of the logistic regression and of the per-level prior."""
    model_probs = np.zeros((len(y), 3))
    prior_probs = np.zeros((len(y), 3))
    level = x[:, -L.N_LEVELS - 3 : -3].argmax(axis=1)  # the level one-hot sits before the study means
    for train, test in GroupKFold(folds).split(x, y, groups):
        fit = LogisticRegression(max_iter=2000, C=1.0).fit(x[train], y[train])
        model_probs[test] = fit.predict_proba(x[test])
        for k in range(L.N_LEVELS):
            counts = np.bincount(y[train][level[train] == k], minlength=3) + 0.5
            prior_probs[test[level[test] == k]] = counts / counts.sum()
    return model_probs, prior_probs


def _subarticular_loss(class_probs, scored, grades) -> float:
    """`rsna_log_loss` subarticular group of per-cell class probabilities (other cells: uniform)."""
    probs = np.full((*grades.shape, 3), 1.0 / 3.0)
    cells = np.zeros((grades.shape[0], 2, L.N_LEVELS, 3))
    cells.reshape(-1, 3)[scored] = class_probs
    # _rows lays the cells out as [study, side, level]; the metric wants [study, condition, level].
    probs[:, LEFT_RECESS], probs[:, RIGHT_RECESS] = cells[:, 0], cells[:, 1]
    return rsna_log_loss(probs, grades)["subarticular"]


def measure(n: int, shared: float, folds: int = 5) -> dict:
    grades, latent = _draws(n, shared)
    out = {}
    for source in ("labels", "latents"):
        x, y, groups, scored = _rows(grades, latent, source)
        model_probs, prior_probs = _cross_validated(x, y, groups, folds)
        out[f"from_{source}"] = _subarticular_loss(model_probs, scored, grades)
        out["prior"] = _subarticular_loss(prior_probs, scored, grades)
    bayes = bayes_optimal_threshold_probs(latent, {"sd": phantom.READER_NOISE_SD, "cuts": phantom.GRADE_CUTS})
    out["perfect_recess_reader"] = rsna_log_loss(L.rsna_submission_triple(bayes), grades)["subarticular"]
    sub = grades[:, [LEFT_RECESS, RIGHT_RECESS]].ravel()
    for name, partners in (("canal", [CANAL, CANAL]), ("same_side_foramen", [LEFT_FORAMEN, RIGHT_FORAMEN])):
        other = grades[:, partners].ravel()
        both = (sub >= 0) & (other >= 0)
        out[f"grade_corr_{name}"] = float(np.corrcoef(sub[both], other[both])[0, 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument(
        "--shared",
        type=float,
        nargs="+",
        default=[1.0, phantom.SUBARTICULAR_SHARED],
        help="subarticular shares of the shared factors to measure (1.0: the phantom before issue 11)",
    )
    args = parser.parse_args()
    results = {str(s): measure(args.studies, s) for s in args.shared}
    keys = ("prior", "from_labels", "from_latents", "perfect_recess_reader")
    keys += ("grade_corr_canal", "grade_corr_same_side_foramen")
    print("| subarticular shared | " + " | ".join(keys) + " |")
    for shared, r in results.items():
        print(f"| {shared} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
