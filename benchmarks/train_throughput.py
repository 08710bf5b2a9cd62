"""Grader training throughput: float32 against mixed_float16, same model and batch, one run.

    .venv/bin/python benchmarks/train_throughput.py --backbone small_cnn --crop 64 --batch 32
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --backbone efficientnetb3 --crop 224 --batch 64 \
        --steps 16 --parallel

Backend-agnostic Keras 3 (random in-memory data, no tf.data), so it runs on a GPU machine that
has JAX but no TensorFlow. Prints and appends a JSON line to benchmarks/train_throughput_results.jsonl:
median images/s over timed repeats after warm-up (compilation excluded) and the ratio, plus the
seconds spent building the model and on the warm-up epoch (first compile included).

--parallel builds and compiles each policy in its own process at the same time (a large backbone's
first XLA compile takes minutes), then times them one after the other, never together.

--on-device also times the same fit loop on one batch put on the accelerator once and fed again each
step (a generator of device arrays; with TensorFlow it goes through tf.data, so only JAX skips the host
entirely): no slicing or host-to-device copy, so a step bound by feeding numpy shows up as the gap.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def wait_for(paths: list[Path]) -> None:
    while not all(path.exists() for path in paths):
        time.sleep(0.05)


def measure(policy: str, args) -> dict:
    import keras
    import numpy as np

    from lumbar_tf.core.config import ModelConfig
    from lumbar_tf.models.losses import OrdinalFocalLoss
    from lumbar_tf.models.networks import build_grader

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    views = ("sag_t2", "sag_t1")
    start = time.perf_counter()
    model = build_grader(args.crop, views, ModelConfig(backbone=args.backbone, weights=None))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=OrdinalFocalLoss(), jit_compile="auto")
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = {v: rng.uniform(0, 255, (n, args.crop, args.crop, 3)).astype("float32") for v in views}
    x["level_index"] = rng.integers(0, 5, n).astype("int32")
    y = np.stack([rng.integers(0, 2, (n, 5, 3)), np.ones((n, 5, 3))], -1).astype("float32")
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)  # warm-up: compile
    warmup_s = time.perf_counter() - start
    if args.turn is not None:  # --parallel child: time only once every policy is compiled, in turn
        print(f"{policy}: built in {build_s:.0f} s, warm-up epoch {warmup_s:.0f} s", file=sys.stderr)
        sync = Path(args.sync)
        (sync / f"ready-{args.turn}").touch()
        ready = [sync / f"ready-{i}" for i in range(args.of)]
        wait_for(ready + [sync / f"done-{i}" for i in range(args.turn)])
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
        rates.append(2 * n / (time.perf_counter() - start))  # two crops (views) per level
    if args.on_device:  # same compiled step (same shapes, dtypes and (x, y) structure): no new compile
        batch = keras.tree.map_structure(lambda a: keras.ops.convert_to_tensor(a[: args.batch]), (x, y))
        device_rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            model.fit((batch for _ in range(args.steps)), epochs=1, verbose=0)
            device_rates.append(2 * n / (time.perf_counter() - start))
    if args.turn is not None:
        (Path(args.sync) / f"done-{args.turn}").touch()
        on_device = f", on device {statistics.median(device_rates):.0f}" if args.on_device else ""
        print(f"{policy}: {statistics.median(rates):.0f} images/s{on_device}", file=sys.stderr)
    result = {
        "policy": policy,
        "images_per_s": statistics.median(rates),
        "output_dtype": str(model.outputs[0].dtype),  # no predict: it would be one more compile
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
    }
    if args.on_device:
        result["on_device_images_per_s"] = statistics.median(device_rates)
    return result


def measure_parallel(policies: list[str], args) -> list[dict]:
    """One child process per policy: compile side by side, time one after another."""
    argv = [f"--{k}={getattr(args, k)}" for k in ("backbone", "crop", "batch", "steps", "repeats")]
    argv += ["--on-device"] if args.on_device else []
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX would take 75% of the GPU for each
    env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # TensorFlow would take the whole GPU
    with tempfile.TemporaryDirectory() as sync:
        children = [
            subprocess.Popen(
                [sys.executable, __file__, *argv, f"--policies={policy}"]
                + [f"--turn={i}", f"--of={len(policies)}", f"--sync={sync}"],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, policy in enumerate(policies)
        ]
        while any(child.poll() is None for child in children):
            if any(child.poll() for child in children):  # one failed: the others would wait forever
                for child in children:
                    if child.poll() is None:
                        child.kill()
                break
            time.sleep(0.5)
        outputs = [child.communicate()[0] for child in children]
    if any(child.returncode for child in children):
        sys.exit(f"a policy's process failed: exit codes {[child.returncode for child in children]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


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
    parser.add_argument("--parallel", action="store_true", help="compile the policies in parallel processes")
    parser.add_argument(
        "--on-device", action="store_true", help="also time steps on a batch already on the accelerator"
    )
    parser.add_argument("--turn", type=int, help=argparse.SUPPRESS)  # set by --parallel for its children
    parser.add_argument("--of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("train_throughput_results.jsonl")
    )
    args = parser.parse_args()
    policies = args.policies.split(",")

    if args.turn is not None:  # a --parallel child: report its one policy to the parent
        print(json.dumps(measure(policies[0], args)), flush=True)
        return
    if args.parallel:
        results = measure_parallel(policies, args)
    else:
        results = []
        for policy in policies:
            results.append(measure(policy, args))
            print(json.dumps(results[-1]), flush=True)  # survives a run cut off before the next policy

    import keras

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
        if args.on_device:
            rates = [result["on_device_images_per_s"] for result in results]
            record["on_device_mixed_over_float32"] = rates[1] / rates[0]
    line = json.dumps(record)
    print(line)
    with open(args.out, "a") as handle:
        handle.write(line + "\n")


if __name__ == "__main__":
    main()
