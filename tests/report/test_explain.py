"""`lumbar-tf explain`: predictions, heatmaps, Grad-CAM++ on the source slices, the HTML report, errors."""

from __future__ import annotations

import csv
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumbar_tf.core import labels as L
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.dicom.reader import DicomError, read_series_descriptions, read_study
from lumbar_tf.preprocess import ViewGrid, level_boxes
from lumbar_tf.report import explain, heatmaps
from tests import dicom_factory as factory

DEMO_CONFIG = "cpu_demo"  # built-in config


def _first_study(phantom_dir: Path) -> Path:
    return sorted((phantom_dir / "train_images").iterdir(), key=lambda p: int(p.name))[0]


@pytest.fixture(scope="module")
def explained(tiny_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    return explain.explain_study(tiny_run, _first_study(phantom_dir), out)


# === Outputs ===


def test_writes_every_output(explained):
    paths = explained["paths"]
    names = {p.name for p in explained["out_dir"].iterdir()}
    expected = {"predictions.json", "grid.png", "levels.png", "report.html"}
    expected |= {f"gradcam_{c}.png" for c in L.CONDITIONS}
    assert names == expected
    assert set(paths["gradcam"]) == set(L.CONDITIONS)
    for path in [paths["grid"], paths["levels"], *paths["gradcam"].values()]:
        with Image.open(path) as img:
            assert img.format == "PNG"


def test_predictions_json_has_the_output_contract(explained, phantom_dir):
    preds = json.loads(explained["paths"]["predictions"].read_text())
    assert preds["study_id"] == _first_study(phantom_dir).name
    assert preds["model"]["format"] == "keras"
    assert [(c["condition"], c["level"]) for c in preds["cells"]] == [
        (c, lv) for c in L.CONDITIONS for lv in L.LEVELS
    ]
    assert [e["level"] for e in preds["levels"]] == list(L.LEVELS)
    for cell in preds["cells"]:
        assert sum(cell["grade_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert cell["grade"] == int(np.argmax(cell["grade_probs"]))


def test_predictions_json_is_what_predict_writes(explained, tiny_run, phantom_dir, tmp_path):
    from tests.conftest import predict_to

    predict_to(tiny_run, _first_study(phantom_dir), tmp_path)
    theirs = json.loads((tmp_path / "predictions.json").read_text())
    ours = json.loads(explained["paths"]["predictions"].read_text())
    assert ours == theirs


def test_grid_numbers_equal_predictions_json(explained):
    preds = json.loads(explained["paths"]["predictions"].read_text())
    grid = heatmaps.severity_grid(preds)
    grades, probs = heatmaps.predicted_grades(preds)
    for cell in preds["cells"]:
        ci, li = L.CONDITIONS.index(cell["condition"]), L.LEVELS.index(cell["level"])
        gp = np.asarray(cell["grade_probs"])
        np.testing.assert_allclose(grid[ci, li], gp @ np.arange(4), atol=1e-9)
        assert grades[ci, li] == cell["grade"]
        assert probs[ci, li] == pytest.approx(gp.max())
    # The in-memory dict the picture was drawn from is the JSON (to its 6-digit rounding).
    np.testing.assert_allclose(heatmaps.severity_grid(explained["predictions"]), grid, atol=1e-5)


def test_overlay_markers_follow_the_localiser_levels(explained):
    preds = explained["predictions"]
    image = np.full((200, 180), 128, np.uint8)
    overlay = heatmaps.render_levels_overlay(preds, image)
    points = heatmaps.level_points(preds)
    assert not np.isnan(points).any()
    np.testing.assert_allclose(overlay.markers, (points + 0.5) * overlay.scale - 0.5)
    # Top-to-bottom order of the drawn markers is the order of the localiser's y (the tiny model's
    # levels are too close to be told apart in pixels; the slow test checks L1/L2 ... L5/S1 order).
    np.testing.assert_array_equal(np.argsort(overlay.markers[:, 1]), np.argsort(points[:, 1]))


def test_gradcam_logits_are_the_models_probabilities(explained):
    preds = explained["predictions"]
    logits = explained["threshold_logits"]
    assert logits.shape == (5, 5, 3)
    p_moderate_or_worse = 1.0 / (1.0 + np.exp(-logits[..., 1]))
    gp = heatmaps.grade_prob_array(preds)
    np.testing.assert_allclose(p_moderate_or_worse, gp[..., 2] + gp[..., 3], atol=1e-4)
    assert explained["target_threshold"] == ">=2"


def test_cams_cover_each_crop_and_come_from_the_right_slice(explained, phantom_dir, tiny_config):
    size = tiny_config.preprocess.crop_size
    for condition in L.CONDITIONS:
        cams = explained["cams"][condition]
        assert cams.shape == (5, size, size)
        assert cams.dtype == np.float32
        assert np.all(cams >= 0) and np.all(cams <= 1)
    study = read_study(_first_study(phantom_dir))
    from lumbar_tf.preprocess import build_views

    _, _, info, _ = build_views(study, tiny_config.preprocess)
    expected = {
        "spinal_canal_stenosis": ("sag_t2", 1),
        "left_neural_foraminal_narrowing": ("sag_t1", 0),
        "right_neural_foraminal_narrowing": ("sag_t1", 2),
        "left_subarticular_stenosis": ("sag_t2", 0),
        "right_subarticular_stenosis": ("sag_t2", 2),
    }
    for condition, (view, channel) in expected.items():
        source = explained["cam_slices"][condition]
        assert (source["view"], source["channel"]) == (view, channel)
        assert source["instance_number"] == info[view][channel]


def test_no_patient_identifier_in_any_output(explained, phantom_dir):
    from lumbar_tf.synthetic.phantom import phi_values

    study_id = _first_study(phantom_dir).name
    identifiers = phi_values(int(study_id))
    assert len(identifiers) >= 10
    files = sorted(explained["out_dir"].iterdir())
    assert len(files) == 9
    for path in files:
        data = path.read_bytes()
        for value in identifiers:
            for variant in {value, value.lower(), value.replace("^", " ")}:
                assert variant.encode() not in data, f"{value!r} found in {path.name}"
        if path.suffix == ".png":
            with Image.open(path) as img:
                assert dict(img.text) == heatmaps.PNG_METADATA
    # The study folder's location never leaks either (only its name, the study id).
    parent = str(_first_study(phantom_dir).parent).encode()
    assert all(parent not in p.read_bytes() for p in files)


def test_report_is_self_contained(explained):
    page = explained["paths"]["report"].read_text(encoding="utf-8")
    assert "Research decision support only; not for diagnosis." in page
    assert page.count("<tr class='g") == 25
    assert page.count("src='data:image/png;base64,") == 7
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert explain.file_fingerprint(explained["model_path"]) in page
    assert "spine_crop_mm" in page and "crop_mm" in page  # preprocessing metadata
    assert "P(grade \u2265 2)" in page


def test_study_without_sagittal_t1_is_explained_without_its_pictures(tiny_run, phantom_dir, tmp_path):
    import shutil

    source = _first_study(phantom_dir)
    descriptions = read_series_descriptions(phantom_dir / "train_series_descriptions.csv")[source.name]
    study = tmp_path / source.name
    shutil.copytree(source, study)
    t1 = next(sid for sid, desc in descriptions.items() if desc == "Sagittal T1")
    shutil.rmtree(study / t1)
    result = explain.explain_study(tiny_run, study, tmp_path / "out")
    assert set(result["paths"]["gradcam"]) == {
        "spinal_canal_stenosis",
        "left_subarticular_stenosis",
        "right_subarticular_stenosis",
    }
    warnings = json.loads(result["paths"]["predictions"].read_text())["warnings"]
    assert any("Sagittal T1" in w and "view sag_t1 is zeros" in w for w in warnings)
    assert any("no Grad-CAM picture for left_neural_foraminal_narrowing" in w for w in warnings)
    assert not any(str(tmp_path) in w for w in warnings)  # paths are reduced to the study id
    page = result["paths"]["report"].read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") == 5


# === Crop -> source mapping (geometry, no model) ===


def _expected_source_px(series, index, grid: ViewGrid, cfg: PreprocessConfig, box, crop_xy):
    """Crop pixel -> source pixel from the formulas of docs/architecture.md, step by step."""
    s, size = cfg.view_size, cfg.crop_size
    y1, x1, y2, x2 = (float(v) for v in box)
    u = x1 * (s - 1) + crop_xy[0] * (x2 - x1) * (s - 1) / (size - 1)
    v = y1 * (s - 1) + crop_xy[1] * (y2 - y1) * (s - 1) / (size - 1)
    mm = grid.spine_crop_mm / grid.size
    y = grid.center_yz[0] + (u + 0.5) * mm - grid.spine_crop_mm / 2
    z = grid.center_yz[1] - (v + 0.5) * mm + grid.spine_crop_mm / 2
    # The slice point whose patient (y, z) is (y, z): solve position + c*col_mm*row_dir + r*row_mm*col_dir.
    sl = series.slices[index]
    row_mm, col_mm = sl.pixel_spacing
    a = np.stack([sl.row_dir[1:3] * col_mm, sl.col_dir[1:3] * row_mm], axis=1)
    return np.linalg.solve(a, np.array([y, z]) - sl.position[1:3])


@pytest.mark.parametrize(
    "iop", [factory.SAGITTAL_IOP, factory.oblique_sagittal_iop(8.0, 12.0)], ids=["plain", "oblique"]
)
def test_single_peak_cam_maps_to_its_source_pixel(tmp_path, iop):
    spec = factory.SeriesSpec(
        "Sagittal T1", n_slices=5, rows=230, cols=210, pixel_spacing=(0.9, 0.8), iop=iop, center=(3, -8, 25)
    )
    factory.write_series(tmp_path / "7", spec)
    series = read_study(tmp_path).series_by_description("Sagittal T1")
    cfg = PreprocessConfig()  # 200 mm view of 192 px, 60 mm crops of 64 px
    centre = np.mean([sl.center for sl in series.slices], axis=0)
    grid = ViewGrid(center_yz=centre[1:3] + (4.0, -6.0), spine_crop_mm=200.0, size=cfg.view_size)
    level_xy = np.array([0.47, 0.55])
    box = level_boxes(level_xy[None], cfg)[0]
    index = 1  # a slice off the middle: the map is drawn on the slice it came from
    peak_crop = np.array([21.0, 9.0])  # (j, i): column 21, row 9 of the crop
    expected = _expected_source_px(series, index, grid, cfg, box, peak_crop)

    np.testing.assert_allclose(
        explain.crop_px_to_source_px(box, peak_crop, series, index, grid, cfg), expected, atol=1e-6
    )
    affine = explain.crop_to_source_affine(box, series, index, grid, cfg)
    np.testing.assert_allclose(affine[:, :2] @ peak_crop + affine[:, 2], expected, atol=1e-6)

    cam = np.zeros((cfg.crop_size, cfg.crop_size), np.float32)
    cam[int(peak_crop[1]), int(peak_crop[0])] = 1.0
    rows, cols = series.slices[index].rows, series.slices[index].cols
    warped, coverage = explain.cam_to_source(cam, affine, (rows, cols))
    assert warped.shape == (rows, cols)
    r, c = np.unravel_index(int(np.argmax(warped)), warped.shape)
    assert np.hypot(c - expected[0], r - expected[1]) <= 1.0
    # The crop's footprint is about (60 mm)^2 of source pixels.
    area_mm2 = coverage.sum() * 0.9 * 0.8
    assert area_mm2 == pytest.approx(60.0**2, rel=0.12)


def test_gradcam_plus_plus_weights():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (2, 4, 4, 3))
    g = np.zeros_like(a)
    g[..., 1] = 0.5  # only channel 1 matters, positively
    cam = explain.gradcam_plus_plus(a, g)
    ratio = cam / a[..., 1]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1], ratio.shape), rtol=1e-6)
    assert not np.any(explain.gradcam_plus_plus(a, np.zeros_like(a)))  # no gradient, no map, no NaN
    assert not np.any(explain.gradcam_plus_plus(a, -g))  # only negative evidence: empty after ReLU


