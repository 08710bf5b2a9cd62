"""Data-pipeline throughput: study folder -> model-ready views, against a bare pydicom baseline.

    .venv/bin/python benchmarks/pipeline.py [--studies 200] [--repeats 3]

Measures, in one run on the same phantom studies:
  * baseline: decode every slice of the same series serially with pydicom (pixel_array), no more;
  * lumbar-tf prepare: headers only for geometry, decode just the slices the views need, in a
    2-process pool (and in-process, 1 worker), normalise/CLAHE/resample, write TFRecords;
  * first epoch = prepare + one tf.data pass from disk; cached epoch = a later pass (in-memory cache).
Runs on the phantom as synthesised and on a copy with RSNA-sized slices (--rsna-factor).
Quotes medians over repeats and the ratios.
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

import pydicom


def bare_baseline(data_dir: Path, series_names=("Sagittal T2/STIR", "Sagittal T1")) -> float:
    """Seconds to decode every slice of the view series serially with pydicom."""
    import csv

    with open(data_dir / "train_series_descriptions.csv") as handle:
        wanted = {
            (r["study_id"], r["series_id"])
            for r in csv.DictReader(handle)
            if r["series_description"] in series_names
        }
    start = time.perf_counter()
    for study_id, series_id in sorted(wanted):
        for path in sorted((data_dir / "train_images" / study_id / series_id).glob("*.dcm")):
            _ = pydicom.dcmread(path).pixel_array.astype("float32")
    return time.perf_counter() - start


def rsna_sized_copy(src: Path, dst: Path, factor: float) -> Path:
    """Copy an RSNA-layout folder with every slice resampled ``factor``x finer (geometry kept exact).

    Phantom slices are 160-224 px; RSNA sagittal slices are ~384-512 px at ~0.6 mm. The finer copy
    shows how the two paths scale when decoding, not header parsing, is the cost.
    """
    import cv2
    import numpy as np

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.dcm"))
    for path in sorted(src.glob("train_images/*/*/*.dcm")):
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows * factor), int(ds.Columns * factor)
        source = ds.pixel_array
        pixels = cv2.resize(source, (cols, rows), interpolation=cv2.INTER_LINEAR).astype(source.dtype)
        # Pixel centres of the new grid: the first one moves half a new pixel towards the old corner.
        r_mm, c_mm = (float(v) for v in ds.PixelSpacing)
        new_r, new_c = r_mm * ds.Rows / rows, c_mm * ds.Columns / cols
        iop = np.array(ds.ImageOrientationPatient, float)
        ipp = np.array(ds.ImagePositionPatient, float)
        ipp = ipp + iop[:3] * (new_c - c_mm) / 2 + iop[3:] * (new_r - r_mm) / 2
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.PixelSpacing = [f"{new_r:.6f}", f"{new_c:.6f}"]
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)
    return dst


def measure(data: Path, cfg, repeats: int, work: Path, tag: str) -> dict:
    """Baseline vs prepare (2 workers and 1) vs cached epochs on one dataset; medians over repeats.

    The first call is a warm-up, reported on its own: the process's first 2-worker call also
    starts the forkserver that forks the workers (`lumbar_tf.data._start_pool`). In the
    ``lumbar-tf prepare`` command that start-up runs while TensorFlow is imported.
    """
    from lumbar_tf.data.dataset import localizer_dataset, prepare_cache

    baseline, prepared, serial, first_epoch, cached_epoch = [], [], [], [], []
    # CPU seconds of the two in-process runs: on a machine shared with other sessions the wall
    # clock of both sides moves with the load; their CPU time much less.
    baseline_cpu, serial_cpu = [], []
    first_call = n = 0
    for r in range(repeats + 1):
        cache = work / f"cache-{tag}-{r}"
        t = time.perf_counter()
        manifest = prepare_cache(data, cache, cfg, workers=2, progress=False)
        elapsed = time.perf_counter() - t
        n = len(manifest["study_ids"])
        if r == 0:  # a warm-up call; the process's first also starts the forkserver
            first_call = elapsed
            continue
        prepared.append(elapsed)
        cpu = time.process_time()
        baseline.append(bare_baseline(data))
        baseline_cpu.append(time.process_time() - cpu)
        t, cpu = time.perf_counter(), time.process_time()
        prepare_cache(data, work / f"serial-{tag}-{r}", cfg, workers=1, progress=False)
        serial.append(time.perf_counter() - t)
        serial_cpu.append(time.process_time() - cpu)
        ds = localizer_dataset(cache, cfg, manifest["study_ids"], batch_size=8, training=False)
        t = time.perf_counter()
        for _ in ds:
            pass
        # The first epoch decodes the DICOM (prepare) and reads the shards from disk.
        first_epoch.append(prepared[-1] + time.perf_counter() - t)
        t = time.perf_counter()
        for _ in ds:
            pass
        cached_epoch.append(time.perf_counter() - t)
    med = statistics.median
    return {
        "studies": n,
        "baseline_studies_per_s": n / med(baseline),
        "prepare_studies_per_s": n / med(prepared),
        "speedup_vs_baseline": med(baseline) / med(prepared),
        "prepare_serial_studies_per_s": n / med(serial),
        "serial_speedup_vs_baseline": med(baseline) / med(serial),
        "baseline_cpu_s": med(baseline_cpu),
        "prepare_serial_cpu_s": med(serial_cpu),
        "serial_cpu_speedup_vs_baseline": med(baseline_cpu) / med(serial_cpu),
        "load_average": [round(v, 1) for v in os.getloadavg()],
        "prepare_first_call_s": first_call,
        "prepare_warm_s": med(prepared),
        "first_epoch_s": med(first_epoch),
        "cached_epoch_s": med(cached_epoch),
        "cached_epoch_speedup": med(first_epoch) / med(cached_epoch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rsna-factor",
        type=float,
        default=2.4,
        help="also measure copies with slices this much finer (1 = off)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pipeline_results.json"))
    parser.add_argument("--acquisition", default="realistic", help="phantom acquisition (realistic, centred)")
    parser.add_argument(
        "--data", type=Path, help="an existing RSNA-layout folder to measure instead of --studies new ones"
    )
    args = parser.parse_args()

    from lumbar_tf.core.config import PreprocessConfig
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    cfg = PreprocessConfig()
    work = Path(tempfile.mkdtemp(prefix="lumbar_bench_"))
    try:
        data = args.data or synthesize_dataset(
            work / "data", args.studies, seed=123, acquisition=args.acquisition
        )
        result = {"repeats": args.repeats, "phantom": measure(data, cfg, args.repeats, work, "phantom")}
        if args.rsna_factor > 1:
            big = rsna_sized_copy(data, work / "rsna_sized", args.rsna_factor)
            result["rsna_sized"] = measure(big, cfg, args.repeats, work, "rsna")
            result["rsna_sized"]["factor"] = args.rsna_factor
        print(json.dumps(result, indent=1))
        args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
