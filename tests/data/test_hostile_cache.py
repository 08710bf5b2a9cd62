"""Batch preparing never dies of one study, and the cache survives a killed re-prepare.

Issue 14 items 4 and 5: any per-study exception is recorded with its file and the batch goes on;
skipped_studies.csv and the manifest exist even when every study was skipped; a re-prepare swaps
the manifest last, and a truncated shard is found (and rebuilt by train), never read.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lumbar_tf.core.errors import DatasetError
from lumbar_tf.data import dataset
from lumbar_tf.data.dataset import load_manifest, prepare_cache, read_index
from tests.reliability.table import record, shape


def _skipped_csv(cache: Path) -> dict[str, str]:
    with open(cache / "skipped_studies.csv", newline="") as handle:
        return {r["study_id"]: r["reason"] for r in csv.DictReader(handle)}


def _copy_studies(phantom_dir, tmp_path, n: int):
    """The first ``n`` phantom studies (a copy that tests may damage)."""
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    keep = read_index(root).study_ids[:n]
    for folder in (root / "train_images").iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder)
    return root, keep


@pytest.fixture
def few_studies(phantom_dir, tmp_path):
    return _copy_studies(phantom_dir, tmp_path, 3)


def test_any_exception_of_one_study_is_recorded_and_the_batch_goes_on(
    few_studies, tiny_config, tmp_path, monkeypatch
):
    root, ids = few_studies
    real = dataset.prepare_study
    failures = {
        ids[0]: MemoryError("Unable to allocate 32.0 GiB"),
        ids[1]: ValueError("invalid literal for int()"),
    }

    def flaky(images_dir, labels, study_id, *args, **kwargs):
        if study_id in failures:
            raise failures[study_id]
        return real(images_dir, labels, study_id, *args, **kwargs)

    monkeypatch.setattr(dataset, "prepare_study", flaky)  # workers=1: runs in this process
    cache = tmp_path / "cache"
    manifest = prepare_cache(root, cache, tiny_config.preprocess, workers=1, progress=False)
    assert manifest["study_ids"] == [ids[2]]
    reported = _skipped_csv(cache)
    study_dir = root / "train_images"
    assert reported[ids[0]] == f"{study_dir / ids[0]}: MemoryError: Unable to allocate 32.0 GiB"
    assert reported[ids[1]].startswith(f"{study_dir / ids[1]}: ValueError")
    assert load_manifest(cache, tiny_config.preprocess)["study_ids"] == [ids[2]]
    record(
        "prepare-exception",
        f"each listed in `skipped_studies.csv` with its folder and reason, e.g. "
        f"`{shape(reported[ids[0]], study=study_dir / ids[0])}`; the other study cached",
    )


def test_every_study_skipped_still_writes_the_report_the_error_names(few_studies, tiny_config, tmp_path):
    root, ids = few_studies
    for sid in ids:
        for path in (root / "train_images" / sid).rglob("*.dcm"):
            path.write_bytes(b"garbage")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="no study could be read") as err:
        prepare_cache(root, cache, tiny_config.preprocess, workers=1, progress=False)
    named = Path(str(err.value).rsplit("see ", 1)[1].rstrip(")"))
    assert named == cache / "skipped_studies.csv" and named.is_file()
    assert set(_skipped_csv(cache)) >= set(ids)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["study_ids"] == [] and set(manifest["skipped"]) >= set(ids)
    with pytest.raises(DatasetError, match="holds no study"):
        load_manifest(cache, tiny_config.preprocess)
    record(
        "prepare-all-skipped",
        f"one line, `{shape(str(err.value), cache=cache, data=root)}`: both files it names written, "
        f"{len(_skipped_csv(cache))} studies listed",
    )


def test_no_usable_label_still_writes_the_report(tmp_path, tiny_config):
    (tmp_path / "train_images" / "1").mkdir(parents=True)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="no usable studies"):
        prepare_cache(tmp_path, cache, tiny_config.preprocess, workers=1, progress=False)
    assert _skipped_csv(cache) == {"1": "1: no row in train.csv"}
    assert (cache / "manifest.json").is_file()


def test_a_truncated_shard_is_found_and_the_cache_rebuilt(few_studies, tiny_config, tmp_path):
    root, ids = few_studies
    cache = tmp_path / "cache"
    cfg = tiny_config.preprocess
    manifest = prepare_cache(root, cache, cfg, workers=1, progress=False, shards=2)
    shard = cache / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=rf"{shard}: shard has \d+ of \d+ bytes \(truncated\)") as err:
        load_manifest(cache, cfg)
    # The manifest is set aside: the cache is no longer "prepared", so train prepares it again.
    assert not (cache / "manifest.json").exists() and (cache / "manifest.json.damaged").exists()
    from lumbar_tf.training.train import _ensure_cache

    rebuilt = _ensure_cache(root, cache, tiny_config)
    assert sorted(rebuilt["study_ids"]) == sorted(ids)
    assert len(dataset.load_studies(cache, cfg)["study_id"]) == len(ids)
    assert not shard.exists()  # the damaged generation is gone
    line = re.sub(r"\d+ of \d+", "N of M", shape(str(err.value), shard=shard))
    record(
        "damaged-shard",
        f"`{line}`: the manifest set aside, `train` prepares the cache again ({len(ids)} studies)",
        "truncated",
    )


def test_a_flipped_byte_is_found(few_studies, tiny_config, tmp_path):
    root, _ = few_studies
    cache = tmp_path / "cache"
    manifest = prepare_cache(root, cache, tiny_config.preprocess, workers=1, progress=False, shards=1)
    shard = cache / manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="CRC-32 differs") as err:
        load_manifest(cache, tiny_config.preprocess)
    record("damaged-shard", f"`{shape(str(err.value), shard=shard)}`, never read", "flipped")


_PREPARE_SLOWLY = """
import sys, time
from lumbar_tf.core.config import load_config
from lumbar_tf.data import dataset
real = dataset._serialize
def slow(record, names):
    time.sleep(0.4)  # lets the parent kill this prepare between writes
    print("wrote", flush=True)
    return real(record, names)
