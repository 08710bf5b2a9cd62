"""Per-epoch wall time and cores used while one training stage fits, on a finished run's cache.

    PYTHONPATH=. .venv/bin/python benchmarks/train_epochs.py --run demo_out/run --stage localizer \
        [--epochs 10] [--intra N] [--inter N] [--no-callbacks] [--materialise]

Takes the run's config, split and cache, fits the stage again into a scratch folder for
``--epochs`` epochs (the first one traces and is left out of the summary) and prints per epoch the
seconds of training steps, the cores this process used during them (CPU seconds / wall seconds) and
the validation seconds. The variants say where an epoch's time goes:
  * ``--intra`` / ``--inter``: TensorFlow's intra-op / inter-op thread pools;
  * ``--no-callbacks``: only the timer (no checkpoint, backup, TensorBoard, CSV, early stopping);
  * ``--materialise``: 45 training batches taken from the pipeline first, then fitted from memory
    (no tf.data work while the steps run).
On 2 cores a step that uses both should show ~1.9 cores; an epoch at ~1 core runs at half speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="a finished run folder (config, split, cache)"
    )
    parser.add_argument("--stage", choices=("localizer", "grader"), default="localizer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--intra", type=int, default=0)
    parser.add_argument("--inter", type=int, default=0)
    parser.add_argument("--no-callbacks", action="store_true")
    parser.add_argument("--materialise", action="store_true")
    args = parser.parse_args()

    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    import keras

    from lumbar_tf.core.config import load_config
    from lumbar_tf.training import train as T

    epochs: list[dict] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_test_begin(self, logs=None):
            fit = time.perf_counter() - self.wall
            cores = (time.process_time() - self.cpu) / fit
            epochs.append({"fit_s": round(fit, 2), "cores": round(cores, 2)})
            self.val = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epochs[-1]["val_s"] = round(time.perf_counter() - self.val, 2)

    timer = Timer()
    if args.no_callbacks:
        T.make_callbacks = lambda run, name, stage, extra=(): [timer]
    if args.materialise:
        make = T.localizer_dataset if args.stage == "localizer" else T.grader_dataset

        def from_memory(*a, **k):
            ds = make(*a, **k)
            if not k.get("training"):
                return ds
            batches = list(ds.take(45))
            stacked = tf.nest.map_structure(lambda *t: tf.stack(t), *batches)
            return tf.data.Dataset.from_tensor_slices(stacked).repeat().prefetch(2)

        setattr(T, f"{args.stage}_dataset", from_memory)

    cfg = load_config(args.run / "config.yaml", [f"train.{args.stage}.epochs={args.epochs}"])
    split = json.loads((args.run / "split.json").read_text())
    cache = args.run / "cache"
    with tempfile.TemporaryDirectory() as scratch:
        if args.stage == "localizer":
            T._fit_localizer(Path(scratch), cfg, cache, split["train"], split["val"], [timer])
        else:
            jitter = cfg.train.crop_jitter_mm
            T._fit_grader(Path(scratch), cfg, cache, split["train"], split["val"], jitter, [timer])
    for n, e in enumerate(epochs, start=1):
        print(
            f"epoch {n:2d}: steps {e['fit_s']:6.2f} s at {e['cores']:.2f} cores, "
            f"validation {e['val_s']:.2f} s"
        )
    timed = epochs[1:]
    slow = [e for e in timed if e["cores"] < 1.3]
    print(
        f"after the first epoch: median {statistics.median(e['fit_s'] for e in timed):.2f} s, "
        f"{len(slow)} of {len(timed)} epochs below 1.3 cores "
        f"(median {statistics.median(e['fit_s'] for e in slow) if slow else 0:.2f} s)"
    )


if __name__ == "__main__":
    main()
