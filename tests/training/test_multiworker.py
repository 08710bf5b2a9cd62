"""Two-worker training on localhost (MultiWorkerMirroredStrategy through TF_CONFIG)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lumbar_tf.core.errors import ConfigError
from lumbar_tf.training import multiworker
from tests.conftest import TINY_OVERRIDES

# One task: train() with a callback that keeps each stage's final weights (the worker's run folder
# is private and removed, so the test asks the process itself what it holds).
WORKER = """
import sys, numpy as np, keras
from lumbar_tf.training.train import train

class Keep(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        trainable = {v.path for v in self.model.trainable_weights}
        np.savez(
            f"{sys.argv[3]}-{self.model.name}.npz",
            **{("T:" if v.path in trainable else "N:") + v.path: np.asarray(v) for v in self.model.weights},
        )

run = train(sys.argv[1], sys.argv[2], overrides=sys.argv[5:], cache_dir=sys.argv[4], extra_callbacks=[Keep()])
print("RUN", run)
"""


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_cluster_reads_tf_config(monkeypatch):
    spec = {"worker": ["a:1", "b:2"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": spec, "task": {"type": "worker", "index": 1}}))
    assert multiworker.cluster() == {"workers": 2, "task_type": "worker", "task_id": 1, "chief": False}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": spec, "task": {"type": "worker", "index": 0}}))
    assert multiworker.cluster()["chief"]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker"}}))
    assert multiworker.cluster() is None
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        multiworker.cluster()


@pytest.mark.slow
def test_two_workers_on_localhost_hold_the_same_weights(phantom_dir, phantom_cache, tmp_path):
    ports = _free_ports(2)
    spec = {"worker": [f"localhost:{p}" for p in ports]}
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, "train.localizer.epochs=1", "train.grader.epochs=1"]
    procs = []
    for index in range(2):
        temp = tmp_path / f"tmp{index}"
        temp.mkdir()
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps({"cluster": spec, "task": {"type": "worker", "index": index}}),
            TMPDIR=str(temp),
            KERAS_BACKEND="tensorflow",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        )
        args = [sys.executable, "-c", WORKER, str(phantom_dir), str(run), str(tmp_path / f"w{index}")]
        procs.append(
            subprocess.Popen(
                [*args, str(phantom_cache), *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        outputs.append(out)
        assert proc.returncode == 0, out[out.find("Traceback") :][:6000]
    for out in outputs:
        assert f"RUN {run}" in out
    for stage in ("localizer", "grader"):
        chief = np.load(tmp_path / f"w0-{stage}.npz")
        worker = np.load(tmp_path / f"w1-{stage}.npz")
        assert len(chief.files) == len(worker.files) > 0
        differ = [key for key in chief.files if not np.array_equal(chief[key], worker[key])]
        assert not differ, differ
    assert (run / "finished.json").exists() and (run / "model.keras").exists()
    assert not list((tmp_path / "tmp1").iterdir())  # the worker's private run folder is gone
