"""Training on several hosts: ``TF_CONFIG`` -> MultiWorkerMirroredStrategy (TensorFlow backend).

Per the TensorFlow multi-worker guide:

- One strategy per process, made before TensorFlow runs any op (`setup`, the first thing `train`
  does); both stages train under it (`scope`).
- ``train.*.batch_size`` stays the global batch: Keras splits each batch over all replicas, so a
  run gives the same schedule on one host or several.
- Only the chief (``task.type == "chief"``, or worker 0 when there is no chief) writes RUN. Every
  other worker trains into a private copy of RUN in a temporary folder, removed when it finishes
  (`write_folder` / `finish`); its checkpoints and BackupAndRestore state go there.
- BatchNormalization's moving statistics, which each worker updates from its own batches, are
  averaged over the workers after every epoch (`callbacks`), so all workers hold the same weights.
- A worker lost mid-training stops the others (collectives time out). Start every task again with
  ``--resume``: each restarts from the chief's ``RUN/backup`` (copied into its private folder), so
  RUN must be on a file system all hosts share. The prepared cache must already exist (``--cache``
  or RUN/cache; `lumbar-tf prepare`, any runner): workers do not prepare it in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lumbar_tf.core.errors import ConfigError, RunFolderError

_STRATEGY: list = []  # the one strategy of this process, once made


def cluster() -> dict | None:
    """``{"workers", "task_type", "task_id", "chief"}`` from ``TF_CONFIG``, or None with fewer than
    two tasks (single-host training)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
        spec, task = config.get("cluster", {}), config.get("task", {})
        n = sum(len(spec.get(kind, [])) for kind in ("chief", "worker"))
        task_type, task_id = str(task["type"]), int(task.get("index", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError("TF_CONFIG", f"not a valid cluster description ({exc})") from None
    if n < 2:
        return None
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not spec.get("chief"))
    return {"workers": n, "task_type": task_type, "task_id": task_id, "chief": chief}


def setup(run: Path, cache_dir) -> dict | None:
    """Make this process's strategy now (before any TensorFlow op) and check the cache exists."""
    info = cluster()
    if info is not None:
        import keras

        if keras.config.backend() != "tensorflow":
            raise ConfigError("TF_CONFIG", "multi-worker training needs KERAS_BACKEND=tensorflow")
        cache = Path(cache_dir) if cache_dir else run / "cache"
        if not (cache / "manifest.json").is_file():
            raise RunFolderError(
                f"{cache}", "multi-worker training needs a prepared cache (run lumbar-tf prepare first)"
            )
    _strategy()
    return info


def _strategy():
    if not _STRATEGY:
        strategy = None
        import keras

        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            if cluster() is not None:
                strategy = tf.distribute.MultiWorkerMirroredStrategy()
                _patch_keras_fit()
            elif len(tf.config.list_physical_devices("GPU")) > 1:
                strategy = tf.distribute.MirroredStrategy()
        _STRATEGY.append(strategy)
    return _STRATEGY[0]


def scope():
    """The strategy's scope (multi-worker, several GPUs), else a no-op scope."""
    strategy = _strategy()
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def callbacks() -> list:
    """Callbacks every stage needs under MultiWorkerMirroredStrategy (first in the list)."""
    strategy = _strategy()
    if strategy is None or cluster() is None:
        return []
    import keras
    import numpy as np
    import tensorflow as tf

    class SyncMovingStatistics(keras.callbacks.Callback):
        """Average BatchNormalization's moving mean and variance over the workers after each epoch.

        Gradients are all-reduced, but each worker updates the moving statistics from its own
        batches only, so without this the workers' models (and the chief's checkpoints) would
        disagree in exactly those variables. Runs before the checkpoint callbacks."""

        def on_epoch_end(self, epoch, logs=None):
            variables = [
                variable
                for layer in self.model._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)
                for variable in (layer.moving_mean, layer.moving_variance)
            ]
            if not variables:
                return

            @tf.function
            def mean_over_workers(*values):
                # One value per worker in, their mean out (a collective all-reduce); replica-context
                # all_reduce fails here ("destinations can not be empty").
                return [
                    strategy.reduce(
                        "MEAN",
                        strategy.experimental_distribute_values_from_function(lambda _, v=value: v),
                        axis=None,
                    )
                    for value in values
                ]

            local = tuple(tf.constant(np.asarray(v.value)) for v in variables)  # this worker's values
            for variable, value in zip(variables, mean_over_workers(*local)):
                variable.assign(value)

    return [SyncMovingStatistics()]


def write_folder(run: Path, cache_dir) -> Path:
    """The folder this task writes: RUN on the chief and single-host runs, else a private copy of
    RUN (without the cache, which is linked) in a temporary folder."""
    info = cluster()
    if info is None or info["chief"]:
        return run
    private = Path(tempfile.mkdtemp(prefix=f"lumbar-tf-{info['task_type']}{info['task_id']}-")) / run.name
    if run.is_dir():
        shutil.copytree(run, private, ignore=shutil.ignore_patterns("cache"), symlinks=True)
    private.mkdir(parents=True, exist_ok=True)
    if not cache_dir and (run / "cache").exists():
        (private / "cache").symlink_to((run / "cache").resolve(), target_is_directory=True)
    return private


def finish(written: Path, run: Path) -> Path:
    """Remove a worker's private folder; the run folder is the chief's."""
    if written != run:
        shutil.rmtree(written.parent, ignore_errors=True)
    return run


def _patch_keras_fit() -> None:
    """Two fixes so Keras 3's ``fit`` runs under MultiWorkerMirroredStrategy (keras-team/keras#20585,
    open in Keras 3.15): its first-batch build reduces the input batch across workers
    (``strategy.reduce`` of eager per-replica values fails), and it averages the scalar step
    outputs with ``axis=0``. The build takes this worker's batch instead (shapes only); scalars are
    averaged over replicas with ``axis=None``, what MirroredStrategy on one host computes."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_lumbar_tf_patched", False):
        return
    reduce_per_replica = trainer.reduce_per_replica

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda x: (
                        self.distribute_strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    next(it),
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_scalars(values, strategy, reduction="auto"):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_scalars
    trainer._lumbar_tf_patched = True