dataset._serialize = slow
cfg = load_config(None, sys.argv[3:]).preprocess
dataset.prepare_cache(sys.argv[1], sys.argv[2], cfg, workers=1, progress=False, shards=2)
"""


@pytest.mark.parametrize("kill_after_writes", [0, 2])
def test_a_killed_re_prepare_leaves_the_old_cache_whole(
    few_studies, tiny_config, tmp_path, kill_after_writes
):
    from tests.conftest import TINY_OVERRIDES

    root, ids = few_studies
    cache = tmp_path / "cache"
    cfg = tiny_config.preprocess
    prepare_cache(root, cache, cfg, workers=1, progress=False, shards=2)
    before = dataset.load_studies(cache, cfg)
    manifest_bytes = (cache / "manifest.json").read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PREPARE_SLOWLY, str(root), str(cache), *TINY_OVERRIDES],
        stdout=subprocess.PIPE,
        env=env,
    )
    for _ in range(kill_after_writes + 1):
        assert proc.stdout.readline() == b"wrote\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Killed before the swap: the old manifest, byte for byte; after the last write the new
    # prepare may have finished its swap. Either way the cache reads whole and the same.
    now = (cache / "manifest.json").read_bytes()
    assert now == manifest_bytes or kill_after_writes == 2
    after = dataset.load_studies(cache, cfg)
    assert after["study_id"] == before["study_id"]
    for name in cfg.view_names:
        assert (after["views"][name] == before["views"][name]).all()
    listed = {e["file"] for e in json.loads(now)["shards"]}
    assert {p.name for p in cache.glob("shard-*.tfrecord")} == listed
    # After the last write the swap may or may not have happened: the row names both.
    manifest = (
        "the old manifest, byte for byte" if kill_after_writes == 0 else "the old or the new manifest, whole"
    )
    record(
        "killed-prepare",
        f"killed after {kill_after_writes} record(s): {manifest}; the cache reads the same "
        f"{len(after['study_id'])} studies and views, only listed shards on disk",
        str(kill_after_writes),
    )


def test_prepare_cli_goes_on_past_bombs_and_links(phantom_dir, tmp_path):
    """`lumbar-tf prepare` over a deflate bomb, a bad frame count and a study folder linked out of
    the data: exit 0, each named with its file in skipped_studies.csv, the intact study cached."""
    from tests import hostile_files as H
    from tests.conftest import TINY_OVERRIDES

    root, ids = _copy_studies(phantom_dir, tmp_path, 4)
    extra = tmp_path / "outside" / "4242"
    shutil.copytree(root / "train_images" / ids[2], extra)
    images = root / "train_images"
    with open(root / "train_series_descriptions.csv", newline="") as handle:
        sag_t2 = {
            r["study_id"]: r["series_id"]
            for r in csv.DictReader(handle)
            if r["series_description"] == "Sagittal T2/STIR"
        }
    bomb = H.deflate_bomb(images / ids[0] / sag_t2[ids[0]] / "9001.dcm", 256 * 2**20)
    sag = images / ids[1] / sag_t2[ids[1]]
    frames = H.with_raw_value(next(iter(sorted(sag.glob("*.dcm")))), 0x00280008, "IS", b"2.5 ")
    linked = ids[2]
    shutil.rmtree(images / linked)
    (images / linked).symlink_to(extra, target_is_directory=True)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "lumbar_tf.cli.main", "prepare", "--data", str(root), "--out", str(cache)]
        + ["--workers", "2", *TINY_OVERRIDES],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported = _skipped_csv(cache)
    assert (
        reported[linked]
        == f"{images / linked}: study folder is a link that leaves the images folder; refused"
    )
    assert ids[0] not in reported and ids[1] not in reported
    manifest = json.loads((cache / "manifest.json").read_text())
    assert sorted(manifest["study_ids"]) == sorted([ids[0], ids[1], ids[3]])
    assert f"cached 3 studies in {cache}" in proc.stdout
    # The bomb and the bad frame count cost their file, not their study: named in its warnings.
    dropped = {}
    for sid, path, reason in (
        (ids[0], bomb, "deflated data set inflates past the 128.0 MiB limit"),
        (ids[1], frames, "bad NumberOfFrames value '2.5' (expected an integer)"),
    ):
        line = f"series {path.parent.name}: dropped unreadable file {path.parent.name}/{path.name} ({reason})"
        assert line in manifest["warnings"][sid], manifest["warnings"][sid]
        dropped[sid] = f"series <series>: dropped unreadable file <series>/{path.name} ({reason})"
    listed = f"`{shape(reported[linked], study=images / linked)}`"
    record(
        "prepare-hostile",
        f"exit {proc.returncode}, the bomb's and the bad frame count's studies cached without that file "
        f"(manifest warnings `{dropped[ids[0]]}`, `{dropped[ids[1]]}`), the intact study cached; "
        f"listed in `skipped_studies.csv`: {listed}",
    )
