from pathlib import Path

import pytest

from lumbar_tf.core.config import ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "lumbar_tf" / "configs"


@pytest.mark.parametrize("name", ["cpu_demo.yaml", "gpu_effnetb3.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.preprocess.crop_mm <= cfg.preprocess.spine_crop_mm


def test_gpu_config_is_effnetb3_mixed_precision():
    cfg = load_config(CONFIGS / "gpu_effnetb3.yaml")
    assert cfg.model.backbone == "efficientnetb3"
    assert 224 <= cfg.preprocess.crop_size <= 256
    assert cfg.train.mixed_precision == "auto"


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(
        None, ["train.grader.epochs=3", "model.backbone=resnet50", "preprocess.clip_percentiles=[1,99]"]
    )
    assert (cfg.train.grader.epochs, cfg.model.backbone) == (3, "resnet50")
    assert cfg.preprocess.clip_percentiles == (1.0, 99.0)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.grader.epoch=3", "train.grader.epoch"),
        ("model.dropout=high", "model.dropout"),
        ("preprocess.view_size=2", "preprocess.view_size"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(key + ":")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbone: small_cnn\n  bakcbone: x\n")
    with pytest.raises(ConfigError, match="model.bakcbone: unknown config key"):
        load_config(path)
