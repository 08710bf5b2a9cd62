"""Where the int8 TFLite runner's batch-1 time goes, against the float32 SavedModel (issue 12, item 6).

    PYTHONPATH=. .venv/bin/python benchmarks/tflite_int8_breakdown.py [--repeats 60]

Same model and inputs as `benchmarks/inference.py` (an untrained end-to-end model at the CPU demo
sizes, exported with all TFLite variants, int8 calibrated on phantoms; views of 16 phantom studies).
For one study at a time it times, in interleaved rounds (medians; the machine is shared):
  * ``saved_model``: the float32 SavedModel's ``serving_default`` (localise -> in-graph crop -> grade);
  * each TFLite variant's whole `EdgeModel.predict_views` call, and its parts: the ``localize``
    invoke, the numpy level crops (`preprocess.crop_levels`), the ``grade`` invoke on the 5 crops,
    and what is left (input conversion, the prior/presence arithmetic of `predict_views`).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import NAME, build_untrained_export, input_views  # noqa: E402


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=60, help="timed studies per runtime")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT threads (default: all cores)")
    args = parser.parse_args()

    from lumbar_tf import preprocess
    from lumbar_tf.core import labels
    from lumbar_tf.runtime.artifacts import resolve_model
    from lumbar_tf.runtime.saved_model import SavedModelRunner
    from lumbar_tf.runtime.tflite_model import EdgeModel

    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="lumbar_int8_"))
    try:
        _, export = build_untrained_export(work)
        _, saved_dir = resolve_model(export)
        saved = SavedModelRunner(saved_dir)
        edges = {
            v: EdgeModel(export / "tflite" / f"{NAME}_{v}.tflite", num_threads=args.threads)
            for v in ("float32", "int8")
        }
        cfg = edges["int8"].preprocess
        views, _ = input_views(cfg, 16, work, None)
        n = len(views[cfg.localizer_view])
        level_index = np.arange(labels.N_LEVELS, dtype=np.int32)
        times: dict[str, list[float]] = {}

        def one(b: int):
            return {k: v[b : b + 1] for k, v in views.items()}

        def record(key: str, seconds: float) -> None:
            times.setdefault(key, []).append(seconds)

        for warm in range(3):  # tracing, tensor allocation, XNNPACK packing
            saved.predict_views(one(warm))
            for edge in edges.values():
                edge.predict_views(one(warm), batch_size=16)
        rounds = 4
        for r in range(rounds):
            for k in range(args.repeats // rounds):
                b = (r * 7 + k) % n
                study = one(b)
                t = time.perf_counter()
                saved.predict_views(study)
                record("saved_model", time.perf_counter() - t)
                for variant, edge in edges.items():
                    t = time.perf_counter()
                    edge.predict_views(study, batch_size=16)
                    record(f"{variant}:total", time.perf_counter() - t)
                    t0 = time.perf_counter()
                    xy = edge.localize(study[cfg.localizer_view])
                    t1 = time.perf_counter()
                    crops = preprocess.crop_levels({name: v[0] for name, v in study.items()}, xy[0], cfg)
                    t2 = time.perf_counter()
                    edge.grade(crops, level_index)
                    t3 = time.perf_counter()
                    record(f"{variant}:localize", t1 - t0)
                    record(f"{variant}:crops", t2 - t1)
                    record(f"{variant}:grade", t3 - t2)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = _median_ms(times["saved_model"])
    lines = [
        "| runtime | total ms | localize invoke | numpy crops | grade invoke | rest | vs SavedModel |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| saved_model (float32) | {base:.2f} | | | | | 1.00x |",
    ]
    for variant in edges:
        total = _median_ms(times[f"{variant}:total"])
        parts = [_median_ms(times[f"{variant}:{p}"]) for p in ("localize", "crops", "grade")]
        rest = total - sum(parts)
        lines.append(
            f"| tflite_{variant} | {total:.2f} | {parts[0]:.2f} | {parts[1]:.2f} | {parts[2]:.2f} | "
            f"{rest:.2f} | {base / total:.2f}x |"
        )
    end = os.getloadavg()
    lines.append(
        f"\nBatch 1, medians of {args.repeats} studies per runtime in {rounds} interleaved rounds; "
        f"load average {load[0]:.1f} at start, {end[0]:.1f} at end."
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
