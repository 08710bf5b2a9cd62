"""Data-pipeline throughput: study folder -> model-ready views, against a bare pydicom baseline.

    .venv/bin/python benchmarks/pipeline.py [--studies 40] [--repeats 3]

Measures, in one run on the same phantom studies:
  * baseline: decode every slice of the same series serially with pydicom (pixel_array), no more;
  * lumbar-tf prepare: headers only for geometry, decode just the slices the views need, in a
    2-process pool, normalise/CLAHE/resample, write TFRecords;
  * first epoch = prepare + one tf.data pass from disk; cached epoch = a later pass (in-memory cache).
Quotes medians over repeats and the ratios.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pipeline_results.json"))
    args = parser.parse_args()

    from lumbar_tf.config import PreprocessConfig
    from lumbar_tf.data import localizer_dataset, prepare_cache
    from lumbar_tf.synthetic import synthesize_dataset

    cfg = PreprocessConfig()
    work = Path(tempfile.mkdtemp(prefix="lumbar_bench_"))
    try:
        data = synthesize_dataset(work / "data", args.studies, seed=123)
        baseline, prepared, first_epoch, cached_epoch = [], [], [], []
        for r in range(args.repeats):
            baseline.append(bare_baseline(data))
            cache = work / f"cache{r}"
            t = time.perf_counter()
            manifest = prepare_cache(data, cache, cfg, workers=2, progress=False)
            prepared.append(time.perf_counter() - t)
            ids = manifest["study_ids"]
            ds = localizer_dataset(cache, cfg, ids, batch_size=8, training=False)
            t = time.perf_counter()
            for _ in ds:
                pass
            # The first epoch decodes the DICOM (prepare) and reads the shards from disk.
            first_epoch.append(prepared[-1] + time.perf_counter() - t)
            t = time.perf_counter()
            for _ in ds:
                pass
            cached_epoch.append(time.perf_counter() - t)
        n = args.studies
        result = {
            "studies": n,
            "repeats": args.repeats,
            "baseline_studies_per_s": n / statistics.median(baseline),
            "prepare_studies_per_s": n / statistics.median(prepared),
            "speedup_vs_baseline": statistics.median(baseline) / statistics.median(prepared),
            "first_epoch_s": statistics.median(first_epoch),
            "cached_epoch_s": statistics.median(cached_epoch),
            "cached_epoch_speedup": statistics.median(first_epoch) / statistics.median(cached_epoch),
        }
        print(json.dumps(result, indent=1))
        args.out.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
