"""Checks of an export against its Keras model: representative studies, held-out ROC-AUC, the gate.

Representative studies come from the training pipeline (the int8 calibration must see what the model
was trained on); the held-out studies give each runtime's macro ROC-AUC, and a TFLite variant that
loses more than `AUC_LOSS_FLOOR` against Keras is refused (`gate_variants`) unless allowed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from lumbar_tf.core.config import config_to_dict
from lumbar_tf.core.errors import ExportError
from lumbar_tf.export.metadata import read_json

# Held-out macro ROC-AUC a TFLite variant may lose against Keras before it is refused.
AUC_LOSS_FLOOR = 0.01
TRAINING, HELD_OUT, PHANTOMS = "training", "held-out", "phantoms"  # kinds of representative studies


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def axial_inputs(studies: dict, cfg) -> np.ndarray | None:
    """An axial model's crops ``[B, 5, C, C, 2n+1]`` (0-255, uint8 values as inference feeds them)
    for studies of `data.dataset.load_studies`: the centre of each stored crop, which is
    `axial.axial_crops` around the labelled level points (None for a sagittal-only model)."""
    if cfg.axial is None:
        return None
    from lumbar_tf.data.dataset import axial_training_crops

    crops = [axial_training_crops(stored, cfg, training=False).numpy() for stored in studies["axial"]]
    return np.clip(np.round(np.stack(crops)), 0, 255).astype(np.float32)


def _studies_from_cache(cache: Path, cfg, ids: list[str] | None, n: int):
    from lumbar_tf.data.dataset import load_manifest, load_studies

    manifest = load_manifest(cache, cfg)
    available = [str(s) for s in manifest["study_ids"]]
    wanted = [s for s in ids if s in set(available)] if ids else available
    if not wanted:
        return None
    return load_studies(cache, cfg, wanted[:n])


def _prepare_studies(data_dir, cfg, ids: list[str] | None, n: int, tmp: Path):
    from lumbar_tf.data.dataset import DatasetError, load_studies, prepare_cache, read_index

    index = read_index(data_dir)
    candidates = [s for s in (ids or index.study_ids) if s in index.studies][: max(n, 1) + 8]
    cache = tmp / f"cache-{uuid.uuid4().hex[:8]}"
    try:
        manifest = prepare_cache(data_dir, cache, cfg, progress=False, study_ids=candidates)
    except DatasetError:
        return None
    return load_studies(cache, cfg, manifest["study_ids"][:n])


def representative_studies(
    loaded, n: int, tmp: Path, *, cache_dir=None, data_dir=None, phantoms: bool = True
) -> tuple[dict, str, str]:
    """Up to ``n`` studies as model-ready views: ``(studies, where from, kind)``.

    Order: an explicit prepared cache; the run's own cache (``RUN/cache``); the run's training data
    (``split.json``'s data folder, decoded now) -- kind `TRAINING`; the held-out ``data_dir``
    (`HELD_OUT`); with ``phantoms``, a few phantom studies synthesised on the spot (`PHANTOMS`).
    Raises ExportError when none is found.
    """
    from lumbar_tf.data.dataset import DatasetError

    cfg = loaded.preprocess
    run = loaded.run_dir
    split = (read_json(run / "split.json") if run else None) or {}
    train_ids = [str(s) for s in split.get("train", [])]
    caches = [Path(cache_dir)] if cache_dir else []
    if run is not None:
        caches.append(run / "cache")
    for cache in caches:
        if (cache / "manifest.json").exists():
            try:
                studies = _studies_from_cache(cache, cfg, train_ids, n)
            except DatasetError:
                studies = None
            if studies and studies["study_id"]:
                return studies, f"training cache {cache}", TRAINING
    sources = []
    if split.get("data_dir") and Path(split["data_dir"]).is_dir():
        sources.append((split["data_dir"], train_ids, "training data", TRAINING))
    if data_dir is not None:
        sources.append((data_dir, None, "held-out data (no training data found)", HELD_OUT))
    for folder, ids, what, kind in sources:
        try:
            studies = _prepare_studies(folder, cfg, ids, n, tmp)
        except DatasetError:
            studies = None
        if studies and studies["study_id"]:
            return studies, f"{what} {folder}", kind
    if not phantoms:
        raise ExportError(f"{loaded.path}: no training studies found (run cache, --cache or training data)")
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    count = max(1, min(n, 8))
    phantom = synthesize_dataset(tmp / "phantom", count, seed=12345)
    studies = _prepare_studies(phantom, cfg, None, count, tmp)
    if not studies or not studies["study_id"]:
        raise ExportError(f"{loaded.path}: no representative studies for the TFLite checks")
    return studies, "phantom studies synthesised on the spot (no training data found)", PHANTOMS


def _heldout_studies(data_dir, cfg, tmp: Path):
    """Labelled held-out studies (RSNA train layout) as views + grades, or (None, reason)."""
    from lumbar_tf.data.dataset import DatasetError, load_studies, prepare_cache

    data_dir = Path(data_dir)
    if not (data_dir / "train.csv").exists() and not (data_dir / "train_grades.csv").exists():
        return None, f"{data_dir}: no train.csv labels; ROC-AUC not computed"
    cache = tmp / "heldout-cache"
    try:
        manifest = prepare_cache(data_dir, cache, cfg, progress=False)
    except DatasetError as exc:
        return None, str(exc)
    return load_studies(cache, cfg, manifest["study_ids"]), None


def _auc(threshold_probs, grades) -> float | None:
    from lumbar_tf.training.metrics import compute_metrics

    return compute_metrics(threshold_probs, grades)["macro_roc_auc"]


def evaluate_heldout(
    data_dir, loaded, saved, tflite_files: dict, cfg, work: Path, floor: float = AUC_LOSS_FLOOR
) -> dict:
    """Macro ROC-AUC of Keras, the SavedModel and each TFLite file on labelled held-out studies."""
    studies, reason = _heldout_studies(data_dir, cfg, work)
    if studies is None:
        return {"data_dir": str(data_dir), "note": reason}
    from lumbar_tf.runtime.tflite_model import EdgeModel

    grades = studies["grades"]
    views = studies["views"]
    axial = axial_inputs(studies, cfg)
    keras_auc = _auc(loaded.predict_views(views, axial=axial)["threshold_probs"], grades)
    result = {
        "data_dir": str(data_dir),
        "n_studies": len(studies["study_id"]),
        "keras_macro_roc_auc": keras_auc,
        "saved_model_macro_roc_auc": _auc(saved.predict_views(views, axial=axial)["threshold_probs"], grades),
        "tflite": {},
    }
    if axial is not None:  # crops around the labelled levels (the cache's), the same for every runtime
        result["axial_levels_covered"] = int(np.sum(studies["axial_valid"]))
    for variant, path in tflite_files.items():
        edge = EdgeModel(path, metadata={"preprocess": config_to_dict(cfg), "variant": variant})
        auc = _auc(edge.predict_views(views, axial=axial)["threshold_probs"], grades)
        delta = None if auc is None or keras_auc is None else auc - keras_auc
        result["tflite"][variant] = {"macro_roc_auc": auc, "delta_vs_keras": delta}
    result["auc_loss_floor"] = {
        "max_loss": floor,
        "met": {
            v: (r["delta_vs_keras"] is not None and r["delta_vs_keras"] >= -floor)
            for v, r in result["tflite"].items()
        },
    }
    return result


def copy_auc_into_variants(report: dict) -> None:
    """Put each variant's held-out AUC and its delta from Keras beside its size and differences."""
    evaluation = report.get("evaluation") or {}
    for variant, info in (report.get("tflite") or {}).items():
        ev = (evaluation.get("tflite") or {}).get(variant)
        if ev:
            info["macro_roc_auc"] = ev["macro_roc_auc"]
            info["keras_macro_roc_auc"] = evaluation.get("keras_macro_roc_auc")
            info["roc_auc_delta_vs_keras"] = ev["delta_vs_keras"]


def gate_variants(report: dict, allow_degraded: bool, floor: float = AUC_LOSS_FLOOR) -> None:
    """Mark each TFLite variant of the report ``published`` (and why not, or why despite a loss).

    A variant whose held-out ROC-AUC is more than ``floor`` below Keras is not published unless
    ``allow_degraded``; without held-out AUC the floor cannot be checked and the reason says so.
    """
    evaluation = report.get("evaluation") or {}
    for variant, info in (report.get("tflite") or {}).items():
        ev = (evaluation.get("tflite") or {}).get(variant)
        delta = None if ev is None else ev.get("delta_vs_keras")
        info["published"], info["degraded"] = True, False
        if not evaluation:
            info["reason"] = "no held-out data (--data): the AUC floor was not checked"
        elif delta is None:
            info["reason"] = f"no held-out ROC-AUC ({evaluation.get('note', 'undefined')}): floor not checked"
        elif delta < -floor:
            info["degraded"] = True
            loss = f"held-out ROC-AUC {ev['macro_roc_auc']:.4f} is {-delta:.4f} below Keras (floor {floor:g})"
            if allow_degraded:
                info["reason"] = f"{loss}; published anyway (--allow-degraded)"
            else:
                info["published"] = False
                info["reason"] = f"{loss}; not published (--allow-degraded publishes it)"
