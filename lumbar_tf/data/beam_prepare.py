"""`prepare_cache` as an Apache Beam pipeline, for archives too big for one machine.

The pipeline runs the pool's own per-study task (`dataset._prepare_task`: decode, build views,
level points) and serialiser (`dataset._serialize`), writes the same ``shard-NNN.tfrecord`` files,
and this driver writes the same manifest and skipped-studies report once the pipeline is done, so
training cannot tell the two apart. apache-beam is an optional extra (``pip install lumbar-tf[beam]``).

The data and cache folders must be paths every Beam worker can open (a local disk for ``direct``;
a shared file system such as NFS/Filestore mounted at the same path on every Dataflow, Flink or
Spark worker): pydicom reads the study files directly.

Local runners (``direct``, ``prism``) shuffle in memory, and a fixed shard count makes Beam group
every record by shard before writing, so the whole cache sat in RAM (peak memory grew with the
number of studies: benchmarks/prepare_memory_results.md). There each bundle streams into its own
file and this driver re-shards those files record by record; cluster runners shuffle on disk and
write the shards themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.core.errors import ConfigError, DatasetError, UsageError
from lumbar_tf.data import dataset
from lumbar_tf.data.slice_offsets import resolve_offsets

RUNNERS = {
    "direct": "DirectRunner",
    "prism": "PrismRunner",
    "dataflow": "DataflowRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
}
# What a cluster runner cannot start without (Beam's own defaults would try to start a local
# cluster or fail deep inside job submission).
REQUIRED_OPTIONS = {
    "dataflow": ("project", "region", "temp_location"),
    "flink": ("flink_master",),
    "spark": ("spark_master_url",),
}
_STATUS = ".beam_status"


def pipeline_options(runner: str, options: dict | None = None, extra_args: list[str] | None = None):
    """Beam `PipelineOptions` for ``runner`` from named options (``None`` values dropped) and raw
    ``--flag=value`` arguments; a cluster runner without its required options is a `UsageError`."""
    if runner not in RUNNERS:
        raise UsageError(f"--runner {runner}", f"unknown runner (one of {', '.join(RUNNERS)})")
    given = {k: v for k, v in (options or {}).items() if v not in (None, "")}
    flags = [f"--{k}={v}" for k, v in given.items()] + list(extra_args or [])
    named = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in flags if arg.startswith("--")}
    missing = [k for k in REQUIRED_OPTIONS.get(runner, ()) if k not in named]
    if missing:
        raise UsageError(
            f"--runner {runner}", "missing " + ", ".join("--" + k.replace("_", "-") for k in missing)
        )
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ConfigError(
            f"--runner {runner}", "apache-beam is not installed (pip install 'lumbar-tf[beam]')"
        ) from None
    return PipelineOptions([f"--runner={RUNNERS[runner]}", *flags])


def _status(result) -> str:
    sid, record, error = result
    return json.dumps({"study_id": sid, "error": error, "warnings": record["warnings"] if record else []})


def _reshard(bundles: list[Path], prefix: Path, n_shards: int) -> None:
    """Stream the records of the per-bundle files round-robin into ``{prefix}-NNN.tfrecord``
    (one record in memory at a time), then delete the bundle files."""
    import tensorflow as tf

    writers = [tf.io.TFRecordWriter(f"{prefix}-{i:03d}.tfrecord") for i in range(n_shards)]
    try:
        n = 0
        for bundle in bundles:
            for record in tf.data.TFRecordDataset(str(bundle)).as_numpy_iterator():
                writers[n % n_shards].write(record)
                n += 1
    finally:
        for writer in writers:
            writer.close()
    for bundle in bundles:
        bundle.unlink()


def prepare_cache_beam(
    data_dir,
    cache_dir,
    cfg: PreprocessConfig,
    options,
    *,
    split: str = "train",
    shards: int = 8,
    study_ids: list[str] | None = None,
) -> dict:
    """Decode every study on a Beam runner (``options``: see `pipeline_options`) and write the cache
    `dataset.prepare_cache` would write; returns the manifest."""
    import apache_beam as beam
    from apache_beam.io.tfrecordio import WriteToTFRecord
    from apache_beam.options.pipeline_options import StandardOptions

    index = dataset.read_index(data_dir, split)
    todo, skipped = dataset.select_studies(index, split, study_ids)
    if not todo:
        raise DatasetError(f"{data_dir}: no usable studies ({len(skipped)} skipped)")
    # Learned channel offsets, once, before the pipeline builds any view: a bounded sample of
    # studies (headers and the spine finder), read here in the driver.
    cfg, offsets_report = resolve_offsets(index.images_dir, index.studies, index.descriptions, todo, cfg)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(_STATUS + "*"):
        stale.unlink()
    view_names = cfg.view_names
    n_shards = max(1, min(shards, len(todo)))
    # As the pool does: a fresh generation of shard names, written beside the old cache, which
    # stays whole until the manifest naming the new shards is swapped in.
    generation = os.urandom(4).hex()
    prefix = cache / f".beam-{generation}"
    local = options.view_as(StandardOptions).runner in (RUNNERS["direct"], RUNNERS["prism"])
    tasks = [
        (index.images_dir, index.studies.get(sid), sid, index.descriptions.get(sid, {}), cfg, None)
        for sid in todo
    ]
    with beam.Pipeline(options=options) as pipeline:
        results = pipeline | "Studies" >> beam.Create(tasks) | "Decode" >> beam.Map(dataset._prepare_task)
        (
            results
            | "Kept" >> beam.Filter(lambda r: r[2] is None)
            | "Serialize" >> beam.Map(lambda r: dataset._serialize(r[1], view_names))
            | "WriteShards"
            >> WriteToTFRecord(
                str(prefix),
                file_name_suffix=".tfrecord",
                num_shards=0 if local else n_shards,  # 0: one file per bundle, no shuffle
                shard_name_template="-bundle-SSSSS" if local else "-SSS",
            )
        )
        results | "Status" >> beam.Map(_status) | "WriteStatus" >> beam.io.WriteToText(str(cache / _STATUS))

    if local:
        _reshard(sorted(cache.glob(f"{prefix.name}-bundle-*.tfrecord")), prefix, n_shards)
    outcome = {}
    for path in sorted(cache.glob(_STATUS + "*")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            outcome[entry["study_id"]] = entry
        path.unlink()
    kept = [sid for sid in todo if outcome[sid]["error"] is None]
    shard_entries = []
    for i in range(n_shards):
        written = Path(f"{prefix}-{i:03d}.tfrecord")
        name = f"shard-{generation}-{i:03d}.tfrecord"
        if not kept:
            written.unlink(missing_ok=True)
            continue
        shard_entries.append({"file": name, **dataset._shard_fingerprint(written)})
        written.replace(cache / name)
    skipped.update({sid: outcome[sid]["error"] for sid in todo if outcome[sid]["error"] is not None})
    if not kept:
        raise DatasetError(
            f"{data_dir}: no study could be read ({len(skipped)} skipped, see {cache / dataset.SKIPPED})"
        )
    warnings = {sid: outcome[sid]["warnings"] for sid in kept if outcome[sid]["warnings"]}
    return dataset.publish_cache(cache, split, kept, shard_entries, cfg, skipped, warnings, offsets_report)
