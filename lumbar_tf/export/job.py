"""`lumbar-tf export`: the trained model as a SavedModel for TF Serving and TFLite files for tablets.

    lumbar-tf export --model RUN --out EXPORT [--name lumbar_spine] [--version N]
                     [--tflite float32,float16,dynamic,int8] [--data HELDOUT] [--representative-size 64]
                     [--allow-degraded] [--calibrate-on-phantoms]

Writes::

    EXPORT/saved_model/<name>/<version>/        SavedModel (keras.export.ExportArchive), TF Serving layout
        saved_model.pb, variables/, metadata.json
    EXPORT/metadata.json                        copy of the newest version's metadata (+ the TFLite files)
    EXPORT/tflite/<name>_<variant>.tflite       signatures localize + grade, builtin ops only,
    EXPORT/tflite/<name>_<variant>.json         metadata embedded in the file and in this sidecar
                                                (only this version's variants: older ones are removed)
    EXPORT/export_report.json                   sizes, largest differences from Keras, ROC-AUC per runtime,
                                                whether each TFLite variant was published and why not

The steps live beside this file: `saved_model` (the two SavedModels), `tflite` (conversion),
`metadata`, `verify` (representative and held-out studies, the AUC gate) and `publish` (versions).
Gates: a TFLite variant that loses more than `verify.AUC_LOSS_FLOOR` held-out ROC-AUC against Keras
is not published unless ``allow_degraded``; int8 is calibrated on training studies only, or on
synthesised phantoms when ``calibrate_on_phantoms`` says so (recorded as ``int8_calibration``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from lumbar_tf.core.config import config_to_dict
from lumbar_tf.core.contract import (
    AXIAL_SIGNATURES,
    INTENDED_USE,
    LEVEL_XY,
    METADATA_FILE,
    OUTPUT_SPECS,
    SERVING_SIGNATURE,
)
from lumbar_tf.core.contract import EXPORT_REPORT_FILE as REPORT_FILE
from lumbar_tf.core.errors import ExportError
from lumbar_tf.core.io import write_json_atomic
from lumbar_tf.export import verify
from lumbar_tf.export.metadata import build_metadata, read_json, tflite_metadata
from lumbar_tf.export.publish import (
    dir_size,
    publish_tflite,
    publish_version,
    staging_folder,
)
from lumbar_tf.export.saved_model import (
    SAVED_MODEL_TOLERANCE,
    write_edge_saved_model,
    write_saved_model,
)
from lumbar_tf.export.tflite import (
    QUANTIZATION,
    VARIANTS,
    calibration_samples,
    convert_tflite,
    embed_metadata,
    tflite_op_names,
)
from lumbar_tf.export.verify import AUC_LOSS_FLOOR, max_diff
from lumbar_tf.runtime.saved_model import SavedModelRunner


def parse_variants(value) -> tuple[str, ...]:
    """``"float32,int8"`` / a sequence -> validated variant names (``""`` or ``"none"``: no TFLite)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ExportError(f"--tflite: unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    return tuple(dict.fromkeys(names))


def _load(run_or_file):
    """The end-to-end Keras model, or ExportError naming the file."""
    from lumbar_tf.core.errors import ModelLoadError
    from lumbar_tf.runtime.keras_model import load_model

    try:
        return load_model(run_or_file)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


def _representative(loaded, n, work, *, cache_dir, data_dir, int8: bool, on_phantoms: bool):
    """Representative studies, and the ``int8_calibration`` record when int8 is calibrated on them."""
    try:
        studies, source, kind = verify.representative_studies(
            loaded,
            n,
            work,
            cache_dir=cache_dir,
            data_dir=None if int8 else data_dir,  # held-out studies never calibrate
            phantoms=on_phantoms or not int8,
        )
    except ExportError as exc:
        if not int8:
            raise
        raise ExportError(
            f"{exc}: int8 calibration needs training studies; pass --cache, or --calibrate-on-phantoms "
            "to calibrate on synthesised phantoms"
        ) from None
    calibration = None
    if int8:
        calibration = {"source": source, "kind": kind, "n_studies": len(studies["study_id"])}
    return studies, source, calibration


def export_model(
    run_or_file,
    out,
    *,
    name: str = "lumbar_spine",
    version: int | None = None,
    tflite=VARIANTS,
    data_dir=None,
    representative_size: int = 64,
    metrics=None,
    cache_dir=None,
    allow_degraded: bool = False,
    calibrate_on_phantoms: bool = False,
    auc_loss_floor: float = AUC_LOSS_FLOOR,
    progress: bool = True,
) -> dict:
    """Export a trained run (or ``model.keras``) as SavedModel + TFLite files; returns the report.

    Args:
        run_or_file: run folder or end-to-end ``.keras`` file.
        out: export root ``EXPORT``.
        name: model name (TF Serving ``model_name``; TFLite file prefix).
        version: SavedModel version; default: the next free number. An existing version is an error.
        tflite: variants to write (subset of `VARIANTS`; ``()`` for none).
        data_dir: held-out studies (RSNA train layout with labels): the report gets macro ROC-AUC of
            Keras, the SavedModel and each TFLite variant on them, and the AUC gate is applied.
        representative_size: studies used for int8 calibration and the Keras comparison.
        metrics: an evaluation ``metrics.json`` (path or dict) to store in the metadata.
        cache_dir: a prepared cache of the training data to draw representative studies from
            (default: the run's cache, else its training data).
        allow_degraded: publish a TFLite variant even if it loses more than ``auc_loss_floor``.
        calibrate_on_phantoms: calibrate int8 on synthesised phantoms when no training study is found.
        progress: print one line per step.

    Raises:
        ExportError: missing/corrupt model, an existing version, bad options, int8 without training
            studies. Nothing is published then: no version folder, no temporary folder.
    """
    say = print if progress else (lambda *a, **k: None)
    variants = parse_variants(tflite)
    if version is not None and int(version) < 1:
        raise ExportError(f"--version: must be a positive integer, got {version}")
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"--name: {name!r} is not a valid model name")
    if representative_size < 1:
        raise ExportError(f"--representative-size: must be at least 1, got {representative_size}")
    evaluation_metrics = metrics
    if metrics is not None and not isinstance(metrics, dict):
        evaluation_metrics = read_json(Path(metrics))
        if not isinstance(evaluation_metrics, dict):
            raise ExportError(f"{metrics}: not a readable metrics.json")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ExportError(f"{data_dir}: held-out data folder not found")
    if cache_dir is not None and not (Path(cache_dir) / "manifest.json").is_file():
        raise ExportError(f"{cache_dir}: not a prepared cache (no manifest.json)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")

    loaded = _load(run_or_file)  # before anything is written: a bad model leaves nothing behind
    cfg = loaded.preprocess
    model_dir = out / "saved_model" / name
    if version is not None and (model_dir / str(version)).exists():
        raise ExportError(f"{model_dir / str(version)}: version {version} already exists")

    report: dict = {
        "name": name,
        "source_model": str(loaded.path),
        "intended_use": INTENDED_USE,
        "keras": {"path": str(loaded.path), "size_bytes": Path(loaded.path).stat().st_size},
    }
    staging = staging_folder(model_dir)
    work = Path(tempfile.mkdtemp(prefix="lumbar_export_"))
    try:
        # 1. Representative studies from the training pipeline (int8 calibration: training only).
        studies, source, calibration = _representative(
            loaded,
            representative_size,
            work,
            cache_dir=cache_dir,
            data_dir=data_dir,
            int8="int8" in variants,
            on_phantoms=calibrate_on_phantoms,
        )
        views = studies["views"]
        say(f"representative studies: {len(studies['study_id'])} from {source}")
        # An axial model is compared on the studies' own axial crops: every artefact gets the same.
        axial = verify.axial_inputs(studies, cfg)
        reference = loaded.predict_views(views, axial=axial)
        report["representative"] = {"source": source, "n_studies": len(studies["study_id"])}
        if axial is not None:
            covered = int(np.sum(studies["axial_valid"]))
            if covered == 0:
                raise ExportError(
                    f"{loaded.path}: no representative study has {cfg.axial.series_description} "
                    f"coverage ({source}): the axial input could not be checked"
                )
            report["representative"]["axial_levels_covered"] = covered
        if calibration is not None:
            report["int8_calibration"] = calibration

        # 2. SavedModel into a hidden staging folder, checked against Keras. Its `metadata` signature
        # serves this version's metadata (the number is TF Serving's: it is chosen at publishing).
        signatures = SERVING_SIGNATURE if axial is None else " then ".join(AXIAL_SIGNATURES)
        inputs = [*cfg.view_names, *([] if axial is None else [cfg.axial.name])]
        say(f"SavedModel: {signatures} ({', '.join(inputs)} -> {', '.join(OUTPUT_SPECS)})")
        model_dir.mkdir(parents=True, exist_ok=True)
        extra = {"int8_calibration": calibration} if calibration else None
        served = build_metadata(
            loaded, name=name, version=0, evaluation_metrics=evaluation_metrics, extra=extra
        )
        served["version"] = None
        write_saved_model(loaded.model, cfg, staging, metadata=served)
        saved = SavedModelRunner(staging)
        saved_out = saved.predict_views(views, axial=axial)
        diffs = {k: max_diff(saved_out[k], reference[k]) for k in OUTPUT_SPECS}
        if axial is not None:  # the level_xy the client projects with comes from localize
            diffs["localize_level_xy"] = max_diff(saved.localize_views(views), reference[LEVEL_XY])
        if max(diffs.values()) > SAVED_MODEL_TOLERANCE:
            raise ExportError(
                f"{loaded.path}: the SavedModel differs from the Keras model by {max(diffs.values()):.2e}"
            )
        report["saved_model"] = {"max_abs_diff": diffs}
        from lumbar_tf.export.warmup import write_warmup_requests

        report["saved_model"]["warmup"] = write_warmup_requests(
            staging,
            views,
            name,
            axial=None if axial is None else {cfg.axial.name: axial},
            localizer_view=cfg.localizer_view,
        )

        # 3. TFLite variants (two signatures), checked against Keras on the same studies.
        tflite_files: dict[str, Path] = {}
        if variants:
            from lumbar_tf.runtime.keras_model import label_semantics_of
            from lumbar_tf.runtime.tflite_model import EdgeModel

            edge_sm = work / "edge_saved_model"
            write_edge_saved_model(loaded.model, cfg, edge_sm)
            samples = calibration_samples(views, reference[LEVEL_XY], cfg, axial) if calibration else None
            edge_meta = {"preprocess": config_to_dict(cfg), "label_semantics": label_semantics_of(loaded)}
            report["tflite"] = {}
            for variant in variants:
                say(f"TFLite {variant}: converting")
                path = work / f"{name}_{variant}.tflite"
                content, notes = convert_tflite(edge_sm, variant, samples)
                path.write_bytes(content)
                edge = EdgeModel(path, metadata={**edge_meta, "variant": variant})
                got = edge.predict_views(views, axial=axial)
                report["tflite"][variant] = {
                    "size_bytes": path.stat().st_size,
                    "max_abs_diff": {k: max_diff(got[k], reference[k]) for k in OUTPUT_SPECS},
                    "ops": tflite_op_names(path),
                    **notes,
                }
                tflite_files[variant] = path

        # 4. Held-out ROC-AUC per runtime; the AUC gate.
        if data_dir is not None:
            say(f"held-out evaluation on {data_dir}")
            report["evaluation"] = verify.evaluate_heldout(
                data_dir, loaded, saved, tflite_files, cfg, work, floor=auc_loss_floor
            )
            verify.copy_auc_into_variants(report)
        verify.gate_variants(report, allow_degraded, floor=auc_loss_floor)

        # 5. Publish: metadata, rename the version into place, then the TFLite files that passed.

        def make_metadata(number: int) -> dict:
            meta = build_metadata(
                loaded, name=name, version=number, evaluation_metrics=evaluation_metrics, extra=extra
            )
            if report.get("evaluation") is not None:
                meta["metrics"]["export_check"] = report["evaluation"]
            return meta

        version = publish_version(staging, model_dir, version, make_metadata)
        meta = read_json(model_dir / str(version) / METADATA_FILE)
        report["version"] = version
        report["saved_model"].update(
            path=str(model_dir / str(version)), size_bytes=dir_size(model_dir / str(version))
        )
        root_meta = dict(meta)
        publish: dict[str, tuple[bytes, dict]] = {}
        for variant, path in tflite_files.items():
            info = report["tflite"][variant]
            if not info["published"]:
                say(f"TFLite {variant}: not published: {info['reason']}")
                info["size_bytes"] = path.stat().st_size
                continue
            tmeta = tflite_metadata(meta, variant, f"{name}_{variant}.tflite", QUANTIZATION[variant])
            publish[variant] = (embed_metadata(path.read_bytes(), tmeta), tmeta)
        # Every run replaces the folder's files of this model: older versions' variants go.
        targets = publish_tflite(out / "tflite", name, publish, VARIANTS)
        if tflite_files:
            root_meta["tflite"] = {}
        for variant, target in targets.items():
            report["tflite"][variant].update(path=str(target), size_bytes=target.stat().st_size)
            root_meta["tflite"][variant] = {
                "file": f"tflite/{target.name}",
                "signatures": publish[variant][1]["signatures"],
            }
        write_json_atomic(out / METADATA_FILE, root_meta)
        report["created"] = meta["created"]
        write_json_atomic(out / REPORT_FILE, report)
        say(f"exported {name} version {version} to {out}")
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


