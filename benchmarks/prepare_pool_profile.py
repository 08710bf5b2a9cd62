"""Where the time of ``prepare_cache`` goes with 1 and 2 workers: parent CPU, worker CPU, wall.

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_pool_profile.py --data D [--repeats 3]

On one RSNA-layout folder, in alternating rounds (so a change of machine load hits every mode
alike), after one untimed warm-up call of each mode:
  * ``serial``: ``workers=1`` (everything in this process, OpenCV with its default threads);
  * ``serial_1t``: the same with ``cv2.setNumThreads(1)``: the single-threaded CPU cost of a study;
  * ``pool``: ``workers=2``, the pool workers' CPU read from /proc just before the pool ends.
Quotes per mode the medians of wall seconds, this process's CPU seconds (for the pool: the
parent's reading of hand-over files, serialisation and TFRecord writing) and the workers' CPU
seconds, the load average and whether the kernel groups CPU shares by session
(``sched_autogroup_enabled``: then every session, not every process, gets an equal share, and a
pool of two workers gets no more CPU than one process while other sessions keep the cores busy).
If the pool's worker CPU is about the single-threaded CPU and the parent's share is small, the
pool's wall time is set by how much of the two cores it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _watch_pool(dataset_module, out: dict):
    """Wrap ``_start_pool`` so the workers' CPU is read just before the pool is terminated."""
    start_pool = dataset_module._start_pool

    def start(workers: int):
        pool = start_pool(workers)
        terminate = pool.terminate

        def read_then_terminate():
            out["workers_cpu_s"] = sum(_cpu_of(p.pid) for p in pool._pool)
            terminate()

        pool.terminate = read_then_terminate
        return pool

    dataset_module._start_pool = start


def run_once(data: Path, cache: Path, cfg, mode: str) -> dict:
    import cv2

    from lumbar_tf.data import dataset

    out: dict = {}
    threads = cv2.getNumThreads()
    if mode == "serial_1t":
        cv2.setNumThreads(1)
    t, cpu = time.perf_counter(), time.process_time()
    try:
        dataset.prepare_cache(data, cache, cfg, workers=2 if mode == "pool" else 1, progress=False)
    finally:
        cv2.setNumThreads(threads)
    out["wall_s"] = time.perf_counter() - t
    out["parent_cpu_s"] = time.process_time() - cpu
    shutil.rmtree(cache, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="an RSNA-layout folder (lumbar-tf synth)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="serial,serial_1t,pool")
    args = parser.parse_args()

    from lumbar_tf.core.config import PreprocessConfig
    from lumbar_tf.data import dataset

    cfg = PreprocessConfig()
    modes = args.modes.split(",")
    pool_stats: dict = {}
    _watch_pool(dataset, pool_stats)
    work = Path(tempfile.mkdtemp(prefix="lumbar_pool_"))
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    loads = [os.getloadavg()]
    try:
        for r in range(args.repeats + 1):
            for mode in modes:
                pool_stats.clear()
                result = run_once(args.data, work / f"{mode}-{r}", cfg, mode)
                result.update(pool_stats)
                if r:  # round 0 is the warm-up (imports, forkserver start)
                    samples[mode].append(result)
        loads.append(os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(dataset.read_index(args.data).studies)
    med = statistics.median
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    summary = {
        "studies": n,
        "repeats": args.repeats,
        "load_average": [[round(v, 1) for v in x] for x in loads],
        "sched_autogroup_enabled": autogroup.read_text().strip() if autogroup.exists() else None,
    }
    for mode, rows in samples.items():
        summary[mode] = {key: round(med(r[key] for r in rows), 3) for key in rows[0]}
        summary[mode]["studies_per_s"] = round(n / summary[mode]["wall_s"], 2)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
