"""Inference latency, throughput and size: Keras vs SavedModel vs each TFLite variant, same inputs, one run.

    .venv/bin/python benchmarks/inference.py [--run demo_out/run --export demo_out/export] [--repeats 40]

Model: the demo's trained run and export when they exist (``demo_out/run``, ``demo_out/export``);
otherwise an *untrained* end-to-end model with the CPU demo config's sizes (latency does not depend on
the weights) is built and exported into a temporary folder, int8 calibrated on phantom studies.

Inputs: preprocessed views of phantom studies (the demo's held-out studies when present), the same
arrays for every runtime. Per-study latency is one study's views -> the output contract's tensors:
  * keras: the end-to-end ``.keras`` model called eagerly (``model(views)``, what `lumbar-tf predict` does);
  * saved_model: ``serving_default`` of the SavedModel (localise -> in-graph crop -> grade);
  * tflite_<variant>: the tablet runner (`lumbar_tf.edge.EdgeModel`): ``localize`` -> numpy crops ->
    ``grade``, LiteRT with XNNPACK on all cores.
Throughput at batch 16: Keras/SavedModel take a batch of 16 studies; the TFLite runner resizes its input
tensors to 16 views (localize) and 80 crops (grade) per invoke. DICOM -> views preprocessing is timed
once, separately (it is the same numpy code for every runtime).

Writes a Markdown table to ``benchmarks/inference_results.md`` (``--md``) and prints it.

``--axial`` measures an axial model (issue 11) instead: the CPU demo sizes with ``preprocess.axial``,
untrained, exported (``--variants``), on phantom studies with Axial T2 series. Per-study latency is
then the two-call path of `runtime.predictor.predict_study` without reading the study and building
its views: ``localize`` -> `lumbar_tf.axial` projection + axial crops (numpy, decoding the chosen
axial slices) -> ``grade`` with ``ax_t2``, for Keras, the SavedModel, each TFLite variant, and gRPC
and REST clients against the in-process TF Serving stand-ins of ``tests/serving_fixtures.py``
(loopback, serialisation and the stand-in's Python, not a TF Serving binary). It writes its own
section of the Markdown file and keeps the sagittal table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from machine import cpu_facts, describe  # noqa: E402  (benchmarks/machine.py)

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "cpu_demo"  # built-in config (package data)
NAME = "lumbar_spine"
AXIAL_BEGIN, AXIAL_END = "<!-- axial-inference:begin -->", "<!-- axial-inference:end -->"


def _dir_size(path: Path) -> int:
    path = Path(path)
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def build_untrained_export(work: Path) -> tuple[Path, Path]:
    """An untrained end-to-end model at the CPU demo sizes, exported (all four TFLite variants)."""
    from lumbar_tf.core.config import load_config
    from lumbar_tf.export.job import export_model
    from lumbar_tf.models.end_to_end import build_end_to_end
    from lumbar_tf.models.networks import build_grader, build_localizer

    cfg = load_config(DEMO_CONFIG)
    p = cfg.preprocess
    model = build_end_to_end(
        build_localizer(p.view_size, cfg.model), build_grader(p.crop_size, p.view_names, cfg.model), p
    )
    model_file = work / "model" / "model.keras"
    model_file.parent.mkdir(parents=True)
    model.save(model_file)
    export = work / "export"
    export_model(model_file, export, representative_size=8, calibrate_on_phantoms=True, progress=False)
    return model_file, export


def input_views(cfg, n: int, work: Path, data_dir: Path | None) -> tuple[dict, float]:
    """Views of ``n`` phantom studies (from ``data_dir`` when given) and the median DICOM->views seconds."""
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views

    if data_dir is None or not (data_dir / "train_images").is_dir():
        from lumbar_tf.synthetic.phantom import synthesize_dataset

        data_dir = synthesize_dataset(work / "phantoms", n, seed=2024)
    studies = sorted((data_dir / "train_images").iterdir())[:n]
    views, seconds = [], []
    for study in studies:
        t = time.perf_counter()
        views.append(build_views(read_study(study), cfg)[0])
        seconds.append(time.perf_counter() - t)
    stacked = {name: np.stack([v[name] for v in views]).astype(np.float32) for name in cfg.view_names}
    return stacked, statistics.median(seconds)


def time_runtime(predict, views: dict, repeats: int, batch: int, warmup: int = 0) -> list[float]:
    """Seconds per call of ``predict`` on batches of ``batch`` studies (``warmup`` untimed calls first)."""
    n = len(next(iter(views.values())))
    out = []
    for k in range(warmup + repeats):
        start = (k * batch) % max(1, n - batch + 1)
        chunk = {name: v[start : start + batch] for name, v in views.items()}
        t = time.perf_counter()
        predict(chunk)
        if k >= warmup:
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=REPO / "demo_out" / "run")
    parser.add_argument("--export", type=Path, default=REPO / "demo_out" / "export")
    parser.add_argument("--data", type=Path, default=REPO / "demo_out" / "holdout", help="studies for inputs")
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=40, help="timed calls at batch 1")
    parser.add_argument("--batch-repeats", type=int, default=8, help="timed calls at batch 16")
    parser.add_argument("--md", type=Path, default=Path(__file__).with_name("inference_results.md"))
    parser.add_argument("--axial", action="store_true", help="an axial model, two calls per study")
    parser.add_argument("--variants", default="float32,int8", help="--axial: TFLite variants to export")
    args = parser.parse_args()
    if args.axial:
        axial_main(args)
        return

    from lumbar_tf.runtime.artifacts import resolve_model
    from lumbar_tf.runtime.keras_model import load_model
    from lumbar_tf.runtime.saved_model import SavedModelRunner
    from lumbar_tf.runtime.tflite_model import EdgeModel

    work = Path(tempfile.mkdtemp(prefix="lumbar_bench_"))
    try:
        if (args.run / "model.keras").exists() and (args.export / "saved_model").is_dir():
            model_source, export = args.run / "model.keras", args.export
            which = f"trained demo run `{args.run}` and export `{args.export}`"
        else:
            t = time.perf_counter()
            model_source, export = build_untrained_export(work)
            which = (
                "untrained end-to-end model at the CPU demo config sizes (no demo run found), "
                f"exported in {time.perf_counter() - t:.0f} s"
            )
        keras_model = load_model(model_source)
        cfg = keras_model.preprocess
        _, saved_dir = resolve_model(export)
        data = args.data if args.data.is_dir() else None
        views, prep_s = input_views(cfg, args.studies, work, data)

        runtimes = {
            "keras": (keras_model.predict_views, _dir_size(keras_model.path)),
            "saved_model": (SavedModelRunner(saved_dir).predict_views, _dir_size(saved_dir)),
        }
        for variant in ("float32", "float16", "dynamic", "int8"):
            path = export / "tflite" / f"{NAME}_{variant}.tflite"
            if path.exists():
                model = EdgeModel(path)
                runtimes[f"tflite_{variant}"] = (
                    lambda v, m=model: m.predict_views(v, batch_size=16),
                    _dir_size(path),
                )

        # Interleaved rounds: every runtime gets a share of each round, so a change in machine load
        # (other processes on the 2 cores) hits all runtimes alike and the ratios stay fair.
        rounds = 4
        timings = {key: {"b1": [], "b16": []} for key in runtimes}
        for predict, _ in runtimes.values():  # warm-up (graph tracing, tensor allocation)
            time_runtime(predict, views, 0, 1, warmup=3)
            time_runtime(predict, views, 0, 16, warmup=2)
        for _ in range(rounds):
            for key, (predict, _) in runtimes.items():
                timings[key]["b1"] += time_runtime(predict, views, max(1, args.repeats // rounds), 1)
                timings[key]["b16"] += time_runtime(predict, views, max(1, args.batch_repeats // rounds), 16)
        rows = {}
        for key, (_, size) in runtimes.items():
            b1, b16 = timings[key]["b1"], timings[key]["b16"]
            rows[key] = {
                "size_mb": size / 1e6,
                "median_ms": 1e3 * statistics.median(b1),
                "p95_ms": 1e3 * float(np.percentile(b1, 95)),
                "b1_per_s": 1.0 / statistics.median(b1),
                "b16_per_s": 16.0 / statistics.median(b16),
            }
            print(f"{key}: {rows[key]['median_ms']:.1f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows["saved_model"]["median_ms"]
    lines = [
        "# Inference benchmark: Keras vs SavedModel vs TFLite",
        "",
        f"Command: `.venv/bin/python benchmarks/inference.py` ({' '.join(sys.argv[1:]) or 'defaults'})",
        "",
        f"Machine: {describe(cpu_facts())}; {platform.system()}, Python {platform.python_version()}; "
        "TensorFlow and LiteRT (XNNPACK) on all cores; no GPU.",
        f"Model: {which}; view {cfg.view_size} px, crop {cfg.crop_size} px, "
        f"views {', '.join(cfg.view_names)}.",
        f"Inputs: the same preprocessed views of {len(next(iter(views.values())))} phantom studies for "
        f"every runtime; {args.repeats} timed calls at batch 1, {args.batch_repeats} at batch 16, in 4 "
        "interleaved rounds after warm-up. DICOM -> views preprocessing (shared numpy code, not in the "
        f"latencies): median {1e3 * prep_s:.0f} ms per study.",
        "",
        "| runtime | size (MB) | latency median (ms) | p95 (ms) | vs SavedModel | studies/s batch 1 "
        "| studies/s batch 16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r['size_mb']:.2f} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{base / r['median_ms']:.2f}x | {r['b1_per_s']:.1f} | {r['b16_per_s']:.1f} |"
        )
    lines += [
        "",
        "Latency = one study's views -> grade probabilities + level positions. TFLite = the tablet runner "
        "(`localize` signature -> numpy level crops -> `grade` signature); at batch 16 it resizes its input "
        "tensors to 16 views and 80 crops per invoke. Keras = eager `model(views)` of the end-to-end model.",
    ]
    if "tflite_int8" in rows:
        ratio = base / rows["tflite_int8"]["median_ms"]
        lines.append(
            f"\nint8 TFLite vs float32 SavedModel at batch 1: {ratio:.2f}x faster "
            f"(issue 12's floor: at least 3.5x; {'met' if ratio >= 3.5 else 'not met'} on this CPU)."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        kept = _axial_section(args.md.read_text()) if args.md.is_file() else ""
        args.md.write_text(text + (f"\n{kept}\n" if kept else ""))


def _axial_section(text: str) -> str:
    if AXIAL_BEGIN not in text or AXIAL_END not in text:
        return ""
    return text[text.index(AXIAL_BEGIN) : text.index(AXIAL_END) + len(AXIAL_END)]


# === The axial model: two calls per study ===


def build_axial_export(work: Path, variants: tuple[str, ...]) -> tuple[Path, Path]:
    """An untrained axial model at the CPU demo sizes, exported (int8 calibrated on phantoms)."""
    from lumbar_tf.core.config import load_config
    from lumbar_tf.export.job import export_model
    from lumbar_tf.models.end_to_end import build_end_to_end, grader_input_names
    from lumbar_tf.models.networks import build_grader, build_localizer

    cfg = load_config(DEMO_CONFIG, ["preprocess.axial={}"])
    p = cfg.preprocess
    names = grader_input_names(p)
    model = build_end_to_end(
        build_localizer(p.view_size, cfg.model),
        build_grader(p.crop_size, names, cfg.model, own_backbone=(p.axial.name,)),
        p,
    )
    model_file = work / "model" / "model.keras"
    model_file.parent.mkdir(parents=True)
    model.save(model_file)
    export = work / "export"
    export_model(
        model_file, export, tflite=variants, representative_size=4, calibrate_on_phantoms=True, progress=False
    )
    return model_file, export


def axial_studies(cfg, n: int, work: Path) -> list[tuple]:
    """``n`` phantom studies read and turned into views once: (study, batch, grid, info) each."""
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.preprocess import build_views
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    data_dir = synthesize_dataset(work / "phantoms", n, seed=2024)
    out = []
    for study_dir in sorted((data_dir / "train_images").iterdir())[:n]:
        study = read_study(study_dir)
        views, grid, info, _ = build_views(study, cfg)
        batch = {name: np.asarray(views[name])[None] for name in cfg.view_names}
        out.append((study, batch, grid, info))
    return out


def axial_main(args) -> None:
    sys.path.insert(0, str(REPO))  # tests/serving_fixtures.py: the in-process TF Serving stand-ins
    from lumbar_tf.runtime.keras_model import KerasPredictor
    from lumbar_tf.runtime.predictor import axial_inputs
    from lumbar_tf.runtime.saved_model import SavedModelPredictor
    from lumbar_tf.runtime.serving.grpc import GrpcClient
    from lumbar_tf.runtime.serving.predictor import ServingPredictor
    from lumbar_tf.runtime.serving.rest import RestClient
    from lumbar_tf.runtime.tflite_model import EdgeModel
    from tests.serving_fixtures import ModelRepository, grpc_server, rest_server

    variants = tuple(v for v in args.variants.split(",") if v)
    work = Path(tempfile.mkdtemp(prefix="lumbar_bench_axial_"))
    try:
        t = time.perf_counter()
        model_file, export = build_axial_export(work, variants)
        export_s = time.perf_counter() - t
        saved_dir = sorted((export / "saved_model" / NAME).iterdir())[-1]
        predictors = {"keras": KerasPredictor(model_file), "saved_model": SavedModelPredictor(saved_dir)}
        for variant in variants:
            predictors[f"tflite_{variant}"] = EdgeModel(export / "tflite" / f"{NAME}_{variant}.tflite")
        cfg = predictors["keras"].preprocess
        studies = axial_studies(cfg, args.studies, work)
        repository = ModelRepository({NAME: export / "saved_model" / NAME})
        with grpc_server({}, repository=repository) as g, rest_server({}, repository=repository) as r:
            predictors["grpc"] = ServingPredictor(GrpcClient(g.target, timeout_s=60.0, retries=1))
            predictors["rest"] = ServingPredictor(RestClient(r.base_url, timeout_s=60.0, retries=1))
            timings = {k: {"study": [], "numpy": []} for k in predictors}

            def one_study(key, predictor, item) -> None:
                study, batch, grid, info = item
                t0 = time.perf_counter()
                level_xy = predictor.localize_views(batch)
                t1 = time.perf_counter()
                _, crops = axial_inputs(predictor, study, batch, grid, info, level_xy=level_xy)
                t2 = time.perf_counter()
                predictor.predict_views(batch, axial=crops[None])
                timings[key]["study"].append(time.perf_counter() - t0)
                timings[key]["numpy"].append(t2 - t1)

            for key, predictor in predictors.items():  # warm-up: tracing, allocation, connections
                for item in studies[:2]:
                    one_study(key, predictor, item)
                timings[key] = {"study": [], "numpy": []}
            rounds = 4  # interleaved, so a change in machine load hits every runtime alike
            per_round = max(1, args.repeats // rounds)
            for _ in range(rounds):
                for key, predictor in predictors.items():
                    for k in range(per_round):
                        one_study(key, predictor, studies[k % len(studies)])
            predictors["grpc"].close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(timings["saved_model"]["study"])
    lines = [
        AXIAL_BEGIN,
        "## Axial model (issue 11): per-study latency with the third view, two calls",
        "",
        f"Command: `.venv/bin/python benchmarks/inference.py --axial` ({' '.join(sys.argv[1:])})",
        "",
        f"Machine: {describe(cpu_facts())}; load average {os.getloadavg()[0]:.1f} at the end (ratios "
        "within this run are the comparable figures).",
        f"Model: untrained end-to-end axial model at the CPU demo config sizes (view {cfg.view_size} px, "
        f"crop {cfg.crop_size} px, views {', '.join(cfg.view_names)} + {cfg.axial.name} "
        f"{cfg.axial.crop_mm:g} mm, {cfg.axial.channels} slices), exported in {export_s:.0f} s; "
        f"{len(studies)} phantom studies with Axial T2 series; {per_round * rounds} timed studies per "
        "runtime in 4 interleaved rounds after warm-up.",
        "Latency = `localize` -> numpy projection + axial crops (`lumbar_tf.axial`, decoding the chosen "
        "axial slices) -> `grade` with `ax_t2`; study reading and view building excluded (shared).",
        "",
        "| runtime | latency median (ms) | p95 (ms) | vs SavedModel | numpy projection + crop median (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, t in timings.items():
        median = statistics.median(t["study"])
        lines.append(
            f"| {key} | {1e3 * median:.1f} | {1e3 * float(np.percentile(t['study'], 95)):.1f} | "
            f"{base / median:.2f}x | {1e3 * statistics.median(t['numpy']):.1f} |"
        )
    lines += [
        "",
        "grpc / rest: `ServingPredictor` against the in-process stand-ins of `tests/serving_fixtures.py` "
        "(the SavedModel run by TensorFlow in the same machine, over loopback): two requests per study "
        "under one deadline; the figures show the client's cost of the second call, not TF Serving's.",
        AXIAL_END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.md:
        old = args.md.read_text() if args.md.is_file() else ""
        kept = _axial_section(old)
        text = old.replace(kept, section) if kept else old.rstrip("\n") + "\n\n" + section + "\n"
        args.md.write_text(text)


if __name__ == "__main__":
    main()
