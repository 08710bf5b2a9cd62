"""Apache Beam pipelines on the local (direct) runner give what the process pool and the batch loop give."""

from __future__ import annotations

import shutil

import pytest

beam = pytest.importorskip("apache_beam")

from lumbar_tf.cli.main import main  # noqa: E402
from lumbar_tf.data import beam_prepare  # noqa: E402
from lumbar_tf.data.dataset import prepare_cache, read_index  # noqa: E402


def _records(cache) -> dict:
    import tensorflow as tf

    files = sorted(str(p) for p in cache.glob("shard-*.tfrecord"))
    out = {}
    for raw in tf.data.TFRecordDataset(files).as_numpy_iterator():
        example = tf.train.Example.FromString(raw)
        out[example.features.feature["study_id"].bytes_list.value[0].decode()] = example
    return out


def test_beam_prepare_writes_the_pools_records(phantom_dir, tiny_config, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    ids = read_index(root).study_ids[:4]
    for path in (root / "train_images" / ids[1]).rglob("*.dcm"):  # one unreadable study
        path.write_bytes(b"broken")
    cfg = tiny_config.preprocess
    options = beam_prepare.pipeline_options("direct")
    beamed = beam_prepare.prepare_cache_beam(root, tmp_path / "beam", cfg, options, study_ids=ids, shards=2)
    pooled = prepare_cache(root, tmp_path / "pool", cfg, workers=2, progress=False, study_ids=ids, shards=2)
    assert beamed == pooled and ids[1] in beamed["skipped"] and len(beamed["study_ids"]) == 3
    assert sorted(p.name for p in (tmp_path / "beam").glob("shard-*")) == [
        "shard-000.tfrecord",
        "shard-001.tfrecord",
    ]
    assert _records(tmp_path / "beam") == _records(tmp_path / "pool")
    for name in ("manifest.json", "skipped_studies.csv"):
        assert (tmp_path / "beam" / name).read_text() == (tmp_path / "pool" / name).read_text()
    assert not list((tmp_path / "beam").glob(".beam_status*"))


@pytest.mark.parametrize(
    ("runner", "missing"),
    [
        ("dataflow", "missing --project, --region, --temp-location"),
        ("flink", "missing --flink-master"),
        ("spark", "missing --spark-master-url"),
    ],
)
def test_cluster_runner_without_its_options_is_one_line(phantom_dir, tmp_path, capsys, runner, missing):
    args = ["prepare", "--data", str(phantom_dir), "--out", str(tmp_path / "c"), "--runner", runner]
    if runner == "dataflow":
        args += ["--project", ""]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --runner {runner}: {missing}"]
    assert not (tmp_path / "c").exists()


def test_cluster_options_given_as_raw_beam_args_count():
    options = beam_prepare.pipeline_options("flink", extra_args=["--flink_master=localhost:8081"])
    assert options.get_all_options()["flink_master"] == "localhost:8081"
