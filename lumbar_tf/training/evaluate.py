"""`lumbar-tf evaluate`: end-to-end metrics (grader on the localiser's crops) and plots.

Writes ``metrics.json`` (DESIGN.md output contract, plus the localiser's error in mm), ROC and PR
curves per condition, confusion matrices per condition and the training curves of the run.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.core.io import write_json_atomic
from lumbar_tf.data.dataset import SKIPPED, DatasetError, load_manifest, load_studies, prepare_cache
from lumbar_tf.runtime.keras_model import load_model, run_prior
from lumbar_tf.training.metrics import (
    bayes_optimal_threshold_probs,
    compute_metrics,
    prior_threshold_probs_from_grades,
)


def _run_split(loaded) -> dict | None:
    """The run's split.json (study -> fold, training data folder), or None for a bare model file."""
    path = loaded.run_dir / "split.json" if loaded.run_dir else None
    return json.loads(path.read_text()) if path and path.exists() else None


def _studies_to_evaluate(
    split: dict | None, same_data: bool, manifest: dict, split_fold: int | None
) -> tuple[list[str], str]:
    """Held-out studies: the run's validation fold when DATA is its training data, else all."""
    if split is not None and (split_fold is not None or same_data):
        fold = split["val_fold"] if split_fold is None else split_fold
        cached = set(manifest["study_ids"])
        ids = [s for s, f in split["folds"].items() if f == fold and s in cached]
        return ids, f"fold {fold} of the training data (never trained on)"
    return list(manifest["study_ids"]), "every study of the data folder"


def _prior(loaded, grades: np.ndarray) -> tuple[np.ndarray, str]:
    stored = run_prior(loaded.run_dir)
    if stored is not None:
        return np.asarray(stored), "training split"
    return prior_threshold_probs_from_grades(grades), "evaluated studies (no run folder)"


def evaluate(model_path, data_dir, out_dir, *, cache_dir=None, split_fold: int | None = None) -> dict:
    """Evaluate a run or model file on an RSNA-layout folder; returns the metrics dict."""
    loaded = load_model(model_path)
    cfg = loaded.preprocess
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = _run_split(loaded)
    same_data = split is not None and Path(split.get("data_dir", "")) == data_dir.resolve()
    if cache_dir:
        cache = Path(cache_dir)
    elif same_data and (loaded.run_dir / "cache").exists():
        cache = loaded.run_dir / "cache"  # the run's own cache of this very data
    else:
        cache = out / "cache"
    try:
        manifest = load_manifest(cache, cfg)
    except DatasetError:
        manifest = prepare_cache(data_dir, cache, cfg)
    ids, which = _studies_to_evaluate(split, same_data, manifest, split_fold)
    studies = load_studies(cache, cfg, ids)
    axial, zeroed = axial_crops_end_to_end(loaded, data_dir, studies) if cfg.axial is not None else (None, {})
    outputs = loaded.predict_views(studies["views"], axial=axial)
    prior, prior_source = _prior(loaded, studies["grades"])
    metrics = compute_metrics(outputs["threshold_probs"], studies["grades"], prior)
    err = np.linalg.norm(outputs["level_xy"] - studies["level_xy"], axis=-1) * cfg.spine_crop_mm
    err = err[studies["level_present"] > 0.5]
    metrics["localizer_error_mm"] = {"median": float(np.median(err)), "p90": float(np.percentile(err, 90))}
    metrics["by_field_placement"] = _by_field_placement(data_dir, studies, outputs, cfg)
    limit = bayes_limit(data_dir, studies["study_id"], studies["grades"])
    if limit is not None:
        metrics["bayes_limit"] = limit
    metrics["evaluated_on"] = which
    # A study that could not be read is not evaluated, never silently: counted, and listed with its
    # file and reason by `prepare_cache` (the same report as `prepare`).
    skipped = manifest.get("skipped") or {}
    metrics["skipped_studies"] = {"count": len(skipped), "listed_in": str(cache / SKIPPED)}
    if zeroed:  # graded from the sagittal views only, as a study without an axial series is
        metrics["axial_crops_zeroed"] = zeroed
    metrics["prior_from"] = prior_source
    metrics["intended_use"] = INTENDED_USE
    from lumbar_tf.training.calibration import evaluate_calibration

    metrics["calibration"] = evaluate_calibration(
        loaded, studies["views"], outputs["threshold_probs"], studies["grades"], out, axial=axial
    )
    write_json_atomic(out / "metrics.json", metrics)
    _plots(outputs["threshold_probs"], studies["grades"], out, loaded.run_dir)
    return metrics


