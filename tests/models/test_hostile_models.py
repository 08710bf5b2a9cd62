"""Model files load in safe mode (issue 14 item 10): a Lambda layer or an unknown class is refused
with one line naming the file, and no code from the file runs."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

from lumbar_tf.core.errors import ModelLoadError
from lumbar_tf.runtime.keras_model import load_model
from tests.reliability.table import record, shape


def _save(model, path):
    model.save(path)
    return path


def test_a_lambda_layer_is_refused(tmp_path, capsys):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = _save(keras.Model(inputs, outputs), tmp_path / "lambda.keras")
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert str(err.value) == (
        f"{path}: refused: the model holds a Lambda layer (Python code), which is never loaded"
    )
    from lumbar_tf.cli.main import main

    code = main(["predict", "--model", str(path), "--study", str(tmp_path), "--out", str(tmp_path / "out")])
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"error: {err.value}"])
    record("model-files", f"`predict`: exit {code}, `error: {shape(str(err.value), file=path)}`", "lambda")


def test_an_unknown_class_is_refused(tmp_path):
    inputs = keras.Input((4,))
    path = _save(keras.Model(inputs, keras.layers.Dense(2)(inputs)), tmp_path / "plain.keras")
    hacked = tmp_path / "unknown.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hacked, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                config["config"]["layers"][1]["class_name"] = "os.system"
                config["config"]["layers"][1]["module"] = "evil.module"
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(ModelLoadError) as err:
        load_model(hacked)
    line = str(err.value)
    assert line.startswith(f"{hacked}: refused: unknown class 'os.system'") and "\n" not in line
    record("model-files", f"`{shape(line, file=hacked)}`", "unknown")


def test_a_foreign_model_is_refused(tmp_path):
    inputs = keras.Input((4,))
    path = _save(keras.Model(inputs, keras.layers.Dense(2)(inputs)), tmp_path / "plain.keras")
    with pytest.raises(ModelLoadError, match=rf"^{path}: not a lumbar-tf end-to-end model$") as err:
        load_model(path)
    record("model-files", f"`{shape(str(err.value), file=path)}`", "foreign")
    assert np.isfinite(keras.models.load_model(path).predict(np.ones((1, 4)), verbose=0)).all()


def test_garbage_is_one_line(tmp_path):
    path = tmp_path / "garbage.keras"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert str(err.value).startswith(f"{path}: cannot load model (") and "\n" not in str(err.value)
    head = shape(str(err.value), file=path).split(" (")[0]  # the loader's own reason follows
    record("model-files", f"`{head} (...)`, the loader's reason in the brackets", "garbage")