# === Errors ===


def test_tflite_and_savedmodel_get_a_clear_message(tmp_path, phantom_dir, capsys):
    from lumbar_tf.cli import main as cli

    tflite = tmp_path / "model_int8.tflite"
    tflite.write_bytes(b"TFL3")
    saved = tmp_path / "export" / "saved_model" / "lumbar_spine" / "1"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"")
    for path in (tflite, saved, tmp_path / "export"):
        with pytest.raises(explain.ExplainError, match="Grad-CAM needs the Keras model") as err:
            explain.explain_study(path, _first_study(phantom_dir), tmp_path / "out")
        assert "--heatmaps" in str(err.value)
    code = cli.main(
        ["explain", "--model", str(tflite), "--study", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Grad-CAM needs the Keras model" in err and "lumbar-tf-edge --heatmaps" in err


def _predict_error(model, study, out):
    """The exception `lumbar-tf predict` raises for a study, or None when predict is not there."""
    from lumbar_tf.cli.main import build_parser
    from lumbar_tf.cli.predict import run_predict

    args = build_parser().parse_args(
        ["predict", "--model", str(model), "--study", str(study), "--out", str(out)]
    )
    with pytest.raises(Exception) as err:  # noqa: PT011  (whatever predict raises, explain must match)
        run_predict(args)
    return err.value


@pytest.mark.parametrize("damage", ["missing", "empty", "not_dicom"])
def test_unreadable_study_raises_the_same_dicom_error_as_predict(tmp_path, tiny_run, damage):
    study = tmp_path / "images" / "4242"
    if damage != "missing":
        study.mkdir(parents=True)
    if damage == "not_dicom":
        (study / "77").mkdir()
        (study / "77" / "1.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(DicomError) as err:
        explain.explain_study(tiny_run, study, tmp_path / "out")
    with pytest.raises(DicomError) as direct:
        read_study(study)
    assert str(err.value) == str(direct.value)
    predicted = _predict_error(tiny_run, study, tmp_path / "predict_out")
    if predicted is not None:
        assert type(predicted) is type(err.value)
        assert str(predicted) == str(err.value)


def test_cli_explain_exit_codes(tiny_run, phantom_dir, tmp_path, capsys):
    from lumbar_tf.cli import main as cli

    out = tmp_path / "cli_out"
    assert (
        cli.main(
            [
                "explain",
                "--model",
                str(tiny_run),
                "--study",
                str(_first_study(phantom_dir)),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "report.html").exists()
    capsys.readouterr()
    assert (
        cli.main(["explain", "--model", str(tiny_run), "--study", str(tmp_path / "nope"), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "study folder not found" in err


# === Slow: the demo model's Grad-CAM finds a severe stenosis ===


def _write_forced_study(
    root: Path, grades: np.ndarray, monkeypatch, study_id: int = 4_100_000_007, seed: int = 11
):
    """Write one phantom study with the given grades (RSNA layout under ``root``); returns its folder.

    Uses a ``grades=`` argument of `synthetic.synthesize_study` where it has one; otherwise replaces
    the study's grade draw (the first draw from its generator) with the given grades.
    """
    from lumbar_tf.synthetic import phantom as synthetic

    grades = np.asarray(grades, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if "grades" in inspect.signature(synthetic.synthesize_study).parameters:
        study = synthetic.synthesize_study(rng, study_id, grades=grades)
    else:
        draw_grades = synthetic.sample_grades

        def forced(r):
            return draw_grades(r)._replace(grades=grades.copy(), known=np.ones(grades.shape, bool))

        monkeypatch.setattr(synthetic, "sample_grades", forced)
        study = synthetic.synthesize_study(rng, study_id)
        monkeypatch.undo()
    np.testing.assert_array_equal(study.grades, grades)
    synthetic.write_study(study, root / "train_images", rng)
    with open(root / "train_series_descriptions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("study_id", "series_id", "series_description"))
        writer.writerows((study.study_id, se.series_id, se.description) for se in study.series)
    with open(root / "train_label_coordinates.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("study_id", "series_id", "instance_number", "condition", "level", "x", "y"))
        writer.writerows(study.coordinates)
    return root / "train_images" / str(study.study_id)


def _demo_run(tmp_path_factory) -> Path:
    """$LUMBAR_DEMO_RUN (e.g. demo_out/run) if set, else a run of the CPU demo configuration."""
    given = os.environ.get("LUMBAR_DEMO_RUN")
    if given:
        if not (Path(given) / "model.keras").exists():
            pytest.fail(f"LUMBAR_DEMO_RUN={given}: no model.keras there (a finished run folder is needed)")
        return Path(given)
    from lumbar_tf.synthetic.phantom import synthesize_dataset
    from lumbar_tf.training.train import train

    root = tmp_path_factory.mktemp("demo")
    data = synthesize_dataset(root / "data", 240, seed=0)
    return train(data, root / "run", config_path=DEMO_CONFIG)


@pytest.mark.slow
def test_demo_model_gradcam_peaks_at_severe_canal_stenosis(tmp_path_factory, monkeypatch):
    """For a phantom whose only abnormal cell is severe canal stenosis at L4/L5, the demo model's
    Grad-CAM++ for that cell peaks within 15 mm of the L4/L5 canal point of the coordinates file."""
    run = _demo_run(tmp_path_factory)
    canal, l4_l5 = L.CONDITIONS.index("spinal_canal_stenosis"), L.LEVELS.index("l4_l5")
    results = {}
    for name, grade in (("control", 0), ("case", 3)):  # the same phantom, without and with the stenosis
        root = tmp_path_factory.mktemp(name)
        grades = np.zeros((L.N_CONDITIONS, L.N_LEVELS), np.int64)
        grades[canal, l4_l5] = grade
        study_dir = _write_forced_study(root, grades, monkeypatch)
        results[name] = (root, study_dir, explain.explain_study(run, study_dir, root / "explain"))
    root, study_dir, result = results["case"]

    preds = result["predictions"]
    ys = [entry["y"] for entry in preds["levels"]]
    assert ys == sorted(ys), f"levels not top to bottom: {ys}"
    # The map only means something if the model sees the stenosis: P(>=2) must rise with it.
    p_case = heatmaps.grade_prob_array(preds)[canal, l4_l5, 2:].sum()
    p_control = heatmaps.grade_prob_array(results["control"][2]["predictions"])[canal, l4_l5, 2:].sum()
    assert p_case - p_control > 0.2, (
        f"the demo model does not see the stenosis (P(>=2) {p_case:.2f} with it, {p_control:.2f} without): "
        "its grader is not trained well enough for Grad-CAM to mean anything"
    )

    with open(root / "train_label_coordinates.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    label = next(r for r in rows if r["condition"] == "Spinal Canal Stenosis" and r["level"] == "L4/L5")
    descriptions = read_series_descriptions(root / "train_series_descriptions.csv")[study_dir.name]
    study = read_study(study_dir, descriptions)
    series = study.series_by_description("Sagittal T2/STIR")
    assert series.series_id == label["series_id"]
    label_mm = series.pixel_to_patient(
        series.index_of_instance(int(label["instance_number"])), (float(label["x"]), float(label["y"]))
    )
    source = result["cam_slices"]["spinal_canal_stenosis"]
    peak = result["cam_peaks"]["spinal_canal_stenosis"][l4_l5]
    peak_mm = series.pixel_to_patient(series.index_of_instance(source["instance_number"]), peak)
    distance = float(np.linalg.norm(peak_mm - label_mm))
    assert distance < 15.0, f"Grad-CAM peak {distance:.1f} mm from the L4/L5 canal point"