def axial_crops_end_to_end(loaded, data_dir: Path, studies: dict) -> tuple[np.ndarray, dict[str, str]]:
    """An axial model's crops ``[N, 5, S, S, C]`` for the evaluated studies, cut around the projection
    of the model's *own* levels, as `predict_study` cuts them (`runtime.predictor.axial_inputs`), and
    ``{study_id: reason}`` for the studies whose crops could not be cut (zeros, with a warning).

    The cache holds crops around the labelled levels (what training reads); scoring on those would
    hide the localiser's and the projection's error. Each study's headers are read again and its
    view grid rebuilt for this (the grid is not cached); a study without an axial series gets zeros,
    as at inference. A slice that fails to decode now (one the labels' projection never needed)
    costs that study its axial crops, not the evaluation.
    """
    from lumbar_tf import preprocess
    from lumbar_tf.core.errors import one_line
    from lumbar_tf.data.dataset import read_index
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.runtime.predictor import axial_inputs

    cfg = loaded.preprocess
    index = read_index(data_dir)
    zeros = np.zeros((L.N_LEVELS, cfg.crop_size, cfg.crop_size, cfg.axial.channels), np.uint8)
    crops, zeroed = [], {}
    for n, sid in enumerate(str(s) for s in studies["study_id"]):
        try:
            study = read_study(index.images_dir / sid, index.descriptions.get(sid))
            _, grid, info, _ = preprocess.build_views(study, cfg)
            batch = {name: studies["views"][name][n : n + 1] for name in cfg.view_names}
            crops.append(axial_inputs(loaded, study, batch, grid, info)[1])
        except Exception as exc:  # a batch job: this study loses its axial input, the run goes on
            zeroed[sid] = one_line(exc)
            warnings.warn(f"study {sid}: axial crops zeroed ({zeroed[sid]})", stacklevel=2)
            crops.append(zeros)
    return np.stack(crops), zeroed


# A study's spine sits "low" when the middle of its labelled L1/L2..L5/S1 canal points lies more
# than this share of the Sagittal T2 field's half height below the field's centre (RSNA 4003253: 0.38;
# the realistic phantom draws 0-0.45, `benchmarks/spine_finder.py` splits the same way).
LOW_FIELD_SHARE = 0.225


