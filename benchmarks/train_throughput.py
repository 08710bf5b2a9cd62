"""Grader training throughput: float32 against mixed_float16, same model and batch, one run.

    .venv/bin/python benchmarks/train_throughput.py --backbone small_cnn --crop 64 --batch 32
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --backbone efficientnetb0 --crop 224 --batch 64

Backend-agnostic Keras 3 (random in-memory data, no tf.data), so it runs on a GPU machine that
has JAX but no TensorFlow. Prints and appends a JSON line to benchmarks/train_throughput_results.jsonl:
median images/s over timed repeats after warm-up (compilation excluded) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(policy: str, args) -> dict:
    import keras
    import numpy as np

    from lumbar_tf.config import ModelConfig
    from lumbar_tf.losses import OrdinalFocalLoss
    from lumbar_tf.model import build_grader

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    views = ("sag_t2", "sag_t1")
    model = build_grader(args.crop, views, ModelConfig(backbone=args.backbone, weights=None))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=OrdinalFocalLoss(), jit_compile="auto")
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = {v: rng.uniform(0, 255, (n, args.crop, args.crop, 3)).astype("float32") for v in views}
    x["level_index"] = rng.integers(0, 5, n).astype("int32")
    y = np.stack([rng.integers(0, 2, (n, 5, 3)), np.ones((n, 5, 3))], -1).astype("float32")
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # warm-up: compile
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
        rates.append(2 * n / (time.perf_counter() - start))  # two crops (views) per level
    out = model.predict({k: v[:2] for k, v in x.items()}, verbose=0)
    return {"policy": policy, "images_per_s": statistics.median(rates), "output_dtype": str(out.dtype)}


def device_name() -> str:
    import keras

    if keras.config.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else f"CPU ({platform.processor() or platform.machine()})"
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default="float32,mixed_float16")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("train_throughput_results.jsonl")
    )
    args = parser.parse_args()

    import keras

    results = [measure(p, args) for p in args.policies.split(",")]
    record = {
        "backend": keras.config.backend(),
        "device": device_name(),
        "backbone": args.backbone,
        "crop": args.crop,
        "batch_levels": args.batch,
        "results": results,
    }
    if len(results) == 2:
        record["mixed_over_float32"] = results[1]["images_per_s"] / results[0]["images_per_s"]
    line = json.dumps(record)
    print(line)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