# === Command line ===


def run_export(args) -> int:
    """``lumbar-tf export``: see `export_model`."""
    report = export_model(
        args.model,
        args.out,
        name=args.name,
        version=args.version,
        tflite=parse_variants(args.tflite),
        data_dir=args.data,
        representative_size=args.representative_size,
        metrics=getattr(args, "metrics", None),
        cache_dir=getattr(args, "cache", None),
        allow_degraded=getattr(args, "allow_degraded", False),
        calibrate_on_phantoms=getattr(args, "calibrate_on_phantoms", False),
    )
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """A terminal table of the export report."""
    lines = [f"{'runtime':<22}{'size MB':>9}{'max |dp|':>11}{'AUC':>8}{'dAUC':>9}"]
    evaluation = report.get("evaluation") or {}
    sm = report["saved_model"]
    lines.append(f"{'keras':<22}{'':>9}{'':>11}{_fmt(evaluation.get('keras_macro_roc_auc')):>8}{'':>9}")
    lines.append(
        f"{'saved_model':<22}{sm['size_bytes'] / 1e6:>9.2f}{sm['max_abs_diff']['threshold_probs']:>11.2e}"
        f"{_fmt(evaluation.get('saved_model_macro_roc_auc')):>8}{'':>9}"
    )
    for variant, info in (report.get("tflite") or {}).items():
        ev = (evaluation.get("tflite") or {}).get(variant, {})
        lines.append(
            f"{'tflite ' + variant:<22}{info['size_bytes'] / 1e6:>9.2f}"
            f"{info['max_abs_diff']['threshold_probs']:>11.2e}{_fmt(ev.get('macro_roc_auc')):>8}"
            f"{_fmt(ev.get('delta_vs_keras'), signed=True):>9}"
            + ("" if info.get("published", True) else "  NOT PUBLISHED")
        )
    return "\n".join(lines)


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


__all__ = [
    "ExportError",
    "VARIANTS",
    "export_model",
    "format_report",
    "parse_variants",
    "run_export",
    "write_saved_model",
]
