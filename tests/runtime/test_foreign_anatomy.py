"""Another body part typed as a lumbar sagittal series (issue 14 item 11): a head, a knee, an
abdominal cross-section and a phantom's axial series, all smooth anatomy that the image statistics
pass, are flagged by the spine-specific ``vertical_periodicity`` check; phantom spines are not."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lumbar_tf.runtime import quality
from tests.reliability.table import record
from tests.runtime.foreign_anatomy import KINDS, write_foreign_study


def _edge_model(tiny_export):
    from lumbar_tf.runtime.tflite_model import EdgeModel

    return EdgeModel(next((tiny_export / "tflite").glob("*_float32.tflite")))


@pytest.mark.parametrize("kind", KINDS)
def test_another_body_part_is_flagged_end_to_end(tiny_export, phantom_dir, tmp_path, kind):
    """Through the exported TFLite model: smooth anatomy passes the texture checks (what let it
    through before) and fails the vertebral-column check against the model's own bounds."""
    from lumbar_tf.runtime.predictor import predict_study

    model = _edge_model(tiny_export)
    assert "vertical_periodicity_min" in model.quality_bounds  # measured on the training views
    study_dir = write_foreign_study(tmp_path, kind, seed=2, size=192, phantom_dir=phantom_dir)
    preds = predict_study(model, study_dir).predictions
    checks = preds["quality"]["checks"]
    if kind != "mistyped_axial":  # an axial slice has few grey levels: entropy may flag it too
        assert checks["neighbour_correlation"]["ok"] and checks["entropy_bits"]["ok"], checks
    assert not checks["vertical_periodicity"]["ok"], checks["vertical_periodicity"]
    assert checks["vertical_periodicity"]["range"][0] == model.quality_bounds["vertical_periodicity_min"]
    assert preds["quality"]["plausible"] is False
    flagged = [w for w in preds["warnings"] if "does not look like a lumbar-spine MRI" in w]
    assert len(flagged) == 1 and "vertical_periodicity" in flagged[0]
    assert "vertical_periodicity" in quality.banner(preds)
    json.dumps(preds, allow_nan=False)
    record(
        "foreign-anatomy",
        f"{kind}: `quality.plausible: false`, one warning naming `vertical_periodicity`, the report banner",
        kind,
    )


def test_the_banner_renders_for_another_body_part(tiny_export, tmp_path):
    from lumbar_tf.report.heatmaps import write_heatmaps_for
    from lumbar_tf.runtime.predictor import predict_study

    study_dir = write_foreign_study(tmp_path, "knee", seed=3, size=192)
    result = predict_study(_edge_model(tiny_export), study_dir)
    assert "vertical_periodicity" in quality.banner(result.predictions)
    assert write_heatmaps_for(result, tmp_path / "heat")


def test_phantom_spines_pass_the_column_check_with_the_models_bounds(tiny_export, phantom_dir, tiny_config):
    """No false alarm on any session phantom: their localiser views repeat at a vertebra's pitch."""
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views
    from lumbar_tf.runtime.predictor import descriptions_for_study

    bounds = _edge_model(tiny_export).quality_bounds
    cfg = tiny_config.preprocess
    values = []
    for study_dir in sorted((phantom_dir / "train_images").iterdir()):
        views, grid, _, _ = build_views(read_study(study_dir, descriptions_for_study(study_dir)), cfg)
        check = quality.image_checks(quality.midline_channel(views, cfg), bounds, grid.spine_crop_mm)
        values.append(check["vertical_periodicity"]["value"])
        assert check["vertical_periodicity"]["ok"], (study_dir.name, check)
    assert len(values) == 12


def test_vertical_periodicity_needs_a_stack_not_texture():
    """A column of 35 mm segments scores high, tilted too; tissue texture (1.5 mm grain), one big
    outline and a ramp do not. (Blobs as large as vertebrae would: the check knows a pitch, not a
    vertebra.)"""
    size, crop = 96, 200.0
    mm = crop / size
    yy, xx = np.mgrid[0:size, 0:size] * mm

    def stack(tilt=0.0):
        column = np.abs(xx - 100 - tilt * (yy - 100)) < 20
        return np.where(column, 128 + 80 * np.cos(2 * np.pi * yy / 35.0), 60.0)

    grain = cv2.GaussianBlur(
        np.random.default_rng(3).normal(0, 1, (size, size)).astype(np.float32), (0, 0), 1.5 / mm
    )
    outline = np.where(((xx - 100) / 80) ** 2 + ((yy - 90) / 70) ** 2 < 1, 200.0, 30.0)
    ramp = np.tile(np.linspace(0, 255, size)[:, None], (1, size))
    assert quality.vertical_periodicity(stack(), crop) > 0.9
    assert quality.vertical_periodicity(stack(tilt=0.3), crop) > 0.8
    for name, image in (("grain", 128 + 60 * grain / grain.std()), ("outline", outline), ("ramp", ramp)):
        assert quality.vertical_periodicity(image, crop) < quality.VERTICAL_PERIODICITY_MIN, name


@pytest.mark.slow
def test_false_alarm_and_detection_rates(tiny_export, phantom_dir, tmp_path_factory):
    """The figures in docs/architecture.md "Input-quality bounds": 40 realistic phantoms (seed 913,
    320-640 px, lumbar spine centred to low) and 12 centred ones must all pass the column check;
    10 of each foreign kind are counted. Both the tiny model's bounds at its 64 px views and the
    fallback constant at the default 192 px views."""
    from lumbar_tf.core.config import load_config
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views
    from lumbar_tf.runtime.predictor import descriptions_for_study
    from lumbar_tf.synthetic.phantom import synthesize_dataset
    from tests.conftest import TINY_OVERRIDES

    root = tmp_path_factory.mktemp("qc_rates")
    realistic = synthesize_dataset(root / "synth", 40, seed=913)
    foreign = root / "foreign"
    foreign_dirs = [
        write_foreign_study(foreign, kind, seed, phantom_dir=phantom_dir)
        for kind in KINDS
        for seed in range(10)
    ]
    spines = sorted((realistic / "train_images").iterdir()) + sorted((phantom_dir / "train_images").iterdir())
    report = {}
    for name, overrides, bounds in (
        ("tiny model, 64 px", TINY_OVERRIDES, _edge_model(tiny_export).quality_bounds),
        ("fallback, 192 px", [], None),
    ):
        cfg = load_config(None, overrides).preprocess

        def passes(study_dir, cfg=cfg, bounds=bounds):
            views, grid, _, _ = build_views(read_study(study_dir, descriptions_for_study(study_dir)), cfg)
            checks = quality.image_checks(quality.midline_channel(views, cfg), bounds, grid.spine_crop_mm)
            return all(c["ok"] for c in checks.values())

        alarms = [d.name for d in spines if not passes(d)]
        missed = [d.name for d in foreign_dirs if passes(d)]
        report[name] = {
            "false_alarms": f"{len(alarms)}/{len(spines)}",
            "detected": f"{len(foreign_dirs) - len(missed)}/{len(foreign_dirs)}",
            "missed": missed,
        }
        print(name, json.dumps(report[name]))
        assert alarms == [], (name, alarms)
        assert len(missed) <= len(foreign_dirs) // 5, (name, missed)
        record(
            "foreign-rates",
            f"{name}: no false alarm on the {len(spines)} phantoms, at least 80% of the {len(foreign_dirs)} "
            "foreign studies flagged (figures: see below)",
            name,
        )
