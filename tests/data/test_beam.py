"""Apache Beam pipelines on the local (direct) runner give what the process pool and the batch loop give."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

beam = pytest.importorskip("apache_beam")

from lumbar_tf.cli.main import main  # noqa: E402
from lumbar_tf.data import beam_prepare  # noqa: E402
from lumbar_tf.data.dataset import load_manifest, prepare_cache, read_index  # noqa: E402


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
    # Shard names carry a random generation and each runner spreads the records over the shards
    # its own way: everything else in the manifest is the same, and the records are.
    shards = beamed.pop("shards"), pooled.pop("shards")
    assert beamed == pooled and ids[1] in beamed["skipped"] and len(beamed["study_ids"]) == 3
    assert [len(s) for s in shards] == [2, 2]
    on_disk = sorted(p.name for p in (tmp_path / "beam").glob("shard-*"))
    assert on_disk == sorted(entry["file"] for entry in shards[0])
    load_manifest(tmp_path / "beam", cfg)  # sizes and checksums verify
    assert _records(tmp_path / "beam") == _records(tmp_path / "pool")
    skipped = "skipped_studies.csv"
    assert (tmp_path / "beam" / skipped).read_text() == (tmp_path / "pool" / skipped).read_text()
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


@pytest.fixture(scope="module")
def mixed_test_folder(phantom_dir, tmp_path_factory):
    """A test-layout folder: three good studies, one without sagittal series, one of broken files."""
    from tests.runtime.test_predict import copy_study_without

    root = tmp_path_factory.mktemp("beamtest")
    images = root / "test_images"
    images.mkdir()
    studies = sorted((phantom_dir / "train_images").iterdir(), key=lambda p: int(p.name))
    for study in studies[:3]:
        shutil.copytree(study, images / study.name)
    copy_study_without(studies[3], images, planes=("sagittal",))
    shutil.copytree(studies[4], images / studies[4].name)
    for path in (images / studies[4].name).rglob("*.dcm"):
        path.write_bytes(b"broken")
    return root, [s.name for s in studies[3:5]]


def _submission(path) -> dict:
    with open(path) as handle:
        rows = list(csv.reader(handle))
    return {r[0]: np.array([float(v) for v in r[1:]]) for r in rows[1:]}, [r[0] for r in rows]


def test_beam_batch_inference_gives_the_loops_numbers(tiny_export, mixed_test_folder, tmp_path, capsys):
    from lumbar_tf.runtime.artifacts import load_predictor
    from lumbar_tf.runtime.batch import predict_folder
    from lumbar_tf.runtime.beam_predict import predict_folder_beam

    root, bad = mixed_test_folder
    model = tiny_export / "saved_model" / "lumbar_spine" / "1"
    loop = predict_folder(load_predictor(model), root, tmp_path / "loop" / "sub.csv", progress=False)
    options = beam_prepare.pipeline_options("direct")
    beamed = predict_folder_beam(
        model, root, tmp_path / "beam" / "sub.csv", options=options, max_batch_size=2
    )
    assert beamed == loop and sorted(beamed["from_prior"]) == sorted(bad) and beamed["n_predicted"] == 3
    assert "no sagittal series" in beamed["from_prior"][bad[0]]
    (a, order_a), (b, order_b) = (
        _submission(tmp_path / "loop" / "sub.csv"),
        _submission(tmp_path / "beam" / "sub.csv"),
    )
    assert order_a == order_b and len(order_a) == 1 + 25 * 5
    for row_id in a:
        np.testing.assert_allclose(b[row_id], a[row_id], atol=2e-6)
    for sid in loop["predicted"]:
        one = json.loads((tmp_path / "loop" / "sub_studies" / sid / "predictions.json").read_text())
        two = json.loads((tmp_path / "beam" / "sub_studies" / sid / "predictions.json").read_text())
        assert one["levels"] == two["levels"] and one["model"] == two["model"]
        for c1, c2 in zip(one["cells"], two["cells"]):
            np.testing.assert_allclose(c2["grade_probs"], c1["grade_probs"], atol=2e-6)
            assert c1["grade"] == c2["grade"]
    assert not list((tmp_path / "beam" / "sub_studies").glob(".beam_status*"))


def test_predict_cli_on_the_direct_runner(tiny_export, mixed_test_folder, tmp_path, capsys):
    root, bad = mixed_test_folder
    model = tiny_export / "saved_model" / "lumbar_spine" / "1"
    args = ["predict", "--model", str(model), "--data", str(root), "--submission", str(tmp_path / "s.csv")]
    assert main([*args, "--runner", "direct"]) == 0
    out = capsys.readouterr()
    assert "predicted 3 of 5 studies; 2 from the training prior" in out.out
    assert f"warning: study {bad[0]}" in out.err
    assert main([*args, "--runner", "flink"]) == 2
    assert capsys.readouterr().err.strip() == "error: --runner flink: missing --flink-master"
