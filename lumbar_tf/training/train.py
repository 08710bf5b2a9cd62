"""`lumbar-tf train`: fit the level localiser, then the level grader, into a run folder.

Run folder layout::

    RUN/config.yaml          resolved configuration
    RUN/split.json           study -> fold, and which fold is validation
    RUN/prior.json           training-split class frequencies (the constant-prior baseline)
    RUN/label_semantics.json which grade thresholds the training labels made known (also in finished.json)
    RUN/quality_bounds.json  input-quality bounds measured on the training split (also in model.keras)
    RUN/localizer.keras      best localiser by validation loss
    RUN/grader.keras         best grader by validation loss
    RUN/history/*.csv        per-epoch histories (CSVLogger)
    RUN/logs/                TensorBoard
    RUN/backup/              BackupAndRestore state (a killed run resumes from here)
    RUN/finished.json        written last; its presence marks a finished run
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import Config, load_config, save_config
from lumbar_tf.core.contract import RUN_LABEL_SEMANTICS_FILE, RUN_PRIOR_FILE
from lumbar_tf.core.errors import RunFolderError
from lumbar_tf.core.io import write_json_atomic, write_text_atomic
from lumbar_tf.data.dataset import (
    DatasetError,
    grader_dataset,
    load_manifest,
    load_studies,
    localizer_dataset,
    manifest_preprocess,
    prepare_cache,
    split_folds,
)
from lumbar_tf.training import multiworker

FINISHED = "finished.json"
QUALITY_BOUNDS_FILE = "quality_bounds.json"


def _fit_stage(model, run: Path, name: str, stage, train_ds, val_ds, steps: int, seed: int, extra_callbacks):
    """Fit one stage and save its best model as ``RUN/<name>.keras`` (EarlyStopping restored it).

    Keras warns at the end of every validation pass whose length tf.data cannot know in advance
    (the study filter hides the cardinality); the training set repeats forever and never runs out,
    so that warning is silenced here.
    """
    import keras

    keras.utils.set_random_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        history = model.fit(
            train_ds,
            shuffle=False,  # tf.data shuffles
            validation_data=val_ds,
            epochs=stage.epochs,
            steps_per_epoch=steps,
            callbacks=make_callbacks(run, name, stage, extra_callbacks),
            verbose=2 if _quiet() else 1,
        )
    model.save(run / f"{name}.keras")
    return model, history.history


# === Set-up ===


def configure_precision(setting: str) -> str:
    """Set Keras' global dtype policy (auto: mixed_float16 on GPU, float32 on CPU)."""
    import keras

    from lumbar_tf.models.networks import choose_dtype_policy

    policy = choose_dtype_policy(setting)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def distribution_scope():
    """MultiWorkerMirroredStrategy with ``TF_CONFIG``, MirroredStrategy with several GPUs (TensorFlow
    backend), else a no-op scope (`training.multiworker`)."""
    return multiworker.scope()


def make_optimizer(stage, steps_per_epoch: int):
    """AdamW with linear warm-up then cosine decay."""
    import keras

    total = max(1, stage.epochs * steps_per_epoch)
    warmup = min(total - 1, int(stage.warmup_epochs * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=stage.learning_rate * 0.01 if warmup else stage.learning_rate,
        decay_steps=max(1, total - warmup),
        warmup_target=stage.learning_rate if warmup else None,
        warmup_steps=warmup,
        alpha=0.01,
    )
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=stage.weight_decay)