def field_placement(data_dir, study_ids) -> dict[str, str]:
    """Study -> "low" / "centred" from its labelled canal points relative to the field of the image
    they are on (pixel rows over the instance's Rows: real data works alike); "unknown" without
    canal points or a readable labelled instance."""
    import pydicom

    from lumbar_tf.data.dataset import read_index

    index = read_index(data_dir)
    out = {}
    for sid in study_ids:
        labels = index.studies.get(str(sid))
        canal = [
            c for c in (labels.coordinates if labels else []) if c["condition"] == "spinal_canal_stenosis"
        ]
        out[str(sid)] = "unknown"
        if not canal:
            continue
        first = canal[0]
        path = index.images_dir / str(sid) / first["series_id"] / f"{first['instance_number']}.dcm"
        try:
            rows = int(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows"]).Rows)
        except (OSError, AttributeError, ValueError, pydicom.errors.InvalidDicomError):
            continue
        ys = [c["y"] for c in canal if c["series_id"] == first["series_id"]]
        below = (0.5 * (min(ys) + max(ys)) - (rows - 1) / 2) / (rows / 2)
        out[str(sid)] = "low" if below > LOW_FIELD_SHARE else "centred"
    return out


def _by_field_placement(data_dir, studies: dict, outputs: dict, cfg) -> dict:
    """End-to-end metrics and level error per field placement (`field_placement`)."""
    placement = field_placement(data_dir, studies["study_id"])
    groups = np.array([placement[str(s)] for s in studies["study_id"]])
    out = {"low_field_share": LOW_FIELD_SHARE}
    for name in ("low", "centred", "unknown"):
        keep = np.flatnonzero(groups == name)
        if keep.size == 0:
            out[name] = {"n_studies": 0}
            continue
        scores = compute_metrics(outputs["threshold_probs"][keep], studies["grades"][keep])
        err = (
            np.linalg.norm(outputs["level_xy"][keep] - studies["level_xy"][keep], axis=-1) * cfg.spine_crop_mm
        )
        err = err[studies["level_present"][keep] > 0.5]
        out[name] = {
            "n_studies": int(keep.size),
            "rsna_log_loss": scores["rsna_log_loss"]["total"],
            "macro_roc_auc": scores["macro_roc_auc"],
            "localizer_error_mm": {
                "median": float(np.median(err)) if err.size else None,
                "p90": float(np.percentile(err, 90)) if err.size else None,
            },
        }
    return out


def bayes_limit(data_dir, study_ids, grades) -> dict | None:
    """RSNA log loss and macro AUC of the Bayes-optimal predictor on these studies, where the data
    folder is a phantom that recorded each cell's latent severity (``train_latent.csv``); else None."""
    from lumbar_tf.synthetic.phantom import LATENT_FILE, read_latent

    path = Path(data_dir) / LATENT_FILE
    if not path.exists():
        return None
    latent, noise = read_latent(path)
    keep = [i for i, sid in enumerate(study_ids) if str(sid) in latent]
    if not keep:
        return None
    probs = bayes_optimal_threshold_probs(np.stack([latent[str(study_ids[i])] for i in keep]), noise)
    scores = compute_metrics(probs, np.asarray(grades)[keep])
    return {
        "rsna_log_loss": scores["rsna_log_loss"]["total"],
        "macro_roc_auc": scores["macro_roc_auc"],
        "n_studies": len(keep),
        "reader_noise_sd": noise["sd"],
    }


# === Plots ===


def _plots(threshold_probs: np.ndarray, grades: np.ndarray, out: Path, run: Path | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

    targets, mask = L.encode_grades(grades)
    fig_roc, axes_roc = plt.subplots(1, 5, figsize=(20, 4))
    fig_pr, axes_pr = plt.subplots(1, 5, figsize=(20, 4))
    for ci, condition in enumerate(L.CONDITIONS):
        for ti, name in enumerate(L.THRESHOLDS):
            m = mask[:, ci, :, ti] > 0.5
            y, p = targets[:, ci, :, ti][m], threshold_probs[:, ci, :, ti][m]
            if len(np.unique(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, p)
            prec, rec, _ = precision_recall_curve(y, p)
            axes_roc[ci].plot(fpr, tpr, label=f"grade{name}")
            axes_pr[ci].plot(rec, prec, label=f"grade{name}")
        for ax, (xl, yl) in ((axes_roc[ci], ("FPR", "TPR")), (axes_pr[ci], ("recall", "precision"))):
            ax.set_title(condition.replace("_", " "), fontsize=9)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.legend(fontsize=7)
    fig_roc.tight_layout()
    fig_roc.savefig(out / "roc_curves.png", dpi=80)
    fig_pr.tight_layout()
    fig_pr.savefig(out / "pr_curves.png", dpi=80)

    grade_probs = L.grade_probs_from_thresholds(threshold_probs)
    fig, axes = plt.subplots(1, 5, figsize=(20, 4))
    for ci, condition in enumerate(L.CONDITIONS):
        true = grades[:, ci].ravel()
        pred = grade_probs[:, ci].argmax(-1).ravel()
        keep = true >= 0
        cm = confusion_matrix(true[keep], pred[keep], labels=[0, 1, 2, 3])
        axes[ci].imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            axes[ci].text(j, i, str(v), ha="center", va="center", fontsize=8)
        axes[ci].set_xticks(range(4), L.GRADES, fontsize=7)
        axes[ci].set_yticks(range(4), L.GRADES, fontsize=7)
        axes[ci].set_xlabel("predicted")
        axes[ci].set_ylabel("true")
        axes[ci].set_title(condition.replace("_", " "), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrices.png", dpi=80)
    plt.close("all")
    if run is not None:
        _training_curves(run, out)


def _training_curves(run: Path, out: Path) -> None:
    import matplotlib.pyplot as plt

    files = sorted((run / "history").glob("*.csv"))
    if not files:
        return
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4), squeeze=False)
    for ax, path in zip(axes[0], files):
        with open(path) as handle:
            rows = list(csv.DictReader(handle))
        for key in ("loss", "val_loss"):
            if rows and key in rows[0]:
                ax.plot([float(r[key]) for r in rows], label=key)
        ax.set_title(f"{path.stem} training")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=80)
    plt.close(fig)


def format_metrics_table(metrics: dict) -> str:
    """A terminal table of the headline metrics."""
    rows = [("studies", f"{metrics['n_studies']}")]
    skipped = metrics.get("skipped_studies") or {}
    if skipped.get("count"):
        rows.append(("  skipped (unreadable)", f"{skipped['count']}, see {skipped['listed_in']}"))
    rows += [
        ("macro ROC-AUC", _fmt(metrics["macro_roc_auc"])),
        ("mean average precision", _fmt(metrics["mean_average_precision"])),
        ("accuracy / balanced", f"{_fmt(metrics['accuracy'])} / {_fmt(metrics['balanced_accuracy'])}"),
        ("RSNA log loss (submitted rows)", _fmt(metrics["rsna_log_loss"]["total"])),
        ("  constant-prior baseline", _fmt(metrics["prior_rsna_log_loss"]["total"])),
    ]
    if metrics.get("bayes_limit"):
        b = metrics["bayes_limit"]
        rows.append(
            ("  Bayes limit (loss / AUC)", f"{_fmt(b['rsna_log_loss'])} / {_fmt(b['macro_roc_auc'])}")
        )
    calibration = metrics.get("calibration")
    if calibration:
        rows.append(("  plain triple (not submitted)", _fmt(calibration["rsna_log_loss_plain_triple"])))
        ece = _fmt(calibration["expected_calibration_error"])
        if "uncalibrated" in calibration:
            ece = f"{_fmt(calibration['uncalibrated']['expected_calibration_error'])} -> {ece} calibrated"
        rows.append(("ECE (threshold tasks)", ece))
    if "localizer_error_mm" in metrics:
        e = metrics["localizer_error_mm"]
        rows.append(("localiser error mm (median/p90)", f"{e['median']:.1f} / {e['p90']:.1f}"))
    for name, group in metrics.get("by_field_placement", {}).items():
        if isinstance(group, dict) and group.get("n_studies"):
            e = group["localizer_error_mm"]
            level = "-" if e["median"] is None else f"{e['median']:.1f} / {e['p90']:.1f}"
            rows.append(
                (
                    f"  spine {name} (n={group['n_studies']})",
                    f"loss {_fmt(group['rsna_log_loss'])}, AUC {_fmt(group['macro_roc_auc'])}, "
                    f"level mm {level}",
                )
            )
    lines = [f"{k:<34}{v}" for k, v in rows]
    lines.append(f"{'condition':<34}{'AUC':>7}{'F1':>7}{'QWK':>7}")
    for c in L.CONDITIONS:
        auc = metrics["per_condition_roc_auc"].get(c)
        lines.append(
            f"{c:<34}{_fmt(auc):>7}{_fmt(metrics['per_condition_f1'].get(c)):>7}"
            f"{_fmt(metrics['quadratic_weighted_kappa'].get(c)):>7}"
        )
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"
