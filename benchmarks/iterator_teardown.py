"""How long deleting a tf.data iterator takes, with tf.data's autotuner on and with it off.

    PYTHONPATH=. .venv/bin/python benchmarks/iterator_teardown.py [--epochs 8] [--step-s 0.37]

Each "epoch" takes 19 batches from a parallel-map pipeline, sleeping ``--step-s`` per batch (the
grader's step time in the demo), then deletes the iterator and times the deletion. With autotuning on,
the iterator's tuning thread sleeps on a timer whose period doubles up to seconds, and deletion waits
for its next wake-up. Keras drops a validation iterator every epoch, so a training run pays this once
an epoch. "off" uses the options the project's pipelines use (`data.dataset._without_autotune_thread`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def deletion_seconds(autotune: bool, epochs: int, step_s: float) -> list[float]:
    import tensorflow as tf

    from lumbar_tf.data.dataset import _without_autotune_thread

    ds = tf.data.Dataset.range(100_000).map(
        lambda x: tf.cast(x, tf.float32) * 2, num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.batch(16).prefetch(tf.data.AUTOTUNE)
    if not autotune:
        ds = ds.with_options(_without_autotune_thread())
    out = []
    for _ in range(epochs):
        it = iter(ds)
        for _ in range(19):
            next(it)
            time.sleep(step_s)
        start = time.perf_counter()
        del it
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--step-s", type=float, default=0.37)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for autotune in (True, False):
        secs = deletion_seconds(autotune, args.epochs, args.step_s)
        stalls = sum(s > 0.1 for s in secs)
        print(
            f"autotune {'on ' if autotune else 'off'}: iterator deletion "
            f"median {statistics.median(secs):.3f} s, "
            f"max {max(secs):.2f} s, {stalls} of {len(secs)} over 0.1 s"
        )


if __name__ == "__main__":
    main()