def make_callbacks(run: Path, name: str, stage, extra=()):
    """Best checkpoint, BackupAndRestore, EarlyStopping, TensorBoard and CSVLogger for one stage."""
    import keras

    (run / "history").mkdir(parents=True, exist_ok=True)
    return [
        *multiworker.callbacks(),  # before the checkpoints: they must save what every worker holds
        keras.callbacks.BackupAndRestore(str(run / "backup" / name), save_freq="epoch"),
        keras.callbacks.ModelCheckpoint(str(run / f"{name}.keras"), monitor="val_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=stage.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.TensorBoard(str(run / "logs" / name), write_graph=False, profile_batch=0),
        keras.callbacks.CSVLogger(str(run / "history" / f"{name}.csv"), append=True),
        *extra,
    ]


def _prepare_run_folder(run: Path, resume: bool, overwrite: bool) -> None:
    if (run / FINISHED).exists() and not (resume or overwrite):
        raise RunFolderError(f"{run}: holds a finished run (use --resume or --overwrite)")
    if overwrite and run.exists():
        for child in run.iterdir():
            if child.name == "cache":
                continue  # the decoded data is still valid
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if resume and not (run / "config.yaml").exists():
        raise RunFolderError(f"{run}: nothing to resume (no config.yaml)")
    run.mkdir(parents=True, exist_ok=True)


def _ensure_cache(data_dir, cache_dir: Path, cfg: Config) -> dict:
    try:
        return load_manifest(cache_dir, cfg.preprocess)
    except DatasetError:
        if (cache_dir / "manifest.json").exists():
            raise
    print(f"preparing cache in {cache_dir}")
    return prepare_cache(data_dir, cache_dir, cfg.preprocess)


def _usable_split(manifest: dict, cfg: Config, cache_dir: Path) -> tuple[list[str], list[str], dict]:
    studies = load_studies(cache_dir, cfg.preprocess)
    grades = studies["grades"]
    labelled = [
        sid
        for sid, g, present in zip(studies["study_id"], grades, studies["level_present"])
        if (g != L.UNKNOWN).any() and present.sum() > 0
    ]
    if len(labelled) < 2:
        raise DatasetError(f"{cache_dir}: no usable labels (need labelled studies with level coordinates)")
    folds = split_folds(labelled, cfg.train.folds, cfg.train.seed)
    val = [s for s in labelled if folds[s] == cfg.train.val_fold]
    train = [s for s in labelled if folds[s] != cfg.train.val_fold]
    if not val or not train:
        raise DatasetError(
            f"{cache_dir}: too few labelled studies ({len(labelled)}) for {cfg.train.folds} folds"
        )
    return train, val, folds


# === Stages ===


def _fit_localizer(run, cfg: Config, cache, train_ids, val_ids, extra_callbacks=()):
    from lumbar_tf.models.losses import MaskedLevelLoss
    from lumbar_tf.models.networks import build_localizer

    stage = cfg.train.localizer
    steps = math.ceil(len(train_ids) / stage.batch_size)
    train_ds = localizer_dataset(
        cache, cfg.preprocess, train_ids, batch_size=stage.batch_size, training=True, seed=cfg.train.seed
    )
    val_ds = localizer_dataset(cache, cfg.preprocess, val_ids, batch_size=stage.batch_size, training=False)
    with distribution_scope():
        model = build_localizer(cfg.preprocess.view_size, cfg.model)
        model.compile(optimizer=make_optimizer(stage, steps), loss=MaskedLevelLoss())
    return _fit_stage(
        model, run, "localizer", stage, train_ds, val_ds, steps, cfg.train.seed, extra_callbacks
    )


def localizer_errors_mm(model, studies: dict, cfg: Config) -> np.ndarray:
    """Distances (mm) between predicted and labelled level centres for labelled levels."""
    view = studies["views"][cfg.preprocess.localizer_view].astype(np.float32)
    pred = np.asarray(model.predict(view, verbose=0, batch_size=16))
    err = np.linalg.norm(pred - studies["level_xy"], axis=-1) * cfg.preprocess.spine_crop_mm
    return err[studies["level_present"] > 0.5]


def _fit_grader(run, cfg: Config, cache, train_ids, val_ids, jitter_mm, extra_callbacks=(), axial=True):
    """Fit the grader; ``axial=False`` leaves a config's axial view out (the ablation,
    `benchmarks/axial_ablation.py`: same cache, same budget, sagittal crops only)."""
    from lumbar_tf.models.end_to_end import grader_input_names
    from lumbar_tf.models.losses import OrdinalFocalLoss
    from lumbar_tf.models.networks import build_grader

    stage = cfg.train.grader
    n_levels = len(train_ids) * L.N_LEVELS
    steps = math.ceil(n_levels / stage.batch_size)
    p = cfg.preprocess
    train_ds = grader_dataset(
        cache,
        p,
        train_ids,
        batch_size=stage.batch_size,
        training=True,
        jitter_mm=jitter_mm,
        seed=cfg.train.seed,
        axial=axial,
    )
    val_ds = grader_dataset(cache, p, val_ids, batch_size=stage.batch_size, training=False, axial=axial)
    names = grader_input_names(p) if axial else p.view_names
    with distribution_scope():
        own = (p.axial.name,) if axial and p.axial is not None else ()
        sides = own if cfg.model.axial_pooling == "sides" else ()
        model = build_grader(p.crop_size, names, cfg.model, own_backbone=own, side_pooled=sides)
        model.compile(
            optimizer=make_optimizer(stage, steps),
            loss=OrdinalFocalLoss.from_loss_config(cfg.train.loss),
        )
    return _fit_stage(
        model, run, "grader", stage, train_ds, val_ds, steps, cfg.train.seed + 1, extra_callbacks
    )


def _quiet() -> bool:
    import os

    return bool(os.environ.get("CI")) or not __import__("sys").stdout.isatty()


def _prior(grades: np.ndarray) -> list:
    from lumbar_tf.training.metrics import prior_threshold_probs_from_grades

    return np.asarray(prior_threshold_probs_from_grades(grades)).tolist()


def record_quality_bounds(run: Path, studies: dict, cfg: Config) -> dict | None:
    """The input-quality bounds of this model, from its training split (labelled level centres and
    the localiser views' midline channels; `runtime.quality.bounds_from_training`), written as
    ``RUN/quality_bounds.json``; the end-to-end model and the export metadata carry them."""
    from lumbar_tf.runtime import quality

    channel = quality.midline_channel(studies["views"], cfg.preprocess)
    bounds = quality.bounds_from_training(
        studies["level_xy"], studies["level_present"], cfg.preprocess.spine_crop_mm, channel
    )
    if bounds is not None:
        write_json_atomic(run / QUALITY_BOUNDS_FILE, bounds)
    return bounds


def train(
    data_dir,
    run_dir,
    *,
    config_path=None,
    overrides=(),
    stage: str = "all",
    cache_dir=None,
    resume: bool = False,
    overwrite: bool = False,
    weights: str | None = None,
    extra_callbacks=(),
) -> Path:
    """Train into ``run_dir``; returns the run folder."""
    import keras

    multiworker.setup(Path(run_dir), cache_dir)  # before any TensorFlow op
    run = multiworker.write_folder(Path(run_dir), cache_dir)  # non-chief workers: a private copy
    _prepare_run_folder(run, resume, overwrite)
    overrides = list(overrides)
    if weights is not None:
        overrides.append(f"model.weights={'null' if weights.lower() == 'none' else weights}")
    # A resumed run keeps its own resolved config; overrides still apply on top.
    cfg = load_config(run / "config.yaml" if resume else config_path, overrides)
    if cfg.model.weights not in (None, "imagenet"):
        from lumbar_tf.models.networks import build_backbone

        # Load the file into a throw-away backbone: one that is missing or does not fit fails in
        # seconds, before the localiser trains for minutes.
        build_backbone(
            cfg.model.backbone, cfg.preprocess.crop_size, cfg.model.weights, cfg.model.small_cnn_filters
        )
    if stage == "grader" and not (run / "localizer.keras").exists():
        raise RunFolderError(f"{run}: no localizer.keras yet (train it first with --stage localizer)")
    save_config(cfg, run / "config.yaml")
    policy = configure_precision(cfg.train.mixed_precision)
    keras.utils.set_random_seed(cfg.train.seed)

    cache = Path(cache_dir) if cache_dir else run / "cache"
    manifest = _ensure_cache(data_dir, cache, cfg)
    # The model carries the preprocessing the cache was built with (learned channel offsets).
    cfg.preprocess = manifest_preprocess(manifest)
    save_config(cfg, run / "config.yaml")
    train_ids, val_ids, folds = _usable_split(manifest, cfg, cache)
    split = {
        "data_dir": str(Path(data_dir).resolve()),
        "val_fold": cfg.train.val_fold,
        "folds": folds,
        "train": train_ids,
        "val": val_ids,
    }
    write_json_atomic(run / "split.json", split)
    studies = load_studies(cache, cfg.preprocess, train_ids)
    write_json_atomic(run / RUN_PRIOR_FILE, {"threshold_probs": _prior(studies["grades"])})
    semantics = L.label_semantics(studies["grades"])
    write_json_atomic(run / RUN_LABEL_SEMANTICS_FILE, semantics)
    quality_bounds = record_quality_bounds(run, studies, cfg)
    print(f"dtype policy {policy}; {len(train_ids)} training and {len(val_ids)} validation studies")
    if not semantics["fine_grades"]:
        print("labels: RSNA severities only (no train_grades.csv): presence is P(>= moderate)")

    summary: dict = {
        "dtype_policy": policy,
        "n_train": len(train_ids),
        "n_val": len(val_ids),
        "label_semantics": semantics,
        "slice_offsets": manifest.get("slice_offsets", {}),
    }
    # A stage that finished is not refitted when a killed run resumes (its backup is gone by then).
    if stage in ("localizer", "all") and not (resume and (run / "localizer.done").exists()):
        localizer, hist = _fit_localizer(run, cfg, cache, train_ids, val_ids, extra_callbacks)
        write_text_atomic(run / "localizer.done", str(len(hist.get("loss", []))))
    else:
        localizer = keras.models.load_model(run / "localizer.keras")
    val_studies = load_studies(cache, cfg.preprocess, val_ids)
    errors = localizer_errors_mm(localizer, val_studies, cfg)
    summary["localizer_val_error_mm"] = {
        "median": float(np.median(errors)),
        "p90": float(np.percentile(errors, 90)),
    }
    # Train the grader on crops shifted as far as the localiser really errs.
    jitter = max(cfg.train.crop_jitter_mm, float(np.percentile(errors, 75)))
    summary["grader_jitter_mm"] = jitter
    if stage in ("grader", "all") and not (resume and (run / "grader.done").exists()):
        _, hist = _fit_grader(run, cfg, cache, train_ids, val_ids, jitter, extra_callbacks)
        write_text_atomic(run / "grader.done", str(len(hist.get("loss", []))))
    if (run / "localizer.keras").exists() and (run / "grader.keras").exists():
        from lumbar_tf.models.end_to_end import build_end_to_end

        end_to_end = build_end_to_end(
            keras.models.load_model(run / "localizer.keras", compile=False),
            keras.models.load_model(run / "grader.keras", compile=False),
            cfg.preprocess,
            fine_grades=semantics["fine_grades"],
            quality_bounds=quality_bounds,
        )
        end_to_end.save(run / "model.keras")
        summary["data_dir"] = str(Path(data_dir).resolve())
        write_json_atomic(run / FINISHED, summary)
    shutil.rmtree(run / "backup", ignore_errors=True)
    return multiworker.finish(run, Path(run_dir))
